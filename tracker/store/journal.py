"""The journal: events not yet in PostgreSQL, kept on disk in the data dir.

The writer spills batches here while PostgreSQL is unreachable or its memory buffer
is past its bound, and (with `TRACKER_DURABILITY=journal`) writes every event here
before the hit is answered. It reads them back, in order, when it can write again;
a segment file is removed only once every event in it is committed, and a replay
never double counts because events carry their id from capture (the writer's move skips
an event whose id is stored already: `move-staged` in sql/writer.sql).

Format. A journal is a set of segment files `{pid}-{instance}-{seq}.seg` in
`TRACKER_DATA_DIR/journal/`; a segment is a sequence of checksummed records
(store/journal_records.py: the record format, labels, and finding the next valid record
after damage). A torn tail (a crash in the middle of an append) or a corrupt record is
skipped and reported (a log line and a counter), never fatal: the reader resumes at the
next valid header. An append (its records) takes one write and one fdatasync.

Ownership. Each writer owns the segments it made, under an exclusive `flock` held for
as long as the file is open; a segment is made under a temporary name, locked, then
renamed, so no one can see it unlocked. The kernel drops the locks of a process that
dies, even by `kill -9`, so a segment whose lock can be taken belongs to nobody: a
worker adopts such orphans at start-up and now and then, and two live workers never
replay the same one.

The cap. `max_bytes` bounds the whole directory, every writer's segments together: the
workers of a server share one journal cap, and one worker that needs it all (its traffic,
or the segments it adopted) gets it all. An append takes an exclusive `flock` on `.cap`
while it sums the segment files and writes its record (not while it syncs), so writers
in several processes never pass the cap together; so does a writer that removes
segments. Under that lock each of them leaves the sum in `.cap` (8 bytes), where
`has_room` reads it without a lock or a directory scan: it sees at once the room another
worker gave back.

Appends are serialised within a process (a spill and a group commit may overlap); one
thread may `append` while the event loop reads and commits.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tracker.store.journal_records import (
    HEADER_BYTES,
    next_valid_header,
    record,
    to_payloads,
    unlabelled,
    valid_record,
)

log = logging.getLogger("tracker.store.journal")

SEGMENT_SUFFIX = ".seg"
_NEW_SUFFIX = ".new"
DEFAULT_SEGMENT_BYTES = 16 << 20
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_STALE_NEW_S = 60.0
_CAP_FILE = ".cap"
_USED = struct.Struct("<q")  # what the segments take, in .cap


class JournalFull(Exception):
    """The journal cannot take the records: its disk cap, or the disk itself, is full."""


@dataclass
class JournalStats:
    appended_records: int = 0
    appended_events: int = 0
    committed_events: int = 0
    adopted_segments: int = 0
    corrupt_records: int = 0  # corrupt stretches followed by a valid record
    torn_tails: int = 0  # corrupt stretches that run to the end of a segment
    skipped_bytes: int = 0


@dataclass(eq=False)
class _Segment:
    path: Path
    fd: int
    size: int  # bytes in the file, counted against the cap
    end: int  # end of the last complete, synced record
    events: int  # events not yet committed
    created: float  # time.time() of the oldest event it may hold
    done: int = 0  # records before this offset are committed
    sealed: bool = False  # no more appends: removed once done == end
    writing: bool = False  # an append is under way (never remove it then)
    holes: dict[int, int] = field(default_factory=dict)  # corrupt stretches: start -> next


@dataclass(frozen=True)
class Part:
    """Lines to append, in records that each start with the label ("": none)."""

    lines: Sequence[str]
    label: str = ""


@dataclass
class Chunk:
    """Events read from the journal, and how far to mark the journal committed after them."""

    records: list[tuple[str, bytes]]  # each record's label ("": none) and its lines, encoded
    events: int
    marks: list[tuple[_Segment, int, int]]  # segment, offset after the chunk, events in it

    @property
    def lines(self) -> list[str]:
        """Every event's line, in order."""
        return [line + "\n" for _, data in self.records for line in data.decode().split("\n")[:-1]]


class Journal:
    def __init__(self, directory: Path, *, max_bytes: int,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        # A segment must be small against the cap: space comes back a segment at a time.
        self._segment_bytes = max(HEADER_BYTES + 1, min(segment_bytes, max_bytes // 4))
        directory.mkdir(parents=True, exist_ok=True)
        self.instance = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._seq = 0
        self._adopted: list[_Segment] = []
        self._own: list[_Segment] = []
        self._active: _Segment | None = None
        self._mutex = threading.Lock()
        self._appending = threading.Lock()  # one append at a time in this process
        self._cap = os.open(directory / _CAP_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                            0o600)
        self._cap_mutex = threading.Lock()
        self._closed = False
        self.stats = JournalStats()

    # -- state -----------------------------------------------------------------------------

    @property
    def disk_bytes(self) -> int:
        """Bytes of segment files this journal holds (its own and adopted ones)."""
        with self._mutex:
            return sum(s.size for s in (*self._adopted, *self._own))

    @property
    def pending_events(self) -> int:
        """Events on disk that are not committed yet."""
        with self._mutex:
            return sum(s.events for s in (*self._adopted, *self._own))

    def oldest_age_s(self) -> float:
        """Age of the oldest segment still holding uncommitted events (0 if none)."""
        with self._mutex:
            waiting = [s.created for s in (*self._adopted, *self._own) if s.events]
        return max(0.0, time.time() - min(waiting)) if waiting else 0.0

    def segments(self) -> list[Path]:
        with self._mutex:
            return [s.path for s in (*self._adopted, *self._own)]

    def has_room(self, nbytes: int) -> bool:
        """Whether the shared cap leaves room for about `nbytes` more (records add a few
        bytes of header each), as the last append or removal by any writer left it. An
        append checks exactly."""
        stored = os.pread(self._cap, _USED.size, 0)
        used = _USED.unpack(stored)[0] if len(stored) == _USED.size else 0
        return used + nbytes <= self.max_bytes

    @contextlib.contextmanager
    def _capped(self) -> Iterator[int]:
        """The cap's lock, and what the segments take now; the block leaves in .cap what
        they take after it (the value it sends back, else the same)."""
        # The flock excludes other processes; threads of this one share its open file, and
        # so its lock (a second flock on it would not wait), so they take the mutex first.
        with self._cap_mutex:
            fcntl.flock(self._cap, fcntl.LOCK_EX)
            try:
                yield _directory_bytes(self.directory)
            finally:
                with contextlib.suppress(OSError):
                    os.pwrite(self._cap, _USED.pack(_directory_bytes(self.directory)), 0)
                fcntl.flock(self._cap, fcntl.LOCK_UN)

    def _removed(self, segments: Sequence[tuple[Path, int]]) -> None:
        """Remove segments (path, locked descriptor), and say so in .cap."""
        if not segments:
            return
        with self._capped():
            for path, fd in segments:
                _remove(path, fd)

    # -- writing ---------------------------------------------------------------------------

    def append(self, lines: Sequence[str]) -> None:
        """Append the lines as one record (several past MAX_PAYLOAD_BYTES), then fdatasync."""
        self.append_parts([Part(lines)])

    def append_parts(self, parts: Sequence[Part]) -> None:
        """Append each part as a record (several past MAX_PAYLOAD_BYTES), with one write
        and one fdatasync for them all.

        All or nothing: raises JournalFull when the cap or the disk leaves no room, or
        OSError on another failure; either way nothing of it is kept."""
        events = sum(len(part.lines) for part in parts)
        if not events:
            return
        payloads = [payload for part in parts if part.lines
                    for payload in to_payloads(part.lines, part.label)]
        data = b"".join(map(record, payloads))
        with self._appending:
            segment, start = self._write(data)
            try:
                os.fdatasync(segment.fd)
            except OSError as exc:
                # Cut the file back so that the next append starts on a record boundary.
                with self._capped(), contextlib.suppress(OSError):
                    os.ftruncate(segment.fd, start)
                with self._mutex:
                    segment.writing = False
                if exc.errno in _FULL_ERRNOS:
                    raise JournalFull(f"disk full: {exc.strerror}") from exc
                raise
            with self._mutex:
                segment.size = segment.end = start + len(data)
                segment.events += events
                segment.writing = False
                self.stats.appended_records += len(payloads)
                self.stats.appended_events += events

    def _write(self, data: bytes) -> tuple[_Segment, int]:
        """Under the cap's lock: check the directory has room for `data`, and write it at
        the end of the active segment (a new one if it would pass its size). Returns the
        segment, marked writing (so that no commit removes it), and where the data starts."""
        with self._mutex:
            if self._closed:  # and its .cap descriptor perhaps too
                raise OSError(errno.EBADF, "the journal is closed")
        segment: _Segment | None = None
        try:
            with self._capped() as used:
                with self._mutex:
                    segment = self._active
                    if segment is not None and segment.size > 0 and (
                            segment.size + len(data) > self._segment_bytes):
                        segment.sealed = True
                        segment = self._active = None
                    if segment is not None:
                        segment.writing = True
                if used + len(data) > self.max_bytes:
                    raise JournalFull(f"journal cap of {self.max_bytes} bytes reached "
                                      f"({used} used, {len(data)} more needed)")
                if segment is None:
                    segment = self._new_segment()  # marked writing
                start = segment.size
                try:
                    _write_all(segment.fd, data, start)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.ftruncate(segment.fd, start)
                    raise
                return segment, start
        except BaseException as exc:
            if segment is not None:
                with self._mutex:
                    segment.writing = False
            if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
                raise JournalFull(f"disk full: {exc.strerror}") from exc
            raise

    def _new_segment(self) -> _Segment:
        """A new segment, made under a temporary name and locked before anyone can see it."""
        with self._mutex:
            self._seq += 1
            name = f"{self.instance}-{self._seq:06d}{SEGMENT_SUFFIX}"
        path = self.directory / name
        temporary = path.with_name(name + _NEW_SUFFIX)
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(temporary, path)
            _sync_directory(self.directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        segment = _Segment(path, fd, size=0, end=0, events=0, created=time.time(), writing=True)
        with self._mutex:
            self._own.append(segment)
            self._active = segment
        return segment

    # -- orphans ---------------------------------------------------------------------------

    def adopt_orphans(self) -> int:
        """Take over the segments no live process holds (their writer died or stopped);
        returns how many. Each is scanned now, so damage is reported once, here."""
        with self._mutex:
            mine = {s.path.name for s in (*self._adopted, *self._own)}
        adopted = 0
        for path in _by_age(self.directory):
            if path.name in mine:
                continue
            temporary = path.name.endswith(_NEW_SUFFIX)
            if temporary and not _older_than(path, _STALE_NEW_S):
                continue  # a live writer may be about to lock and name it
            fd = _lock(path)
            if fd is None:
                continue
            if temporary:
                # A writer died between making a segment and naming it: it is empty.
                self._removed([(path, fd)])
                continue
            try:
                segment = self._scan(path, fd)
            except OSError as exc:
                log.warning("cannot read journal segment %s: %s", path.name, exc)
                os.close(fd)
                continue
            if segment.events == 0:
                self._removed([(path, fd)])  # nothing (valid) in it
                continue
            with self._mutex:
                self._adopted.append(segment)
                self.stats.adopted_segments += 1
            log.info("adopted journal segment %s: %d events to replay", path.name,
                     segment.events)
            adopted += 1
        return adopted

    def _scan(self, path: Path, fd: int) -> _Segment:
        info = os.fstat(fd)
        segment = _Segment(path, fd, size=info.st_size, end=info.st_size, events=0,
                           created=info.st_mtime, sealed=True)
        offset = 0
        while offset < segment.end:
            payload, offset = self._record_at(segment, offset, segment.end)
            segment.events += unlabelled(payload)[1].count(b"\n")
        return segment

    # -- reading ---------------------------------------------------------------------------

    def read(self, max_events: int, after: Chunk | None = None) -> Chunk | None:
        """The oldest uncommitted events, in whole records: up to max_events, but at least
        one record. None when there is nothing to read. With `after`, a chunk read before
        and not committed yet, the events that follow it (so several chunks can be written
        at once; commit them in the order they were read)."""
        with self._mutex:
            segments = [(s, s.done, s.end) for s in (*self._adopted, *self._own)]
        if after is not None and after.marks:
            last, offset, _ = after.marks[-1]
            for i, (segment, done, end) in enumerate(segments):
                if segment is last:
                    segments = [(segment, max(done, offset), end), *segments[i + 1:]]
                    break
        records: list[tuple[str, bytes]] = []
        total = 0
        marks: list[tuple[_Segment, int, int]] = []
        for segment, offset, end in segments:
            start, events = offset, 0
            while offset < end:
                payload, following = self._record_at(segment, offset, end)
                label, data = unlabelled(payload)
                found = data.count(b"\n")
                if total and total + found > max_events:
                    break
                if found:
                    records.append((label, data))
                total += found
                events += found
                offset = following
                if total >= max_events:
                    break
            if offset > start:
                marks.append((segment, offset, events))
            if offset < end:
                break
        return Chunk(records, total, marks) if marks else None

    def commit(self, chunk: Chunk) -> None:
        """The chunk's events are in PostgreSQL: mark them, and remove every segment that
        has nothing left to give (its own active one too, to give its space back)."""
        with self._mutex:
            for segment, offset, events in chunk.marks:
                if offset > segment.done:
                    segment.done = offset
                    segment.events = max(0, segment.events - events)
                    self.stats.committed_events += events
            retired = self._take_done()
        self._removed([(segment.path, segment.fd) for segment in retired])

    def seal(self) -> None:
        """The next append starts a new segment; this one (like every other) is removed as
        soon as all its events are committed, at once if they are. Committed records are
        otherwise kept until their segment fills up and is all committed: an erasure
        (privacy/sync.py) seals, then writes everything out, so that no record captured
        before it is left on the disk."""
        with self._mutex:
            if self._active is not None:
                self._active.sealed = True
                self._active = None
            retired = self._take_done()
        self._removed([(segment.path, segment.fd) for segment in retired])

    def _take_done(self) -> list[_Segment]:
        """(Under the mutex.) The segments with nothing left to give, taken out: every
        sealed one whose events are all committed, and the active one when it is (to give
        its space back)."""
        retired: list[_Segment] = []
        for group in (self._adopted, self._own):
            for segment in list(group):
                if segment.writing or segment.done < segment.end:
                    continue
                if segment is self._active:
                    self._active = None
                elif not segment.sealed:
                    continue
                group.remove(segment)
                retired.append(segment)
        return retired

    def _record_at(self, segment: _Segment, offset: int, end: int) -> tuple[bytes, int]:
        """The payload of the record at offset and the offset after it; an empty payload
        and the next valid header (or end) when the bytes there are damaged."""
        hole = segment.holes.get(offset)
        if hole is not None:
            return b"", hole
        payload = valid_record(segment.fd, offset, end)
        if payload is not None:
            return payload, offset + HEADER_BYTES + len(payload)
        after = next_valid_header(segment.fd, offset + 1, end)
        segment.holes[offset] = after
        skipped = after - offset
        self.stats.skipped_bytes += skipped
        if after < end:
            self.stats.corrupt_records += 1
            log.warning("journal segment %s: corrupt record at byte %d, %d bytes skipped",
                        segment.path.name, offset, skipped)
        else:
            self.stats.torn_tails += 1
            log.warning("journal segment %s: torn or corrupt tail at byte %d, %d bytes skipped",
                        segment.path.name, offset, skipped)
        return b"", after

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release every segment: the committed ones are removed, the rest stay on disk
        for the next start (or another worker) to replay."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            segments = [*self._adopted, *self._own]
            self._adopted, self._own, self._active = [], [], None
        for segment in segments:
            if segment.done < segment.end:
                os.close(segment.fd)
        # An append stuck in another thread (a disk that hangs) must not hold the shutdown:
        # then the descriptors go with the process.
        if self._appending.acquire(blocking=False):
            try:
                self._removed([(s.path, s.fd) for s in segments if s.done >= s.end])
                os.close(self._cap)
            finally:
                self._appending.release()


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _directory_bytes(directory: Path) -> int:
    """What every segment in the directory takes, whoever writes it: the cap's measure."""
    total = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.endswith((SEGMENT_SUFFIX, SEGMENT_SUFFIX + _NEW_SUFFIX)):
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                    total += entry.stat().st_size
    return total


def _by_age(directory: Path) -> list[Path]:
    found = []
    for path in directory.iterdir():
        if path.name.endswith((SEGMENT_SUFFIX, SEGMENT_SUFFIX + _NEW_SUFFIX)):
            with contextlib.suppress(FileNotFoundError):
                found.append((path.stat().st_mtime_ns, path.name, path))
    return [path for *_, path in sorted(found)]


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except FileNotFoundError:
        return False


def _lock(path: Path) -> int | None:
    """An open, exclusively locked descriptor of a segment nobody holds, or None."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    # Its owner may have removed it between our listing and our lock.
    if os.fstat(fd).st_nlink == 0:
        os.close(fd)
        return None
    return fd


def _remove(path: Path, fd: int) -> None:
    """Unlink while still holding the lock, so no one can take it in between."""
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    finally:
        os.close(fd)
