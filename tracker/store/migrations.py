"""Numbered plain-SQL migrations from sql/, applied in order, each in its own transaction.

The bookkeeping (`schema_migrations`, the advisory lock that lets several processes start
at once) is in sql/setup.sql and sql/queries.sql, read through store/queries.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from tracker.store.queries import MIGRATION_FILE, QUERIES, sql_dir

# Any constant will do; it only has to be the same in every tracker process.
_LOCK_ID = 0x7472_6163_6B65_72


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available(directory: Path | None = None) -> list[Migration]:
    directory = directory or sql_dir()
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = MIGRATION_FILE.match(path.name)
        if match:
            found.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a number in {directory}")
    return found


async def migrate(conn: asyncpg.Connection, directory: Path | None = None) -> list[Migration]:
    """Apply pending migrations; returns those applied. Safe to run from several processes."""
    await conn.execute(QUERIES.advisory_lock, _LOCK_ID)
    try:
        await conn.execute(QUERIES.create_schema_migrations)
        done = {r["version"]: r["checksum"]
                for r in await conn.fetch(QUERIES.applied_migrations)}
        applied = []
        for migration in available(directory):
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} was changed after it "
                        "was applied; add a new migration instead")
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(QUERIES.record_migration, migration.version, migration.name,
                                   migration.checksum)
            applied.append(migration)
        return applied
    finally:
        await conn.execute(QUERIES.advisory_unlock, _LOCK_ID)
