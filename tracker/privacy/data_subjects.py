"""A recipient's rights, exercised from the plain address: erasure, opt-out and export.

Messages are found by the recipient key (privacy/recipients.py), so all three work whether a
campaign stored the address or only its pseudonym. What each operation changes:

- erasure removes the recipient's messages (and with them their links), their events,
  their consent record and its history (privacy/consent.py; a refusal stays in force),
  and the per-message markers of the rollups (`rollup_message`, `rollup_message_link`,
  `relabel_triggers`), and redacts the account's stored destinations that still name
  the address (privacy/link_redaction.py; registration stores none). The campaign
  totals, unique counts, timeline and breakdown stay: they are anonymous counts, and a
  report keeps its numbers, including the campaign's message count. The recipient key
  is kept as suppressed up to the last message id handed out, so hits on the old links
  still redirect but record nothing; mail registered for the address afterwards is
  tracked again.
- opt-out keeps nothing from being recorded for the address, in every campaign of the
  account, now and for future messages, until it is withdrawn. Nothing is deleted.
- export returns everything stored about the address.

An erasure races with hits in flight: before it deletes anything, every worker of the
server stops recording the recipient and writes out what it captured before
(privacy/sync.py), so that is deleted too. What no worker of the server could write out
by then (a wedged one, another node's, a journal replayed after an outage) is swept:
shortly after the erasure in the worker that ran it, and by the hourly job (privacy/jobs.py) for
`SWEEP_DAYS`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from tracker.ingest.suppression import SuppressionBook
from tracker.privacy import consent
from tracker.privacy.link_redaction import Redactor
from tracker.privacy.recipients import (
    Recipient,
    account_secret,
    identify,
    is_recipient,
    normalize,
    run_block,
)
from tracker.store.labels import decode_metadata
from tracker.store.queries import QUERIES

SWEEP_DAYS = 30


@dataclass(frozen=True)
class Erased:
    messages: int
    events: int
    links: int
    message_ids: tuple[int, ...] = ()
    recipient_key: int = 0
    through: int = 0  # hits on messages with ids up to this record nothing

    def as_json(self) -> dict[str, int]:
        return {"messages": self.messages, "events": self.events, "links": self.links}


async def erase(pool: asyncpg.Pool, account_id: int, address: str,
                book: SuppressionBook | None = None,
                flush: Callable[[], Awaitable[object]] | None = None) -> Erased:
    """Erase a recipient in an account. `book`: this process's suppression book, told
    first; `flush`: has every worker stop recording the recipient and write out what it
    captured before (Runtime.privacy_changed), before anything is deleted."""
    async with pool.acquire() as conn:
        recipient = identify(await account_secret(conn, account_id), address)
        state = await conn.fetchrow(QUERIES.mark_erased, account_id, recipient.key)
        through: int = state["erased_through"]
        if book is not None:
            # Before anything is deleted: from here on this process records nothing of it.
            book.put_recipient(account_id, recipient.key, state["opted_out"], through)
        if flush is not None:
            await flush()  # what the workers captured before is in the table now, or raises
        await consent.erase(conn, account_id, recipient.key)
        return await _erase(conn, account_id, recipient.key, through,
                            lambda stored: is_recipient(stored, address, recipient),
                            normalize(address), redactor=Redactor(address))


async def sweep(conn: asyncpg.Connection, account_id: int, recipient_key: int, through: int,
                message_ids: list[int]) -> Erased:
    """Erase again what arrived after an erasure: events of its messages written late, and
    messages of the recipient whose registration committed after it."""
    erased = await _erase(conn, account_id, recipient_key, through, None, "", message_ids,
                          record=False)
    await conn.execute(QUERIES.mark_swept, account_id, recipient_key, through)
    return erased


async def sweep_recent(conn: asyncpg.Connection, now: datetime) -> int:
    """Sweep every erasure of the last `SWEEP_DAYS`, and forget older ones. Returns the
    number of events and messages swept."""
    since = now - timedelta(days=SWEEP_DAYS)
    swept = 0
    for row in await conn.fetch(QUERIES.recent_erasures, since):
        erased = await sweep(conn, row["account_id"], row["recipient_key"],
                             row["erased_through"], list(row["message_ids"]))
        swept += erased.events + erased.messages
    await conn.execute(QUERIES.forget_old_erasures, since)
    return swept


async def _erase(conn: asyncpg.Connection, account_id: int, recipient_key: int, through: int,
                 match: Callable[[str], bool] | None, normalized: str,
                 known_ids: list[int] | None = None, *, record: bool = True,
                 redactor: Redactor | None = None) -> Erased:
    async with conn.transaction():
        if redactor is not None:
            await _redact_destinations(conn, account_id, redactor)
        rows = await conn.fetch(QUERIES.recipient_messages, account_id, recipient_key,
                                normalized, through)
        found = [r for r in rows if match is None or match(r["recipient"])]
        ids = sorted({r["id"] for r in found} | set(known_ids or ()))
        if not ids:
            return Erased(0, 0, 0, (), recipient_key, through)
        events = _count(await conn.execute(QUERIES.erase_events, account_id, ids))
        for statement in (QUERIES.erase_message_rollups,
                          QUERIES.erase_message_link_rollups,
                          QUERIES.erase_relabel_triggers):
            await conn.execute(statement, account_id, ids)
        links = await conn.fetchval(QUERIES.count_links, account_id, ids)
        campaigns = [r["campaign_id"] for r in await conn.fetch(QUERIES.erase_messages,
                                                                 account_id, ids)]
        if campaigns:
            await conn.execute(QUERIES.keep_message_counts, account_id, campaigns)
        if record:
            await conn.execute(QUERIES.record_erasure, account_id, recipient_key,
                               through, ids)
    return Erased(len(campaigns), events, links, tuple(ids), recipient_key, through)


async def _redact_destinations(conn: asyncpg.Connection, account_id: int,
                               redactor: Redactor) -> int:
    """Replace the address in every stored destination of the account that names it; a
    destination whose redacted form its campaign has already is merged into that one (its
    links, events and link rollups move there). Returns how many were redacted."""
    pattern = redactor.like_pattern()
    if pattern == "%%":
        return 0  # an address without a letter or digit: nothing to find it by
    redacted = 0
    for row in await conn.fetch(QUERIES.destinations_like, account_id, pattern):
        if not redactor.names(row["url"]):
            continue
        url_id, campaign_id = row["id"], row["campaign_id"]
        text = redactor.redact(row["url"])
        if await conn.fetchval(QUERIES.redact_destination, account_id, url_id, text,
                               campaign_id) is None:
            (target,) = await conn.fetch(QUERIES.find_urls, account_id, campaign_id, [text])
            await conn.execute(QUERIES.merge_destination, account_id, url_id,
                               target["id"], campaign_id)
            await run_block(conn, QUERIES.delete_destination, account_id, url_id)
        redacted += 1
    return redacted


def _count(status: str) -> int:
    return int(status.split()[-1])  # "DELETE 12"


async def opt_out(pool: asyncpg.Pool, account_id: int, address: str,
                  book: SuppressionBook | None = None) -> dict[str, Any]:
    return await _set_opt_out(pool, account_id, address, book, QUERIES.opt_out)


async def withdraw_opt_out(pool: asyncpg.Pool, account_id: int, address: str,
                           book: SuppressionBook | None = None) -> dict[str, Any]:
    return await _set_opt_out(pool, account_id, address, book, QUERIES.opt_in)


async def _set_opt_out(pool: asyncpg.Pool, account_id: int, address: str,
                       book: SuppressionBook | None, query: str) -> dict[str, Any]:
    async with pool.acquire() as conn:
        recipient = identify(await account_secret(conn, account_id), address)
        state = await conn.fetchrow(query, account_id, recipient.key)
    if state is not None and book is not None:
        book.put_recipient(account_id, recipient.key, state["opted_out"], state["erased_through"])
    return _tracking(state)


async def tracking_state(conn: asyncpg.Connection | asyncpg.Pool, account_id: int,
                         address: str) -> dict[str, Any]:
    recipient = identify(await account_secret(conn, account_id), address)
    return _tracking(await conn.fetchrow(QUERIES.suppression_state, account_id,
                                         recipient.key))


def _tracking(state: asyncpg.Record | None) -> dict[str, Any]:
    return {"opted_out": bool(state and state["opted_out"]),
            "opted_out_at": _iso(state["opted_out_at"]) if state else None,
            "erased_at": _iso(state["erased_at"]) if state else None}


async def export(conn: asyncpg.Connection, account_id: int, address: str) -> dict[str, Any]:
    """Everything stored about the address in the account, as a JSON-ready dict."""
    recipient = identify(await account_secret(conn, account_id), address)
    rows = [r for r in await conn.fetch(QUERIES.export_recipient_messages, account_id,
                                        recipient.key, normalize(address))
            if is_recipient(r["recipient"], address, recipient)]
    ids = [r["id"] for r in rows]
    links: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    events: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    if ids:
        for link in await conn.fetch(QUERIES.export_recipient_links, account_id, ids):
            links[link["message_id"]].append({
                "position": link["position"], "url": link["url"],
                "human_clicks": link["human_clicks"] or 0,
                "first_clicked_in": _iso(link["clicked_in"])})
        for e in await conn.fetch(QUERIES.export_recipient_events, account_id, ids):
            events[e["message_id"]].append({
                "id": str(e["id"]), "type": e["type"], "at": _iso(e["occurred_at"]),
                "url": e["url"], "link_position": e["link_position"], "machine": e["machine"],
                "reason": e["reason"], "country": e["country"], "region": e["region"],
                "city": e["city"], "browser": e["browser"], "os": e["os"],
                "device": e["device"], "client": e["client"], "ip": e["ip"]})
    state = await conn.fetchrow(QUERIES.suppression_state, account_id, recipient.key)
    return {
        "address": address,
        "generated_at": _iso(datetime.now(UTC)),
        "tracking": {**_tracking(state),
                     "consent_refused": await consent.refusals(conn, account_id,
                                                               recipient.key)},
        "consent": await consent.export(conn, account_id, recipient.key),
        "messages": [{
            "id": str(r["id"]),
            "campaign": {"id": str(r["campaign_id"]), "name": r["campaign_name"],
                         "deleted_at": _iso(r["campaign_deleted_at"])},
            "recipient": r["recipient"],
            "recipient_stored_as": _stored_as(r["recipient"], recipient),
            "subject": r["subject"],
            "tags": list(r["tags"]),
            "metadata": decode_metadata(r["metadata"]),
            "sent_at": _iso(r["sent_at"]),
            "registered_at": _iso(r["created_at"]),
            "links": links[r["id"]],
            "events": events[r["id"]],
            # Whether it went out with a tracking image / tracked links (not without the
            # consent its campaign required, nor after an opt-out).
            "opens_tracked": r["opens_tracked"],
            "clicks_tracked": r["clicks_tracked"],
            "human_opens": r["human_opens"] or 0,
            "human_clicks": r["human_clicks"] or 0,
            # Opens and clicks by machines (prefetches, link scanners, bots), counted apart.
            "machine_opens": r["machine_opens"] or 0,
            "machine_clicks": r["machine_clicks"] or 0,
            # Apple Mail Privacy Protection's prefetches of it (kept, for the estimate of
            # the opens MPP hides).
            "mpp_prefetches": r["mpp_prefetches"] or 0,
            # Kept after retention, with the counts: the 15-minute slot of the first human
            # open or click (a click proves the open), the hour of the first human click.
            "first_opened_in": _iso(r["opened_in"]),
            "first_clicked_in": _iso(r["clicked_in"]),
        } for r in rows],
        "never_stored": ["the message body", "the user agent string", "cookies",
                         "the IP address, unless the campaign's policy keeps it (see each "
                         "event's ip)"],
    }


def _stored_as(stored: str, recipient: Recipient) -> str:
    return "pseudonym" if stored == recipient.pseudonym else "address"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
