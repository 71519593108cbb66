"""A streaming replica for reading (TRACKER_READ_DATABASE_URL), and how far behind it is.

Reports, the dashboard, lists and exports read from it; every write, authentication and
privacy change goes to the primary. Once a second the primary's WAL position and the
replica's replayed one are sampled: their difference is the lag in bytes, and the time
since the primary passed the replica's position is the lag in seconds (to the sampling
interval). While the replica is behind by more than `max_lag_s`, or does not answer,
reads go to the primary; they come back once it has caught up.

A privacy change (an erasure, an opt-out, a policy made stricter) must hold for readers
from the moment the API answers, so `caught_up()` waits until the replica has replayed
the primary's WAL as of the change; a replica that does not get there in time is not
read again until it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

import asyncpg

from tracker.store.database import create_pool, redacted
from tracker.store.queries import QUERIES

log = logging.getLogger("tracker.store.replica")

SAMPLE_INTERVAL_S = 1.0
# A replica that has been away this long has this many samples waiting; older ones go
# (the lag then reads as at least this many intervals).
_MAX_SAMPLES = 100_000
_PROBE_TIMEOUT_S = 2.0
_CATCH_UP_POLL_S = 0.005


class ReadReplica:
    def __init__(self, primary: asyncpg.Pool, dsn: str, *, max_lag_s: float,
                 interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.dsn = dsn
        self.max_lag_s = max_lag_s
        self._primary = primary
        self._interval_s = interval_s
        self._pool: asyncpg.Pool | None = None
        self._task: asyncio.Task[None] | None = None
        # (monotonic time, primary WAL position) of the samples the replica has not replayed.
        self._samples: deque[tuple[float, int]] = deque(maxlen=_MAX_SAMPLES)
        self.primary_position = 0
        self.replayed_position = 0
        self.reachable = False
        # Not read again before it has replayed this far (a privacy change it missed).
        self._hold_until = 0
        self._last_problem = ""

    async def start(self) -> None:
        self._pool = await create_pool(self.dsn)
        await self.sample()
        self._task = asyncio.create_task(self._sample_forever(), name="tracker-replica-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pool is not None:
            await self._pool.close()

    @property
    def lag_bytes(self) -> int:
        return max(0, self.primary_position - self.replayed_position)

    @property
    def lag_s(self) -> float:
        """Time since the primary wrote the first WAL the replica has not replayed (0 when
        it has replayed all of it as of the last sample)."""
        if not self._samples:
            return 0.0
        return max(0.0, time.monotonic() - self._samples[0][0])

    @property
    def in_use(self) -> bool:
        return (self.reachable and self.lag_s <= self.max_lag_s
                and self.replayed_position >= self._hold_until)

    def pool_for_reading(self) -> asyncpg.Pool:
        """The replica while it is close enough to the primary, else the primary."""
        if self._pool is not None and self.in_use:
            return self._pool
        return self._primary

    async def sample(self) -> None:
        now = time.monotonic()
        try:
            position = await self._primary.fetchval(QUERIES.wal_position,
                                                    timeout=_PROBE_TIMEOUT_S)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return  # the primary's own trouble: the writer and /readyz report it
        self.primary_position = int(position)
        if not self._samples or self._samples[-1][1] < self.primary_position:
            self._samples.append((now, self.primary_position))
        replayed = await self._replayed()
        if replayed is not None:
            self.replayed_position = replayed
        while self._samples and self._samples[0][1] <= self.replayed_position:
            self._samples.popleft()

    async def _replayed(self) -> int | None:
        assert self._pool is not None
        try:
            position = await self._pool.fetchval(QUERIES.replayed_position,
                                                 timeout=_PROBE_TIMEOUT_S)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            self._unreachable(str(exc) or type(exc).__name__)
            return None
        if not self.reachable:
            log.info("reading from the replica %s", redacted(self.dsn))
        self.reachable, self._last_problem = True, ""
        return int(position)

    def _unreachable(self, problem: str) -> None:
        if self.reachable or problem != self._last_problem:
            log.warning("the read replica %s does not answer (%s): reading from the primary",
                        redacted(self.dsn), problem)
        self.reachable, self._last_problem = False, problem

    async def caught_up(self, timeout_s: float) -> bool:
        """Wait until the replica has replayed everything the primary has written so far;
        if it does not within `timeout_s`, stop reading it until it has."""
        await self.sample()
        target = self.primary_position
        deadline = time.monotonic() + timeout_s
        while self.reachable and self.replayed_position < target:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(_CATCH_UP_POLL_S)
            replayed = await self._replayed()
            if replayed is not None:
                self.replayed_position = replayed
        if self.replayed_position >= target:
            return True
        self._hold_until = max(self._hold_until, target)
        log.warning("the read replica is %d bytes behind a privacy change: reading from "
                    "the primary until it has caught up", target - self.replayed_position)
        return False

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.sample()
