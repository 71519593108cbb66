"""Webhooks: delivery throughput, and what delivering costs the tracking endpoints.

    python -m benchmarks webhooks [--seconds 5] [--rounds 3] [--concurrency 2] [--quick]

One `tracker serve` (core 0) on an embedded PostgreSQL, with one webhook endpoint: a
receiver on loopback in this process (core 1, with wrk and PostgreSQL) that answers 204
and counts the events of each delivery by id. In interleaved rounds the pixel is loaded
as the suite loads it (phases.Load: the readers' mix, wrk over a finite plan, a probe
timing answers), once with the endpoint disabled ("without": events queue, nothing is
sent) and once enabled ("with": the queue left by the run before drains while the load
runs, and the new events are sent as they are stored). Reported: the medians of req/s
and latency, and with / without. Then, with no tracking load, a backlog of the events of
one more run is delivered from scratch: events/s to the receiver. At the end every stored
event must have arrived exactly once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import (
    LOAD_CORE,
    Database,
    free_port,
    or_exit,
    priority_note,
    require,
    start_tracker,
    stop,
)
from benchmarks.phases import Deployment, Load, LoadSettings, Phase, Target
from benchmarks.traffic import LOCAL_SERVER_ENV, Mix


class Receiver:
    """Counts delivered events by id; answers 204 on a kept-alive connection."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.lock = threading.Lock()
        self.seen: Counter[str] = Counter()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                ids = [event["id"] for event in orjson.loads(body)["events"]]
                with receiver.lock:
                    receiver.seen.update(ids)
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def count(self) -> int:
        with self.lock:
            return len(self.seen)

    def doubled(self) -> int:
        with self.lock:
            return sum(1 for n in self.seen.values() if n > 1)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _stored(db: Database) -> int:
    return int(db.value("select count(*) from events"))


def _wait_delivered(receiver: Receiver, db: Database, timeout: float) -> float:
    """Seconds until the receiver has every stored event (or the timeout)."""
    started = time.monotonic()
    while receiver.count() < _stored(db) and time.monotonic() - started < timeout:
        time.sleep(0.05)
    return time.monotonic() - started


def run(args: argparse.Namespace) -> int:
    require("wrk", "taskset")
    workdir = Path(tempfile.mkdtemp(prefix="tracker-webhooks-"))
    db = Database(workdir / "pg")
    db.yield_to_load(LOAD_CORE)
    os.sched_setaffinity(0, {int(LOAD_CORE)})  # the receiver: on the load's core
    receiver = Receiver()
    settings = LoadSettings(seconds=args.seconds, warmup=10 if args.quick else 40,
                            window=0.25 if args.quick else 1.0,
                            settle_s=60 if args.quick else 180)
    proc = None
    try:
        proc, url = start_tracker(db.dsn, workdir, **LOCAL_SERVER_ENV)
        deployment = Deployment(url, db.account("webhooks"))
        hook = deployment.call("POST", "/api/webhooks", json={
            "url": receiver.url, "concurrency": args.concurrency}).json()

        def enabled(on: bool) -> None:
            deployment.call("PATCH", f"/api/webhooks/{hook['id']}", json={"enabled": on})

        deployment.create_campaign("webhooks")
        messages, _, origin = deployment.register(args.messages)
        load = Load(settings, deployment, Mix(messages, remote=False, seed=args.seed,
                                              name="readers"), workdir / "load")
        target = Target(origin, [proc.pid], db)
        phases: dict[str, list[Phase]] = {"without": [], "with": []}
        print(f"pixel, the readers' mix: {args.rounds} interleaved rounds of about "
              f"{args.seconds:g} s each, without and with delivery", flush=True)
        for _ in range(args.rounds):
            enabled(False)
            phases["without"].append(load.phase("without delivery", "pixel", target))
            enabled(True)
            phases["with"].append(load.phase("with delivery", "pixel", target))
        _wait_delivered(receiver, db, 300)
        enabled(False)
        load.phase("backlog", "pixel", target)
        backlog = _stored(db) - receiver.count()
        enabled(True)
        drain_s = _wait_delivered(receiver, db, 600)
        stored, delivered, doubled = _stored(db), receiver.count(), receiver.doubled()
    finally:
        stop(proc)
        receiver.stop()
        db.stop()
    base = statistics.median(p.rate for p in phases["without"])
    print(f"\npixel, wrk -t1 -c{settings.connections} and a probe of "
          f"{settings.probe_connections} connections; {args.rounds} interleaved rounds "
          f"(medians); the server on core 0, wrk, PostgreSQL and the receiver on core "
          f"{LOAD_CORE}, {priority_note()}\n")
    # µs/req: the server's CPU (its workers and the delivery process) per request, which
    # the neighbours' load moves far less than req/s.
    print(f"{'delivery':<9} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'× without':>9} "
          f"{'µs/req':>7} {'rounds req/s':>24}")
    for name, runs in phases.items():
        rate = statistics.median(p.rate for p in runs)
        per_cpu = statistics.median(p.per_cpu_second for p in runs)
        print(f"{name:<9} {rate:>8,.0f} "
              f"{statistics.median(p.latency_ms(0.5) for p in runs):>7.2f} "
              f"{statistics.median(p.latency_ms(0.99) for p in runs):>7.2f} "
              f"{rate / base if base else 0:>9.3f} {1e6 / per_cpu if per_cpu else 0:>7.1f} "
              f"{' '.join(f'{p.rate:,.0f}' for p in runs):>24}")
    print(f"\ndelivery of a backlog of {backlog:,} events, concurrency {args.concurrency}, "
          f"batches of 100: {backlog / drain_s if drain_s else 0:,.0f} events/s "
          f"({drain_s:.1f} s)")
    exact = delivered == stored and doubled == 0
    print(f"every stored event delivered once: {'yes' if exact else 'NO'} "
          f"({stored:,} stored, {delivered:,} delivered, {doubled:,} more than once)")
    if not exact:
        print(f"the server's log is in {workdir}")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks webhooks",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, help="per measured run (default 5; quick 2)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=2,
                        help="the endpoint's deliveries at once")
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    return or_exit(lambda: run(args))
