"""The batch writer: events wait in memory and reach PostgreSQL in COPY batches.

It flushes when a batch is full, on a timer (every flush interval), on an explicit
`flush()` (which is what makes tests deterministic) and on shutdown. Events arrive
already encoded as COPY text lines (see ingest/pipeline.py); a batch is COPYed
(store/lanes.py) into a session-local staging table and moved into `events`, skipping
an event whose id is stored already (sql/writer.sql): event ids are made at capture, so
writing a batch twice after an unclear failure counts it once. The same transaction
keeps the report rollups (store/rollups.py), from the rows that were new, and re-labels
clicks around a honeypot or burst click.

Several batches are written at once (`connections`, one transaction each on a
connection of its own), so PostgreSQL works on more than one core: each connection is a
lane that takes the events of its share of the messages (flush() says why), writes one
batch at a time, and overlaps the others in everything but the campaign rollups' rows
and the commit.

While PostgreSQL is unreachable, or memory holds more than its bound, the backlog
(store/backlog.py) spills what memory holds to the journal (store/journal.py: checksummed records,
an fsync per batch) and the writer retries with backoff; when it can write again it
replays the journal, in order, before what memory holds. Without a journal (tests,
tools) events stay in memory up to the bound. Past every bound new events are dropped,
counted by reason and logged once per interval.

Durability. By default an event is acknowledged once it is in memory: a `kill -9`
loses what memory holds, the events of at most one flush interval plus the writes in
progress (a batch per connection). A durable writer (TRACKER_DURABILITY=journal)
instead puts every event in the journal before its hit is answered (`synced`): the
events added while one append and fsync run go together in the next (group commit), and
PostgreSQL is then fed from the journal, so a `kill -9` loses nothing that was answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from tracker.ingest.pipeline import DropReason, EventRecord
from tracker.store.backlog import Backlog, WriterStats, describe
from tracker.store.journal import Chunk, Journal
from tracker.store.lanes import Batch, Connect, Lanes, placed, sort_lines

log = logging.getLogger("tracker.store.writer")

_RETRY_FIRST_S = 0.1
_RETRY_MAX_S = 5.0
_ADOPT_EVERY_S = 10.0  # how often a healthy writer looks for orphaned journal segments
# Batches written at once, each on its own connection. PostgreSQL runs a batch's
# statements on one core; a second write in flight keeps a second core busy while the
# first waits for its commit or holds the campaign's rollup rows (store/rollups.py). More than
# the cores PostgreSQL has gains nothing (benchmarks/README.md, Ingest).
DEFAULT_CONNECTIONS = 2
# Events sorted into lanes between two turns of the event loop (~1 ms of work).
_SORT_SLICE = 1000


class BatchWriter:
    def __init__(self, connect: Connect, *, batch_size: int, interval_s: float,
                 max_buffered: int, on_drop: Callable[[DropReason], None] | None = None,
                 relabel_windows: Mapping[str, timedelta] | None = None,
                 journal: Journal | None = None, durable: bool = False,
                 connections: int = DEFAULT_CONNECTIONS) -> None:
        if connections < 1:
            raise ValueError("a writer needs at least one connection")
        self.stats = WriterStats()
        # Called with the size and the seconds of every batch written (web/metrics/counters.py).
        self.on_flush: Callable[[int, float], None] | None = None
        self._backlog = Backlog(batch_size=batch_size, max_rows=max_buffered, journal=journal,
                                durable=durable, stats=self.stats, on_batch=self._batch_waits,
                                on_drop=on_drop, lanes=connections)
        self._db = Lanes(connect, connections, relabel_windows)
        self._batch_size = batch_size
        self._interval_s = interval_s
        self._wake = asyncio.Event()
        self._connections = connections
        self._batch_ready = asyncio.Event()  # a full batch waits: another write may start
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._failing_since: float | None = None
        self._stopping = False
        self._journal = journal
        self._inflight: dict[int, list[EventRecord]] = {}  # batches being written from memory
        self._lanes: list[list[EventRecord]] = [[] for _ in range(connections)]  # sorted out
        self._taken = 0  # batches taken from memory so far: their order
        self._adopted_at = time.monotonic()

    @property
    def journal(self) -> Journal | None:
        return self._journal

    @property
    def buffered(self) -> int:
        """Events in memory only: in the backlog, sorted into lanes, or being written."""
        return (self._backlog.in_memory + sum(len(b) for b in self._inflight.values())
                + sum(len(queue) for queue in self._lanes))

    @property
    def healthy(self) -> bool:
        return self._failing_since is None

    def add(self, row: EventRecord) -> DropReason | None:
        """Queue an event; never blocks. Why it cannot be taken (memory full, and the
        journal full or absent), for the caller to count; else None."""
        return self._backlog.add(row)

    def synced(self) -> Awaitable[bool] | None:
        """Durable writer: what a hit awaits before it is answered (Backlog.synced)."""
        return self._backlog.synced()

    def _batch_waits(self) -> None:
        self._wake.set()
        self._batch_ready.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tracker-writer")
        self._backlog.start()
        if self._journal is not None and self._journal.pending_events:
            self._wake.set()  # replay what earlier runs left without waiting for the timer

    async def flush(self) -> int:
        """Write everything queued so far, the journal's events first; returns rows written.
        Raises if the database fails.

        Up to `connections` batches are written at once, each in its own transaction on
        its own connection, and never two with an event of the same message: events go
        to a lane by message (its id modulo the lanes), and a lane writes one batch at a time. Two
        transactions that share a message would meet on its `rollup_message` row, the
        second waiting for the first to commit (store/rollups.py, Concurrency); sharing only
        campaigns, they wait for each other in their last statement alone. Small batches
        wait while others are written (`_take`). A journal chunk is committed (its
        segment may then go) only once it and every chunk read before it are in
        PostgreSQL. A batch that fails, or is interrupted, goes back to memory in front of
        anything newer; the chunks after a failed one stay in the journal (written again
        later, they count nothing twice)."""
        await self._backlog.settle()
        async with self._lock:
            round_ = _Round(self._connections)
            writing: dict[int, asyncio.Task[None]] = {}
            try:
                while True:
                    self._batch_ready.clear()
                    if self._lane_needs_journal(round_, writing):
                        await self._read_journal(round_, alone=not writing)
                    for lane in range(self._connections):
                        if (round_.error is None and lane not in writing
                                and not round_.parts[lane]
                                and len(self._lanes[lane]) < self._batch_size):
                            await self._sort_out(lane)
                    for lane in range(self._connections):
                        if round_.error is None and lane not in writing:
                            work = self._take(round_, lane, alone=not writing)
                            if work is not None:
                                writing[lane] = asyncio.create_task(
                                    self._write_work(work, round_))
                    if not writing:
                        break
                    # A write ends, or a full batch arrives for an idle lane.
                    ready = asyncio.create_task(self._batch_ready.wait())
                    try:
                        await asyncio.wait({*writing.values(), ready},
                                           return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        ready.cancel()
                    writing = {lane: task for lane, task in writing.items() if not task.done()}
            finally:
                for task in writing.values():
                    task.cancel()
                try:
                    await asyncio.gather(*writing.values(), return_exceptions=True)
                finally:
                    # Not written (or in doubt), or sorted into lanes and not taken yet: back
                    # in front of anything newer. (Even if cancelled again while the writes
                    # wind down: one that commits after all is written twice, counted once.)
                    self._backlog.put_back([
                        *(row for taken in sorted(self._inflight)
                          for row in self._inflight[taken]),
                        *(row for queue in self._lanes for row in queue)])
                    self._inflight.clear()
                    for queue in self._lanes:
                        queue.clear()
            if round_.error is not None:
                raise round_.error
            return round_.written

    def _take(self, round_: _Round, lane: int, alone: bool) -> _Work | None:
        """The lane's next batch: its part of the journal's next chunk, else its oldest
        events in memory. A batch holds at most `batch_size` events; with other writes
        under way it holds at least this lane's share of a full batch (so a full batch
        in memory goes in a write per lane, at once), and what is short of that waits for
        them (or for more events) rather than go in a small transaction of its own."""
        parts = round_.parts[lane]
        if parts:
            chunk, part = parts.popleft()
            return _Work(lane, part, chunk=chunk)
        queue = self._lanes[lane]
        if not queue or (not alone and len(queue) < self._batch_size // self._connections):
            return None
        batch = queue[: self._batch_size]
        del queue[: len(batch)]
        self._taken += 1
        self._inflight[self._taken] = batch
        return _Work(lane, Batch.of(batch), taken=self._taken)

    def _lane_needs_journal(self, round_: _Round, writing: Mapping[int, object]) -> bool:
        """Whether to read the journal's next chunk now: it holds events, a lane is free and
        has no part of a chunk left, and no lane has two waiting. (An empty journal, the
        usual case, is not worth a trip to a worker thread.)"""
        return (self._journal is not None and self._journal.pending_events > 0
                and round_.error is None and all(len(p) < 2 for p in round_.parts)
                and any(lane not in writing and not round_.parts[lane]
                        for lane in range(self._connections)))

    async def _read_journal(self, round_: _Round, alone: bool) -> None:
        """The journal's next chunk (a batch for every lane), split into the lanes' parts.

        Read and split in a thread: some microseconds of Python per event, milliseconds
        for a chunk, which in the event loop held every hit's answer that long (a replay after an
        outage, and every event in `journal` durability); in a thread the loop gets the
        interpreter back within the switch interval (1 ms in the server: tracker.app)."""
        assert self._journal is not None
        read = await asyncio.to_thread(
            self._read_split, self._journal, self._batch_size * self._connections,
            round_.cursor, alone)
        if read is None:
            return
        chunk, split = read
        round_.cursor = chunk
        round_.chunks.append(chunk)
        parts = [(lane, part) for lane, part in enumerate(split) if part is not None]
        round_.unwritten[id(chunk)] = len(parts)
        for lane, part in parts:
            round_.parts[lane].append((chunk, part))
        if not parts:  # nothing readable in it (damaged records): done as it is
            self._chunk_part_written(round_, chunk)

    def _read_split(self, journal: Journal, max_events: int, after: Chunk | None,
                    alone: bool) -> tuple[Chunk, list[Batch | None]] | None:
        """(In a worker thread.) The chunk after `after`, its events as a batch by lane;
        None if there is none, or only a small one while other lanes write.

        The records the backlog sorted for these lanes go to theirs as they are; only
        others (written for another number of lanes, or before records were sorted) are
        read line by line."""
        chunk = journal.read(max_events, after=after)
        if chunk is None or (not alone and chunk.events < self._batch_size):
            return None
        lanes = self._connections
        data: list[list[bytes]] = [[] for _ in range(lanes)]
        days: list[set[int]] = [set() for _ in range(lanes)]
        events = [0] * lanes
        for label, lines in chunk.records:
            place = placed(label, lanes)
            if place is not None:
                lane, on = place
                data[lane].append(lines)
                days[lane].update(on)
                events[lane] += lines.count(b"\n")
                continue
            for lane, records in enumerate(sort_lines(lines, lanes)):
                if records:
                    batch = Batch.of(records)
                    data[lane].append(batch.data)
                    days[lane].update(batch.days)
                    events[lane] += batch.events
        return chunk, [Batch(b"".join(data[lane]), days[lane], events[lane])
                       if events[lane] else None for lane in range(lanes)]

    async def _sort_out(self, lane: int) -> None:
        """Move events from the front of memory into the lanes' queues, until this lane's
        has a full batch, memory is empty, or the queues hold a batch for every lane (so
        traffic for one message, which all goes to one lane, cannot pile up there).

        A whole batch at a time would hold every answer for milliseconds: events are
        sorted in slices, and the loop answers hits between slices. Each slice moves
        events from the front of memory as it is then (a spill or a restore in between
        changes what the next slice sees, never what one has moved)."""
        queue = self._lanes[lane]
        if self._connections == 1:
            queue += self._backlog.take(self._batch_size - len(queue))
            return
        lanes = self._lanes
        count = self._connections
        appends = [lane_queue.append for lane_queue in lanes]
        while True:
            # Read anew each slice: a spill in between changes what is waiting.
            room = min(count * self._batch_size - sum(map(len, lanes)), _SORT_SLICE)
            if len(queue) >= self._batch_size or room <= 0 or not self._backlog.waiting:
                return
            for record in self._backlog.take(room):
                appends[record[3] % count](record)  # by message id
            await asyncio.sleep(0)

    async def _write_work(self, work: _Work, round_: _Round) -> None:
        try:
            # Not `+= await`: that would read the total before the write.
            written = await self._write(work.lane, work.batch)
            round_.written += written
            if work.chunk is not None:
                self._chunk_part_written(round_, work.chunk)
            else:
                self._inflight.pop(work.taken, None)
        except Exception as exc:  # flush() raises it once the others end
            if round_.error is None:
                round_.error = exc

    def _chunk_part_written(self, round_: _Round, chunk: Chunk) -> None:
        """Mark the journal committed up to the first chunk not wholly written."""
        assert self._journal is not None
        round_.unwritten[id(chunk)] -= 1
        while round_.chunks and not round_.unwritten[id(round_.chunks[0])]:
            done = round_.chunks.popleft()
            del round_.unwritten[id(done)]
            self._journal.commit(done)
            self.stats.replayed += done.events

    async def close(self, timeout_s: float) -> int:
        """Stop the timer, then try to write what is left within the timeout; with a
        journal, what could not be written is kept there for the next start.
        Returns how many events were lost (neither written nor kept in the journal)."""
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
        await self._backlog.stop(timeout_s / 2)  # what is left in memory is written below
        backlog = self._backlog
        while backlog.unwritten and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.flush(), max(0.01, deadline - time.monotonic()))
            except (TimeoutError, OSError, asyncpg.PostgresError,
                    asyncpg.InterfaceError) as exc:
                log.warning("flush at shutdown failed: %s", describe(exc))
                if self._journal is not None:
                    break  # no need to wait out the timeout: the journal keeps the rest
                await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        await backlog.settle()
        left = backlog.waiting
        if left and self._journal is not None:
            left = await backlog.journal_the_rest()
        if left:
            log.error("%d events could not be written before shutdown and are lost", left)
        if self._journal is not None:
            waiting = self._journal.pending_events
            if waiting:
                log.warning("%d events wait in the journal (%s) for the next start", waiting,
                            self._journal.directory)
            self._journal.close()
        backlog.report_drops(force=True)
        await self._db.close()
        return left

    async def _run(self) -> None:
        delay = _RETRY_FIRST_S
        retry_at = 0.0
        while not self._stopping:
            await self._pause(self._interval_s)
            if self._stopping:
                return  # close() writes what is left
            self._backlog.report_drops()
            if self._failing_since is not None:
                # PostgreSQL is unreachable: what memory took since the last tick goes to
                # the journal before anything else (a connect attempt can take seconds),
                # so a crash during an outage loses one interval at most.
                await self._backlog.spill()
            if time.monotonic() < retry_at:
                continue
            try:
                await self.flush()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self.stats.failures += 1
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    log.warning("cannot write events (%s); %s and retrying", describe(exc),
                                "spilling them to the journal" if self._journal
                                else "keeping them in memory")
                await self._backlog.spill()
                retry_at = time.monotonic() + delay
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            except Exception:
                # A bug must not stop the writer for good; the batch stays queued.
                log.exception("unexpected error in the batch writer")
                retry_at = time.monotonic() + delay
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            if self._failing_since is not None:
                log.warning("writing events again after %.1f s; %d queued",
                            time.monotonic() - self._failing_since, self._backlog.waiting)
                self._failing_since = None
            delay = _RETRY_FIRST_S
            await self._adopt_now_and_then()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once for a full batch or close()."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _write(self, lane: int, batch: Batch) -> int:
        started = time.perf_counter()
        new, relabelled = await self._db.write(lane, batch)
        self.stats.written += new
        self.stats.relabelled += relabelled
        self.stats.duplicates += batch.events - new
        self.stats.batches += 1
        self.stats.last_batch_size = batch.events
        self.stats.last_flush_seconds = time.perf_counter() - started
        if self.on_flush is not None:
            self.on_flush(batch.events, self.stats.last_flush_seconds)
        return new

    async def _adopt_now_and_then(self) -> None:
        """A sibling worker that died left its segments behind: take them over."""
        if self._journal is None or time.monotonic() - self._adopted_at < _ADOPT_EVERY_S:
            return
        self._adopted_at = time.monotonic()
        try:
            if await asyncio.to_thread(self._journal.adopt_orphans):
                self._wake.set()
        except OSError as exc:
            log.warning("cannot look for orphaned journal segments: %s", describe(exc))


@dataclass
class _Work:
    lane: int
    batch: Batch
    taken: int = 0  # from memory: its key in BatchWriter._inflight
    chunk: Chunk | None = None  # from the journal: the chunk it is a part of


class _Round:
    """One flush: what it wrote, the journal chunks it read (in order), the parts of them
    each lane has still to take and how many parts of each are not written, and the
    first error."""

    def __init__(self, lanes: int) -> None:
        self.written = 0
        self.cursor: Chunk | None = None  # the last chunk read: the next one starts after it
        self.chunks: deque[Chunk] = deque()
        self.parts: list[deque[tuple[Chunk, Batch]]] = [
            deque() for _ in range(lanes)]
        self.unwritten: dict[int, int] = {}
        self.error: Exception | None = None
