"""Numbered plain-SQL migrations from sql/, applied in order, each in its own transaction."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
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


def sql_dir() -> Path:
    """sql/ inside the installed package (wheel), else the repository's sql/ (editable)."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "sql"
    return packaged if packaged.is_dir() else package.parent / "sql"


def available(directory: Path | None = None) -> list[Migration]:
    directory = directory or sql_dir()
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if match:
            found.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a number in {directory}")
    return found


async def migrate(conn: asyncpg.Connection, directory: Path | None = None) -> list[Migration]:
    """Apply pending migrations; returns those applied. Safe to run from several processes."""
    await conn.execute("select pg_advisory_lock($1)", _LOCK_ID)
    try:
        await conn.execute("""
            create table if not exists schema_migrations (
                version     integer primary key,
                name        text not null,
                checksum    text not null,
                applied_at  timestamptz not null default now()
            )""")
        done = {r["version"]: r["checksum"]
                for r in await conn.fetch("select version, checksum from schema_migrations")}
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
                await conn.execute(
                    "insert into schema_migrations (version, name, checksum) values ($1, $2, $3)",
                    migration.version, migration.name, migration.checksum)
            applied.append(migration)
        return applied
    finally:
        await conn.execute("select pg_advisory_unlock($1)", _LOCK_ID)
