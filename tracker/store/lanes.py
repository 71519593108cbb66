"""The writer's database side: one batch at a time on each lane's own connection.

A batch of COPY text lines is COPYed into a session-local staging table and moved into
`events` and the report rollups in one transaction (store/rollups.py), after making sure the
day partitions it needs exist (and, the first time one of its short texts is seen, after
adding that text to `event_terms`); the statements are sql/writer.sql's. Each lane keeps its
connection between batches; a write that fails or is interrupted throws that connection
away, since the session is in doubt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from operator import itemgetter

import asyncpg

from tracker.ingest.pipeline import DAY_MICROSECONDS, EVENT_COLUMNS, EventRecord, current_line
from tracker.store.journal import Part
from tracker.store.queries import QUERIES
from tracker.store.rollups import Mover

Connect = Callable[[], Awaitable[asyncpg.Connection]]

_EPOCH_DAY = date(1970, 1, 1)
# What sql/writer.sql's `create-writer-tables` names the staging table.
STAGING_TABLE = "events_staging"
# What sql/0018_event_terms.sql's tracker_new_term raises: the batch has a short text that
# event_terms does not hold yet.
NEW_TERMS = "TRK01"
# Per event, on a batch of thousands: map() over these is twice as fast as a comprehension.
LINE, DAY = itemgetter(0), itemgetter(1)


@dataclass(frozen=True)
class Batch:
    """What one write COPYs: the events' lines, encoded; the UTC days they fall on (their
    partitions); how many events."""

    data: bytes
    days: Collection[int]
    events: int

    @classmethod
    def of(cls, records: Sequence[EventRecord]) -> Batch:
        return cls("".join(map(LINE, records)).encode(), set(map(DAY, records)), len(records))


def journal_parts(records: Sequence[EventRecord], lanes: int) -> list[Part]:
    """The records as journal parts, one a lane (a message's events go to lane message id
    modulo lanes: store/writer.py, `flush`), each labelled with its lane and days
    (`placed`): a replay with as many lanes then passes each part to its lane whole."""
    sorted_out: list[list[str]] = [[] for _ in range(lanes)]
    for line, _, _, message_id in records:
        sorted_out[message_id % lanes].append(line)
    days = ",".join(map(str, sorted(set(map(DAY, records)))))
    return [Part(lines, f"lane {lane}/{lanes} days {days}")
            for lane, lines in enumerate(sorted_out) if lines]


def placed(label: str, lanes: int) -> tuple[int, list[int]] | None:
    """The lane and days a journal part's label names, if it was sorted for `lanes` lanes."""
    match label.split():
        case ["lane", where, "days", days]:
            lane, _, count = where.partition("/")
            if count == str(lanes) and lane.isdigit() and int(lane) < lanes:
                return int(lane), [int(day) for day in days.split(",")]
    return None


def sort_lines(data: bytes, lanes: int) -> list[list[EventRecord]]:
    """Journal lines with no usable label (written before labels, or for another number of
    lanes), read one by one into records by lane."""
    split: list[list[EventRecord]] = [[] for _ in range(lanes)]
    for line in data.decode().split("\n")[:-1]:
        line = current_line(line + "\n")
        fields = line.split("\t", 9)
        message_id = int(fields[4])
        split[message_id % lanes].append(
            (line, int(fields[1]) // DAY_MICROSECONDS, fields[8] == "t", message_id))
    return split


class Lanes:
    def __init__(self, connect: Connect, lanes: int,
                 relabel_windows: Mapping[str, timedelta] | None = None) -> None:
        self._connect = connect
        # Moves a staged batch into events and the report rollups, re-labelling human clicks
        # near a honeypot or burst click (rollups.relabel_windows: the rules' timing).
        self._mover = Mover(relabel_windows)
        self._conns: list[asyncpg.Connection | None] = [None] * lanes
        self._known_days: set[int] = set()

    async def write(self, lane: int, batch: Batch) -> tuple[int, int]:
        """Writes a batch on the lane's connection; (events new to the database, clicks
        re-labelled). Raises what the database raised; the batch is then not written."""
        conn = await self._connection(lane)
        try:
            await self._ensure_partitions(conn, batch.days)
            # A buffer, not a file: asyncpg reads a file in its thread pool, a thread hop per
            # 512 KiB and one to close it (~2 % of a pixel hit's CPU), and sends a buffer as
            # it is (a memoryview: bytes would be taken for a path).
            data = memoryview(batch.data)
            try:
                return await self._move(conn, data)
            except asyncpg.PostgresError as exc:
                if exc.sqlstate != NEW_TERMS:
                    raise
            # Short texts new to event_terms (rare: a value's first time): added and
            # committed in a transaction of their own, so no other writer waits for them
            # longer than that; then the batch again.
            async with conn.transaction():
                await conn.copy_to_table(STAGING_TABLE, source=data, columns=EVENT_COLUMNS)
                await self._mover.add_terms(conn)
            return await self._move(conn, data)
        except BaseException:
            # A write that failed or was interrupted leaves the session in doubt (asyncpg can
            # believe a BEGIN is still open, turning the next commit into a savepoint):
            # never reuse it. The batch stays queued; writing it again is harmless.
            self._conns[lane] = None
            conn.terminate()
            # Retention may have dropped a day's partition since we made it (a late event
            # for that day then fails): check the days again rather than fail for ever.
            self._known_days.clear()
            raise

    async def _move(self, conn: asyncpg.Connection, data: memoryview) -> tuple[int, int]:
        async with conn.transaction():
            await conn.copy_to_table(STAGING_TABLE, source=data, columns=EVENT_COLUMNS)
            return await self._mover.move_staged(conn)

    async def close(self) -> None:
        conns, self._conns = self._conns, [None] * len(self._conns)
        for conn in conns:
            if conn is None:
                continue
            try:
                await asyncio.wait_for(conn.close(), 2)
            except Exception:
                conn.terminate()

    async def _ensure_partitions(self, conn: asyncpg.Connection, days: Collection[int]) -> None:
        for day in sorted(set(days) - self._known_days):
            await conn.execute(QUERIES.ensure_event_partition, _EPOCH_DAY + timedelta(days=day))
            self._known_days.add(day)

    async def _connection(self, lane: int) -> asyncpg.Connection:
        conn = self._conns[lane]
        if conn is not None and not conn.is_closed():
            return conn
        conn = await self._connect()
        try:
            await conn.execute(QUERIES.create_writer_tables)
        except BaseException:
            conn.terminate()
            raise
        self._conns[lane] = conn
        return conn
