"""What is deleted when: expired events (retention) and deleted campaigns and accounts
after their grace period (purge). Both run from privacy/jobs.py, hourly in the server and on
demand with `tracker retention run`; both take `now` so tests control the clock.

Retention. A campaign keeps its raw events for its policy's `retention_days`, else its
account's default, else for ever. Events live in one partition per UTC day
(`events_YYYYMMDD`), so for each day old enough to hold something expired:

- when every campaign with events in that day has expired it entirely, the partition is
  dropped: no row is deleted, no dead tuple is left for vacuum;
- otherwise only the expired campaigns' rows in that partition are deleted, campaign by
  campaign, in batches of `BATCH_ROWS` (by the partition's (account, campaign, time)
  index): never a delete over the whole table, never an unbounded one.

The campaigns present in a partition come from a skip scan of that index (one probe per
campaign, not a read of the partition). Reports read only the rollups (store/rollups.py),
which retention leaves alone: a report after retention shows the totals it showed
before. The re-label windows of expired clicks (`relabel_triggers`) go with them, and so do
the outbox's re-labels that name no event left (sql/webhooks.sql, forget-event-log).

Purge. Deleting a campaign or an account stops its recording at once; `GRACE` later
its data is removed: events (partition by partition, in batches, as above), messages,
links, urls, rollups. The purge first claims the row (`purged_at`; from then on it
cannot be restored) and marks it finished at the end, so a purge cut short resumes at
the next run. The campaign or account row stays as a tombstone, so its old links keep
redirecting and recording nothing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import asyncpg

from tracker.privacy.recipients import run_block
from tracker.store.queries import QUERIES, for_table

log = logging.getLogger("tracker.privacy.retention")

GRACE = timedelta(days=30)
BATCH_ROWS = 20_000
_DAY = timedelta(days=1)
_PARTITION = re.compile(r"^events_(\d{4})(\d{2})(\d{2})$")


@dataclass
class RetentionResult:
    partitions_dropped: list[str] = field(default_factory=list)
    rows_deleted: int = 0
    # (partition, account id, campaign id) whose expired rows were deleted
    trimmed: list[tuple[str, int, int]] = field(default_factory=list)


@dataclass
class PurgeResult:
    campaigns: list[tuple[int, int]] = field(default_factory=list)  # (account id, campaign id)
    accounts: list[int] = field(default_factory=list)
    events_deleted: int = 0


@dataclass(frozen=True)
class Partition:
    name: str
    day: date

    @property
    def start(self) -> datetime:
        return datetime(self.day.year, self.day.month, self.day.day, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        return self.start + _DAY


async def partitions(conn: asyncpg.Connection) -> list[Partition]:
    found = []
    for row in await conn.fetch(QUERIES.event_partitions):
        match = _PARTITION.match(row["name"])
        if match:  # anything else attached to `events` is not ours to touch
            found.append(Partition(row["name"], date(*map(int, match.groups()))))
    return sorted(found, key=lambda p: p.day)


async def campaigns_in(conn: asyncpg.Connection, partition: Partition) -> list[tuple[int, int]]:
    """The (account, campaign) pairs with events in the partition: a skip scan of its
    (account_id, campaign_id) index, one probe per pair."""
    rows = await conn.fetch(for_table(QUERIES.partition_campaigns, partition.name))
    return [(r["account_id"], r["campaign_id"]) for r in rows]


async def delete_in_batches(conn: asyncpg.Connection, partition: Partition, account_id: int,
                            campaign_id: int | None = None,
                            before: datetime | None = None) -> int:
    """Delete an account's (or one campaign's) rows from one partition, older than `before`
    if given, `BATCH_ROWS` at a time, each batch its own transaction. Returns rows deleted."""
    statement = for_table(QUERIES.delete_partition_batch, partition.name)
    total = 0
    while True:
        status = await conn.execute(statement, account_id, campaign_id, before, BATCH_ROWS)
        deleted = int(status.split()[-1])
        total += deleted
        if deleted < BATCH_ROWS:
            return total


async def enforce_retention(conn: asyncpg.Connection, now: datetime) -> RetentionResult:
    """Remove every event older than its campaign's retention at `now`."""
    result = RetentionResult()
    days = {(r["account_id"], r["id"]): r["days"]
            for r in await conn.fetch(QUERIES.campaign_retention)}
    shortest = min((d for d in days.values() if d is not None), default=None)
    if shortest is None:
        return result  # nothing ever expires
    for partition in await partitions(conn):
        if partition.start >= now - timedelta(days=shortest):
            break  # this day and every later one hold nothing old enough to expire
        present = await campaigns_in(conn, partition)
        # Per campaign: the cutoff before which its events have expired, if any has.
        cutoffs: dict[tuple[int, int], datetime] = {}
        whole = True
        for pair in present:
            keep = days.get(pair)
            cutoff = now - timedelta(days=keep) if keep is not None else None
            if cutoff is None or cutoff < partition.end:
                whole = False
            if cutoff is not None and cutoff > partition.start:
                cutoffs[pair] = cutoff
        if whole and await _drop(conn, partition):
            result.partitions_dropped.append(partition.name)
            continue
        for (account_id, campaign_id), cutoff in cutoffs.items():
            before = cutoff if cutoff < partition.end else None
            deleted = await delete_in_batches(conn, partition, account_id, campaign_id, before)
            await conn.execute(QUERIES.expired_relabel_triggers, account_id,
                               campaign_id, min(cutoff, partition.end), partition.start)
            if deleted:
                result.rows_deleted += deleted
                result.trimmed.append((partition.name, account_id, campaign_id))
        if any(name == partition.name for name, _, _ in result.trimmed):
            await conn.execute(QUERIES.forget_event_log, partition.start)
    if result.partitions_dropped or result.rows_deleted:
        log.info("retention: dropped %d partition(s), deleted %d expired event(s)",
                 len(result.partitions_dropped), result.rows_deleted)
    return result


async def _drop(conn: asyncpg.Connection, partition: Partition) -> bool:
    """Drop a partition whose every event has expired (and its re-label windows)."""
    try:
        async with conn.transaction():
            await conn.execute(for_table(QUERIES.drop_event_partition, partition.name))
            await conn.execute(QUERIES.forget_partition_relabel_triggers, partition.start,
                               partition.end)
            await conn.execute(QUERIES.forget_event_log, partition.start)
    except asyncpg.LockNotAvailableError:
        log.warning("retention: %s is busy; deleting its rows instead of dropping it",
                    partition.name)
        return False
    return True


@dataclass(frozen=True)
class InGrace:
    """A deleted campaign or account that is still in its grace period."""

    account_id: int
    campaign_id: int | None  # None: the account itself
    name: str
    deleted_at: datetime

    def describe(self) -> str:
        what = (f"account {self.account_id}" if self.campaign_id is None
                else f"campaign {self.campaign_id} of account {self.account_id}")
        whole = "" if self.campaign_id is not None else ", with all its campaigns"
        return f"{what} ({self.name!r}, deleted {self.deleted_at.isoformat()}{whole})"

    def as_json(self) -> dict[str, object]:
        return {"account_id": str(self.account_id),
                "campaign_id": None if self.campaign_id is None else str(self.campaign_id),
                "name": self.name, "deleted_at": self.deleted_at.isoformat()}


async def still_in_grace(conn: asyncpg.Connection, real_now: datetime,
                         now: datetime) -> list[InGrace]:
    """What a purge as of `now` would take that is still in its grace period at `real_now`:
    nothing unless `now` is later (`tracker retention run --now` in the future)."""
    if now <= real_now:
        return []
    rows = await conn.fetch(QUERIES.deleted_in_grace, real_now - GRACE, now - GRACE)
    return [InGrace(r["account_id"], r["campaign_id"], r["name"], r["deleted_at"])
            for r in rows]


async def purge_deleted(conn: asyncpg.Connection, now: datetime) -> PurgeResult:
    """Purge the campaigns and accounts deleted more than `GRACE` before `now`."""
    result = PurgeResult()
    cutoff = now - GRACE
    for row in await conn.fetch(QUERIES.accounts_to_purge, cutoff):
        account_id = row["id"]
        if await conn.fetchval(QUERIES.claim_account_purge, account_id, cutoff) is None:
            continue  # restored in the meantime
        for campaign in await conn.fetch(QUERIES.claim_account_campaigns, account_id):
            result.events_deleted += await _purge_campaign(conn, account_id, campaign["id"])
        # Events of campaigns this database has no row for (there should be none).
        for partition in await partitions(conn):
            result.events_deleted += await delete_in_batches(conn, partition, account_id)
        async with conn.transaction():
            await run_block(conn, QUERIES.purge_account_data, account_id)
            await conn.execute(QUERIES.finish_account_purge, account_id)
        result.accounts.append(account_id)
    for row in await conn.fetch(QUERIES.campaigns_to_purge, cutoff):
        account_id, campaign_id = row["account_id"], row["id"]
        if await conn.fetchval(QUERIES.claim_campaign_purge, account_id, campaign_id,
                               cutoff) is None:
            continue  # restored in the meantime
        result.events_deleted += await _purge_campaign(conn, account_id, campaign_id)
        result.campaigns.append((account_id, campaign_id))
    if result.campaigns or result.accounts:
        log.info("purge: %d campaign(s) and %d account(s) past their grace period, "
                 "%d event(s) deleted", len(result.campaigns), len(result.accounts),
                 result.events_deleted)
    return result


async def _purge_campaign(conn: asyncpg.Connection, account_id: int, campaign_id: int) -> int:
    """Everything of a claimed campaign; safe to run again after an interruption."""
    deleted = 0
    for partition in await partitions(conn):
        deleted += await delete_in_batches(conn, partition, account_id, campaign_id)
    async with conn.transaction():
        await run_block(conn, QUERIES.purge_campaign_data, account_id, campaign_id)
        await conn.execute(QUERIES.finish_campaign_purge, account_id, campaign_id)
    return deleted
