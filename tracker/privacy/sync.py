"""Privacy changes that hold in every worker from the moment the API answers.

Each worker keeps the campaigns' policies and the suppressions (opt-outs, erasures,
deleted accounts, GPC/DNT settings) in memory, so a hit never waits on the database
(ingest/policy.py, ingest/suppression.py). A change made through the API lands in PostgreSQL and in
the memory of the worker that took the request; the other workers of the server must
apply it before the answer goes out, or a hit they take just after the answer would be
recorded under the old rules. They learn of it like this:

- A **generation** in a small file shared by the server's workers
  (`TRACKER_DATA_DIR/privacy-sync`, mapped into memory). The worker that made a change,
  once it is committed, adds one to it (under a lock on the file, so no change is lost
  to another's) and rings every worker's **doorbell**, a datagram socket in Linux's
  abstract namespace named after the file and the worker's pid.
- The **check on every hit**: a worker compares the shared generation with the one it
  has applied (one read of shared memory). While they differ, the hit is
  answered as always but not recorded yet: it is held in memory, and the worker reads
  the changes from PostgreSQL (the policies and the suppressions changed since its last
  read); then it records the held hits under the new rules. Nothing the new rules
  forbid reaches the writer, the journal or the database, whatever the worker was doing
  when the change was made (busy, or stopped: a worker that was wedged records nothing
  before it has caught up). The hit's answer never waits: if PostgreSQL is unreachable
  right then, the held hits wait in memory (bounded by TRACKER_BUFFER_MAX_EVENTS; past
  it they are dropped and counted) until it is back.
- **Confirmation**: each worker has a slot in the file (its pid, the generation it
  has applied, the last erasure it has written out for), held with a lock the kernel
  drops when the process dies. The API answers once every live worker's slot shows the
  change applied, or after `CONFIRM_WAIT_S` (logged, naming the worker: it is wedged,
  and the check above still keeps it from recording anything the change forbids). A
  worker that is starting reads the generation before it loads the policies and
  suppressions, so it misses nothing and is not waited for.
- **Erasure** asks a little more: every worker also writes out what it captured before
  the change (its writer's flush, the journal first) before it confirms, so the erasure
  then deletes those events too, as a single worker does with its own.

Workers of other nodes (several `tracker serve` behind a balancer, one database), and
changes made by the CLI of another data dir, are read by every worker once a second;
between nodes a change therefore holds within a second (docs/privacy.md). Without the
file (the data dir is not writable) a worker logs a warning and reads every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

log = logging.getLogger("tracker.privacy.sync")

FILE_NAME = "privacy-sync"
# How long the API waits for the other workers to confirm a change; one that has not
# by then is wedged (the check on every hit keeps it from recording until it has read
# the change). Long enough for a busy worker's writer to write out what it holds.
CONFIRM_WAIT_S = 5.0
REFRESH_S = 1.0  # every worker reads the changes made elsewhere (other nodes) this often
_RETRY_FIRST_S = 0.05
_RETRY_MAX_S = 1.0

# The file: 8 words of header, then `_SLOTS` slots of 4 words (64-bit, native order).
_GENERATION = 0  # word: the last change made
_ERASURE = 1  # word: the generation of the last erasure (workers write out what they hold)
_HEADER_WORDS = 8
_SLOT_WORDS = 4  # pid, applied generation, erasure written out for, ready
_SLOTS = 1024
_SIZE = (_HEADER_WORDS + _SLOTS * _SLOT_WORDS) * 8
_LOCK_BYTE = 0  # the lock that orders changes: a byte of the header


class SharedGeneration:
    """The shared file, mapped: the generation, the erasure generation and the slots."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(self._fd).st_size < _SIZE:
                os.ftruncate(self._fd, _SIZE)  # zeros; two workers doing it at once is fine
            self._map = mmap.mmap(self._fd, _SIZE)
        except BaseException:
            os.close(self._fd)
            raise
        self.words = memoryview(self._map).cast("Q")
        info = os.fstat(self._fd)
        self.name = f"{info.st_dev:x}-{info.st_ino:x}"

    def change(self, erasure: bool) -> int:
        """Count a change (its data is committed by now); returns its generation."""
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, _LOCK_BYTE)
        try:
            generation = self.words[_GENERATION] + 1
            if erasure:
                self.words[_ERASURE] = generation
            self.words[_GENERATION] = generation
            return int(generation)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _LOCK_BYTE)

    def claim_slot(self) -> int | None:
        """A free slot, locked for as long as this process lives; None if all are taken."""
        for slot in range(_SLOTS):
            if self._try_lock(slot):
                base = self._base(slot)
                self.words[base: base + _SLOT_WORDS] = memoryview(
                    bytes(8 * _SLOT_WORDS)).cast("Q")
                self.words[base] = os.getpid()
                return slot
        return None

    def release_slot(self, slot: int) -> None:
        self.words[self._base(slot)] = 0
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._offset(slot))

    def set_slot(self, slot: int, applied: int, erasure: int, ready: bool) -> None:
        base = self._base(slot)
        self.words[base + 1] = applied
        self.words[base + 2] = erasure
        self.words[base + 3] = int(ready)

    def live_workers(self, own: int | None) -> list[tuple[int, int]]:
        """(slot, pid) of every other worker that is running and ready."""
        found = []
        for slot in range(_SLOTS):
            base = self._base(slot)
            pid = self.words[base]
            if slot == own or not pid:
                continue
            if self._try_lock(slot):  # nobody holds it: its worker died
                self.words[base: base + _SLOT_WORDS] = memoryview(
                    bytes(8 * _SLOT_WORDS)).cast("Q")
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._offset(slot))
            elif self.words[base + 3]:
                found.append((slot, int(pid)))
        return found

    def confirmed(self, slot: int, generation: int, erasure: bool) -> bool:
        base = self._base(slot)
        return bool(self.words[base + 1] >= generation
                    and (not erasure or self.words[base + 2] >= generation))

    def close(self) -> None:
        self.words.release()
        self._map.close()
        os.close(self._fd)

    def _try_lock(self, slot: int) -> bool:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._offset(slot))
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    @staticmethod
    def _base(slot: int) -> int:
        return _HEADER_WORDS + slot * _SLOT_WORDS

    def _offset(self, slot: int) -> int:
        return self._base(slot) * 8


def doorbell_name(shared: SharedGeneration, pid: int) -> bytes:
    """A socket in Linux's abstract namespace: no file, no path length limit, gone with
    the process."""
    return f"\0tracker-privacy-{shared.name}-{pid}".encode()


class PrivacySync:
    """One worker's side: the check on every hit, catching up, confirming, announcing.

    `refresh` reads the policies and suppressions changed since the last read into this
    worker's books, and says whether they hold an erasure it did not know of; `flush`
    writes out what the worker captured so far, leaving none of it in the journal (both
    raise on a database error); `release`, given to `start`, records the held hits
    (called once a change is applied).
    """

    def __init__(self, data_dir: Path, refresh: Callable[[], Awaitable[bool]],
                 flush: Callable[[], Awaitable[object]]) -> None:
        self._data_dir = data_dir
        self._refresh = refresh
        self._flush = flush
        self._release: Callable[[], None] = lambda: None
        self.shared: SharedGeneration | None = None
        self._slot: int | None = None
        self._doorbell: socket.socket | None = None
        self.applied = 0  # the generation this worker has applied
        self._erasure = 0  # the erasure generation it has written out for
        self._refreshing = asyncio.Lock()  # one read of the books at a time, in order
        self._catching_up: asyncio.Task[None] | None = None
        self._periodic: asyncio.Task[None] | None = None

    # -- start and stop --------------------------------------------------------------------

    def open(self) -> None:
        """Before the books are loaded: join the shared file, and take the generation that
        the load will cover."""
        try:
            self._data_dir.mkdir(parents=True, exist_ok=True)
            self.shared = SharedGeneration(self._data_dir / FILE_NAME)
        except OSError as exc:
            log.warning("privacy changes made by another worker apply here within %.0f s: "
                        "cannot use %s: %s", REFRESH_S, self._data_dir / FILE_NAME, exc)
            return
        self.applied = int(self.shared.words[_GENERATION])
        self._erasure = int(self.shared.words[_ERASURE])
        self._slot = self.shared.claim_slot()
        if self._slot is None:
            log.warning("no free slot in %s: this worker's confirmations are not waited for",
                        self.shared.path)

    def start(self, release: Callable[[], None]) -> None:
        """After the books are loaded and hits can be recorded (`release` records the hits
        held for a change): ready to confirm changes."""
        self._release = release
        if self.shared is not None:
            self._open_doorbell(self.shared)
            if self._slot is not None:
                self.shared.set_slot(self._slot, self.applied, self._erasure, ready=True)
            if self.behind():
                self.wake()
        self._periodic = asyncio.create_task(self._refresh_forever(), name="tracker-privacy-sync")

    async def stop(self) -> None:
        for task in (self._periodic, self._catching_up):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._doorbell is not None:
            asyncio.get_running_loop().remove_reader(self._doorbell.fileno())
            self._doorbell.close()
            self._doorbell = None
        if self.shared is not None:
            if self._slot is not None:
                self.shared.release_slot(self._slot)
            self.shared.close()
            self.shared = None

    # -- the hot path ------------------------------------------------------------------------

    def behind(self) -> bool:
        """Whether a change was made that this worker has not applied yet (every hit asks)."""
        shared = self.shared
        return shared is not None and shared.words[_GENERATION] != self.applied

    def wake(self) -> None:
        """Catch up now (a held hit, the doorbell): start the task unless it runs."""
        if self._catching_up is None or self._catching_up.done():
            self._catching_up = asyncio.get_running_loop().create_task(
                self._catch_up(), name="tracker-privacy-catch-up")

    async def settle(self, timeout_s: float) -> bool:
        """At shutdown: apply what is pending, if the database lets us within the time;
        whether this worker is current."""
        if self.behind():
            self.wake()
        task = self._catching_up
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), timeout_s)
        return not self.behind()

    # -- announcing a change (the worker whose API made it) -------------------------------

    async def changed(self, erasure: bool = False) -> None:
        """A privacy change is committed: every worker applies it (and, for an erasure,
        writes out what it captured before) before this returns, or CONFIRM_WAIT_S passes."""
        shared = self.shared
        if shared is None:
            if erasure:
                await self._flush()  # this worker alone; the others read it within a second
            return
        generation = shared.change(erasure)
        others = shared.live_workers(self._slot)
        for _, pid in others:
            self._ring(shared, pid)
        self.wake()
        deadline = time.monotonic() + CONFIRM_WAIT_S
        while True:
            waiting = [(slot, pid) for slot, pid in others
                       if not shared.confirmed(slot, generation, erasure)]
            own = self._slot is None or shared.confirmed(self._slot, generation, erasure)
            if not waiting and own:
                return
            if time.monotonic() >= deadline:
                alive = {pid for _, pid in shared.live_workers(self._slot)}
                late = sorted(pid for _, pid in waiting if pid in alive)
                if late or not own:
                    log.warning("worker(s) %s did not confirm a privacy change within %.0f s; "
                                "they record nothing until they have read it",
                                ", ".join(map(str, late or [os.getpid()])), CONFIRM_WAIT_S)
                return
            await asyncio.sleep(0.001)

    # -- catching up -------------------------------------------------------------------------

    async def _catch_up(self) -> None:
        delay = _RETRY_FIRST_S
        while self.shared is not None:
            generation = int(self.shared.words[_GENERATION])
            erasure = int(self.shared.words[_ERASURE])
            if generation == self.applied and erasure == self._erasure:
                return
            try:
                if generation != self.applied:
                    async with self._refreshing:
                        await self._refresh()
                    self.applied = generation
                    self._release()  # the held hits, under the rules read just now
                    self._confirm()
                if erasure != self._erasure:
                    await self._flush()
                    self._erasure = erasure
                    self._confirm()
                delay = _RETRY_FIRST_S
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Hits stay held until the database answers again.
                log.warning("cannot read a privacy change yet (%s); hits wait in memory",
                            exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
            except Exception:
                log.exception("unexpected error while applying a privacy change; retrying")
                await asyncio.sleep(_RETRY_MAX_S)

    def _confirm(self) -> None:
        if self.shared is not None and self._slot is not None:
            self.shared.set_slot(self._slot, self.applied, self._erasure, ready=True)

    async def _refresh_forever(self) -> None:
        """Changes made elsewhere (another node, the CLI of another data dir). An erasure
        made on another node has this worker write out what it captured, so that no
        line of it stays in the journal, and the erasure's sweep finds the events."""
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                async with self._refreshing:
                    erased = await self._refresh()
                if erased:
                    await self._flush()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Keep what we know; the database may be down for a while.
                log.debug("privacy refresh failed: %s", exc)
            if self.behind():
                self.wake()

    # -- the doorbell ------------------------------------------------------------------------

    def _open_doorbell(self, shared: SharedGeneration) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(doorbell_name(shared, os.getpid()))
        except OSError as exc:  # not Linux: changes are seen at the next hit or second
            log.debug("no privacy doorbell: %s", exc)
            sock.close()
            return
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._rung)
        self._doorbell = sock

    def _rung(self) -> None:
        assert self._doorbell is not None
        with contextlib.suppress(OSError):
            while self._doorbell.recv(16):
                pass
        self.wake()

    def _ring(self, shared: SharedGeneration, pid: int) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            with contextlib.suppress(OSError):  # gone, or its queue full: it wakes anyway
                sock.sendto(b"!", doorbell_name(shared, pid))


def announce_from_outside(data_dir: Path) -> bool:
    """A change made by a process that is no worker (the CLI): the workers of a server on
    this data dir read it at once. False when no server has used the data dir."""
    path = data_dir / FILE_NAME
    if not path.exists():
        return False
    shared = SharedGeneration(path)
    try:
        shared.change(erasure=False)
        for _, pid in shared.live_workers(None):
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, \
                    contextlib.suppress(OSError):
                sock.setblocking(False)
                sock.sendto(b"!", doorbell_name(shared, pid))
    finally:
        shared.close()
    return True
