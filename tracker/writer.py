"""The batch writer: events wait in memory and reach PostgreSQL in COPY batches.

It flushes when a batch is full, on a timer (every flush interval), on an explicit
`flush()` (which is what makes tests deterministic) and on shutdown. Events arrive
already encoded as COPY text lines (see hits.py); a batch is COPYed into a
session-local staging table and moved into `events` with ON CONFLICT DO NOTHING:
event ids are made at capture, so writing a batch twice after an unclear failure
counts it once.

While PostgreSQL is unreachable the writer keeps events in memory up to a bound,
retries with backoff and writes them, in order, when it is back. Past the bound new
events are dropped and counted (a disk journal takes over there in a later step).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, timedelta

import asyncpg

from tracker.hits import EVENT_COLUMNS, DropReason, EventRecord

log = logging.getLogger("tracker.writer")

_EPOCH_DAY = date(1970, 1, 1)

_STAGING = "events_staging"
_CREATE_STAGING = f"""
    create temp table if not exists {_STAGING} (
        account_id bigint, at_us bigint, id uuid, campaign_id bigint, message_id bigint,
        type text, link_position integer, url_id bigint, machine boolean, reason text,
        country text, region text, city text, browser text, os text, device text, ip inet
    ) on commit delete rows"""
_EVENT_FIELDS = ", ".join(("occurred_at" if c == "at_us" else c) for c in EVENT_COLUMNS)
_STAGED_FIELDS = ", ".join(
    ("timestamptz 'epoch' + at_us * interval '1 microsecond'" if c == "at_us" else c)
    for c in EVENT_COLUMNS)
_MOVE_STAGED = (f"insert into events ({_EVENT_FIELDS}) select {_STAGED_FIELDS} from {_STAGING} "
                "on conflict do nothing")
_RETRY_FIRST_S = 0.1
_RETRY_MAX_S = 5.0

Connect = Callable[[], Awaitable[asyncpg.Connection]]


@dataclass
class WriterStats:
    written: int = 0  # rows new to the database
    duplicates: int = 0  # rows that were already there (a retried batch)
    batches: int = 0
    failures: int = 0
    last_batch_size: int = 0
    last_flush_seconds: float = 0.0
    dropped: dict[str, int] = field(default_factory=dict)


class BatchWriter:
    def __init__(self, connect: Connect, *, batch_size: int, interval_s: float,
                 max_buffered: int, on_drop: Callable[[DropReason], None] | None = None) -> None:
        self._connect = connect
        self._batch_size = batch_size
        self._interval_s = interval_s
        self._max_buffered = max_buffered
        self._on_drop = on_drop
        self._buffer: list[EventRecord] = []
        self._wake = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._known_days: set[int] = set()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._failing_since: float | None = None
        self._stopping = False
        self.stats = WriterStats()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def healthy(self) -> bool:
        return self._failing_since is None

    def add(self, row: EventRecord) -> bool:
        """Queue an event; never blocks. False if it had to be dropped (buffer full)."""
        if len(self._buffer) >= self._max_buffered:
            self._drop(DropReason.BUFFER_FULL)
            return False
        self._buffer.append(row)
        if len(self._buffer) >= self._batch_size:
            self._wake.set()
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tracker-writer")

    async def flush(self) -> int:
        """Write everything queued so far; returns rows written. Raises if the database fails."""
        async with self._lock:
            written = 0
            while self._buffer:
                written += await self._write(self._buffer[: self._batch_size])
            return written

    async def close(self, timeout_s: float) -> int:
        """Stop the timer, then try to write what is left within the timeout.
        Returns how many events could not be written."""
        deadline = time.monotonic() + timeout_s
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None and not task.done():
            # Let the loop finish the write it may be in rather than cancel it mid-way; if
            # that write hangs, half the budget is left to write everything again.
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout_s / 2)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        while self._buffer and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.flush(), max(0.01, deadline - time.monotonic()))
            except (TimeoutError, OSError, asyncpg.PostgresError,
                    asyncpg.InterfaceError) as exc:
                log.warning("flush at shutdown failed: %s", _describe(exc))
                await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        left = len(self._buffer)
        if left:
            log.error("%d events could not be written before shutdown and are lost", left)
        await self._disconnect()
        return left

    async def _run(self) -> None:
        delay = _RETRY_FIRST_S
        while not self._stopping:
            await self._pause(self._interval_s)
            if self._stopping:
                return  # close() writes what is left
            try:
                await self.flush()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self.stats.failures += 1
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    log.warning("cannot write events (%s); keeping them in memory and retrying",
                                _describe(exc))
                await self._pause(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            except Exception:
                # A bug must not stop the writer for good; the batch stays queued.
                log.exception("unexpected error in the batch writer")
                await self._pause(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            if self._failing_since is not None:
                log.warning("writing events again after %.1f s; %d queued",
                            time.monotonic() - self._failing_since, len(self._buffer))
                self._failing_since = None
            delay = _RETRY_FIRST_S

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once for a full batch or close()."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _write(self, batch: list[EventRecord]) -> int:
        started = time.perf_counter()
        conn = await self._connection()
        try:
            await self._ensure_partitions(conn, batch)
            data = io.BytesIO("".join(line for line, _, _ in batch).encode())
            async with conn.transaction():
                await conn.copy_to_table(_STAGING, source=data, columns=EVENT_COLUMNS)
                status = await conn.execute(_MOVE_STAGED)
        except BaseException:
            # A write that failed or was interrupted leaves the session in doubt (asyncpg can
            # believe a BEGIN is still open, turning the next commit into a savepoint):
            # never reuse it. The batch stays queued; writing it again is harmless.
            self._abandon_connection()
            raise
        # Only now is the batch safe; rows added meanwhile sit behind it in the buffer.
        del self._buffer[: len(batch)]
        inserted = int(status.rsplit(" ", 1)[-1])
        self.stats.written += inserted
        self.stats.duplicates += len(batch) - inserted
        self.stats.batches += 1
        self.stats.last_batch_size = len(batch)
        self.stats.last_flush_seconds = time.perf_counter() - started
        return inserted

    async def _ensure_partitions(self, conn: asyncpg.Connection, batch: list[EventRecord]) -> None:
        days = {day for _, day, _ in batch} - self._known_days
        for day in sorted(days):
            await conn.execute("select tracker_ensure_event_partition($1)",
                               _EPOCH_DAY + timedelta(days=day))
            self._known_days.add(day)

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            conn = await self._connect()
            try:
                await conn.execute(_CREATE_STAGING)
            except BaseException:
                conn.terminate()
                raise
            self._conn = conn
        return self._conn

    def _abandon_connection(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def _disconnect(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await asyncio.wait_for(conn.close(), 2)
            except Exception:
                conn.terminate()

    def _drop(self, reason: DropReason) -> None:
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + 1
        if self._on_drop is not None:
            self._on_drop(reason)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
