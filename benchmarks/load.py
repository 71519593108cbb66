"""Load benchmark: wrk against tracker's pixel and click endpoints, nginx as the reference.

    python benchmarks/load.py [--duration 10] [--connections 64]

In one run, on this machine: nginx serving a static GIF, then tracker's pixel and
click endpoints, each with the same wrk settings. The HTTP server under test (nginx
or tracker) is pinned to core 0; wrk and PostgreSQL share core 1, wrk at real-time priority
where permitted (root) and PostgreSQL at idle priority: it takes what wrk leaves, and the
writer catches up after each run (common.load_generator says why). wrk walks a list of
many distinct valid tokens (a Lua script), so every request is a real, distinct
event. Afterwards the events in PostgreSQL are counted and compared with the
requests wrk completed.

Readers, not scanners: the messages were sent an hour before the run, and the click list
holds one link of each message (each message has `--links`), so the classification rules
see what most real traffic is. Walking every link of a message within a second, the way
the list was once built, is what a security scanner does: every click was then `burst` or
`too_soon`, a re-label trigger that PostgreSQL has to work through.

A second reference, "nginx, PG busy": nginx again, while PostgreSQL inserts rows as fast
as it can on wrk's core (the same idle priority). Tracker's own runs always have that
neighbour, busy writing their events; nginx's do not. On this machine the neighbour alone
takes 30-50 % of what wrk can send to nginx (benchmarks/README.md), so the row tells how
much of the gap between tracker and nginx is the load generator's.

Exactness: wrk reports responses it completed; when its duration ends it drops the
connections with requests still in flight, which the server may already have
recorded. So events = completed + (at most one in-flight request per connection).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    LOAD_CORE,
    SERVER_CORE,
    Database,
    free_port,
    load_generator,
    ms,
    or_exit,
    pin,
    real_time_permitted,
    require,
    start_nginx,
    start_tracker,
    stop,
    tree_cpu_seconds,
)

from tracker.store import accounts

USER_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)",
    "Microsoft Outlook 16.0.17928; Pro",
]

LUA = """
local paths = {}
local uas = {}
init = function(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  for line in io.lines(args[2]) do uas[#uas + 1] = line end
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
  counter = math.random(#paths)
end
request = function()
  counter = counter + 1
  local path = paths[(counter % #paths) + 1]
  local ua = uas[(counter % #uas) + 1]
  return wrk.format("GET", path, {["User-Agent"] = ua})
end
"""


BUSY = "nginx, PG busy"


@dataclass
class Result:
    name: str
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    wrk_cpu: float  # share of one core wrk used
    server_cpu_s: float = 0.0  # CPU seconds the server's processes used during the run
    database_cpu: float = 0.0  # share of one core PostgreSQL used during the run
    spilled: int = 0  # events the writer put in its journal during the run (behind PostgreSQL)

    @property
    def per_cpu_second(self) -> float:
        """Requests per CPU-second of the server: what one core would do if it had nothing
        else to do, which stays steady when other work shares the machine."""
        return self.requests / self.server_cpu_s if self.server_cpu_s else 0.0


def run_wrk(name: str, url: str, args: argparse.Namespace, server_pid: int,
            script: Path | None = None, script_args: list[str] | None = None,
            db: Database | None = None) -> Result:
    command = [*load_generator(), "wrk", "-t1", f"-c{args.connections}",
               f"-d{args.duration}s", "--latency"]
    if script is not None:
        command += ["-s", str(script), url, "--", *(script_args or [])]
    else:
        command.append(url)
    before = os.times()
    server_before = tree_cpu_seconds(server_pid)
    database_before = db.cpu_seconds() if db else 0.0
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    server_cpu = tree_cpu_seconds(server_pid) - server_before
    database_cpu = db.cpu_seconds() - database_before if db else 0.0
    after = os.times()
    cpu = (after.children_user - before.children_user
           + after.children_system - before.children_system)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE))
    return Result(name, requests, float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
                  ms(latency["50"]), ms(latency["99"]), errors, cpu / args.duration,
                  server_cpu, database_cpu / args.duration)


async def _prepare(dsn: str, url: str, messages: int, links: int) -> tuple[list[str], list[str]]:
    conn = await asyncpg.connect(dsn)
    key = (await accounts.create_account(conn, "benchmark")).api_key
    await conn.close()
    async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {key}"},
                                 timeout=30) as client:
        campaign = (await client.post("/api/campaigns", json={
            "name": "load", "policy": {"location": "city", "ip": "truncated"}})).json()["id"]
        semaphore = asyncio.Semaphore(8)

        sent_at = (datetime.now(UTC) - timedelta(hours=1)).isoformat()

        async def one(i: int) -> dict[str, object]:
            async with semaphore:
                response = await client.post(f"/api/campaigns/{campaign}/messages", json={
                    "recipient": f"reader{i}@example.com", "sent_at": sent_at,
                    "links": [f"https://example.com/p/{i}/{j}?utm_source=mail"
                              for j in range(links)]})
                response.raise_for_status()
                return response.json()  # type: ignore[no-any-return]

        registered = await asyncio.gather(*(one(i) for i in range(messages)))
    pixels = [str(m["pixel_url"]).removeprefix(url) for m in registered]
    clicks = [m["links"][i % links]["tracked_url"].removeprefix(url)  # type: ignore[index]
              for i, m in enumerate(registered)] if links else []
    return pixels, clicks


async def _count(dsn: str, kind: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("select count(*) from events where type = $1", kind))
    finally:
        await conn.close()


async def _labels(dsn: str) -> dict[str, list[tuple[str, int]]]:
    """Per kind, the events' labels ("human" or the machine reason) and their counts."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("select type, coalesce(reason, 'human') as label, count(*) "
                                "from events group by 1, 2 order by 1, 3 desc")
    finally:
        await conn.close()
    labels: dict[str, list[tuple[str, int]]] = {}
    for row in rows:
        labels.setdefault(row["type"], []).append((row["label"], row["count"]))
    return labels


def _spilled(url: str) -> int:
    """Events the server's writer has put in its journal so far: memory was full because
    PostgreSQL did not keep up (each costs the server a write and a read back)."""
    found = re.search(r"^tracker_journal_appended_events_total (\S+)$",
                      httpx.get(f"{url}/metrics", timeout=10).text, re.MULTILINE)
    return int(float(found.group(1))) if found else 0


def settle(dsn: str, kind: str, at_least: int = 0, timeout: float = 60) -> int:
    """Events of a kind once the writer has caught up: at least `at_least` of them and the
    count steady for 2 s (PostgreSQL, sharing wrk's core, may pause longer than a poll),
    or whatever is there at `timeout`."""
    deadline = time.monotonic() + timeout
    last, steady_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = asyncio.run(_count(dsn, kind))
        if now != last:
            last, steady_since = now, time.monotonic()
        elif now >= at_least and time.monotonic() - steady_since >= 2.0:
            return now
        time.sleep(0.5)
    return last


def _insert_forever(dsn: str) -> None:
    """What the busy neighbour does: 5,000-row inserts into an indexed table, committed one
    by one, like the writer's batches, until it is terminated."""
    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        await conn.execute("create table if not exists neighbour_load "
                           "(id bigint primary key, a text, b text)")
        start = int(await conn.fetchval("select coalesce(max(id), 0) + 1 from neighbour_load"))
        while True:
            await conn.execute(
                "insert into neighbour_load select g, md5(g::text), repeat('x', 200) "
                "from generate_series($1::bigint, $1::bigint + 4999) g", start)
            start += 5000
    asyncio.run(run())


class BusyDatabase:
    """While open: PostgreSQL inserting on wrk's core, its client and (by inheritance from
    Database.yield_to_load) its backend at idle priority."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._proc = multiprocessing.get_context("fork").Process(
            target=_insert_forever, args=(db.dsn,), daemon=True)

    def __enter__(self) -> BusyDatabase:
        self._proc.start()
        assert self._proc.pid is not None
        pin([self._proc.pid], LOAD_CORE)
        os.sched_setscheduler(self._proc.pid, os.SCHED_IDLE, os.sched_param(0))
        deadline = time.monotonic() + 15
        while not self._inserting():
            if not self._proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the busy-database neighbour could not start")
            time.sleep(0.05)
        self._db.yield_to_load(LOAD_CORE)  # the backend, whatever it inherited
        return self

    def _inserting(self) -> bool:
        return bool(self._db.value(
            "select count(*) from pg_stat_activity where query like 'insert into neighbour_load%'"))

    def __exit__(self, *_: object) -> None:
        self._proc.terminate()
        self._proc.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of every endpoint; medians are reported")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--links", type=int, default=5)
    args = parser.parse_args()
    or_exit(lambda: measure(args))


def measure(args: argparse.Namespace) -> None:
    require("wrk", "nginx", "taskset")
    servers = ["uvicorn"]

    workdir = Path(tempfile.mkdtemp(prefix="tracker-bench-"))
    db = Database(workdir / "pg")
    db.yield_to_load(LOAD_CORE)
    dsn = db.dsn
    procs: list[subprocess.Popen[bytes]] = []
    runs: dict[str, list[Result]] = {}
    checks = []
    try:
        (workdir / "uas.txt").write_text("\n".join(USER_AGENTS) + "\n")
        script = workdir / "paths.lua"
        script.write_text(LUA)

        nginx_port = free_port()
        nginx = start_nginx(workdir, nginx_port)
        procs.append(nginx)
        trackers = {}
        for server_name in servers:
            server, url = start_tracker(dsn, workdir, name=server_name)
            procs.append(server)
            pixels, clicks = asyncio.run(_prepare(dsn, url, args.messages, args.links))
            (workdir / f"{server_name}-pixels.txt").write_text("\n".join(pixels) + "\n")
            (workdir / f"{server_name}-clicks.txt").write_text("\n".join(clicks) + "\n")
            trackers[server_name] = (server, url)

        # Interleaved, so a change in the machine's other load hits every endpoint alike.
        for _ in range(args.rounds):
            runs.setdefault("nginx static GIF", []).append(run_wrk(
                "nginx static GIF", f"http://127.0.0.1:{nginx_port}/o/x.gif", args, nginx.pid,
                db=db))
            with BusyDatabase(db):
                runs.setdefault(BUSY, []).append(run_wrk(
                    BUSY, f"http://127.0.0.1:{nginx_port}/o/x.gif", args, nginx.pid, db=db))
            for server_name, (server, url) in trackers.items():
                for endpoint, kind in (("pixel", "open"), ("click", "click")):
                    name = f"{server_name} {endpoint}"
                    before = settle(dsn, kind)
                    spilled = _spilled(url)
                    result = run_wrk(name, url, args, server.pid, script, [
                        str(workdir / f"{server_name}-{endpoint}s.txt"),
                        str(workdir / "uas.txt")], db=db)
                    result.spilled = _spilled(url) - spilled
                    runs.setdefault(name, []).append(result)
                    landed = settle(dsn, kind, before + result.requests) - before
                    checks.append((name, result.requests, landed, result.requests <= landed
                                   <= result.requests + args.connections))
        labels = asyncio.run(_labels(dsn)) if trackers else {}
        for server, _ in trackers.values():
            stop(server)
        stop(nginx, signal.SIGQUIT, 10)
    finally:
        for proc in procs:
            stop(proc, signal.SIGKILL, 10)
        db.stop()

    results = {name: _median(rs) for name, rs in runs.items()}
    reference = results["nginx static GIF"]
    busy = results[BUSY]
    goals = {"pixel": 0.5, "click": 0.45}
    priority = ("real-time priority" if real_time_permitted() else
                "normal priority (real time is not permitted: run as root for figures that "
                "do not include wrk's wait for PostgreSQL)")
    print(f"\nwrk -t1 -c{args.connections} -d{args.duration}s, {args.rounds} interleaved rounds "
          f"(medians); the server under test pinned to core {SERVER_CORE}, wrk and PostgreSQL "
          f"on core {LOAD_CORE}, wrk at {priority}; {args.messages} pixel and {args.messages} "
          f"click tokens (one link of {args.links} per message)\n")
    print(f"{'endpoint':<18} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
          f"{'wrk cpu':>7} {'PG cpu':>6} {'spilled':>7} {'req/cpu-s':>9} {'x nginx':>8} "
          f"{'x nginx/cpu':>11} {'goal':>9}")
    for r in results.values():
        ratio = r.rps / reference.rps
        cpu_ratio = r.per_cpu_second / reference.per_cpu_second
        goal = goals.get(r.name.rsplit(" ", 1)[-1])
        verdict = "" if goal is None else (f">={goal}" + (" ok" if ratio >= goal else " MISS"))
        print(f"{r.name:<18} {r.rps:>8.0f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.errors:>6} "
              f"{r.wrk_cpu:>6.0%} {r.database_cpu:>5.0%} {r.spilled / max(r.requests, 1):>7.0%} "
              f"{r.per_cpu_second:>9.0f} "
              f"{ratio:>8.2f} {cpu_ratio:>11.2f} {verdict:>9}")
    print(f"\nThe load generator's share: with PostgreSQL inserting on wrk's core, nginx answered "
          f"{busy.rps / reference.rps:.2f}x its req/s alone. Against that reference (the "
          "neighbour tracker's runs always have): "
          + ", ".join(f"{r.name} {r.rps / busy.rps:.2f}x" for r in results.values()
                      if r.name not in ("nginx static GIF", BUSY)))
    for kind, counts in labels.items():
        total = sum(n for _, n in counts)
        print(f"{kind} events labelled: " + ", ".join(f"{label} {n / total:.0%}"
                                                      for label, n in counts))
    print(f"\n{'run':<18} {'completed':>10} {'events':>10}  landed")
    for name, completed, landed, ok in checks:
        print(f"{name:<18} {completed:>10} {landed:>10}  {'ok' if ok else 'MISMATCH'}")
    if not all(ok for *_, ok in checks):
        raise SystemExit(f"events missing: the servers' logs are in {workdir}")
    shutil.rmtree(workdir, ignore_errors=True)


def _median(results: list[Result]) -> Result:
    ordered = sorted(results, key=lambda r: r.rps)
    return ordered[len(ordered) // 2]


if __name__ == "__main__":
    main()
