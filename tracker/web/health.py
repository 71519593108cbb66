"""Readiness: is this worker's database reachable, and is its writer keeping up?

`/healthz` only says the process answers. `/readyz` asks PostgreSQL the trivial `ping`
query of sql/queries.sql (bounded by a short timeout, and cached for a second so a busy
prober costs one query a second, however many ask) and looks at the batch writer: its
last write must have succeeded and its buffer must be below a threshold.

The tracking endpoints answer without the database, so an unready worker still
serves pixels and redirects correctly: /readyz is for alerts and deploys, not for
taking a worker out of the tracking traffic (docs/metrics.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tracker.store.writer import BatchWriter

PROBE_TIMEOUT_S = 1.0
PROBE_CACHE_S = 1.0
# A writer that keeps up flushes every interval; ten full batches waiting means it does
# not (or PostgreSQL is slower than the traffic), long before the buffer is full.
BACKLOG_BATCHES = 10


@dataclass(frozen=True)
class ReadinessState:
    ready: bool
    checks: dict[str, str]  # check -> "ok" or what is wrong

    def as_json(self) -> dict[str, object]:
        problems = [f"{name}: {state}" for name, state in self.checks.items() if state != "ok"]
        body: dict[str, object] = {"status": "ready" if self.ready else "not ready",
                                   "checks": self.checks}
        if problems:
            body["reason"] = "; ".join(problems)
        return body


class Readiness:
    def __init__(self, probe: Callable[[], Awaitable[object]],
                 writer: Callable[[], BatchWriter | None], *, batch_size: int,
                 max_buffered: int, on_database_error: Callable[[], None] | None = None,
                 timeout_s: float = PROBE_TIMEOUT_S, cache_s: float = PROBE_CACHE_S) -> None:
        self._probe = probe
        self._writer = writer
        self.backlog_limit = max(1, min(max_buffered // 2, BACKLOG_BATCHES * batch_size))
        self._on_database_error = on_database_error
        self._timeout_s = timeout_s
        self._cache_s = cache_s
        self._lock = asyncio.Lock()
        self._checked_at: float | None = None
        self._database = "not checked"

    async def check(self) -> ReadinessState:
        checks = {"database": await self._database_state(), "writer": self._writer_state()}
        return ReadinessState(all(state == "ok" for state in checks.values()), checks)

    async def _database_state(self) -> str:
        async with self._lock:  # one probe at a time; the others read its answer
            now = time.monotonic()
            if self._checked_at is None or now - self._checked_at >= self._cache_s:
                self._database = await self._probe_once()
                self._checked_at = time.monotonic()
            return self._database

    async def _probe_once(self) -> str:
        try:
            await asyncio.wait_for(self._probe(), self._timeout_s)
        except TimeoutError:
            state = f"no answer within {self._timeout_s:g} s"
        except Exception as exc:  # anything the driver raises means "not reachable"
            state = f"unreachable ({type(exc).__name__})"
        else:
            return "ok"
        if self._on_database_error is not None:
            self._on_database_error()
        return state

    def _writer_state(self) -> str:
        writer = self._writer()
        if writer is None:
            return "not started"
        if not writer.healthy:
            return "the last write to PostgreSQL failed; events wait in memory"
        if writer.buffered >= self.backlog_limit:
            return (f"falling behind: {writer.buffered} events waiting "
                    f"(limit {self.backlog_limit})")
        return "ok"
