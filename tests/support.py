"""Test helpers: a real tracker server in a subprocess, API calls, database reads.

Nothing here is a mock: the server is `python -m tracker serve` on a loopback
port, the database a real PostgreSQL. Waiting is polling with a deadline: `wait_for`,
and `wait_for_async` in async tests. Every test reaches PostgreSQL through `connected`
(or the `db` fixture, conftest.py), `db_call`, `db_fetch` or `db_value`.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, overload
from urllib.parse import urlsplit

import asyncpg
import httpx

from tracker.store import accounts
from tracker.store.embedded_db import EmbeddedPostgres

T = TypeVar("T")
SECRET = "test-signing-key-0123456789abcdef"


@dataclass
class Replication:
    """A primary and a streaming standby made from it."""
    primary: EmbeddedPostgres
    standby: EmbeddedPostgres
    primary_dsn: str
    standby_dsn: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
             message: str = "condition") -> T:
    """Poll until `predicate` is true, and return its value. The deadline is for a machine
    far busier than a quiet one: only a test that is failing waits it out."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(timeout, message)
        time.sleep(interval)


# The twin of wait_for, called the same way (ASYNC109 would have the caller wrap it in
# asyncio.timeout, whose error could not say what was awaited).
@overload
async def wait_for_async(predicate: Callable[[], Awaitable[T]], timeout: float = ...,  # noqa: ASYNC109
                         interval: float = ..., message: str = ...) -> T: ...
@overload
async def wait_for_async(predicate: Callable[[], T], timeout: float = ...,  # noqa: ASYNC109
                         interval: float = ..., message: str = ...) -> T: ...
async def wait_for_async(predicate: Callable[[], Any],
                         timeout: float = 30.0,  # noqa: ASYNC109
                         interval: float = 0.02, message: str = "condition") -> Any:
    """`wait_for` in an async test: the predicate may be a coroutine function, and the
    event loop (the writer, the journal, their tasks) runs between tries. What it polls
    is mostly in this process, cheap to ask, and some tests wait once per event: hence
    the shorter interval."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(timeout, message)
        await asyncio.sleep(interval)


def _timed_out(timeout: float, message: str) -> AssertionError:
    return AssertionError(f"timed out after {timeout}s waiting for {message}")


def worker_pids(pid: int) -> list[int]:
    """The child processes of a server (Linux: /proc)."""
    return [int(child) for child in
            Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def socket_inodes(pid: int) -> set[int]:
    """The inodes of a process's open sockets (Linux: /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


# Set apart from the server's own connections (application_name "tracker"), which tests
# count in pg_stat_activity; in the server's time zone.
_TEST_SESSION = {"timezone": "UTC", "application_name": "tracker-tests"}


@asynccontextmanager
async def connected(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own to PostgreSQL, closed on the way out."""
    conn = await asyncpg.connect(dsn, server_settings=_TEST_SESSION)
    try:
        yield conn
    finally:
        await conn.close()


def unreachable_dsn() -> str:
    """A PostgreSQL address where nothing listens: connecting fails at once."""
    return f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"


def in_database(dsn: str, name: str) -> str:
    """`dsn`, for another database of the same PostgreSQL."""
    return urlsplit(dsn)._replace(path=f"/{name}").geturl()


@contextmanager
def database_down(pg: EmbeddedPostgres) -> Iterator[None]:
    """PostgreSQL stopped (fast) for the block, then started again where it was."""
    before = pg.running()
    assert before is not None
    pg.stop("fast")
    assert pg.running() is None
    try:
        yield
    finally:
        after, started = pg.start()
        assert started
        # The server's DSN names the socket dir and port; they must not move.
        assert after == before


def db_call(dsn: str, use: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Runs `use` on a connection of its own, from a synchronous test."""
    async def run() -> T:
        async with connected(dsn) as conn:
            return await use(conn)
    return asyncio.run(run())


def db_fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    return list(db_call(dsn, lambda conn: conn.fetch(sql, *args)))


def db_value(dsn: str, sql: str, *args: Any) -> Any:
    rows = db_fetch(dsn, sql, *args)
    return rows[0][0] if rows else None


def new_account(dsn: str, name: str = "test") -> str:
    """Creates an account straight in the database; returns its API key."""
    return db_call(dsn, lambda conn: accounts.create_account(conn, name)).api_key


class Server:
    """`python -m tracker serve` in a subprocess, on a free loopback port."""

    def __init__(self, dsn: str | None, tmp: Path, env: dict[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        self._env = {**os.environ, "TRACKER_PORT": str(self.port), "TRACKER_HOST": "127.0.0.1",
                     "TRACKER_DATA_DIR": str(tmp / "data"), "TRACKER_LOG_LEVEL": "info",
                     "TRACKER_GEOIP_FETCH": "off"}
        if dsn is not None:
            self._env.update({"TRACKER_DATABASE_URL": dsn, "TRACKER_SECRET_KEY": SECRET})
        self._env.update(env or {})
        self._args = args or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def workers(self) -> int:
        flag = self._args.index("--workers") if "--workers" in self._args else None
        return int(self._args[flag + 1] if flag is not None
                   else self._env.get("TRACKER_WORKERS", "1"))

    def start(self, timeout: float = 60.0) -> Server:
        """Start the server and return once every worker is up: the first one to answer
        may be the only one, and a signal sent while another is still starting tests
        something else (or leaves it behind)."""
        log = open(self.log_path, "ab")  # noqa: SIM115 -- lives as long as the process
        self.proc = subprocess.Popen([sys.executable, "-m", "tracker", "serve", *self._args],
                                     env=self._env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout

        def answering(path: str) -> str | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                response = httpx.get(self.url + path, timeout=1)
            except httpx.HTTPError:
                return None
            return response.text if response.status_code == 200 else None

        wait_for(lambda: answering("/healthz"), timeout, interval=0.1,
                 message="the server to answer")
        if self.workers > 1:
            # Each worker publishes its metrics once its start-up is done (tracker_workers
            # counts them), whichever worker is asked.
            wait_for(lambda: _workers_up(answering("/metrics")) >= self.workers,
                     max(1.0, deadline - time.monotonic()), interval=0.1,
                     message=f"{self.workers} workers to start")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not stop on SIGTERM:\n{self.log()}") from None

    def client(self, api_key: str | None = None) -> httpx.Client:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)


def _workers_up(metrics: str | None) -> int:
    for line in (metrics or "").splitlines():
        if line.startswith("tracker_workers "):
            return int(float(line.split()[1]))
    return 0


def register(client: httpx.Client, campaign_id: str, links: list[str] | None = None,
             recipient: str = "reader@example.com", **extra: Any) -> dict[str, Any]:
    """Registers a message sent an hour ago unless `sent_at` is given (`sent_at=None`: none,
    the server's default, now). Tests click at once, and a click within seconds of sent_at
    is a machine's (the `too_soon` rule)."""
    body = {"recipient": recipient, "links": links or [],
            "sent_at": (datetime.now(UTC) - timedelta(hours=1)).isoformat(), **extra}
    if body["sent_at"] is None:
        del body["sent_at"]
    response = client.post(f"/api/campaigns/{campaign_id}/messages", json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def campaign(client: httpx.Client, policy: dict[str, Any] | None = None,
             name: str = "campaign") -> str:
    body: dict[str, Any] = {"name": name}
    if policy is not None:
        body["policy"] = policy
    response = client.post("/api/campaigns", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])
