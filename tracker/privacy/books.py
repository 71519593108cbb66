"""What the hit path's in-memory books know, read from PostgreSQL: the campaigns'
policies (ingest/policy.py) and who must not be recorded (ingest/suppression.py).

A book is read whole at start and then only the rows changed since the last read; the
queries re-read a few seconds before that, so a transaction that committed late is not
missed. While the database is down the books keep what they have.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from tracker.ingest.policy import PolicyBook
from tracker.ingest.suppression import AccountState, SuppressionBook
from tracker.store.campaigns import policy_of
from tracker.store.queries import QUERIES

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def read_policies(book: PolicyBook, conn: asyncpg.Connection | asyncpg.Pool) -> None:
    """The policies of the campaigns changed since the last read."""
    rows = await conn.fetch(QUERIES.campaign_policies_since, book.loaded_until or _EPOCH)
    for row in rows:
        book.put(row["account_id"], row["id"], policy_of(row), row["deleted_at"] is None)
        if book.loaded_until is None or row["updated_at"] > book.loaded_until:
            book.loaded_until = row["updated_at"]


async def read_suppressions(book: SuppressionBook, conn: asyncpg.Connection | asyncpg.Pool) -> bool:
    """The accounts' exceptions, and the recipients changed since the last read; True if
    they hold an erasure the book did not know (made by another node: what this worker
    captured of the recipient must be written out, to be swept)."""
    # Accounts: the few exceptions, read whole, so a restored account leaves the book.
    rows = await conn.fetch(QUERIES.account_exceptions)
    book.set_accounts({r["id"]: AccountState(r["disabled"], r["honour_privacy_signals"])
                       for r in rows})
    rows = await conn.fetch(QUERIES.suppressions_since, book.loaded_until)
    erased = False
    for r in rows:
        erased |= book.put_recipient(r["account_id"], r["recipient_key"], r["opted_out"],
                                     r["erased_through"], (r["consent_refused_opens"],
                                                           r["consent_refused_clicks"]))
        if book.loaded_until is None or r["changed_at"] > book.loaded_until:
            book.loaded_until = r["changed_at"]
    return erased
