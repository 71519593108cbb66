"""The database a command works on: said on stderr, migrated before use."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import asyncpg

from tracker.cli.common import load_settings
from tracker.settings import Settings
from tracker.store.database import connect, use_database, wait_until_reachable
from tracker.store.migrations import migrate

# How long serve and migrate wait for an external database to answer at start.
_DATABASE_WAIT_S = 30.0


async def apply_migrations(dsn: str) -> list[str]:
    await wait_until_reachable(dsn, _DATABASE_WAIT_S)
    conn = await connect(dsn)
    try:
        return [f"{m.version:04d}_{m.name}" for m in await migrate(conn)]
    finally:
        await conn.close()


@contextlib.contextmanager
def command_database(settings: Settings, *, create: bool = False) -> Iterator[str]:
    """The DSN of the database a command works on, said on stderr (stdout may be the
    command's JSON): an operator sees at once a command that went to the wrong place."""
    with use_database(settings, create=create) as database:
        print(f"tracker: database: {database.where}", file=sys.stderr)
        yield database.dsn


def on_database(args: argparse.Namespace,
                work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    """Run `work` on a connection to the configured (migrated) database, which must exist:
    only serve and migrate make a new embedded one."""
    settings = load_settings(args)

    async def run(dsn: str) -> Any:
        await apply_migrations(dsn)
        conn = await connect(dsn)
        try:
            return await work(conn)
        finally:
            await conn.close()

    with command_database(settings) as dsn:
        return asyncio.run(run(dsn))
