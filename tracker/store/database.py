"""Connections to PostgreSQL: where the database is, and how tracker talks to it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from tracker.settings import Settings, SettingsError
from tracker.store.datadir import running_server
from tracker.store.embedded_db import EmbeddedPostgres, NoDatabase

_CONNECT_TIMEOUT_S = 5.0


async def connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, timeout=_CONNECT_TIMEOUT_S, server_settings=_SESSION)


async def create_pool(dsn: str, *, max_size: int = 10) -> asyncpg.Pool:
    # min_size=0: with a floor, asyncpg logs a traceback each time it fails to refill
    # the pool during an outage; connections are made on demand instead.
    pool = await asyncpg.create_pool(dsn, min_size=0, max_size=max_size,
                                     timeout=_CONNECT_TIMEOUT_S, server_settings=_SESSION)
    assert pool is not None
    return pool


async def wait_until_reachable(dsn: str, timeout_s: float) -> None:
    """Retry connecting until the database answers; raise the last error after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = await connect(dsn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
        else:
            await conn.close()
            return


@dataclass(frozen=True)
class Database:
    dsn: str
    where: str  # which database this is, for a person: never a password


@contextmanager
def use_database(settings: Settings, *, create: bool = True) -> Iterator[Database]:
    """The database to use: the external one, or the embedded one in the data dir for the
    duration (started unless it runs, and stopped after unless another process uses it).
    Without `create`, a data dir that holds no embedded database is a settings error:
    a command run from the wrong directory must not make a new, empty database there."""
    if settings.database_url:
        yield Database(settings.database_url, f"{redacted(settings.database_url)} "
                       f"({settings.named('TRACKER_DATABASE_URL')})")
        return
    data_dir = settings.data_dir.resolve()
    try:
        with EmbeddedPostgres(data_dir).session(create=create) as session:
            if session.started:
                state = "started for this command"
            else:
                server = running_server(data_dir)
                state = (f"the running server's: {server.describe()}" if server is not None
                         else "already running")
            yield Database(session.dsn, f"the embedded database in {data_dir} ({state})")
    except NoDatabase:
        name = settings.named("TRACKER_DATA_DIR")
        raise SettingsError(
            f"{name}: no tracker database in {data_dir}; this command does not create one. "
            f"Run it with {name} set to the server's data dir, or create the database there "
            "first (tracker serve, or tracker migrate)") from None


def redacted(dsn: str) -> str:
    """A DSN as it may be shown: user, host, port and database; no password, no options
    but the host and port ones (libpq takes a password from the query string too)."""
    parts = urlsplit(dsn)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    try:
        port = parts.port
    except ValueError:  # not a number: PostgreSQL will say so
        port = None
    if port is not None:
        netloc += f":{port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    kept = [(k, v) for k, v in parse_qsl(parts.query) if k in ("host", "port")]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(kept, safe="/"), ""))


# Timestamps go out as UTC whatever the server's zone; reports convert explicitly.
_SESSION = {"timezone": "UTC", "application_name": "tracker"}
