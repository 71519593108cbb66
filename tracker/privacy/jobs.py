"""A worker's background privacy maintenance, and the run shared with the CLI.

Maintenance — retention, the grace-period purge and the erasure sweep (privacy/retention.py,
privacy/data_subjects.py) — runs hourly in every worker, but in one process at a time across all
workers and nodes: each run takes a PostgreSQL advisory lock with `pg_try_advisory_lock` and skips
the round when another process holds it. `tracker retention run` is the same run, on
demand. Every entry point takes `now`, so tests drive the clock instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from tracker.privacy import data_subjects
from tracker.privacy.retention import PurgeResult, RetentionResult, enforce_retention, purge_deleted
from tracker.store.queries import QUERIES

log = logging.getLogger("tracker.privacy.jobs")

MAINTENANCE_INTERVAL_S = 3600.0
# The first run waits this long after start: start-up (and a restart loop) stays cheap.
FIRST_RUN_S = 120.0
# An erasure's follow-up sweep, for what no worker of this server could write out before
# it answered: other nodes' workers (they read changes every second, privacy/sync.py) and
# a wedged worker, with margin for their writers' flush interval (200 ms by default).
SWEEP_AFTER_S = 5.0
# Any constant will do; it only has to be the same in every tracker process.
_MAINTENANCE_LOCK = 0x7472_6163_6B70_7276


@dataclass
class Maintenance:
    retention: RetentionResult
    purge: PurgeResult
    swept: int

    def as_json(self) -> dict[str, object]:
        return {
            "partitions_dropped": self.retention.partitions_dropped,
            "expired_events_deleted": self.retention.rows_deleted,
            "campaigns_purged": [str(c) for _, c in self.purge.campaigns],
            "accounts_purged": [str(a) for a in self.purge.accounts],
            "purged_events_deleted": self.purge.events_deleted,
            "erasure_sweep": self.swept,
        }


async def maintain(conn: asyncpg.Connection, now: datetime,
                   purge_at: datetime | None = None) -> Maintenance | None:
    """One maintenance run, unless another process is running one (None). `purge_at`: the
    time the grace periods are measured at, when not `now` (the CLI keeps it at the real
    time unless told to purge within the grace period)."""
    if not await conn.fetchval(QUERIES.try_advisory_lock, _MAINTENANCE_LOCK):
        return None
    try:
        await conn.execute(QUERIES.forget_expired_sign_outs, now)
        return Maintenance(await enforce_retention(conn, now),
                           await purge_deleted(conn, now if purge_at is None else purge_at),
                           await data_subjects.sweep_recent(conn, now))
    finally:
        await conn.execute(QUERIES.advisory_unlock, _MAINTENANCE_LOCK)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Jobs:
    def __init__(self, pool: asyncpg.Pool, *, interval_s: float = MAINTENANCE_INTERVAL_S,
                 first_run_s: float = FIRST_RUN_S,
                 clock: Callable[[], datetime] = _utc_now) -> None:
        self._pool = pool
        self._interval_s = interval_s
        self._first_run_s = first_run_s
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self.runs = 0  # maintenance runs this process did (tests, metrics)

    def start(self) -> None:
        self._spawn(self._maintain_forever(), "tracker-maintenance")

    async def stop(self) -> None:
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def sweep_later(self, account_id: int, recipient_key: int, through: int,
                    message_ids: list[int], delay_s: float = SWEEP_AFTER_S) -> None:
        """After an erasure: erase again, once every worker has stopped recording the
        recipient, whatever they had captured before (the hourly run sweeps too)."""
        async def run() -> None:
            await asyncio.sleep(delay_s)
            try:
                async with self._pool.acquire() as conn:
                    erased = await data_subjects.sweep(conn, account_id, recipient_key, through,
                                                  message_ids)
                if erased.events or erased.messages:
                    log.info("erasure sweep removed %d late event(s) and %d message(s)",
                             erased.events, erased.messages)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("erasure sweep failed (the hourly run retries): %s", exc)
        self._spawn(run(), "tracker-erasure-sweep")

    async def run_once(self) -> Maintenance | None:
        async with self._pool.acquire() as conn:
            result = await maintain(conn, self._clock())
        if result is not None:
            self.runs += 1
        return result

    def _spawn(self, work: Coroutine[object, object, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._tasks.discard(done))

    async def _maintain_forever(self) -> None:
        await asyncio.sleep(self._first_run_s)
        while True:
            try:
                await self.run_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("privacy maintenance failed (retried in an hour): %s", exc)
            except Exception:
                log.exception("unexpected error in privacy maintenance")
            await asyncio.sleep(self._interval_s)
