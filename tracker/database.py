"""Connections to PostgreSQL: where the database is, and how tracker talks to it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

from tracker.embedded_db import EmbeddedPostgres
from tracker.settings import Settings

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


@contextmanager
def database_url(settings: Settings, *, owner: bool = False) -> Iterator[str]:
    """The DSN to use: the external database, or the embedded one started for the duration."""
    if settings.database_url:
        yield settings.database_url
        return
    with EmbeddedPostgres(settings.data_dir).session(owner=owner) as dsn:
        yield dsn


# Timestamps go out as UTC whatever the server's zone; reports convert explicitly.
_SESSION = {"timezone": "UTC", "application_name": "tracker"}
