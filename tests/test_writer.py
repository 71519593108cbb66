"""tracker.writer.BatchWriter in process, against a real PostgreSQL (a fresh database per test)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tracker.ingest.pipeline import (
    CLICK,
    EVENT_COLUMNS,
    OPEN,
    DropReason,
    Event,
    EventRecord,
    Pipeline,
    event_id,
)
from tracker.ingest.policy import DEFAULT, PolicyBook
from tracker.ingest.tokens import ClickToken, OpenToken
from tracker.ingest.useragent import parse_agent
from tracker.store.database import connect
from tracker.store.writer import DEFAULT_CONNECTIONS, BatchWriter, Connect

from .support import unreachable_dsn, wait_for_async

ACCOUNT = 7
CAMPAIGN = 70
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")


def event(at: datetime | None = None, message_id: int = 700, kind: str = OPEN,
          ip: str | None = None) -> Event:
    at_us = _micros(at or datetime.now(UTC))
    click = kind == CLICK
    return Event(account_id=ACCOUNT, at_us=at_us, id=event_id(at_us), campaign_id=CAMPAIGN,
                 message_id=message_id, type=kind, link_position=0 if click else None,
                 url_id=1 if click else None, machine=False, reason=None, country="DE",
                 region="Hesse\tand a tab", city=None, browser="Chrome", os="Windows",
                 device="desktop", ip=ip)


def row(at: datetime | None = None, message_id: int = 700, kind: str = OPEN) -> EventRecord:
    """An event for the writer, made by hand."""
    return event(at, message_id, kind).record()


def rows(n: int, at: datetime | None = None) -> list[EventRecord]:
    return [row(at, message_id=700 + i) for i in range(n)]


def _micros(at: datetime) -> int:
    return (at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def expected(record: EventRecord) -> tuple[object, ...]:
    """What the events table should hold for a record, in EVENT_COLUMNS order."""
    fields = [None if v == "\\N" else v.replace("\\t", "\t")
              for v in record[0].rstrip("\n").split("\t")]
    converted: list[object] = [int(fields[0]),
                               datetime(1970, 1, 1, tzinfo=UTC) + timedelta(
                                   microseconds=int(fields[1])),  # type: ignore[arg-type]
                               uuid.UUID(fields[2])]
    for name, value in zip(EVENT_COLUMNS[3:], fields[3:], strict=True):
        if value is not None and name in ("campaign_id", "message_id", "link_position",
                                          "url_id"):
            converted.append(int(value))
        elif name == "machine":
            converted.append(value == "t")
        else:
            converted.append(value)
    return tuple(converted)


class Writers:
    """Makes writers on the test database and closes every one of them at the end."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.made: list[BatchWriter] = []

    def __call__(self, *, batch_size: int = 100, interval_s: float = 3600.0,
                 max_buffered: int = 10_000, connect_fn: Connect | None = None,
                 on_drop: Callable[[DropReason], None] | None = None,
                 connections: int = DEFAULT_CONNECTIONS) -> BatchWriter:
        writer = BatchWriter(connect_fn or (lambda: connect(self.dsn)), batch_size=batch_size,
                             interval_s=interval_s, max_buffered=max_buffered, on_drop=on_drop,
                             connections=connections)
        self.made.append(writer)
        return writer


@pytest.fixture
async def writers(dsn: str) -> AsyncIterator[Writers]:
    made = Writers(dsn)
    yield made
    for writer in made.made:
        await writer.close(0.2)


async def stored(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await db.fetch(f"select {', '.join(_STORED)} from events_decoded order by id"))


_STORED = tuple("occurred_at" if c == "at_us" else "ip::text as ip" if c == "ip" else c
                for c in EVENT_COLUMNS)


async def slow_inserts(db: asyncpg.Connection, seconds: float) -> None:
    """Every insert statement into events takes `seconds` longer (a trigger)."""
    await db.execute(f"""
        create function slow_insert() returns trigger language plpgsql as $$
        begin perform pg_sleep({seconds}); return null; end $$;
        create trigger slow_insert before insert on events
            for each statement execute function slow_insert();""")


def as_tuple(record: asyncpg.Record) -> tuple[object, ...]:
    return tuple(record)


async def test_flush_writes_buffered_rows_exactly_as_given(
        writers: Writers, db: asyncpg.Connection) -> None:
    writer = writers()
    batch = [*rows(3), row(kind=CLICK)]
    for item in batch:
        assert writer.add(item) is None
    assert writer.buffered == 4
    assert await writer.flush() == 4
    assert writer.buffered == 0
    assert sorted(as_tuple(r) for r in await stored(db)) == sorted(expected(b) for b in batch)
    assert writer.stats.written == 4
    assert writer.stats.duplicates == 0


async def test_short_texts_new_to_the_database_get_one_code_each(
        writers: Writers, db: asyncpg.Connection) -> None:
    """A batch with a text no code stands for yet (sql/0018_event_terms.sql) is written once
    its new texts are added; two lanes, each two writers meeting the same new texts at
    once, add each text once and store it as given."""
    made = [writers(batch_size=50) for _ in range(2)]
    batches = [[replace(event(message_id=700 + 100 * w + i), browser=f"Browser {i % 3}",
                        client="A mail client", reason="head" if i % 2 else None).record()
                for i in range(100)] for w in range(2)]
    for writer, batch in zip(made, batches, strict=True):
        for item in batch:
            assert writer.add(item) is None
    assert await asyncio.gather(*(w.flush() for w in made)) == [100, 100]
    assert sorted(as_tuple(r) for r in await stored(db)) == sorted(
        expected(r) for batch in batches for r in batch)
    terms = [r["term"] for r in await db.fetch("select term from event_terms")]
    assert sorted(terms) == sorted({"Browser 0", "Browser 1", "Browser 2", "A mail client",
                                    "head", "Hesse\tand a tab", "Windows", "desktop"})
    assert {r["data_type"] for r in await db.fetch(
        "select data_type from information_schema.columns where table_name = 'events' "
        "and column_name = 'browser'")} == {"smallint"}


async def test_rows_from_the_pipeline_are_written(
        writers: Writers, db: asyncpg.Connection) -> None:
    book = PolicyBook()
    book.put(ACCOUNT, CAMPAIGN, replace(DEFAULT, ip="truncated"), recording=True)
    pipeline = Pipeline(book, parse_agent, lambda ip: None)
    hit = ("GET", CHROME, "203.0.113.9", time.time_ns() // 1000)
    opened = pipeline.open(OpenToken(account_id=ACCOUNT, campaign_id=CAMPAIGN, message_id=700,
                                     sent_at=0), *hit)
    clicked = pipeline.click(ClickToken(
        account_id=ACCOUNT, campaign_id=CAMPAIGN, message_id=700, sent_at=0, flags=0,
        link_position=2, url_id=9, destination=b"https://example.com/"), *hit)
    assert not isinstance(opened, DropReason) and not isinstance(clicked, DropReason)
    writer = writers()
    writer.add(opened)
    writer.add(clicked)
    assert await writer.flush() == 2
    got = {r["type"]: r for r in await db.fetch(
        "select type, browser, link_position, url_id, ip::text as ip from events_decoded")}
    assert got[OPEN]["browser"] == "Chrome"
    assert got[OPEN]["ip"] == got[CLICK]["ip"] == "203.0.113.0/24"
    assert (got[CLICK]["link_position"], got[CLICK]["url_id"]) == (2, 9)


@pytest.mark.parametrize("ip", [None, "203.0.113.9", "203.0.113.0/24", "2001:db8::1",
                                "2001:db8:1::/48", "::ffff:192.0.2.1"])
async def test_addresses_are_stored_as_inet(
        writers: Writers, db: asyncpg.Connection, ip: str | None) -> None:
    writer = writers()
    writer.add(event(ip=ip).record())
    assert await writer.flush() == 1
    # The same value PostgreSQL makes of the text, prefix length included.
    assert await db.fetchval("select ip::text is not distinct from $1::inet::text from events",
                             ip)


async def test_flush_with_nothing_buffered_writes_nothing(
        writers: Writers, db: asyncpg.Connection) -> None:
    assert await writers().flush() == 0
    assert await stored(db) == []


async def test_same_batch_written_twice_is_stored_once(
        writers: Writers, db: asyncpg.Connection) -> None:
    writer = writers()
    batch = rows(5)
    for item in batch:
        writer.add(item)
    assert await writer.flush() == 5
    for item in batch:
        writer.add(item)
    assert await writer.flush() == 0
    assert len(await stored(db)) == 5
    assert writer.stats.written == 5
    assert writer.stats.duplicates == 5


async def test_replay_by_another_writer_is_stored_once(
        writers: Writers, db: asyncpg.Connection) -> None:
    batch = rows(4)
    first, second = writers(), writers()
    for item in batch:
        first.add(item)
    await first.flush()
    for item in [*batch, *rows(1)]:
        second.add(item)
    assert await second.flush() == 1
    assert second.stats.duplicates == 4
    assert len(await stored(db)) == 5


async def test_duplicate_ids_within_one_batch_are_stored_once(
        writers: Writers, db: asyncpg.Connection) -> None:
    writer = writers()
    one = row()
    for item in (one, one, *rows(2)):
        writer.add(item)
    assert await writer.flush() == 3
    assert writer.stats.duplicates == 1
    assert len(await stored(db)) == 3


async def test_flush_splits_into_batches_of_batch_size(
        writers: Writers, db: asyncpg.Connection) -> None:
    writer = writers(batch_size=3, connections=1)
    for item in rows(8):
        writer.add(item)
    assert await writer.flush() == 8
    assert writer.stats.batches == 3
    assert writer.stats.last_batch_size == 2
    assert len(await stored(db)) == 8


@pytest.mark.slow
async def test_batches_of_different_lanes_are_written_at_once(
        writers: Writers, db: asyncpg.Connection) -> None:
    await slow_inserts(db, 0.3)
    writer = writers(batch_size=100, connections=2)
    batch = rows(400)
    for item in batch:
        writer.add(item)
    flushing = asyncio.create_task(writer.flush())

    async def two_inserting() -> bool:
        return int(await db.fetchval(
            "select count(*) from pg_stat_activity where application_name = 'tracker' "
            "and state = 'active' and query like '%insert into events%'")) == 2

    await wait_for_async(two_inserting, message="two batches to be written at once")
    assert await flushing == 400
    assert sorted(map(as_tuple, await stored(db))) == sorted(expected(r) for r in batch)
    assert writer.stats.duplicates == 0


async def test_a_message_is_never_in_two_batches_written_at_once(
        writers: Writers, db: asyncpg.Connection) -> None:
    # Two transactions with the same message would queue on its rollup row (store/rollups.py).
    # Each lane has its connection and writes a batch at a time, so one backend per
    # message is the proof.
    await db.execute("""
        create table written_by (pid integer, message_id bigint);
        create function note_backend() returns trigger language plpgsql as $$
        begin insert into written_by values (pg_backend_pid(), new.message_id); return new;
        end $$;
        create trigger note_backend before insert on events
            for each row execute function note_backend();""")
    writer = writers(batch_size=50, connections=2)
    start = datetime.now(UTC)
    batch = [row(start + timedelta(seconds=i), message_id=700 + i % 20) for i in range(600)]
    for item in batch:
        writer.add(item)
    assert await writer.flush() == 600
    assert await db.fetchval("select count(distinct pid) from written_by") == 2
    assert await db.fetchval(
        "select count(*) from (select message_id from written_by group by message_id "
        "having count(distinct pid) > 1) shared") == 0


async def test_a_failed_batch_goes_back_to_memory_and_the_other_lane_still_writes(
        writers: Writers, db: asyncpg.Connection) -> None:
    await db.execute("""
        create table failing (message_id bigint);
        create function fail_on_message() returns trigger language plpgsql as $$
        begin
            if exists (select 1 from failing f where f.message_id = new.message_id) then
                raise exception 'injected failure for message %', new.message_id;
            end if;
            return new;
        end $$;
        create trigger fail_on_message before insert on events
            for each row execute function fail_on_message();
        insert into failing values (700);""")
    writer = writers(batch_size=50, connections=2)
    batch = rows(200)  # messages 700..899: even ones in one lane, odd ones in the other
    for item in batch:
        writer.add(item)
    with pytest.raises(asyncpg.RaiseError, match="message 700"):
        await writer.flush()
    written = int(await db.fetchval("select count(*) from events"))
    assert written >= 50, "the odd lane's batch, written at the same time"
    assert written + writer.buffered == 200, "what is not written is back in memory"
    await db.execute("delete from failing")
    assert await writer.flush() == 200 - written
    assert sorted(map(as_tuple, await stored(db))) == sorted(expected(r) for r in batch)
    assert writer.stats.duplicates == 0


async def test_a_full_batch_wakes_the_writer_without_flush(
        writers: Writers, db: asyncpg.Connection) -> None:
    # The interval is an hour: only the batch size can trigger this write.
    writer = writers(batch_size=3, interval_s=3600)
    writer.start()
    for item in rows(3):
        writer.add(item)

    async def written() -> bool:
        # The batch may go in a write per lane (by message): wait for all of it. The rows
        # can be seen in PostgreSQL a moment before the writer has heard its commit back.
        return (int(await db.fetchval("select count(*) from events")) == 3
                and writer.buffered == 0)

    assert await wait_for_async(written, message="the full batch to be written")


async def test_the_interval_flushes_without_flush(
        writers: Writers, db: asyncpg.Connection) -> None:
    writer = writers(batch_size=1000, interval_s=0.05)
    writer.start()
    writer.add(row())

    async def written() -> int:
        # Seen in PostgreSQL a moment before the writer has heard its commit back: both.
        count = int(await db.fetchval("select count(*) from events"))
        return count if writer.buffered == 0 else 0

    assert await wait_for_async(lambda: written(), message="the timer to flush") == 1
    assert writer.stats.batches >= 1


async def test_flush_raises_and_keeps_rows_when_the_database_is_unreachable(
        writers: Writers) -> None:
    closed = unreachable_dsn()
    writer = writers(connect_fn=lambda: connect(closed))
    batch = rows(3)
    for item in batch:
        writer.add(item)
    with pytest.raises(OSError):
        await writer.flush()
    assert writer.buffered == 3


async def test_rows_stay_buffered_while_connect_fails_and_are_written_after(
        writers: Writers, dsn: str, db: asyncpg.Connection) -> None:
    closed = unreachable_dsn()
    attempts = {"failed": 0}
    up = asyncio.Event()

    async def flaky() -> asyncpg.Connection:
        if not up.is_set():
            attempts["failed"] += 1
            return await connect(closed)
        return await connect(dsn)

    writer = writers(connect_fn=flaky, batch_size=1000, interval_s=0.02)
    writer.start()
    first, later = rows(3), rows(2)
    for item in first:
        writer.add(item)

    async def failed_twice() -> bool:
        return attempts["failed"] >= 2 and writer.stats.failures >= 2

    await wait_for_async(failed_twice, message="the writer to retry against a closed port")
    assert writer.buffered == 3
    assert not writer.healthy
    for item in later:
        writer.add(item)
    assert await db.fetchval("select count(*) from events") == 0

    up.set()

    async def all_written() -> bool:
        # Seen in PostgreSQL a moment before the writer has heard its commit back: both.
        return bool(await db.fetchval("select count(*) from events") == 5
                    and writer.buffered == 0 and writer.healthy)

    await wait_for_async(all_written, message="the buffered rows to be written once connect works")
    assert (sorted(as_tuple(r) for r in await stored(db))
            == sorted(expected(b) for b in first + later))


async def test_buffer_bound_drops_new_rows_with_reason_buffer_full(
        writers: Writers, db: asyncpg.Connection) -> None:
    reasons: list[DropReason] = []
    writer = writers(max_buffered=3, on_drop=reasons.append)
    batch = rows(5)
    refused = [writer.add(item) for item in batch]
    assert refused == [None, None, None, DropReason.BUFFER_FULL, DropReason.BUFFER_FULL]
    assert writer.buffered == 3
    assert writer.stats.dropped == {DropReason.BUFFER_FULL: 2}
    assert writer.stats.dropped.get("buffer_full") == 2
    assert reasons == []  # refused at once: the caller counts them (ingest/capture.py)
    await writer.flush()
    # The oldest rows were kept; the ones past the bound were dropped.
    assert sorted(as_tuple(r) for r in await stored(db)) == sorted(expected(b) for b in batch[:3])
    assert writer.add(row()) is None


async def test_close_flushes_what_is_left(writers: Writers, db: asyncpg.Connection) -> None:
    writer = writers(batch_size=1000, interval_s=3600)
    writer.start()
    batch = rows(4)
    for item in batch:
        writer.add(item)
    assert await writer.close(5.0) == 0
    assert writer.buffered == 0
    assert sorted(as_tuple(r) for r in await stored(db)) == sorted(expected(b) for b in batch)


async def test_close_without_start_flushes_too(writers: Writers, db: asyncpg.Connection) -> None:
    writer = writers()
    writer.add(row())
    assert await writer.close(5.0) == 0
    assert len(await stored(db)) == 1


async def test_close_reports_rows_it_could_not_write(writers: Writers) -> None:
    closed = unreachable_dsn()
    writer = writers(connect_fn=lambda: connect(closed))
    for item in rows(2):
        writer.add(item)
    assert await writer.close(0.2) == 2


async def test_partitions_are_made_for_each_day(
        writers: Writers, db: asyncpg.Connection) -> None:
    now = datetime.now(UTC)
    days = [now - timedelta(days=1), now, datetime(2001, 2, 3, 23, 59, 59, tzinfo=UTC),
            datetime(2001, 2, 4, 0, 0, 0, tzinfo=UTC)]
    writer = writers()
    for at in days:
        writer.add(row(at))
    assert await writer.flush() == 4
    placed = {r["occurred_at"]: r["partition"] for r in await db.fetch(
        "select occurred_at, tableoid::regclass::text as partition from events")}
    assert placed == {at: f"events_{at:%Y%m%d}" for at in days}
    partitions = {r["name"] for r in await db.fetch(
        "select c.relname as name from pg_inherits i join pg_class c on c.oid = i.inhrelid "
        "where i.inhparent = 'events'::regclass")}
    assert {f"events_{at:%Y%m%d}" for at in days} <= partitions


async def test_a_day_whose_partition_another_writer_made_is_written(
        writers: Writers, db: asyncpg.Connection) -> None:
    first, second = writers(), writers()
    first.add(row())
    await first.flush()
    second.add(row())
    assert await second.flush() == 1
    assert len(await stored(db)) == 2


def test_event_ids_are_unique_uuid7() -> None:
    at_us = time.time_ns() // 1000
    made = {uuid.UUID(int=event_id(at_us)) for _ in range(1000)}
    assert len(made) == 1000
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in made)
    assert {i.int >> 80 for i in made} == {at_us // 1000}


@pytest.mark.slow
async def test_close_during_a_background_write_still_writes_everything_once(
        writers: Writers, db: asyncpg.Connection) -> None:
    # Every insert into events takes a moment, so close() lands inside a write for certain.
    await slow_inserts(db, 0.2)
    writer = writers(batch_size=500, interval_s=3600)
    writer.start()
    for item in rows(1500):
        assert writer.add(item) is None

    async def inserting() -> bool:
        return bool(await db.fetchval(
            "select count(*) from pg_stat_activity where application_name = 'tracker' "
            "and state = 'active' and query like '%insert into events%'"))

    await wait_for_async(inserting, message="the background write to be under way")
    assert await writer.close(10.0) == 0
    assert await db.fetchval("select count(*) from events") == 1500


class _PausesAfterFirstBegin(asyncpg.Connection):  # type: ignore[misc]
    """A real connection that, once, sits on its way back from BEGIN (the server is in the
    transaction, the caller has not heard yet): where a cancel lands on a busy writer."""

    paused: asyncio.Event

    async def execute(self, query: str, *args: object, **kwargs: object) -> str:
        result: str = await super().execute(query, *args, **kwargs)
        if query.startswith("BEGIN") and not self.paused.is_set():
            self.paused.set()
            await asyncio.Event().wait()  # until cancelled
        return result


@pytest.mark.slow
async def test_close_that_cancels_a_write_just_after_begin_loses_nothing(
        writers: Writers, dsn: str, db: asyncpg.Connection) -> None:
    paused = asyncio.Event()

    class Connection(_PausesAfterFirstBegin):
        pass

    Connection.paused = paused

    async def connect_pausing() -> asyncpg.Connection:
        return await asyncpg.connect(dsn, connection_class=Connection)

    writer = writers(connect_fn=connect_pausing, batch_size=100, interval_s=3600)
    writer.start()
    for item in rows(300):
        assert writer.add(item) is None
    await asyncio.wait_for(paused.wait(), 10)
    left = await writer.close(5.0)
    stored_rows = await db.fetchval("select count(*) from events")
    assert (left, stored_rows) == (0, 300), "events were lost at shutdown"
