"""The writer's backlog: events in memory that no write has taken yet, within a bound.

Past the bound, memory is handed to the journal (store/journal.py) and written to disk in the
background (a spill). Events that arrive while a spill is being written queue for the
next one, which takes all of them in one append: nothing is dropped while the journal
has room, however small the bound (what is on its way to disk counts against the
journal's room, so a disk that stops answering holds at most that much in memory). With
the journal full or failing, or without one, new events past the bound are dropped,
counted by reason (`journal_full`, or `buffer_full` without a journal) and logged once
per interval. In durable mode (TRACKER_DURABILITY=journal) every event goes to the
journal before its hit is answered: the events added while one append and fsync run go
together in the next (group commit), and they too are held back only by the journal's room.

The batch writer (store/writer.py) takes events from the front (`take`), puts back in
front what it could not write (`put_back`), and reads the journal back into PostgreSQL;
this module only decides what stays in memory, what goes to disk, and what is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tracker.ingest.pipeline import DropReason, EventRecord
from tracker.store.journal import Journal, JournalFull
from tracker.store.lanes import journal_parts

log = logging.getLogger("tracker.store.writer")

_DROP_LOG_S = 10.0  # drops and journal failures are logged at most this often
# A durable hit waits for its group commit; a disk that stalls longer than this must not
# hold the answer (the pixel always renders): it goes out unconfirmed, and is logged.
_SYNC_WAIT_S = 5.0


@dataclass
class WriterStats:
    written: int = 0  # rows new to the database
    duplicates: int = 0  # rows that were already there (a retried batch)
    relabelled: int = 0  # human clicks made machine by a honeypot or burst click near them
    batches: int = 0
    failures: int = 0
    last_batch_size: int = 0
    last_flush_seconds: float = 0.0
    dropped: dict[str, int] = field(default_factory=dict)
    journaled: int = 0  # events put in the journal (spills and group commits)
    replayed: int = 0  # events written to PostgreSQL from the journal


class Backlog:
    def __init__(self, *, batch_size: int, max_rows: int, journal: Journal | None,
                 durable: bool, stats: WriterStats, on_batch: Callable[[], None],
                 on_drop: Callable[[DropReason], None] | None = None, lanes: int = 1) -> None:
        if durable and journal is None:
            raise ValueError("a durable writer needs a journal")
        self._rows: list[EventRecord] = []  # oldest first
        self.journal = journal
        self._batch_size = batch_size
        self._lanes = lanes  # the writer's: events go to the journal sorted for them
        self._max_rows = max_rows
        self._durable = durable
        self._stats = stats
        self._on_batch = on_batch  # a batch is ready to be written
        self._on_drop = on_drop
        # On their way to the journal, each with its size; the events and bytes in them.
        self._spills: deque[tuple[list[EventRecord], int]] = deque()
        self._spilling = 0
        self._spilling_bytes = 0
        self._spill_task: asyncio.Task[None] | None = None
        self._journal_full = False  # logged as full; until a spill finds room again
        self._journal_error_logged = 0.0
        # Durable: events waiting for the next group commit, and the future their hits await.
        self._pending: list[EventRecord] = []
        self._pending_bytes = 0
        self._committing_bytes = 0  # the group being appended
        self._pending_synced: asyncio.Future[bool] | None = None
        self._commit_lock = asyncio.Lock()
        self._commit_wake = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._stopping = False
        self._unreported: Counter[str] = Counter()
        self._reported_at = 0.0

    @property
    def waiting(self) -> int:
        """Events in memory that no write has taken yet."""
        return len(self._rows)

    def take(self, count: int) -> list[EventRecord]:
        """The oldest `count` events, taken out."""
        taken = self._rows[:count]
        del self._rows[:count]
        return taken

    def put_back(self, rows: list[EventRecord]) -> None:
        """Events a write took and did not write (or is in doubt about), in front of
        anything newer; nothing is dropped (`restore` keeps memory's bound)."""
        self._rows[:0] = rows

    async def journal_the_rest(self) -> int:
        """At shutdown: what memory holds into the journal; returns how many are left."""
        kept = await self.to_journal(self._rows)
        del self._rows[:kept]
        return len(self._rows)

    @property
    def in_memory(self) -> int:
        """Events here in memory only: waiting, being spilled, or waiting for their group
        commit."""
        return len(self._rows) + self._spilling + len(self._pending)

    @property
    def unwritten(self) -> bool:
        """Whether anything here, in memory or in the journal, waits for PostgreSQL."""
        return bool(self._rows or self._spilling or self._pending
                    or (self.journal is not None and self.journal.pending_events))

    def add(self, row: EventRecord) -> DropReason | None:
        """Queue an event; never blocks. The reason it cannot be taken (memory full, and
        the journal full, failing or absent), for the caller to count; else None."""
        if self._durable:
            return self._add_pending(row)
        if len(self._rows) >= self._max_rows and not self.spill_rows():
            return self._refused(self._full_reason())
        self._rows.append(row)
        if len(self._rows) >= self._batch_size:
            self._on_batch()
        return None

    def synced(self) -> Awaitable[bool] | None:
        """Durable: what a hit awaits before it is answered. Done once every event added so
        far is in the journal (True), or could not be put there (False: it is kept in
        memory, or was dropped and counted); None when nothing is waiting."""
        if not self._pending:
            return None
        if self._pending_synced is None:
            self._pending_synced = asyncio.get_running_loop().create_future()
        # Shielded: a hit whose client went away must not cancel its neighbours' answers.
        return asyncio.shield(self._pending_synced)

    def start(self) -> None:
        if self._durable:
            self._committer = asyncio.create_task(self._commit_forever(),
                                                  name="tracker-group-commit")

    async def stop(self, timeout_s: float) -> None:
        """The group commit under way, and what is pending, to the journal; a disk that
        hangs must not hold the shutdown (the events stay in memory)."""
        self._stopping = True
        self._commit_wake.set()
        committer, self._committer = self._committer, None
        if committer is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(committer), timeout_s)
        except TimeoutError:
            log.error("the journal did not answer within %.1f s at shutdown", timeout_s)

    def restore(self, rows: list[EventRecord]) -> None:
        """Put rows back in front of anything newer; memory's bound decides what is kept."""
        self._rows[:0] = rows
        excess = len(self._rows) - self._max_rows
        if excess > 0:
            del self._rows[-excess:]
            reason = self._full_reason()
            for _ in range(excess):
                self.drop(reason)

    def drop(self, reason: DropReason) -> None:
        """An event taken before is lost (counted here: its hit was counted as recorded)."""
        self._refused(reason)
        if self._on_drop is not None:
            self._on_drop(reason)

    def _refused(self, reason: DropReason) -> DropReason:
        """Noted for the writer's statistics and the log (the caller counts it)."""
        self._stats.dropped[reason] = self._stats.dropped.get(reason, 0) + 1
        self._unreported[reason] += 1
        return reason

    def report_drops(self, force: bool = False) -> None:
        """One log line per interval for the drops of that interval, never one per event."""
        now = time.monotonic()
        if not self._unreported or (not force and now - self._reported_at < _DROP_LOG_S):
            return
        log.warning("dropped %d events since the last report (%s)",
                    sum(self._unreported.values()),
                    ", ".join(f"{reason}: {n}" for reason, n in sorted(self._unreported.items())))
        self._unreported.clear()
        self._reported_at = now

    def _full_reason(self) -> DropReason:
        # With a journal, memory's bound alone never drops an event: the journal had no
        # room for it, or failed.
        return DropReason.JOURNAL_FULL if self.journal is not None else DropReason.BUFFER_FULL

    def _journal_takes(self, nbytes: int) -> bool:
        """Whether the journal has room for `nbytes` more besides what is on its way."""
        assert self.journal is not None
        on_its_way = self._spilling_bytes + self._pending_bytes + self._committing_bytes
        if self.journal.has_room(on_its_way + nbytes):
            self._journal_full = False
            return True
        if not self._journal_full:
            self._journal_full = True
            log.warning("the journal is full (its cap of %d bytes, shared by the workers): "
                        "events past memory's bound are dropped until it drains",
                        self.journal.max_bytes)
        return False

    # -- spills -----------------------------------------------------------------------------

    def spill_rows(self) -> bool:
        """Hand memory's rows to the journal (written in the background); False if the
        journal cannot take them: none, or no room for them besides what is on its way.
        While a spill is being written the next ones queue behind it, and the next append
        takes them all."""
        if self.journal is None:
            return False
        if self._rows:
            size = _size(self._rows)
            if not self._journal_takes(size):
                return False
            batch, self._rows = self._rows, []
            self._spills.append((batch, size))
            self._spilling += len(batch)
            self._spilling_bytes += size
            if self._spill_task is None or self._spill_task.done():
                self._spill_task = asyncio.get_running_loop().create_task(
                    self._drain_spills(), name="tracker-spill")
        return True

    async def spill(self) -> None:
        """Spill what memory holds, and wait until it is on disk (or back in memory)."""
        self.spill_rows()
        await self.settle()

    async def settle(self) -> None:
        """Let the spills and the group commit under way finish, so that whatever was
        added before is in the journal or back in memory."""
        spilling = self._spill_task
        if spilling is not None and not spilling.done():
            await asyncio.shield(spilling)
        if self._durable:
            await self._commit_group()

    async def _drain_spills(self) -> None:
        while self._spills:
            # Whatever queued up during the last write goes in one (fewer fsyncs).
            batch = [row for queued, _ in self._spills for row in queued]
            size = sum(queued_size for _, queued_size in self._spills)
            taken = len(self._spills)
            kept = await self.to_journal(batch)
            for _ in range(taken):
                self._spills.popleft()
            self._spilling -= len(batch)
            self._spilling_bytes -= size
            if kept < len(batch):
                # Full or failing: the rest goes back to memory, in front of anything
                # newer, and memory's bound decides what is kept.
                rest = batch[kept:] + [row for later, _ in self._spills for row in later]
                self._spills.clear()
                self._spilling = self._spilling_bytes = 0
                self.restore(rest)
                return

    async def to_journal(self, rows: list[EventRecord]) -> int:
        """Append rows to the journal, a record and an fsync per batch; returns how many,
        from the front, it took before it was full or failed."""
        journal = self.journal
        assert journal is not None
        kept = 0
        while kept < len(rows):
            part = rows[kept: kept + self._batch_size]
            try:
                await asyncio.to_thread(self._append, journal, part)
            except JournalFull as exc:
                if not self._journal_full:
                    log.warning("the journal is full (%s): events past memory's bound are "
                                "dropped until it drains", exc)
                self._journal_full = True
                break
            except OSError as exc:
                now = time.monotonic()
                if now - self._journal_error_logged >= _DROP_LOG_S:
                    self._journal_error_logged = now
                    log.error("cannot write to the journal: %s", describe(exc))
                break
            kept += len(part)
        self._stats.journaled += kept
        return kept

    def _append(self, journal: Journal, rows: list[EventRecord]) -> None:
        """(In a worker thread.) The rows into the journal, sorted for the writer's lanes."""
        journal.append_parts(journal_parts(rows, self._lanes))

    # -- group commit (durable) -------------------------------------------------------------

    def _add_pending(self, row: EventRecord) -> DropReason | None:
        # Past memory's bound (the disk is not keeping up), only while the journal has room.
        size = len(row[0])
        if (len(self._pending) + len(self._rows) >= self._max_rows
                and not self._journal_takes(size)):
            return self._refused(self._full_reason())
        self._pending.append(row)
        self._pending_bytes += size
        self._commit_wake.set()
        return None

    async def _commit_forever(self) -> None:
        """Group commit: the events that arrived during one append + fsync go in the next."""
        while True:
            await self._commit_wake.wait()
            self._commit_wake.clear()
            await self._commit_group()
            # Checked after the commit: stop() wakes it once, with events perhaps pending,
            # and nothing would wake it again.
            if self._stopping and not self._pending:
                return

    async def _commit_group(self) -> None:
        async with self._commit_lock:
            if not self._pending:
                return
            group, self._pending = self._pending, []
            self._committing_bytes, self._pending_bytes = self._pending_bytes, 0
            synced, self._pending_synced = self._pending_synced, None
            timer = (asyncio.get_running_loop().call_later(_SYNC_WAIT_S, _late, synced)
                     if synced is not None else None)
            try:
                kept = await self.to_journal(group)
            finally:
                self._committing_bytes = 0
            if kept < len(group):
                self.restore(group[kept:])  # written from memory, if it has room
            if timer is not None:
                timer.cancel()
            if synced is not None and not synced.done():
                synced.set_result(kept == len(group))
            if self.journal is not None and self.journal.pending_events >= self._batch_size:
                self._on_batch()


def _late(synced: asyncio.Future[bool]) -> None:
    if not synced.done():
        log.warning("the journal took more than %.0f s to sync: hits answered unconfirmed",
                    _SYNC_WAIT_S)
        synced.set_result(False)


def _size(rows: list[EventRecord]) -> int:
    """About the bytes rows take in the journal (their lines; records add a header each)."""
    return sum(len(row[0]) for row in rows)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
