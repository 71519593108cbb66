"""Reports from rollups, against a real PostgreSQL: the rollup-based report must equal a
recomputation from the raw events, after every batch, whatever the order, the replays,
the writers and the re-labels.

Events go in through the real writer (BatchWriter: COPY into staging, the move and
rollup statements); the oracle is plain Python over `select * from events`, written
from the contract's definitions, independent of the SQL under test.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from tracker.ingest.pipeline import CLICK, OPEN, Event, event_id
from tracker.ingest.rules import load_rules
from tracker.store import accounts, campaigns, reports
from tracker.store.database import connect
from tracker.store.migrations import migrate
from tracker.store.queries import sql_dir
from tracker.store.rollups import HONEYPOT_URL_ID, relabel_windows
from tracker.store.writer import BatchWriter

from .support import connected

ZONES = ("UTC", "Asia/Kolkata", "Asia/Kathmandu", "America/St_Johns", "Europe/Berlin")
WINDOWS_US = {reason: span // timedelta(microseconds=1)
              for reason, span in relabel_windows().items()}
HONEYPOT_POSITION = 65535
# Across a day boundary and Berlin's autumn change of clocks (01:00 UTC on Oct 27).
T0 = datetime(2024, 10, 26, 22, 40, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MACHINE_REASONS = ("bot_ua", "head", "apple_mpp", "too_soon", "scanner_ua", "empty_ua")
COUNTRIES = ("DE", "GB", "IN", "NP", "unknown", None)
REGIONS = ("Hesse", "England", "Bagmati", None)
BROWSERS = ("Chrome", "Firefox", "Safari", "Outlook", None)
SYSTEMS = ("Windows", "iOS", "Mac OS X", "Android", None)
DEVICES = ("desktop", "mobile", "tablet", None)
CLIENTS = ("Apple Mail", "Gmail", "Outlook", "webmail", "other", None)


def micros(at: datetime) -> int:
    return (at - EPOCH) // timedelta(microseconds=1)


@dataclass
class Campaign:
    account_id: int
    campaign_id: int
    messages: list[int]
    urls: dict[int, str]  # url id -> destination


async def make_campaign(conn: asyncpg.Connection, messages: int, urls: int) -> Campaign:
    account = await accounts.create_account(conn, "reports")
    campaign = (await campaigns.create(conn, account.id, "reports"))["id"]
    message_ids = [r["id"] for r in await conn.fetch(
        "insert into messages (account_id, campaign_id, recipient) "
        "select $1, $2, 'r' || n || '@example.com' from generate_series(1, $3) n returning id",
        account.id, campaign, messages)]
    url_rows = await conn.fetch(
        "insert into urls (account_id, campaign_id, url) "
        "select $1, $2, 'https://example.com/' || n from generate_series(1, $3) n "
        "returning id, url", account.id, campaign, urls)
    return Campaign(account.id, campaign, sorted(message_ids), {r["id"]: r["url"]
                                                                 for r in url_rows})


def event(c: Campaign, message: int, kind: str, at_us: int, *, url: int | None = None,
          machine: bool = False, reason: str | None = None, rng: random.Random | None = None,
          position: int = 0) -> Event:
    rng = rng or random.Random(at_us)
    click = kind == CLICK
    return Event(account_id=c.account_id, at_us=at_us, id=event_id(at_us),
                 campaign_id=c.campaign_id, message_id=message, type=kind,
                 link_position=position if click else None,
                 url_id=(url if url is not None else next(iter(c.urls))) if click else None,
                 machine=machine, reason=reason, country=rng.choice(COUNTRIES),
                 region=rng.choice(REGIONS), city=None, browser=rng.choice(BROWSERS),
                 os=rng.choice(SYSTEMS), device=rng.choice(DEVICES), client=rng.choice(CLIENTS))


# --- the oracle ------------------------------------------------------------------------


def expected_report(c: Campaign, rows: list[asyncpg.Record], messages: int,
                    tz: str) -> dict[str, Any]:
    """The contract's report, recomputed from raw event rows."""
    human = [r for r in rows if not r["machine"]]
    opens = [r for r in human if r["type"] == OPEN]
    clicks = [r for r in human if r["type"] == CLICK]
    unique_opens = len({r["message_id"] for r in human})
    unique_clicks = len({r["message_id"] for r in clicks})

    def rate(part: int, whole: int) -> float:
        return round(part / whole, 6) if whole else 0.0

    links = sorted(({"url": url,
                     "clicks": sum(1 for r in clicks if r["url_id"] == url_id),
                     "unique_clicks": len({r["message_id"] for r in clicks
                                           if r["url_id"] == url_id})}
                    for url_id, url in c.urls.items()),
                   key=lambda link: (-link["clicks"], link["url"]))
    zone = ZoneInfo(tz)
    # Keyed in UTC: two aware datetimes of one zone compare by wall time, so 02:00 before
    # and 02:00 after clocks go back would be one hour.
    hours: Counter[tuple[datetime, str]] = Counter(
        (r["occurred_at"].astimezone(zone).replace(minute=0, second=0, microsecond=0)
         .astimezone(UTC), r["type"]) for r in human)
    timeline = [{"at": hour.astimezone(zone).isoformat(), "opens": hours[(hour, OPEN)],
                 "clicks": hours[(hour, CLICK)]}
                for hour in sorted({hour for hour, _ in hours})]
    breakdown: dict[str, dict[str, dict[str, int]]] = {
        kind: {dim: {} for dim in reports.DIMENSIONS} for kind in ("opens", "clicks")}
    for r in human:
        for dim in reports.DIMENSIONS:
            counts = breakdown["opens" if r["type"] == OPEN else "clicks"][dim]
            key = r[dim] if r[dim] is not None else "unknown"
            counts[key] = counts.get(key, 0) + 1
    by_reason: dict[str, Counter[str]] = {OPEN: Counter(), CLICK: Counter()}
    for r in rows:
        if r["machine"]:
            by_reason[r["type"]][r["reason"]] += 1
    # The MPP-adjusted estimate, from its definition (README): messages opened by a reader,
    # plus those only MPP prefetched at the open rate of the ones it did not prefetch.
    opened = {r["message_id"] for r in human}
    prefetched = {r["message_id"] for r in rows
                  if r["type"] == OPEN and r["machine"] and r["reason"] == "apple_mpp"}
    estimate: float | None
    if not messages:
        estimate = None
    elif not prefetched:
        estimate = rate(unique_opens, messages)
    elif len(prefetched) == messages:
        estimate = None
    else:
        seen_rate = len(opened - prefetched) / (messages - len(prefetched))
        estimate = round(min(1.0, (len(opened) + seen_rate * len(prefetched - opened))
                             / messages), 6)
    return {
        "campaign_id": str(c.campaign_id),
        "messages": messages,
        "opens": {"total": len(opens), "unique": unique_opens,
                  "machine": sum(1 for r in rows if r["machine"] and r["type"] == OPEN),
                  "machine_by_reason": dict(by_reason[OPEN])},
        "clicks": {"total": len(clicks), "unique": unique_clicks,
                   "machine": sum(1 for r in rows if r["machine"] and r["type"] == CLICK),
                   "machine_by_reason": dict(by_reason[CLICK])},
        "open_rate": rate(unique_opens, messages),
        "estimated_open_rate": estimate,
        "estimate_method": reports.ESTIMATE_METHOD,
        "click_rate": rate(unique_clicks, messages),
        "click_to_open_rate": rate(unique_clicks, unique_opens),
        "links": links,
        "timeline": timeline,
        "breakdown": breakdown,
    }


def is_trigger(e: Event) -> bool:
    return e.type == CLICK and (e.reason == "burst" or (
        e.reason == "honeypot" and e.url_id == HONEYPOT_URL_ID))


def expected_labels(stored: Iterable[Event]) -> dict[int, tuple[bool, set[str | None]]]:
    """Event id -> (machine, the reasons it may carry), by the re-labelling rule: a human
    click within its trigger's window of a honeypot hit or a burst click of the same
    message is machine, with that trigger's reason."""
    by_message: dict[tuple[int, int], list[Event]] = defaultdict(list)
    for e in stored:
        if is_trigger(e):
            by_message[(e.account_id, e.message_id)].append(e)
    labels = {}
    for e in stored:
        near = {t.reason for t in by_message.get((e.account_id, e.message_id), [])
                if t.reason is not None and abs(t.at_us - e.at_us) <= WINDOWS_US[t.reason]}
        if e.type == CLICK and not e.machine and near:
            labels[e.id] = (True, set(near))
        else:
            labels[e.id] = (e.machine, {e.reason})
    return labels


# --- fixtures and helpers --------------------------------------------------------------


@pytest.fixture
async def writers(dsn: str) -> AsyncIterator[list[BatchWriter]]:
    """Two writers, as two server workers would have, each with its own connection."""
    made = [BatchWriter(lambda: connect(dsn), batch_size=1000, interval_s=3600,
                        max_buffered=100_000) for _ in range(2)]
    yield made
    for writer in made:
        await writer.close(1.0)


async def write(writer: BatchWriter, events: Iterable[Event]) -> int:
    for e in events:
        assert writer.add(e.record()) is None
    return await writer.flush()


async def stored_rows(db: asyncpg.Connection, c: Campaign) -> list[asyncpg.Record]:
    return list(await db.fetch("select * from events_decoded"
                               " where account_id = $1 and campaign_id = $2",
                               c.account_id, c.campaign_id))


async def assert_report_is_recomputation(db: asyncpg.Connection, c: Campaign,
                                         zones: Iterable[str] = ("UTC",)) -> dict[str, Any]:
    rows = await stored_rows(db, c)
    report: dict[str, Any] = {}
    for tz in zones:
        report = await reports.campaign_report(db, c.account_id, c.campaign_id, tz)
        assert report == expected_report(c, rows, len(c.messages), tz), tz
    return report


async def labels_in_db(db: asyncpg.Connection) -> dict[int, tuple[bool, str | None]]:
    return {r["id"].int: (r["machine"], r["reason"])
            for r in await db.fetch("select id, machine, reason from events_decoded")}


def assert_labels(got: dict[int, tuple[bool, str | None]], delivered: Iterable[Event]) -> None:
    unique = {e.id: e for e in delivered}
    assert set(got) == set(unique)
    for event_id_, (machine, reasons) in expected_labels(unique.values()).items():
        assert got[event_id_][0] == machine, unique[event_id_]
        assert got[event_id_][1] in reasons, unique[event_id_]


async def rollup_tables(db: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    tables = ("rollup_campaign", "rollup_link", "rollup_dimension", "rollup_message",
              "rollup_message_link", "relabel_triggers", "campaign_messages")
    return {t: sorted(tuple(r) for r in await db.fetch(f"select * from {t}")) for t in tables}


# --- randomized workloads --------------------------------------------------------------


def workload(c: Campaign, rng: random.Random) -> list[Event]:
    """Readers, machines, honeypot hits and bursts with human clicks around them (some
    exactly at a window's edge), over five hours."""
    span_us = 5 * 3600 * 1_000_000
    start = micros(T0)
    real_urls = list(c.urls)
    events: list[Event] = []
    for _ in range(rng.randint(40, 160)):
        message = rng.choice(c.messages)
        at = start + rng.randrange(span_us)
        kind = rng.choice((OPEN, OPEN, CLICK))
        machine = rng.random() < 0.25
        events.append(event(c, message, kind, at, url=rng.choice(real_urls), machine=machine,
                            reason=rng.choice(MACHINE_REASONS) if machine else None, rng=rng))
    for _ in range(rng.randint(1, 6)):
        message = rng.choice(c.messages)
        hit = start + rng.randrange(span_us)
        reason = rng.choice(("honeypot", "burst"))
        window = WINDOWS_US[reason]
        if reason == "honeypot":
            events.append(event(c, message, CLICK, hit, url=HONEYPOT_URL_ID, machine=True,
                                reason="honeypot", rng=rng, position=HONEYPOT_POSITION))
            # What ingest/classify.py labels after a hit on the same worker: not a trigger itself.
            events.append(event(c, message, CLICK, hit + rng.randrange(window),
                                url=rng.choice(real_urls), machine=True, reason="honeypot",
                                rng=rng))
        else:
            events.append(event(c, message, CLICK, hit, url=rng.choice(real_urls),
                                machine=True, reason="burst", rng=rng))
        offsets = [rng.randint(-2 * window, 2 * window) for _ in range(rng.randint(1, 6))]
        offsets += [-window, window, window + 1, -window - 1, 2 * window + 1]
        for offset in offsets:
            events.append(event(c, message, rng.choice((CLICK, CLICK, OPEN)), hit + offset,
                                url=rng.choice(real_urls), rng=rng))
    return events


def deliveries(events: list[Event], rng: random.Random) -> list[list[Event]]:
    """Batches in an arrival order (shuffled, or nearly in time order), with retried
    batches, replays of random earlier events and duplicates inside a batch."""
    order = list(events)
    if rng.random() < 0.5:
        rng.shuffle(order)
    else:
        order.sort(key=lambda e: e.at_us)
        for _ in range(len(order) // 5):
            i, j = rng.randrange(len(order)), rng.randrange(len(order))
            order[i], order[j] = order[j], order[i]
    batches: list[list[Event]] = []
    while order:
        size = rng.randint(1, 30)
        batch, order = order[:size], order[size:]
        if rng.random() < 0.2:
            batch.append(rng.choice(batch))  # the same event twice in one batch
        batches.append(batch)
        if rng.random() < 0.25:
            batches.append(list(rng.choice(batches)))  # a retried batch
        if rng.random() < 0.15:
            sent = [e for b in batches for e in b]
            batches.append(rng.sample(sent, min(len(sent), rng.randint(1, 20))))  # a replay
    return batches


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.slow
async def test_rollup_report_equals_recomputation_for_random_workloads(
        db: asyncpg.Connection, writers: list[BatchWriter], seed: int) -> None:
    rng = random.Random(seed)
    c = await make_campaign(db, messages=rng.randint(3, 20), urls=rng.randint(1, 4))
    other = await make_campaign(db, messages=3, urls=1)  # another tenant, same time
    delivered: list[Event] = []
    for number, batch in enumerate(deliveries(workload(c, rng), rng)):
        noise = [event(other, other.messages[0], OPEN, e.at_us, rng=rng) for e in batch[:2]]
        await write(rng.choice(writers), batch + noise)
        delivered += batch
        if number % 4 == 0:
            await assert_report_is_recomputation(db, c)
    await assert_report_is_recomputation(db, c, ZONES)
    got = await labels_in_db(db)
    assert_labels({k: v for k, v in got.items() if k in {e.id for e in delivered}}, delivered)
    assert await db.fetchval(
        "select count(*) from (select opens, clicks from rollup_message where opens < 0 "
        "or clicks < 0 union all select clicks, clicked from rollup_link where clicks < 0 "
        "or clicked < 0 union all select opened, clicked from rollup_campaign "
        "where opened < 0 or clicked < 0) negative") == 0
    # Each click the rule makes machine was re-labelled once, by whichever writer.
    victims = sum(1 for e in {e.id: e for e in delivered}.values()
                  if not e.machine and expected_labels(delivered)[e.id][0])
    assert sum(w.stats.relabelled for w in writers) == victims


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.slow
async def test_rollups_stay_exact_with_many_writers_writing_at_once(
        dsn: str, db: asyncpg.Connection, seed: int) -> None:
    """Four workers' writers, two connections each, all writing at the same time: up to
    eight transactions meet on the same campaign and message rows, re-labels included.
    None may deadlock (it would raise here), miss a re-label or count twice."""
    rng = random.Random(1000 + seed)
    c = await make_campaign(db, messages=rng.randint(3, 12), urls=rng.randint(1, 3))
    batches = deliveries(workload(c, rng), rng)
    made = [BatchWriter(lambda: connect(dsn), batch_size=rng.randint(3, 30), interval_s=3600,
                        max_buffered=100_000, connections=2) for _ in range(4)]

    async def deliver(writer: BatchWriter, share: list[list[Event]]) -> None:
        for batch in share:
            await write(writer, batch)

    try:
        await asyncio.gather(*(deliver(w, batches[i::len(made)]) for i, w in enumerate(made)))
    finally:
        for writer in made:
            await writer.close(1.0)
    delivered = [e for batch in batches for e in batch]
    await assert_report_is_recomputation(db, c, ZONES)
    assert_labels(await labels_in_db(db), delivered)
    victims = sum(1 for e in {e.id: e for e in delivered}.values()
                  if not e.machine and expected_labels(delivered)[e.id][0])
    assert sum(w.stats.relabelled for w in made) == victims


async def test_random_workloads_do_relabel() -> None:
    """The workloads above exercise re-labelling: most seeds have clicks to re-label."""
    c = Campaign(1, 1, [1, 2, 3], {1: "https://example.com/"})
    seeds_with_victims = 0
    for seed in range(12):
        rng = random.Random(seed)
        c = replace(c, messages=list(range(1, rng.randint(3, 20) + 1)),
                    urls={i: f"u{i}" for i in range(1, rng.randint(1, 4) + 1)})
        events = workload(c, rng)
        labels = expected_labels(events)
        if any(labels[e.id][0] and not e.machine for e in events):
            seeds_with_victims += 1
    assert seeds_with_victims >= 9


# --- exactly once -------------------------------------------------------------------------


async def test_a_retried_batch_changes_no_rollup(
        db: asyncpg.Connection, writers: list[BatchWriter]) -> None:
    c = await make_campaign(db, messages=4, urls=2)
    rng = random.Random(7)
    batch = workload(c, rng)
    assert await write(writers[0], batch) == len(batch)
    before = await rollup_tables(db)
    assert await write(writers[1], batch) == 0
    assert await write(writers[0], batch[::3]) == 0
    assert await rollup_tables(db) == before
    await assert_report_is_recomputation(db, c, ZONES)


async def test_a_click_alone_makes_the_message_opened(
        db: asyncpg.Connection, writers: list[BatchWriter]) -> None:
    c = await make_campaign(db, messages=3, urls=1)
    at = micros(T0)
    await write(writers[0], [event(c, c.messages[0], CLICK, at)])
    await write(writers[0], [event(c, c.messages[0], OPEN, at + 1)])  # not a new unique
    report = await assert_report_is_recomputation(db, c)
    assert report["opens"] == {"total": 1, "unique": 1, "machine": 0, "machine_by_reason": {}}
    assert report["clicks"] == {"total": 1, "unique": 1, "machine": 0, "machine_by_reason": {}}


# --- re-labelling -------------------------------------------------------------------------


async def test_a_honeypot_hit_makes_the_messages_clicks_around_it_machine(
        db: asyncpg.Connection, writers: list[BatchWriter]) -> None:
    c = await make_campaign(db, messages=2, urls=2)
    message, bystander = c.messages
    hit = micros(T0)
    window = WINDOWS_US["honeypot"]
    assert window == load_rules().timing.honeypot_seconds * 1_000_000
    offsets = (-window - 1, -window, -1, 1, window, window + 1)
    clicks = {offset: event(c, message, CLICK, hit + offset) for offset in offsets}
    opened = event(c, message, OPEN, hit + 2)
    elsewhere = event(c, bystander, CLICK, hit)
    # Half before the hit is stored, half after, by two writers.
    await write(writers[0], [clicks[-window - 1], clicks[-window], clicks[-1], opened, elsewhere])
    before = await assert_report_is_recomputation(db, c)
    assert before["clicks"] == {"total": 4, "unique": 2, "machine": 0, "machine_by_reason": {}}
    await write(writers[1], [event(c, message, CLICK, hit, url=HONEYPOT_URL_ID, machine=True,
                                   reason="honeypot", position=HONEYPOT_POSITION)])
    await write(writers[0], [clicks[1], clicks[window], clicks[window + 1]])
    labels = await labels_in_db(db)
    assert {o: labels[e.id] for o, e in clicks.items()} == {
        -window - 1: (False, None), -window: (True, "honeypot"), -1: (True, "honeypot"),
        1: (True, "honeypot"), window: (True, "honeypot"), window + 1: (False, None)}
    assert labels[opened.id] == (False, None)  # opens are not re-labelled
    assert labels[elsewhere.id] == (False, None)  # another message
    after = await assert_report_is_recomputation(db, c, ZONES)
    assert after["clicks"] == {"total": 3, "unique": 2, "machine": 5,
                              "machine_by_reason": {"honeypot": 5}}
    assert sum(w.stats.relabelled for w in writers) == 4


async def test_relabelling_the_last_human_click_takes_the_unique_counts_back(
        db: asyncpg.Connection, writers: list[BatchWriter]) -> None:
    c = await make_campaign(db, messages=1, urls=1)
    (message,), (url,) = c.messages, c.urls
    at = micros(T0)
    await write(writers[0], [event(c, message, CLICK, at, url=url)])
    assert (await assert_report_is_recomputation(db, c))["opens"]["unique"] == 1
    await write(writers[0], [event(c, message, CLICK, at + 1, url=url, machine=True,
                                   reason="burst")])
    report = await assert_report_is_recomputation(db, c, ZONES)
    assert report["opens"] == {"total": 0, "unique": 0, "machine": 0, "machine_by_reason": {}}
    assert report["clicks"] == {"total": 0, "unique": 0, "machine": 2,
                                "machine_by_reason": {"burst": 2}}
    assert report["links"] == [{"url": c.urls[url], "clicks": 0, "unique_clicks": 0}]
    assert report["timeline"] == []
    # A reader's click later on counts again.
    await write(writers[1], [event(c, message, CLICK, at + 3_600_000_000, url=url)])
    report = await assert_report_is_recomputation(db, c, ZONES)
    assert report["clicks"] == {"total": 1, "unique": 1, "machine": 2,
                                "machine_by_reason": {"burst": 2}}


async def test_clicks_labelled_honeypot_after_a_hit_do_not_extend_its_window(
        db: asyncpg.Connection, writers: list[BatchWriter]) -> None:
    c = await make_campaign(db, messages=1, urls=1)
    (message,), (url,) = c.messages, c.urls
    hit, window = micros(T0), WINDOWS_US["honeypot"]
    follower = event(c, message, CLICK, hit + window - 5, url=url, machine=True,
                     reason="honeypot")
    reader = event(c, message, CLICK, hit + window + 1_000_000, url=url)
    await write(writers[0], [event(c, message, CLICK, hit, url=HONEYPOT_URL_ID, machine=True,
                                   reason="honeypot", position=HONEYPOT_POSITION),
                             follower, reader])
    assert (await labels_in_db(db))[reader.id] == (False, None)
    await assert_report_is_recomputation(db, c)


@pytest.mark.slow
async def test_concurrent_writers_relabel_a_click_and_its_trigger_written_at_once(
        dsn: str, db: asyncpg.Connection, writers: list[BatchWriter]) -> None:
    """A reader's click and a burst click of the same message, flushed at the same moment
    by two workers: neither transaction can see the other's row, yet the click ends
    machine. They fall in different rollup rows (buckets, urls, dimensions), so nothing
    but the writer's lock orders the two transactions."""
    c = await make_campaign(db, messages=40, urls=2)
    first_url, second_url = c.urls
    # Made first: two writers meeting a new day at once is another race (see the report).
    await db.execute("select tracker_ensure_event_partition($1)", T0.date())
    boundary = micros(T0.replace(minute=45))  # a 15-minute bucket boundary
    pairs = []
    for message in c.messages:
        reader = replace(event(c, message, CLICK, boundary - 1_000_000, url=first_url),
                         country="DE", region="Hesse", browser="Chrome", os="Windows",
                         device="desktop")
        burst = replace(event(c, message, CLICK, boundary + 500_000, url=second_url,
                              machine=True, reason="burst"),
                        country="US", region=None, browser="Bot", os=None, device="bot")
        pairs.append((reader, burst))
    for reader, burst in pairs:
        await asyncio.gather(write(writers[0], [reader]), write(writers[1], [burst]))
    labels = await labels_in_db(db)
    assert [labels[reader.id] for reader, _ in pairs] == [(True, "burst")] * len(pairs)
    await assert_report_is_recomputation(db, c)


# --- what reports read -------------------------------------------------------------------


async def test_reports_read_no_raw_events_and_survive_dropped_partitions(
        db: asyncpg.Connection, writers: list[BatchWriter]) -> None:
    """Retention drops whole day partitions: the report's totals stay."""
    c = await make_campaign(db, messages=10, urls=3)
    rng = random.Random(3)
    days = [event(c, rng.choice(c.messages), rng.choice((OPEN, CLICK)),
                  micros(T0 + timedelta(days=d, minutes=rng.randrange(600))),
                  url=rng.choice(list(c.urls)), rng=rng)
            for d in range(4) for _ in range(20)]
    await write(writers[0], days)
    before = {tz: await assert_report_is_recomputation(db, c, [tz]) for tz in ZONES}
    assert before["UTC"]["opens"]["total"] + before["UTC"]["clicks"]["total"] == len(days)
    partitions = [r["name"] for r in await db.fetch(
        "select c.relname as name from pg_inherits i join pg_class c on c.oid = i.inhrelid "
        "where i.inhparent = 'events'::regclass")]
    assert len(partitions) >= 4
    for name in partitions:
        await db.execute(f"drop table {name}")
    assert await db.fetchval("select count(*) from events") == 0
    assert {tz: await reports.campaign_report(db, c.account_id, c.campaign_id, tz)
            for tz in ZONES} == before


async def test_timeline_hours_are_exact_in_half_and_quarter_hour_zones(
        db: asyncpg.Connection, writers: list[BatchWriter]) -> None:
    c = await make_campaign(db, messages=1, urls=1)
    base = T0.replace(minute=0)
    edges = [base + timedelta(minutes=m, microseconds=us) for m in range(0, 120, 15)
             for us in (-1, 0)]
    await write(writers[0], [event(c, c.messages[0], OPEN, micros(at)) for at in edges])
    report = await assert_report_is_recomputation(db, c, ZONES)
    assert sum(b["opens"] for b in report["timeline"]) == len(edges)
    kathmandu = (await reports.campaign_report(db, c.account_id, c.campaign_id,
                                               "Asia/Kathmandu"))["timeline"]
    assert all(b["at"].endswith(":00:00+05:45") for b in kathmandu)


async def test_messages_are_counted_as_they_are_registered_and_deleted(
        db: asyncpg.Connection) -> None:
    c = await make_campaign(db, messages=5, urls=0)
    assert (await reports.campaign_report(db, c.account_id, c.campaign_id))["messages"] == 5
    await db.execute("delete from messages where account_id = $1 and id = any($2::bigint[])",
                     c.account_id, c.messages[:2])
    assert (await reports.campaign_report(db, c.account_id, c.campaign_id))["messages"] == 3
    # Deleting the campaign outright takes its messages and its counts with it.
    await db.execute("delete from campaigns where account_id = $1 and id = $2",
                     c.account_id, c.campaign_id)
    assert await db.fetchval("select count(*) from campaign_messages where campaign_id = $1",
                             c.campaign_id) == 0


# --- the migration ------------------------------------------------------------------------


async def test_the_migration_rolls_up_events_written_before_it(
        empty_dsn: str, tmp_path: Path) -> None:
    """An installation that has events from before the rollups gets the same report."""
    first = tmp_path / "sql"
    first.mkdir()
    (first / "0001_initial.sql").write_text((sql_dir() / "0001_initial.sql").read_text())
    async with connected(empty_dsn) as conn:
        await migrate(conn, first)
        # Plain SQL on the version 1 schema: the code's queries follow the newest one.
        account = await conn.fetchval("insert into accounts (name) values ('old') returning id")
        campaign = await conn.fetchval(
            "insert into campaigns (account_id, name) values ($1, 'old') returning id", account)
        messages = [r["id"] for r in await conn.fetch(
            "insert into messages (account_id, campaign_id, recipient) "
            "select $1, $2, 'r@example.com' from generate_series(1, 6) returning id",
            account, campaign)]
        urls = {r["id"]: r["url"] for r in await conn.fetch(
            "insert into urls (account_id, campaign_id, url) values ($1, $2, 'https://a/'), "
            "($1, $2, 'https://b/') returning id, url", account, campaign)}
        c = Campaign(account, campaign, messages, urls)
        rng = random.Random(11)
        events = [e for e in workload(c, rng) if not is_trigger(e)]
        for day in (T0.date(), T0.date() + timedelta(days=1)):
            await conn.execute("select tracker_ensure_event_partition($1)", day)
        await conn.copy_records_to_table("events", records=[
            (e.account_id, EPOCH + timedelta(microseconds=e.at_us), uuid.UUID(int=e.id),
             e.campaign_id, e.message_id, e.type, e.link_position, e.url_id, e.machine,
             e.reason, e.country, e.region, e.city, e.browser, e.os, e.device, None)
            for e in events], columns=(
            "account_id", "occurred_at", "id", "campaign_id", "message_id", "type",
            "link_position", "url_id", "machine", "reason", "country", "region", "city",
            "browser", "os", "device", "ip"))
        applied = [m.version for m in await migrate(conn)]
        assert applied[0] == 2
        await assert_report_is_recomputation(conn, c, ZONES)
