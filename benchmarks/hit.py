"""Where a hit's CPU goes, in process: the wire protocol and each step of the one hit path.

    python -m benchmarks hit [--geoip-db PATH] [--addresses N ...]

The server's own protocol (ingest/protocol.py) is fed whole requests on 64 connections
whose transport only counts what is written, so no system call is in the figures (the
suite's µs per hit minus these is the kernel's and the event loop's share). The mix is
the suite's readers: five agents (desktop Chrome and Firefox, iPhone Mail, Outlook,
Gmail's image proxy), sent an hour before, through X-Forwarded-For from public
addresses. Then the steps alone, the caches at a campaign's cardinality (as many
distinct addresses as --addresses says: each hit from another one is a geo lookup), and
what a waiting event holds in memory. µs of process CPU, best of --rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import time
import tracemalloc
from collections.abc import Callable, Sequence
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import uvloop
from uvicorn.config import Config
from uvicorn.server import ServerState

from benchmarks.traffic import BROWSERS, GMAIL, OUTLOOK, reader_addresses
from tracker.ingest import geo
from tracker.ingest.addresses import ClientAddress
from tracker.ingest.capture import Capture
from tracker.ingest.endpoints import FastPath
from tracker.ingest.pipeline import DropReason, EventRecord, Pipeline
from tracker.ingest.policy import DEFAULT, PolicyBook
from tracker.ingest.protocol import TrackingHttpProtocol
from tracker.ingest.suppression import SuppressionBook
from tracker.ingest.tokens import Signer
from tracker.ingest.useragent import parse_agent, prepare
from tracker.web.metrics import Metrics

AGENTS = (BROWSERS[0], BROWSERS[2], OUTLOOK[0], GMAIL[0],
          "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
          "like Gecko) Mobile/15E148")
CONNECTIONS = 64
MESSAGES = 300
KEY = "benchmark-signing-key-0123456789"


class _Transport:
    """A connection's transport that keeps nothing: what the protocol writes is counted."""

    def __init__(self) -> None:
        self.written = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(
            name, default)

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...

    def set_protocol(self, protocol: object) -> None: ...

    def can_write_eof(self) -> bool:
        return True


class _Sink:
    """The writer's side of `Capture`: keeps the last events (their memory is measured)."""

    def __init__(self) -> None:
        self.records: list[EventRecord] = []

    def add(self, record: EventRecord) -> DropReason | None:
        self.records.append(record)
        if len(self.records) >= 100_000:
            self.records.clear()
        return None

    def synced(self) -> None:
        return None


class _Runtime:
    def __init__(self, capture: Capture) -> None:
        self.capture: Capture | None = capture

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def _no_fallback(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError(f"not a tracking request: {scope['path']}")


def _requests(signer: Signer, kind: str, count: int, addresses: Sequence[str],
              rng: random.Random) -> list[bytes]:
    sent_at = int(time.time()) - 3600
    out = []
    for _ in range(count):
        message = rng.randrange(MESSAGES)
        if kind == "open":
            path = f"/o/{signer.open_token(1, 1, message + 1, sent_at, message + 7)}.gif"
        else:
            link = rng.randrange(3)
            path = "/c/" + signer.click_token(1, 1, message + 1, sent_at, link, 100 + link,
                                              f"https://shop.example.com/{link}?utm_source=x",
                                              recipient_key=message + 7)
        out.append((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: "
                    f"{rng.choice(AGENTS)}\r\nX-Forwarded-For: {rng.choice(addresses)}\r\n"
                    "\r\n").encode())
    return out


class _Bench:
    def __init__(self, locate: geo.Locate) -> None:
        self.signer = Signer([KEY])
        policies = PolicyBook()
        policies.put(1, 1, DEFAULT, True)
        self.pipeline = Pipeline(policies, parse_agent, locate)
        self.addresses = ClientAddress([ip_network("127.0.0.1/32")])
        self.sink = _Sink()
        self.capture = Capture(self.signer, self.pipeline, self.addresses, self.sink,
                               Metrics(), SuppressionBook())
        app = FastPath(_no_fallback, _Runtime(self.capture))
        config = Config(app, http=TrackingHttpProtocol, lifespan="off", proxy_headers=False,
                        access_log=False, server_header=False, date_header=False)
        config.load()
        state = ServerState()
        loop = asyncio.get_running_loop()
        self.connections = []
        for _ in range(CONNECTIONS):
            protocol = TrackingHttpProtocol(config, state, {}, loop)
            protocol.connection_made(_Transport())  # type: ignore[arg-type]
            self.connections.append(protocol)

    async def feed(self, requests: Sequence[bytes]) -> None:
        """Each connection one request a turn, as wrk's 64 send; the loop runs between turns
        (the answers' flush and the pixels' recording)."""
        connections = self.connections
        for start in range(0, len(requests), CONNECTIONS):
            for protocol, request in zip(connections, requests[start:start + CONNECTIONS],
                                         strict=False):
                protocol.data_received(request)
            await asyncio.sleep(0)
        await asyncio.sleep(0)

    async def per_request(self, requests: Sequence[bytes], rounds: int) -> float:
        best = float("inf")
        for _ in range(rounds):
            gc.collect()
            started = time.process_time()
            await self.feed(requests)
            best = min(best, time.process_time() - started)
        return best / len(requests) * 1e6


def _per_call(fn: Callable[[], object], number: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(number):
            fn()
        best = min(best, time.process_time() - started)
    return best / number * 1e6


async def _measure(args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(1)
    locate = geo.GeoLookup(args.geoip_db).lookup if args.geoip_db else geo.no_location
    prepare(None)
    bench = _Bench(locate)
    readers = reader_addresses(2000, rng)
    figures: dict[str, float] = {}
    count = CONNECTIONS * 300
    for kind in ("open", "click"):
        requests = _requests(bench.signer, kind, count, readers, rng)
        await bench.feed(requests)  # warm every cache
        figures[f"{kind} whole"] = await bench.per_request(requests, args.rounds)
        capture = bench.capture
        real = capture._refusal
        capture._refusal = lambda *a, **k: None  # type: ignore[method-assign]
        figures[f"{kind} protocol and answer"] = await bench.per_request(requests, args.rounds)
        capture._refusal = real  # type: ignore[method-assign]

    # The steps alone, on warm caches.
    signer = bench.signer
    sent_at = int(time.time()) - 3600
    open_text = signer.open_token(1, 1, 5, sent_at, 9)
    click_text = signer.click_token(1, 1, 5, sent_at, 1, 101, "https://shop.example.com/1?u=x",
                                    recipient_key=9)
    open_token, click_token = signer.verify_open(open_text), signer.verify_click(click_text)
    assert open_token is not None and click_token is not None
    number = 20_000
    steps: list[tuple[str, Callable[[], object]]] = [
        ("token, open, kept", lambda: signer.verify_open(open_text)),
        ("token, open, verified", lambda: signer._verify_open(open_text)),
        ("token, click, kept", lambda: signer.verify_click(click_text)),
        ("token, click, verified", lambda: signer._verify_click(click_text)),
        ("address from X-Forwarded-For, kept",
         lambda: bench.addresses.resolve("127.0.0.1", readers[0].encode())),
        ("address from X-Forwarded-For, parsed",
         lambda: bench.addresses._from_forwarded(readers[0].encode())),
    ]
    now_us = time.time_ns() // 1000
    pipeline, classifier = bench.pipeline, bench.pipeline.classifier
    def open_with(agent: str) -> Callable[[], object]:
        return lambda: pipeline.open(open_token, "GET", agent, readers[1], now_us)

    steps += [(f"pipeline open ({agent[:36]}...)", open_with(agent)) for agent in AGENTS]
    agent_class = pipeline._agent_parts(AGENTS[0], True)[2]
    steps += [
        ("pipeline click (desktop Chrome)",
         lambda: pipeline.click(click_token, "GET", AGENTS[0], readers[1], now_us)),
        ("classification rules, open (in the above)",
         lambda: classifier.open(agent_class, readers[1], open_token, now_us)),
        ("classification rules, click (in the above)",
         lambda: classifier.click(agent_class, "GET", click_token, now_us, readers[1])),
    ]
    for name, fn in steps:
        fn()
        figures[name] = _per_call(fn, number, args.rounds)

    # Caches at a campaign's cardinality: every hit from one of N addresses.
    for size in args.addresses:
        fresh = _Bench(locate)
        pool = reader_addresses(size, random.Random(size)) if size > 2000 else readers
        many = _requests(fresh.signer, "open", max(count, min(size, 200_000)), pool, rng)
        await fresh.feed(many)
        figures[f"open whole, {size:,} addresses"] = await fresh.per_request(many, 2)
    if args.geoip_db:
        lookup = geo.GeoLookup(args.geoip_db)
        pool = reader_addresses(20_000, random.Random(3))
        cursor = iter(range(1 << 62))
        figures["geo lookup, not cached"] = _per_call(
            lambda: lookup._lookup_uncached(pool[next(cursor) % len(pool)]), len(pool), 1)

    # What an event waiting for the writer holds.
    bench.sink.records.clear()
    requests = _requests(bench.signer, "open", 20_000, readers, rng)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    await bench.feed(requests)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    figures["bytes held per waiting event"] = held / len(bench.sink.records)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks hit",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--geoip-db", type=Path, help="a MaxMind-format City database "
                        "(the suite's default: DB-IP City Lite); without one nothing is located")
    parser.add_argument("--addresses", default="2000,200000",
                        help="comma-separated counts of distinct client addresses")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    args.addresses = [int(n) for n in args.addresses.split(",") if n.strip()]
    figures = uvloop.run(_measure(args))
    print(f"| {'part of a hit (µs of CPU; no system calls)':56s} | {'µs':>7s} |")
    print("|---|---:|")
    for name, value in figures.items():
        unit = "B" if name.startswith("bytes") else "µs"
        print(f"| {name:56s} | {value:7.2f} {unit} |")
    if args.json:
        print(json.dumps(figures))
    return 0
