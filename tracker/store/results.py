"""Recipient results: the messages of a campaign with their readers' counts, filtered by
what happened to them (opened, clicked, a link clicked, not opened, machine only), by tag,
by when they were sent, by mail client or country, and by recipient. Read side, no HTTP.

Counts come from the per-message rollups (`rollup_message`, `rollup_message_link`), kept
by the writer in the transaction that stores the events, so they survive retention: a
message's opens, clicks and machine hits stay when its events are deleted. The mail
client and the country are only in the stored events: a filter on them matches a
message while its events are kept, and no longer once retention has deleted them.

Messages are listed in the order they were registered (id); a page ends with the last
id, and the next page starts after it, so messages registered meanwhile never shift a
page: they come at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from tracker.store.queries import QUERIES

STATUSES = ("opened", "clicked", "not_opened", "machine_only", "untracked")
COLUMNS = ("id", "recipient", "subject", "sent_at", "opens", "clicks", "machine")


@dataclass(frozen=True)
class Selection:
    """Which of a campaign's messages a list or a report covers: those with `tag`, sent at
    or after `since` and before `until` (None: any)."""
    tag: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @property
    def everything(self) -> bool:
        return self.tag is None and self.since is None and self.until is None

    def args(self) -> tuple[str | None, datetime | None, datetime | None]:
        return self.tag, self.since, self.until


@dataclass(frozen=True)
class MessageFilter:
    selection: Selection = Selection()
    status: str | None = None  # one of STATUSES
    url_id: int | None = None  # the reader clicked this destination
    client: str | None = None  # a reader's stored event has this mail client
    country: str | None = None  # ... this country
    recipient_key: int | None = None  # the address searched for (privacy/recipients.py)
    recipient_pattern: str | None = None  # an ILIKE pattern of the stored recipient

    def args(self, account_id: int, campaign_id: int, after: int | None,
             limit: int | None) -> tuple[Any, ...]:
        return (account_id, campaign_id, *self.selection.args(), self.status, self.url_id,
                self.client, self.country, self.recipient_key, self.recipient_pattern, after,
                limit)


async def list_messages(conn: asyncpg.Connection | asyncpg.Pool, account_id: int,
                        campaign_id: int, found: MessageFilter, after: int | None,
                        limit: int) -> tuple[list[dict[str, Any]], int | None]:
    """A page of messages, and the last id on it when more may follow (None: the end)."""
    rows = await conn.fetch(QUERIES.list_messages,
                            *found.args(account_id, campaign_id, after, limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    return [message_json(r) for r in rows], rows[-1]["id"] if more else None


def message_json(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": str(row["id"]), "recipient": row["recipient"], "subject": row["subject"],
            "sent_at": row["sent_at"].isoformat(), "opens": row["opens"],
            "clicks": row["clicks"], "machine": row["machine"]}


def search_pattern(text: str) -> str:
    """An ILIKE pattern matching `text` anywhere, its own % and _ taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"
