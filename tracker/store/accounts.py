"""Accounts and their API keys. A key is shown once; only a hash of its secret is kept."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

import asyncpg

from tracker.store.queries import QUERIES

_PREFIX = "tk"
MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class NewAccount:
    id: int
    name: str
    api_key: str


def _hash(secret: str) -> bytes:
    # The secret is 256 random bits, so a fast hash is as strong as a slow one here.
    return hashlib.sha256(secret.encode()).digest()


async def create_account(conn: asyncpg.Connection, name: str) -> NewAccount:
    name = name.strip()
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise ValueError(f"an account name must be 1 to {MAX_NAME_CHARS} characters")
    async with conn.transaction():
        row = await conn.fetchrow(QUERIES.create_account, name)
        key = await create_api_key(conn, row["id"])
    return NewAccount(row["id"], row["name"], key)


async def create_api_key(conn: asyncpg.Connection, account_id: int) -> str:
    key_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(32)
    await conn.execute(QUERIES.create_api_key, account_id, key_id, _hash(secret))
    return f"{_PREFIX}_{account_id}_{key_id}_{secret}"


async def authenticate(pool: asyncpg.Pool, api_key: str) -> int | None:
    """The account the key belongs to, or None. The secret is compared in constant time."""
    parts = api_key.split("_", 3)
    if (len(parts) != 4 or parts[0] != _PREFIX or not parts[1].isascii()
            or not parts[1].isdigit() or len(parts[1]) > 18):
        return None
    account_id = int(parts[1])
    stored = await pool.fetchval(QUERIES.api_key_hash, account_id, parts[2])
    # Compare against something even when the key id is unknown, so timing tells nothing.
    expected = stored if stored is not None else b"\0" * 32
    if hmac.compare_digest(expected, _hash(parts[3])) and stored is not None:
        return account_id
    return None
