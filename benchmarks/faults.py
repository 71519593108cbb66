"""What fault injection needs: distinct pixel hits from a client that notes when each was
answered, and `kill -9` of a server's whole process tree.

Every hit is a distinct pixel open (its own message id, in a token signed here with the
server's key), so the events in PostgreSQL can be matched one for one with the requests
that were answered. `durability` measures what a kill loses with it, and
tests/test_faults.py checks the same bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from benchmarks.common import descendants
from tracker.ingest.endpoints import PIXEL_GIF
from tracker.ingest.tokens import Signer

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")


@dataclass
class Target:
    """An account and campaign, and pixel paths for distinct messages of it."""

    account_id: int
    campaign_id: int
    secret: str  # the server's TRACKER_SECRET_KEY
    first_message: int = 1_000_000
    _signer: Signer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._signer = Signer.from_setting(self.secret)

    def path(self, i: int) -> str:
        token = self._signer.open_token(self.account_id, self.campaign_id,
                                        self.first_message + i, int(time.time()) - 3600)
        return f"/o/{token}.gif"

    def message(self, i: int) -> int:
        return self.first_message + i


def messages_stored(dsn: str, where: Target) -> set[int]:
    """The message ids of the target's campaign that have an event in PostgreSQL."""
    async def fetch() -> set[int]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("select message_id from events where account_id = $1 "
                                    "and campaign_id = $2", where.account_id, where.campaign_id)
        finally:
            await conn.close()
        return {int(row[0]) for row in rows}
    return asyncio.run(fetch())


def _poll(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Until `predicate()` is true; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.01)


def kill_9(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL a server and its workers (all started by the caller), the parent first so
    that it cannot start a new worker; returns once every one of them is dead."""
    assert proc is not None
    tree = [proc.pid, *descendants(proc.pid)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(10)
    for pid in tree[1:]:
        _poll(lambda p=pid: not Path(f"/proc/{p}").exists()  # type: ignore[misc]
              or "Z" in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3],
              10, f"worker {pid} to die")


class Load:
    """A bounded loop of distinct pixel hits over keep-alive connections, in a thread.

    It runs until `stop()` or until `limit` requests, at `rate` requests a second (None:
    as fast as the server answers); for each request answered it notes when (monotonic)
    and how long it took. A request whose connection broke is not answered; it is noted
    in `broken` and the connection is made again."""

    def __init__(self, port: int, where: Target, connections: int = 6,
                 limit: int = 200_000, rate: float | None = None) -> None:
        self.port = port
        self.where = where
        self.connections = connections
        self.limit = limit
        self.rate = rate
        self._started = 0.0
        self.answered: dict[int, tuple[float, float]] = {}  # index -> (answered at, latency)
        self.broken: list[int] = []
        self.wrong: list[tuple[int, bytes]] = []
        self._next = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def sent(self) -> int:
        return len(self.answered)

    def wait_answered(self, n: int, timeout: float = 60.0) -> None:
        _poll(lambda: len(self.answered) >= n or not self._thread.is_alive(), timeout,
              f"{n} answered hits")
        assert len(self.answered) >= n, f"the load ended after {len(self.answered)} hits"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the load did not stop"

    async def _main(self) -> None:
        self._started = time.monotonic()
        await asyncio.gather(*(self._connection() for _ in range(self.connections)))

    async def _connection(self) -> None:
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while not self._stop.is_set():
            i = next(self._next)
            if i >= self.limit:
                return
            request = (f"GET {self.where.path(i)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       f"User-Agent: {CHROME}\r\n\r\n").encode()
            if self.rate is not None:
                # Pacing, not waiting for a condition: request i is due at i / rate.
                await asyncio.sleep(max(0.0, self._started + i / self.rate - time.monotonic()))
            started = time.monotonic()
            try:
                if streams is None:
                    streams = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", self.port), 5)
                reader, writer = streams
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                body = await reader.readexactly(int(length.group(1)) if length else 0)
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                self.broken.append(i)
                if streams is not None:
                    streams[1].close()
                streams = None
                if self._stop.is_set():
                    return
                await asyncio.sleep(0.05)  # the server is gone or restarting: back off
                continue
            answered = time.monotonic()
            if not head.startswith(b"HTTP/1.1 200 ") or body != PIXEL_GIF:
                self.wrong.append((i, head))
            self.answered[i] = (answered, answered - started)
        if streams is not None:
            streams[1].close()
