"""tracker.journal on its own (files in a temp dir), and the writer with a journal against a
real PostgreSQL: spills, replays, bounds, durable group commit, shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from benchmarks.wrk import Plan, http_request, run_plans, write_plan
from tracker.ingest.pipeline import DropReason, EventRecord
from tracker.store import journal_records
from tracker.store.backlog import Backlog, WriterStats
from tracker.store.database import connect
from tracker.store.journal import Journal, JournalFull, Part
from tracker.store.journal_records import HEADER_BYTES, MAGIC
from tracker.store.lanes import placed
from tracker.store.writer import BatchWriter

from .support import (
    Server,
    campaign,
    db_value,
    new_account,
    register,
    unreachable_dsn,
    wait_for,
    wait_for_async,
)
from .test_writer import row, rows

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20


def lines(n: int) -> list[str]:
    return [line for line, *_ in rows(n)]


def read_all(journal: Journal) -> list[str]:
    """Everything the journal gives, committing as a writer would."""
    got: list[str] = []
    while (chunk := journal.read(1000)) is not None:
        got.extend(chunk.lines)
        journal.commit(chunk)
    return got


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def records(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of each record of an undamaged segment, parsed independently of
    store/journal.py."""
    found, offset = [], 0
    while offset < len(data):
        magic, length, crc = struct.unpack_from("<4sII", data, offset)
        assert magic == MAGIC
        assert zlib.crc32(data[offset + 12: offset + 12 + length]) == crc
        found.append((offset, 12 + length))
        offset += 12 + length
    assert offset == len(data)
    return found


def payloads_of(data: bytes) -> list[bytes]:
    return [data[offset + HEADER_BYTES: offset + size] for offset, size in records(data)]


def orphan_from(data: bytes, directory: Path, name: str = "4242-deadbeef-000001.seg") -> Journal:
    """A journal that finds `data` as a segment left by a dead writer."""
    directory.mkdir(parents=True)
    (directory / name).write_bytes(data)
    journal = Journal(directory, max_bytes=64 * MB)
    journal.adopt_orphans()
    return journal


def three_records(tmp_path: Path) -> tuple[bytes, list[list[str]]]:
    batches = [lines(3), lines(2), lines(1)]
    source = Journal(tmp_path / "source", max_bytes=64 * MB)
    for batch in batches:
        source.append(batch)
    (path,) = segment_files(tmp_path / "source")
    data = path.read_bytes()
    source.close()
    return data, batches


# -- the journal alone ---------------------------------------------------------------------


def test_appended_batches_come_back_in_order_and_a_committed_segment_is_removed(
        tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=64 * MB)
    batches = [lines(5), lines(1), lines(40)]
    for batch in batches:
        journal.append(batch)
    assert journal.pending_events == 46
    first = journal.read(6)
    assert first is not None
    assert first.lines == batches[0] + batches[1]  # whole records, up to the limit
    journal.commit(first)
    assert journal.pending_events == 40
    assert segment_files(tmp_path), "a segment is kept while events in it are uncommitted"
    assert read_all(journal) == batches[2]
    assert journal.read(1000) is None
    assert segment_files(tmp_path) == []
    assert journal.disk_bytes == 0
    journal.append(lines(2))  # a new segment after the last one went
    assert len(segment_files(tmp_path)) == 1
    journal.close()


def test_reading_after_a_chunk_in_flight_gives_what_follows_across_segments(
        tmp_path: Path) -> None:
    # A writer with several connections reads the next chunk before the last one is
    # committed; a segment goes only once every chunk with events of it is.
    journal = Journal(tmp_path, max_bytes=64 * MB, segment_bytes=1)  # a segment per record
    batches = [lines(3), lines(2), lines(4)]
    for batch in batches:
        journal.append(batch)
    assert len(segment_files(tmp_path)) == 3
    first = journal.read(3)
    second = journal.read(3, after=first)
    third = journal.read(3, after=second)
    assert first is not None and second is not None and third is not None
    assert [first.lines, second.lines, third.lines] == batches
    assert journal.read(3, after=third) is None
    assert journal.read(3) == first, "nothing is committed yet: a fresh read starts over"
    journal.commit(first)
    journal.commit(second)
    assert journal.pending_events == 4
    assert len(segment_files(tmp_path)) == 1
    assert journal.read(3, after=first) == third, "a chunk read before the commits still leads"
    journal.commit(third)
    assert segment_files(tmp_path) == []
    journal.close()


def test_a_segment_holds_the_copy_lines_and_nothing_else(tmp_path: Path) -> None:
    # The privacy promise: what reaches the disk is exactly the policy-filtered COPY lines.
    journal = Journal(tmp_path, max_bytes=64 * MB)
    batches = [lines(3), lines(7)]
    for batch in batches:
        journal.append(batch)
    (path,) = segment_files(tmp_path)
    data = path.read_bytes()
    payloads = b"".join(data[o + HEADER_BYTES: o + n] for o, n in records(data))
    assert payloads == "".join(batches[0] + batches[1]).encode()
    assert len(data) == len(payloads) + 2 * HEADER_BYTES
    assert path.stat().st_mode & 0o777 == 0o600
    journal.close()


def test_a_label_is_kept_with_its_record_and_is_not_an_event(tmp_path: Path) -> None:
    # What the writer sorts for its lanes: two parts in one append, one fsync; a label
    # line on disk says where they go, and is neither counted nor read back as an event.
    journal = Journal(tmp_path, max_bytes=64 * MB)
    even, odd = lines(2), lines(3)
    journal.append_parts([Part(even, "lane 0/2 days 20000"), Part(odd, "lane 1/2 days 20000"),
                          Part([], "nothing")])
    assert journal.pending_events == 5
    assert journal.stats.appended_records == 2
    (path,) = segment_files(tmp_path)
    data = path.read_bytes()
    payloads = b"".join(data[o + HEADER_BYTES: o + n] for o, n in records(data))
    assert payloads == ("#lane 0/2 days 20000\n" + "".join(even)
                        + "#lane 1/2 days 20000\n" + "".join(odd)).encode()
    chunk = journal.read(1000)
    assert chunk is not None and chunk.events == 5 and chunk.lines == even + odd
    assert [label for label, _ in chunk.records] == ["lane 0/2 days 20000", "lane 1/2 days 20000"]
    journal.close()
    again = Journal(tmp_path, max_bytes=64 * MB)
    assert again.adopt_orphans() == 1
    assert again.pending_events == 5, "a scan counts the lines, not the labels"
    assert read_all(again) == even + odd
    again.close()


def test_a_part_past_the_record_size_is_split_into_records_each_labelled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_records, "MAX_PAYLOAD_BYTES", 1000)
    journal = Journal(tmp_path, max_bytes=64 * MB)
    batch = lines(20)  # ~130 bytes each: three records of at most 1,000 bytes
    journal.append_parts([Part(batch, "lane 1/2 days 20000")])
    (path,) = segment_files(tmp_path)
    payloads = payloads_of(path.read_bytes())
    assert len(payloads) == journal.stats.appended_records == 3
    assert all(p.startswith(b"#lane 1/2 days 20000\n") and len(p) <= 1000 for p in payloads)
    chunk = journal.read(1000)
    assert chunk is not None and chunk.lines == batch and chunk.events == 20
    journal.close()


@pytest.mark.parametrize("label", [
    "", "lane 0/3 days 1", "lane 2/2 days 1", "lane x/2 days 1", "lane 0/2", "lane 0/2 days",
    "lane 0/2 days 1 more", "lane -1/2 days 1", "lanes 0/2 days 1"])
def test_a_label_for_other_lanes_or_unreadable_places_nothing(label: str) -> None:
    assert placed(label, 2) is None
    assert placed("lane 1/2 days 20000,20001", 2) == (1, [20000, 20001])


@pytest.mark.parametrize(("spilled_by", "replayed_by"), [(2, 2), (1, 2), (2, 1), (3, 2)])
async def test_events_spilled_for_some_lanes_are_replayed_once_by_a_writer_with_any(
        writers: Callable[..., BatchWriter], dsn: str, db: asyncpg.Connection,
        tmp_path: Path, spilled_by: int, replayed_by: int) -> None:
    # A spill sorts events for the writer's lanes; a writer with as many takes each part
    # whole, one with another number reads the lines again. Either way: every event once,
    # on two days (each needing its partition).
    day_one = datetime(2026, 3, 1, 23, 59, tzinfo=UTC)
    batch = [row(day_one + timedelta(seconds=i), message_id=700 + i % 7) for i in range(120)]
    first = writers(Journal(tmp_path, max_bytes=64 * MB), Switch(dsn), batch_size=50,
                    connections=spilled_by)
    first.start()
    for item in batch:
        first.add(item)
    assert await first.close(5.0) == 0
    labels = {payload.split(b"\n", 1)[0].decode() for path in segment_files(tmp_path)
              for payload in payloads_of(path.read_bytes())}
    lanes = set()
    for label in labels:  # parts of 50 events: some on one day, some on both
        lane, days = label.removeprefix("#lane ").split(f"/{spilled_by} days ")
        assert days in ("20513", "20514", "20513,20514"), label
        lanes.add(int(lane))
    assert lanes == set(range(spilled_by))
    journal = Journal(tmp_path, max_bytes=64 * MB)
    assert journal.adopt_orphans() >= 1
    second = writers(journal, lambda: connect(dsn), batch_size=50, connections=replayed_by)
    assert await second.flush() == 120
    assert second.stats.replayed == 120
    await exactly_once(db, batch)
    assert segment_files(tmp_path) == []


def test_an_uncommitted_segment_survives_close_and_a_new_journal_replays_it(
        tmp_path: Path) -> None:
    first = Journal(tmp_path, max_bytes=64 * MB)
    batch = lines(4)
    first.append(batch)
    first.close()
    second = Journal(tmp_path, max_bytes=64 * MB)
    assert second.adopt_orphans() == 1
    assert second.pending_events == 4
    assert read_all(second) == batch
    assert segment_files(tmp_path) == []
    second.close()


def test_a_torn_tail_at_every_byte_of_the_last_record_is_skipped_and_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data, batches = three_records(tmp_path)
    last_start, last_size = records(data)[-1]
    whole = batches[0] + batches[1]
    for cut in range(last_start, last_start + last_size):
        caplog.clear()
        journal = orphan_from(data[:cut], tmp_path / f"cut{cut}")
        assert read_all(journal) == whole, f"cut at byte {cut}"
        torn = cut > last_start
        assert journal.stats.torn_tails == int(torn), f"cut at byte {cut}"
        assert journal.stats.skipped_bytes == cut - last_start
        assert journal.stats.corrupt_records == 0
        assert ("torn or corrupt tail" in caplog.text) == torn
        assert segment_files(tmp_path / f"cut{cut}") == []
        journal.close()
    untouched = orphan_from(data, tmp_path / "whole")
    assert read_all(untouched) == whole + batches[2]
    assert untouched.stats.torn_tails == 0


@pytest.mark.parametrize("where", ["magic", "length", "crc", "payload", "last payload byte"])
def test_a_corrupt_record_in_the_middle_is_skipped_and_the_next_one_read(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str) -> None:
    data, batches = three_records(tmp_path)
    start, size = records(data)[1]
    at = {"magic": start + 1, "length": start + 4, "crc": start + 9,
          "payload": start + HEADER_BYTES + 20, "last payload byte": start + size - 1}[where]
    damaged = bytearray(data)
    damaged[at] ^= 0x5A
    journal = orphan_from(bytes(damaged), tmp_path / "damaged")
    assert journal.pending_events == 4
    assert read_all(journal) == batches[0] + batches[2]
    assert journal.stats.corrupt_records == 1
    assert journal.stats.torn_tails == 0
    assert journal.stats.skipped_bytes == size
    assert "corrupt record at byte" in caplog.text
    journal.close()


def test_garbage_only_segment_is_reported_and_removed(tmp_path: Path) -> None:
    journal = orphan_from(b"\x00" * 100 + MAGIC + b"\xff" * 50, tmp_path / "junk")
    assert journal.pending_events == 0
    assert journal.stats.torn_tails == 1
    assert segment_files(tmp_path / "junk") == []
    journal.close()


def test_the_disk_cap_is_never_passed_and_space_comes_back_once_committed(
        tmp_path: Path) -> None:
    cap = 16 * 1024
    journal = Journal(tmp_path, max_bytes=cap)
    appended = 0
    with pytest.raises(JournalFull):
        for _ in range(1000):
            journal.append(lines(5))
            appended += 5
    assert appended > 0
    assert journal.disk_bytes <= cap
    assert sum(p.stat().st_size for p in segment_files(tmp_path)) <= cap
    assert len(read_all(journal)) == appended
    journal.append(lines(5))  # room again
    journal.close()


def test_the_workers_share_one_cap_and_one_may_use_all_of_it(tmp_path: Path) -> None:
    # Two writers in one directory, as two workers have: whichever needs the room gets
    # it, and together they never pass the cap.
    cap = 16 * 1024
    busy, idle = Journal(tmp_path, max_bytes=cap), Journal(tmp_path, max_bytes=cap)
    taken = 0
    with pytest.raises(JournalFull):
        while True:
            busy.append(lines(5))
            taken += 5
    assert busy.disk_bytes > cap * 3 // 4, "one worker could not use the whole cap"
    with pytest.raises(JournalFull):
        idle.append(lines(5))
    assert busy.disk_bytes + idle.disk_bytes <= cap
    assert not idle.has_room(1024)
    assert len(read_all(busy)) == taken  # committed: its space comes back, to either
    assert idle.has_room(1024)
    idle.append(lines(5))
    busy.close()
    idle.close()


def test_a_segment_of_a_live_writer_is_never_adopted(tmp_path: Path) -> None:
    # Two writers in one directory (as two workers have): separate files, neither takes
    # the other's, even in one process (flock locks belong to the open file).
    first = Journal(tmp_path, max_bytes=64 * MB)
    second = Journal(tmp_path, max_bytes=64 * MB)
    first.append(lines(2))
    second.append(lines(3))
    assert first.instance != second.instance
    assert len(segment_files(tmp_path)) == 2
    assert first.adopt_orphans() == 0
    assert second.adopt_orphans() == 0
    assert first.pending_events == 2 and second.pending_events == 3
    first.close()
    assert second.adopt_orphans() == 1  # now an orphan
    assert second.pending_events == 5
    second.close()


_CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from tracker.store.journal import Journal
    journal = Journal(Path(sys.argv[1]), max_bytes=1 << 26)
    if sys.argv[2] == "append":
        journal.append([f"line {i} of {os.getpid()}\\n" for i in range(int(sys.argv[3]))])
    else:
        journal.adopt_orphans()
        print(*sorted(p.name for p in journal.segments()), flush=True)
    print("ready", flush=True)
    if sys.argv[-1] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()  # hold the locks until told to go
""")


def _child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _CHILD, *args], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def _ready(child: subprocess.Popen[str]) -> list[str]:
    """What the child printed before "ready"."""
    assert child.stdout is not None
    said = []
    while (line := child.stdout.readline().strip()) != "ready":
        assert line or child.poll() is None, "the child process ended early"
        said.append(line)
    return said


def test_orphans_of_a_dead_process_are_replayed_and_a_live_ones_are_not(
        tmp_path: Path) -> None:
    dead = _child(str(tmp_path), "append", "7", "die")
    _ready(dead)
    assert dead.wait(10) == -signal.SIGKILL
    alive = _child(str(tmp_path), "append", "5", "hold")
    try:
        _ready(alive)
        journal = Journal(tmp_path, max_bytes=64 * MB)
        assert journal.adopt_orphans() == 1  # the dead one's only
        got = read_all(journal)
        assert got == [f"line {i} of {dead.pid}\n" for i in range(7)]
        assert journal.adopt_orphans() == 0
    finally:
        alive.kill()
        alive.wait(10)
    assert journal.adopt_orphans() == 1
    assert read_all(journal) == [f"line {i} of {alive.pid}\n" for i in range(5)]
    assert segment_files(tmp_path) == []
    journal.close()


def test_two_workers_adopting_at_once_never_share_a_segment(tmp_path: Path) -> None:
    for _ in range(24):
        left = Journal(tmp_path, max_bytes=64 * MB)
        left.append(lines(1))
        left.close()
    orphans = {p.name for p in segment_files(tmp_path)}
    assert len(orphans) == 24
    workers = [_child(str(tmp_path), "adopt", "hold") for _ in range(3)]
    try:
        adopted = [set(" ".join(_ready(w)).split()) for w in workers]
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(10)
    assert set().union(*adopted) == orphans
    assert sum(len(a) for a in adopted) == len(orphans), "a segment was adopted twice"


# -- the writer with a journal, against PostgreSQL ------------------------------------------


async def exactly_once(db: asyncpg.Connection, expected: list[EventRecord]) -> None:
    total, distinct = await db.fetchrow("select count(*), count(distinct id) from events")
    assert (total, distinct) == (len(expected), len(expected))
    ids = {r[0] for r in await db.fetch("select replace(id::text, '-', '') from events")}
    assert ids == {line.split("\t")[2] for line, *_ in expected}


class Switch:
    """A connect function that fails (closed port) until switched on."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.up = False
        self._closed = unreachable_dsn()

    async def __call__(self) -> asyncpg.Connection:
        return await connect(self.dsn if self.up else self._closed)


@pytest.fixture
async def writers(dsn: str) -> AsyncIterator[Callable[..., BatchWriter]]:
    made: list[BatchWriter] = []

    def make(journal: Journal | None, connect_fn: Callable[[], Awaitable[asyncpg.Connection]],
             **options: object) -> BatchWriter:
        settings: dict[str, object] = {"batch_size": 100, "interval_s": 3600.0,
                                       "max_buffered": 10_000}
        settings.update(options)
        writer = BatchWriter(connect_fn, journal=journal, **settings)  # type: ignore[arg-type]
        made.append(writer)
        return writer

    yield make
    for writer in made:
        await writer.close(0.5)


async def test_while_postgres_is_unreachable_events_spill_and_are_replayed_once_when_back(
        writers: Callable[..., BatchWriter], dsn: str, db: asyncpg.Connection,
        tmp_path: Path) -> None:
    switch = Switch(dsn)
    journal = Journal(tmp_path, max_bytes=64 * MB)
    writer = writers(journal, switch, interval_s=0.02)
    writer.start()
    batch = rows(250)
    for item in batch:
        assert writer.add(item) is None
    await wait_for_async(lambda: writer.buffered == 0 and journal.pending_events == 250,
                         message="the buffer to spill to the journal")
    assert not writer.healthy
    assert segment_files(tmp_path)
    switch.up = True
    await wait_for_async(lambda: journal.pending_events == 0 and writer.buffered == 0,
                         message="the journal to be replayed")
    await exactly_once(db, batch)
    assert writer.stats.replayed == 250
    assert segment_files(tmp_path) == []


@pytest.mark.slow
async def test_past_the_memory_bound_events_spill_instead_of_being_dropped(
        writers: Callable[..., BatchWriter], dsn: str, db: asyncpg.Connection,
        tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=64 * MB)
    writer = writers(journal, lambda: connect(dsn), max_buffered=10, batch_size=7)
    batch = rows(300)
    for item in batch:
        assert writer.add(item) is None
        # A disk that keeps up: each spill is on disk before memory fills again.
        await wait_for_async(lambda: writer.buffered <= 10, message="the spill to be written")
    assert writer.stats.dropped == {}
    assert journal.stats.appended_events >= 290
    assert await writer.flush() == 300
    await exactly_once(db, batch)


async def test_events_that_come_while_a_spill_is_written_queue_for_the_next_one(
        writers: Callable[..., BatchWriter], dsn: str, db: asyncpg.Connection,
        tmp_path: Path) -> None:
    # A bound of one event: every event past the first spills, and all of them arrive
    # while the first spill is still being written (nothing here lets it run). None may
    # be dropped while the journal has room.
    journal = Journal(tmp_path, max_bytes=64 * MB)
    writer = writers(journal, lambda: connect(dsn), max_buffered=1, batch_size=100)
    batch = rows(500)
    assert [writer.add(item) for item in batch] == [None] * len(batch)
    assert writer.stats.dropped == {}
    assert await writer.flush() == 500
    assert journal.stats.appended_events == 499
    await exactly_once(db, batch)


async def test_with_memory_and_journal_full_drops_are_counted_by_reason_and_logged_per_interval(
        writers: Callable[..., BatchWriter], dsn: str, db: asyncpg.Connection,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    switch = Switch(dsn)
    journal = Journal(tmp_path, max_bytes=8 * 1024)
    reasons: list[DropReason] = []
    writer = writers(journal, switch, interval_s=0.01, max_buffered=20, batch_size=10,
                     on_drop=reasons.append)
    writer.start()
    batch = rows(2000)
    accepted = 0
    for item in batch:
        refused = writer.add(item)
        if refused is None:
            accepted += 1
        else:  # refused now: the caller counts it, as the hit path does
            reasons.append(refused)
        # Each spill reaches the disk before memory fills again, until the journal is full.
        await wait_for_async(lambda: writer.buffered <= 20, message="the spill to be written")
    assert DropReason.JOURNAL_FULL in writer.stats.dropped
    assert journal.disk_bytes <= 8 * 1024
    assert writer.buffered <= 2 * 20 + 10  # memory, a spill under way, a batch in flight
    assert set(writer.stats.dropped) <= {DropReason.JOURNAL_FULL, DropReason.BUFFER_FULL}
    assert accepted < len(batch)
    switch.up = True
    await wait_for_async(lambda: writer.healthy and writer.buffered == 0
                         and journal.pending_events == 0, message="the writer to catch up")
    dropped = sum(writer.stats.dropped.values())
    assert len(reasons) == dropped
    # Every event is either in PostgreSQL once or was dropped and counted, never both.
    assert await db.fetchval("select count(distinct id) from events") == len(batch) - dropped
    assert await db.fetchval("select count(*) from events") == len(batch) - dropped
    await writer.close(1.0)
    reports = [r.getMessage() for r in caplog.records
               if "events since the last report" in r.getMessage()]
    assert dropped > 10
    assert 1 <= len(reports) <= 2, "drops are logged once per interval, not per event"
    assert "journal_full: " in " ".join(reports)


async def test_durable_writer_has_the_event_on_disk_before_synced_resolves(
        writers: Callable[..., BatchWriter], dsn: str, db: asyncpg.Connection,
        tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=64 * MB)
    writer = writers(journal, lambda: connect(dsn), durable=True)
    writer.start()
    batch = rows(30)
    waits = []
    for item in batch:
        assert writer.add(item) is None
        waiter = writer.synced()
        assert waiter is not None
        waits.append(waiter)
    assert writer.synced() is not None
    assert await asyncio.gather(*waits) == [True] * 30
    assert writer.synced() is None  # nothing is waiting
    on_disk = b"".join(p.read_bytes() for p in segment_files(tmp_path))
    assert all(line.encode() in on_disk for line, *_ in batch)
    assert await db.fetchval("select count(*) from events") == 0
    assert writer.stats.journaled == 30
    assert await writer.flush() == 30
    await exactly_once(db, batch)
    assert segment_files(tmp_path) == []


async def test_durable_writer_whose_journal_is_full_answers_and_keeps_events_in_memory(
        writers: Callable[..., BatchWriter], dsn: str, db: asyncpg.Connection,
        tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=1024)
    writer = writers(journal, lambda: connect(dsn), durable=True)
    writer.start()
    batch = rows(20)  # far more than 1 KB
    for item in batch:
        writer.add(item)
    waiter = writer.synced()
    assert waiter is not None
    assert await waiter is False
    assert writer.buffered == 20
    assert await writer.flush() == 20
    await exactly_once(db, batch)


async def test_close_with_postgres_down_keeps_events_in_the_journal_for_the_next_start(
        writers: Callable[..., BatchWriter], dsn: str, db: asyncpg.Connection,
        tmp_path: Path) -> None:
    first = writers(Journal(tmp_path, max_bytes=64 * MB), Switch(dsn), batch_size=40)
    first.start()
    batch = rows(100)
    for item in batch:
        first.add(item)
    assert await first.close(5.0) == 0, "nothing is lost"
    assert segment_files(tmp_path)
    journal = Journal(tmp_path, max_bytes=64 * MB)
    assert journal.adopt_orphans() >= 1
    second = writers(journal, lambda: connect(dsn))
    assert await second.flush() == 100
    await exactly_once(db, batch)
    assert segment_files(tmp_path) == []


async def test_a_replay_of_events_already_committed_counts_them_once(
        writers: Callable[..., BatchWriter], dsn: str, db: asyncpg.Connection,
        tmp_path: Path) -> None:
    # A crash after PostgreSQL committed a chunk but before the journal learned of it.
    batch = rows(60)
    crashed = Journal(tmp_path, max_bytes=64 * MB)
    crashed.append([line for line, *_ in batch])
    before = writers(None, lambda: connect(dsn))
    for item in batch[:35]:
        before.add(item)
    assert await before.flush() == 35
    crashed.close()
    journal = Journal(tmp_path, max_bytes=64 * MB)
    journal.adopt_orphans()
    after = writers(journal, lambda: connect(dsn))
    assert await after.flush() == 25
    assert after.stats.duplicates == 35
    await exactly_once(db, batch)


# Message 700's write fails, but only once the other lane has committed its 300 events
# (odd messages): waiting for that, not for a fixed time, keeps the order of the two
# lanes the same however busy the machine is. (Each query of a plpgsql function sees
# what other transactions have committed by then.) The deadline only ends a test that
# fails.
FAIL_ON_MESSAGE_700_ONCE_THE_ODD_ONES_ARE_IN = """
    create function fail_on_700() returns trigger language plpgsql as $$
    declare
        deadline timestamptz := clock_timestamp() + interval '60 seconds';
    begin
        if new.message_id = 700 then
            while (select count(*) from events where message_id % 2 = 1) < 300
                  and clock_timestamp() < deadline loop
                perform pg_sleep(0.01);
            end loop;
            raise exception 'injected failure for message 700';
        end if;
        return new;
    end $$;
    create trigger fail_on_700 before insert on events
        for each row execute function fail_on_700();"""


async def test_journal_chunks_written_at_once_are_committed_in_order(
        writers: Callable[..., BatchWriter], dsn: str, db: asyncpg.Connection,
        tmp_path: Path) -> None:
    # Two lanes (by message: even, odd). The first chunk's even part fails, once the odd
    # lane has written its part of the first chunk and the whole second chunk (odd
    # messages only). None of it may be committed in the journal: the first chunk is not
    # all in PostgreSQL. Written again, nothing counts twice.
    first = rows(200)  # messages 700..899
    second = [row(message_id=1001 + 2 * i) for i in range(200)]
    journal = Journal(tmp_path, max_bytes=64 * MB)
    for part in range(0, 400, 50):
        journal.append([line for line, *_ in (first + second)[part: part + 50]])
    await db.execute(FAIL_ON_MESSAGE_700_ONCE_THE_ODD_ONES_ARE_IN)
    writer = writers(journal, lambda: connect(dsn), batch_size=100, connections=2)
    with pytest.raises(asyncpg.RaiseError, match="message 700"):
        await writer.flush()
    assert await db.fetchval("select count(*) from events") == 100 + 200
    assert journal.pending_events == 400
    assert writer.stats.replayed == 0
    await db.execute("drop trigger fail_on_700 on events")
    assert await writer.flush() == 100
    assert writer.stats.duplicates == 300
    assert writer.stats.replayed == 400
    await exactly_once(db, first + second)
    assert journal.pending_events == 0
    assert segment_files(tmp_path) == []


def test_a_writer_refuses_durability_without_a_journal() -> None:
    with pytest.raises(ValueError, match="journal"):
        BatchWriter(lambda: connect("postgresql://x"), batch_size=1, interval_s=1,
                    max_buffered=1, durable=True)


@pytest.fixture(autouse=True)
def _journal_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    # tracker's logger stops propagating once logs.configure ran in this process.
    logger = logging.getLogger("tracker")
    propagate, logger.propagate = logger.propagate, True
    caplog.set_level(logging.INFO, logger="tracker")
    yield
    logger.propagate = propagate


def test_segment_names_carry_the_pid(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=64 * MB)
    journal.append(lines(1))
    (path,) = segment_files(tmp_path)
    assert path.name.startswith(f"{os.getpid()}-")
    journal.close()


async def test_a_durable_backlog_stopped_with_events_pending_puts_them_in_the_journal_and_returns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = Journal(tmp_path, max_bytes=64 * MB)
    backlog = Backlog(batch_size=100, max_rows=1000, journal=journal, durable=True,
                      stats=WriterStats(), on_batch=lambda: None)
    backlog.start()
    for record in rows(5):
        assert backlog.add(record) is None
    # The group commit takes the five, then ends: stop() returns then, not at its timeout
    # (which it would say in the log).
    await backlog.stop(timeout_s=60)
    assert journal.pending_events == 5
    assert "did not answer" not in caplog.text
    journal.close()


# -- a real server under load -----------------------------------------------------------------


@pytest.mark.slow
def test_two_workers_with_a_bound_of_one_event_drop_nothing_while_the_journal_has_room(
        dsn: str, tmp_path: Path) -> None:
    # Every event past the first of each worker goes through the journal, and wrk sends
    # the hits on many connections at once, so they keep arriving while spills are
    # written. A finite plan: every request sent is answered, none is left in flight.
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    hits = 20_000
    srv = Server(dsn, tmp_path, env={"TRACKER_WORKERS": "2",
                                     "TRACKER_BUFFER_MAX_EVENTS": "1"}).start()
    try:
        with srv.client(new_account(dsn, "bound of one")) as api:
            cid = campaign(api)
            pixels = [urlsplit(register(api, cid, recipient=f"r{i}@example.com")["pixel_url"])
                      .path for i in range(50)]
        plan = tmp_path / "plan"
        write_plan(plan, [http_request("GET", pixels[i % len(pixels)], "t")
                          for i in range(hits)], threads=2)
        (run,) = run_plans(srv.url, [Plan(plan, connections=32, threads=2)], core=None)
        assert (run.complete, run.answered, sum(run.errors.values())) == (True, hits, 0), run
        wait_for(lambda: db_value(dsn, "select count(*) from events") == hits, 60,
                 message="every hit to be written")
        drops = {line for line in httpx.get(srv.url + "/metrics").text.splitlines()
                 if line.startswith("tracker_drops_total") and "full" in line}
        assert all(line.endswith(" 0.0") for line in drops), drops
    finally:
        srv.stop()
    assert "dropped" not in srv.log(), srv.log()
