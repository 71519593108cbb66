"""Durability: what TRACKER_DURABILITY=journal costs, and what a kill -9 loses in each mode.

    python -m benchmarks durability [--seconds 5] [--rounds 3] [--kills 5] [--quick]

Part 1, the cost. In one run: a `tracker serve` in each mode, `memory` (the default: a
hit is answered once its event is in memory) and `journal` (once it is fsynced to the
journal, in group commits), each pinned to core 0 in turn, wrk and PostgreSQL on core 1.
The pixel of each is loaded as the suite loads it (phases.Load: the readers' mix over
distinct tokens, wrk over a finite plan at real-time priority where permitted, a probe
timing answers), the modes in interleaved rounds, medians reported; then each
campaign's report must count exactly what was sent.

Part 2, the loss. A server of each mode under a paced load of distinct pixel hits (a
client that notes which request was answered, and when: faults.Load) is killed with
SIGKILL, whole process tree, then started again on the same data dir; afterwards every
answered hit is looked for in PostgreSQL. Reported: hits answered, answered hits lost,
and how long before the kill the oldest lost one was answered.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from benchmarks.common import (
    LOAD_CORE,
    SECRET,
    SERVER_CORE,
    Database,
    or_exit,
    priority_note,
    require,
    start_tracker,
    stop,
)
from benchmarks.faults import Load as Hits
from benchmarks.faults import Target as HitTarget
from benchmarks.faults import kill_9, messages_stored
from benchmarks.phases import Deployment, Load, LoadSettings, Phase, Target, correctness
from benchmarks.traffic import LOCAL_SERVER_ENV, Mix
from tracker.store import accounts
from tracker.store.accounts import NewAccount

MODES = ("memory", "journal")


def measure_cost(args: argparse.Namespace, db: Database, workdir: Path) -> bool:
    """Part 1; whether every campaign's report counted exactly what was sent."""
    settings = LoadSettings(seconds=args.seconds, warmup=10 if args.quick else 40,
                            window=0.25 if args.quick else 1.0,
                            settle_s=60 if args.quick else 180)
    loads: dict[str, tuple[Load, Target, subprocess.Popen[bytes]]] = {}
    phases: dict[str, list[Phase]] = {mode: [] for mode in MODES}
    try:
        for mode in MODES:
            (workdir / mode).mkdir()
            proc, url = start_tracker(db.dsn, workdir / mode, TRACKER_DURABILITY=mode,
                                      **LOCAL_SERVER_ENV)
            deployment = Deployment(url, db.account(f"durability-{mode}"))
            deployment.create_campaign(f"durability {mode}")
            messages, _, origin = deployment.register(args.messages)
            mix = Mix(messages, remote=False, seed=args.seed, name="readers")
            loads[mode] = (Load(settings, deployment, mix, workdir / mode / "load"),
                           Target(origin, [proc.pid], db), proc)
        print(f"pixel, the readers' mix: {args.rounds} interleaved rounds of about "
              f"{args.seconds:g} s per mode", flush=True)
        for _ in range(args.rounds):
            for mode, (load, target, _) in loads.items():
                phases[mode].append(load.phase(f"{mode} pixel", "pixel", target))
        checks = {mode: correctness(load, 60 if args.quick else 300)
                  for mode, (load, _, _) in loads.items()}
    finally:
        for _, _, proc in loads.values():
            stop(proc)
    base = _median_rate(phases["memory"])
    print(f"\nPart 1: pixel, wrk -t1 -c{settings.connections} and a probe of "
          f"{settings.probe_connections} connections; {args.rounds} interleaved rounds (medians); "
          f"the server on core {SERVER_CORE}, wrk and PostgreSQL on core {LOAD_CORE}, "
          f"{priority_note()}\n")
    print(f"{'mode':<8} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'req/cpu-s':>9} "
          f"{'µs/req':>6} {'× memory':>8} {'report':>7}")
    for mode in MODES:
        rate = _median_rate(phases[mode])
        p50 = statistics.median(p.latency_ms(0.5) for p in phases[mode])
        p99 = statistics.median(p.latency_ms(0.99) for p in phases[mode])
        per_cpu = statistics.median(p.per_cpu_second for p in phases[mode])
        exact = all(c.ok for c in checks[mode]) and not loads[mode][0].problems
        print(f"{mode:<8} {rate:>8,.0f} {p50:>7.2f} {p99:>7.2f} {per_cpu:>9,.0f} "
              f"{1e6 / per_cpu if per_cpu else 0:>6.1f} {rate / base if base else 0:>8.2f} "
              f"{'exact' if exact else 'WRONG':>7}")
    wrong = [f"{mode}: {c.name}: sent {c.expected}, report {c.got}"
             for mode in MODES for c in checks[mode] if not c.ok]
    wrong += [problem for load, _, _ in loads.values() for problem in load.problems]
    for line in wrong:
        print(f"  {line}")
    return not wrong


def _median_rate(phases: Sequence[Phase]) -> float:
    return statistics.median(p.rate for p in phases) if phases else 0.0


async def _account(dsn: str, name: str) -> NewAccount:
    conn = await asyncpg.connect(dsn)
    try:
        return await accounts.create_account(conn, name)
    finally:
        await conn.close()


def _kill_target(db: Database, url: str, name: str) -> HitTarget:
    """A new account and campaign whose pixel tokens faults.Load signs itself."""
    account = asyncio.run(_account(db.dsn, name))
    deployment = Deployment(url, account.api_key)
    deployment.create_campaign("kill -9")
    return HitTarget(account.id, int(deployment.campaign), SECRET)


def _settled(dsn: str, where: HitTarget, answered: set[int], timeout: float = 60) -> set[int]:
    """The messages stored once every answered one is, or once the count stops moving."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        stored = messages_stored(dsn, where)
        if answered <= stored or len(stored) == last or time.monotonic() > deadline:
            return stored
        last = len(stored)
        time.sleep(1.0)


def measure_loss(args: argparse.Namespace, db: Database, workdir: Path) -> None:
    rows = []
    for mode in MODES:
        for n in range(args.kills):
            # The same data dir for the restart: it replays what the killed server left.
            directory = workdir / f"kill-{mode}-{n}"
            directory.mkdir()
            proc, url = start_tracker(db.dsn, directory, TRACKER_DURABILITY=mode)
            where = _kill_target(db, url, f"kill-{mode}-{n}")
            port = int(url.rsplit(":", 1)[1])
            with Hits(port, where, connections=16, rate=args.rate) as hits:
                hits.wait_answered(int(args.rate * args.kill_after))
                killed_at = time.monotonic()
                kill_9(proc)
            answered = {where.message(i): at for i, (at, _) in hits.answered.items()}
            proc, _ = start_tracker(db.dsn, directory, name="restarted",
                                    TRACKER_DURABILITY=mode)
            try:
                stored = _settled(db.dsn, where, set(answered))
            finally:
                stop(proc)
            lost = [killed_at - at for message, at in answered.items() if message not in stored]
            rows.append((mode, len(answered), len(lost), 1000 * max(lost, default=0.0)))
    print(f"\nPart 2: kill -9 under {args.rate:,.0f} hits/s (16 connections), killed after "
          f"{args.kill_after:g} s, {args.kills} runs per mode\n")
    print(f"{'mode':<8} {'answered':>9} {'lost':>6} {'oldest lost, ms before the kill':>32}")
    for mode, answered_n, lost_n, oldest in rows:
        print(f"{mode:<8} {answered_n:>9,} {lost_n:>6,} {oldest:>32.0f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks durability",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, help="per measured run (default 5; quick 2)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--kills", type=int, help="kill -9 runs per mode (default 5; quick 1)")
    parser.add_argument("--rate", type=float, default=5000.0, help="hits/s before a kill")
    parser.add_argument("--kill-after", type=float, default=3.0, help="seconds of load")
    parser.add_argument("--quick", action="store_true", help="one short round, one kill")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-loss", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.kills = args.kills or (1 if args.quick else 5)
    return or_exit(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    require("wrk", "taskset")
    workdir = Path(tempfile.mkdtemp(prefix="tracker-durability-"))
    db = Database(workdir / "pg")
    db.yield_to_load(LOAD_CORE)
    exact = True
    try:
        if not args.skip_cost:
            exact = measure_cost(args, db, workdir)
        if not args.skip_loss:
            measure_loss(args, db, workdir)
    finally:
        db.stop()
    if not exact:
        print(f"reports differ from what was sent: the servers' logs are in {workdir}")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0
