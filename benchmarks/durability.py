"""Durability benchmark: what TRACKER_DURABILITY=journal costs, and what a kill -9 loses.

    python benchmarks/durability.py [--duration 5] [--rounds 3] [--connections 64] [--kills 5]

Part 1, the cost. In one run, on this machine: tracker's pixel endpoint in the default
mode (`memory`: answered once the event is in memory) and in `journal` mode (answered
once the event is fsynced to the journal, in group commits), each server pinned to core
0, wrk and PostgreSQL on core 1, the modes measured in interleaved rounds and the medians
reported, exactly as load.py measures (wrk walks distinct valid tokens; the events in
PostgreSQL are counted against the requests wrk completed).

Part 2, the loss. A server of each mode under a paced load of distinct pixel hits (a
client that notes which request was answered, and when) is killed with SIGKILL, whole
process tree, then started again on the same data dir; afterwards every answered hit is
looked for in PostgreSQL. Reported: hits answered, answered hits lost, and how long
before the kill the oldest lost one was answered.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SERVER_CORE, free_port, wait_http
from load import (
    LUA,
    USER_AGENTS,
    Result,
    _median,
    _prepare,
    run_wrk,
    settle,
)

from tests.support import SECRET
from tests.test_faults import Load, Target, kill_9, messages_stored
from tracker.store import accounts
from tracker.store.embedded_db import EmbeddedPostgres
from tracker.store.migrations import migrate

MODES = ("memory", "journal")


class Tracker:
    """`tracker serve` in one durability mode, on its own data dir, pinned to core 0."""

    def __init__(self, mode: str, dsn: str, workdir: Path) -> None:
        self.mode = mode
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = workdir / f"data-{mode}"
        self.log = workdir / f"tracker-{mode}.log"
        self.env = {**os.environ, "TRACKER_DATABASE_URL": dsn, "TRACKER_SECRET_KEY": SECRET,
                    "TRACKER_PORT": str(self.port), "TRACKER_DATA_DIR": str(self.data),
                    "TRACKER_DURABILITY": mode, "TRACKER_LOG_LEVEL": "warning",
                    "TRACKER_GEOIP_FETCH": "off"}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Tracker:
        self.proc = subprocess.Popen(
            ["taskset", "-c", SERVER_CORE, sys.executable, "-m", "tracker", "serve"],
            env=self.env, stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"))  # noqa: SIM115 -- lives as long as the process
        wait_http(self.url + "/healthz")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)

    # The test helpers take a `Server`; these are the parts of it they use.
    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def measure_cost(args: argparse.Namespace, dsn: str, workdir: Path) -> None:
    (workdir / "uas.txt").write_text("\n".join(USER_AGENTS) + "\n")
    script = workdir / "paths.lua"
    script.write_text(LUA)
    servers = {mode: Tracker(mode, dsn, workdir).start() for mode in MODES}
    runs: dict[str, list[Result]] = {}
    checks = []
    try:
        for mode, server in servers.items():
            pixels, _ = asyncio.run(_prepare(dsn, server.url, args.messages, 0))
            (workdir / f"{mode}-pixels.txt").write_text("\n".join(pixels) + "\n")
        for _ in range(args.rounds):
            for mode, server in servers.items():
                before = settle(dsn, "open")
                result = run_wrk(f"{mode} pixel", server.url, args, server.pid, script,
                                 [str(workdir / f"{mode}-pixels.txt"), str(workdir / "uas.txt")])
                runs.setdefault(mode, []).append(result)
                landed = settle(dsn, "open") - before
                checks.append((mode, result.requests, landed,
                               result.requests <= landed <= result.requests + args.connections))
    finally:
        for server in servers.values():
            server.stop()
    results = {mode: _median(rs) for mode, rs in runs.items()}
    base = results["memory"]
    print(f"\nPart 1: pixel, wrk -t1 -c{args.connections} -d{args.duration}s, {args.rounds} "
          f"interleaved rounds (medians); server on core {SERVER_CORE}\n")
    print(f"{'mode':<8} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
          f"{'req/cpu-s':>9} {'x memory':>8}")
    for mode, r in results.items():
        print(f"{mode:<8} {r.rps:>8.0f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.errors:>6} "
              f"{r.per_cpu_second:>9.0f} {r.rps / base.rps:>8.2f}")
    print(f"\n{'run':<8} {'completed':>10} {'events':>10}  landed")
    for mode, completed, landed, ok in checks:
        print(f"{mode:<8} {completed:>10} {landed:>10}  {'ok' if ok else 'MISMATCH'}")
    if not all(ok for *_, ok in checks):
        raise SystemExit(1)


async def _target(dsn: str, url: str) -> Target:
    conn = await asyncpg.connect(dsn)
    try:
        account = await accounts.create_account(conn, f"kill-{time.monotonic_ns()}")
    finally:
        await conn.close()
    async with httpx.AsyncClient(base_url=url, timeout=30, headers={
            "authorization": f"Bearer {account.api_key}"}) as client:
        response = await client.post("/api/campaigns", json={"name": "kill -9"})
        response.raise_for_status()
    return Target(account.id, int(response.json()["id"]))


def _settled(dsn: str, where: Target, answered: set[int], timeout: float = 60) -> set[int]:
    """The messages stored once every answered one is, or once the count stops moving."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        stored = messages_stored(dsn, where)
        if answered <= stored or len(stored) == last or time.monotonic() > deadline:
            return stored
        last = len(stored)
        time.sleep(1.0)


def measure_loss(args: argparse.Namespace, dsn: str, workdir: Path) -> None:
    rows = []
    for mode in MODES:
        for _ in range(args.kills):
            server = Tracker(mode, dsn, workdir).start()
            where = asyncio.run(_target(dsn, server.url))
            with Load(server.port, where, connections=16, rate=args.rate) as load:
                load.wait_answered(int(args.rate * args.kill_after))
                killed_at = time.monotonic()
                kill_9(server)
            answered = {where.message(i): at for i, (at, _) in load.answered.items()}
            server = Tracker(mode, dsn, workdir).start()  # the same data dir: replays it
            try:
                stored = _settled(dsn, where, set(answered))
            finally:
                server.stop()
            lost = [killed_at - at for message, at in answered.items() if message not in stored]
            rows.append((mode, len(answered), len(lost), 1000 * max(lost, default=0.0)))
    print(f"\nPart 2: kill -9 under {args.rate:.0f} hits/s (16 connections), "
          f"killed after {args.kill_after:.0f} s, {args.kills} runs per mode\n")
    print(f"{'mode':<8} {'answered':>9} {'lost':>6} {'oldest lost, ms before the kill':>32}")
    for mode, answered_n, lost_n, oldest in rows:
        print(f"{mode:<8} {answered_n:>9} {lost_n:>6} {oldest:>32.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--kills", type=int, default=5, help="kill -9 runs per mode")
    parser.add_argument("--rate", type=float, default=5000.0, help="hits/s before a kill")
    parser.add_argument("--kill-after", type=float, default=3.0, help="seconds of load")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-loss", action="store_true")
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed: apt-get install wrk util-linux")
    workdir = Path(tempfile.mkdtemp(prefix="tracker-durability-"))
    pg = EmbeddedPostgres(workdir / "pg")
    pg.start()
    try:
        running = pg.running()
        assert running is not None
        dsn = running.dsn()
        asyncio.run(_migrate(dsn))
        if not args.skip_cost:
            measure_cost(args, dsn, workdir)
        if not args.skip_loss:
            measure_loss(args, dsn, workdir)
    finally:
        pg.stop("immediate")
    shutil.rmtree(workdir, ignore_errors=True)


async def _migrate(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
