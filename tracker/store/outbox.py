"""The outbox: reading what the writer stored for delivery, and the delivery queues.

The log is the stored events themselves, each with the id of the transaction that stored
it (`events.xid`), and the re-labels the writer records in `event_log` in the transaction
that makes them (sql/writer.sql, sql/0020_event_order.sql), so what is sent is exactly
what was stored. Rows are read in commit order, (xid, id), both tables merged: a row is
taken only once every transaction older than it has ended (sql/webhooks.sql,
stream-events), so a cursor never passes a row that commits later. The pull stream
(`GET /api/events`) and the webhook queues read the log the same way; a webhook replay
reads `events` by time instead.

An event's fields are read when it is sent: an event erased or expired meanwhile is not
sent, nor is one of a recipient who has opted out since.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from tracker.store.queries import QUERIES

_ZERO = uuid.UUID(int=0)
_CURSOR = re.compile(r"^(\d{1,19})\.([0-9a-f]{32})$")
ALL_TYPES = ["open", "click", "relabel"]


class BadCursor(ValueError):
    pass


@dataclass(frozen=True)
class Position:
    """Where a reader of the log stands: after the row (xid, id)."""

    xid: int
    id: uuid.UUID

    def encode(self) -> str:
        return f"{self.xid}.{self.id.hex}"

    @classmethod
    def decode(cls, text: str) -> Position:
        match = _CURSOR.match(text)
        if match is None or int(match[1]) >= 2**63:
            raise BadCursor("not a cursor this server gave")
        return cls(int(match[1]), uuid.UUID(match[2]))


START = Position(0, _ZERO)


@dataclass(frozen=True)
class Filter:
    """Which rows a reader wants: its lane (of `lanes`, by message), types, campaign,
    and whether events a rule judged machine."""

    types: list[str]
    campaign_id: int | None = None
    machine: bool = True
    lanes: int = 1
    lane: int = 0


EVERYTHING = Filter(ALL_TYPES)


@dataclass
class Page:
    events: list[dict[str, Any]]
    scanned: int
    last: asyncpg.Record | None  # the last row read, sent or not: where the cursor goes


async def stream(conn: asyncpg.Connection | asyncpg.Pool, account_id: int, after: Position,
                 limit: int, wanted: Filter = EVERYTHING) -> Page:
    """The next `limit` rows of the account's log after `after`, and the events among
    them that `wanted` takes."""
    rows = await conn.fetch(QUERIES.stream_events, account_id, after.xid, after.id, limit,
                            wanted.lanes, wanted.lane, wanted.types, wanted.campaign_id,
                            wanted.machine)
    return _page(rows)


async def replay(conn: asyncpg.Connection | asyncpg.Pool, account_id: int,
                 after: tuple[datetime, uuid.UUID], until: datetime, limit: int,
                 wanted: Filter) -> Page:
    """The next `limit` events stored for times before `until`, after (time, id)."""
    rows = await conn.fetch(QUERIES.replay_events, account_id, after[0], after[1], limit,
                            until, [t for t in wanted.types if t != "relabel"],
                            wanted.campaign_id, wanted.machine)
    return _page(rows)


def _page(rows: list[asyncpg.Record]) -> Page:
    return Page([event_json(r) for r in rows if r["send"]], len(rows),
                rows[-1] if rows else None)


def event_json(row: asyncpg.Record) -> dict[str, Any]:
    """An event as webhooks and the pull stream give it: the API's event (README) with its
    id, message and campaign; a re-label names the events it made machine."""
    base = {"id": str(row["id"]), "type": row["type"], "message_id": str(row["message_id"]),
            "campaign_id": str(row["campaign_id"]), "at": row["occurred_at"].isoformat()}
    if row["type"] == "relabel":
        return {**base, "machine": True, "reason": row["reason"],
                "events": [str(i) for i in row["relabelled"] or ()]}
    return {**base, "url": row["url"], "country": row["country"], "region": row["region"],
            "city": row["city"], "browser": row["browser"], "os": row["os"],
            "device": row["device"], "client": row["client"], "machine": row["machine"],
            "reason": row["reason"]}


@dataclass
class Lease:
    """A delivery queue leased by this worker, with its endpoint's settings."""

    account_id: int
    endpoint_id: int
    queue_id: int
    token: int
    replay: bool
    after_xid: int | None
    after_at: datetime | None
    after_id: uuid.UUID
    until: datetime | None
    attempts: int
    failing_since: datetime | None
    url: str
    wanted: Filter
    secrets: list[str]

    @classmethod
    def of(cls, row: asyncpg.Record) -> Lease:
        secrets = [row["secret"]]
        if row["previous_secret"]:
            secrets.append(row["previous_secret"])
        return cls(row["account_id"], row["endpoint_id"], row["id"], row["lease"],
                   row["replay"], row["after_xid"], row["after_at"], row["after_id"],
                   row["until"], row["attempts"], row["failing_since"], row["url"],
                   Filter(list(row["events"]), row["campaign_id"], row["machine"],
                          1 if row["replay"] else row["concurrency"], row["lane"]),
                   secrets)

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.account_id, self.endpoint_id, self.queue_id)

    async def read(self, conn: asyncpg.Connection | asyncpg.Pool, limit: int) -> Page:
        if self.replay:
            assert self.after_at is not None and self.until is not None
            return await replay(conn, self.account_id, (self.after_at, self.after_id),
                                self.until, limit, self.wanted)
        assert self.after_xid is not None
        return await stream(conn, self.account_id, Position(self.after_xid, self.after_id),
                            limit, self.wanted)

    def move_past(self, row: asyncpg.Record) -> None:
        if self.replay:
            self.after_at = row["occurred_at"]
        else:
            self.after_xid = int(row["xid"])
        self.after_id = row["id"]


async def lease(conn: asyncpg.Pool, limit: int, seconds: float) -> list[Lease]:
    return [Lease.of(r) for r in await conn.fetch(QUERIES.lease_webhook_queues, limit,
                                                   seconds)]


async def advance(conn: asyncpg.Pool, lease: Lease, *, keep: bool, next_in_s: float,
                  delivered: int, waiting: bool) -> bool:
    """Record the cursor after a delivery; False if the lease was lost meanwhile."""
    done: int = await conn.fetchval(
        QUERIES.advance_webhook_queue, *lease.key, lease.token,
        None if lease.replay else lease.after_xid, lease.after_at if lease.replay else None,
        lease.after_id, keep, next_in_s, delivered, waiting)
    return done > 0


async def fail(conn: asyncpg.Pool, lease: Lease, retry_in_s: float,
               error: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        QUERIES.fail_webhook_queue, *lease.key, lease.token, retry_in_s, error)
    return row


async def release(conn: asyncpg.Pool, lease: Lease) -> None:
    await conn.execute(QUERIES.release_webhook_queue, *lease.key, lease.token)


async def finish_replay(conn: asyncpg.Pool, lease: Lease) -> None:
    await conn.execute(QUERIES.finish_webhook_replay, *lease.key, lease.token)
