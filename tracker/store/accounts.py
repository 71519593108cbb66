"""Accounts and their API keys. A key is shown once; only a hash of its secret is kept.

An account has any number of named keys, each with a scope:

- `read`: every read (reports, message lists, exports, the dashboard);
- `register`: that, and registering messages (what a sending system needs);
- `full`: everything, managing the account's keys included.

A key is "tk_<account>_<key id>_<secret>". Revoking one refuses it at once everywhere:
every request looks its key up in PostgreSQL (one indexed read), so there is no cache
to go stale in any worker or node. Rotating a key makes a new key with the same name
and scope (a new id and secret) and revokes the old one, in one transaction.

When a key was last used is kept to the minute: the read that checks a key also says
whether its last use is older than a minute, and only then is the use written (by the
caller, after the answer's work is done), so a busy key costs one write a minute,
not one per request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from tracker.store.queries import QUERIES

_PREFIX = "tk"
MAX_NAME_CHARS = 200
MAX_KEY_NAME_CHARS = 100
SCOPES = ("read", "register", "full")
DEFAULT_KEY_NAME = "default"


class KeyRequestError(ValueError):
    """A key request that cannot be done; the message says why."""


class LastFullKey(KeyRequestError):
    """Revoking the account's only full key would leave nothing that can manage it."""


@dataclass(frozen=True)
class NewAccount:
    id: int
    name: str
    api_key: str


@dataclass(frozen=True)
class Key:
    """An authenticated API key: whose, which, and what it may do."""
    account_id: int
    key_id: str
    name: str
    scope: str
    stale: bool = False  # its last use is older than a minute: note this one

    def allows(self, needed: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(needed)


@dataclass(frozen=True)
class NewKey:
    id: str
    name: str
    scope: str
    created_at: datetime
    api_key: str  # shown once

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "scope": self.scope,
                "created_at": self.created_at.isoformat(), "last_used_at": None,
                "api_key": self.api_key}


def _hash(secret: str) -> bytes:
    # The secret is 256 random bits, so a fast hash is as strong as a slow one here.
    return hashlib.sha256(secret.encode()).digest()


def check_key_name(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise KeyRequestError("name: must be a non-empty string")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise KeyRequestError("name: contains a control character")
    if len(value) > MAX_KEY_NAME_CHARS:
        raise KeyRequestError(f"name: longer than {MAX_KEY_NAME_CHARS} characters")
    return value.strip()


def check_scope(value: object) -> str:
    if value not in SCOPES:
        raise KeyRequestError(f"scope: must be one of {', '.join(SCOPES)}")
    assert isinstance(value, str)
    return value


async def create_account(conn: asyncpg.Connection, name: str) -> NewAccount:
    name = name.strip()
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise ValueError(f"an account name must be 1 to {MAX_NAME_CHARS} characters")
    async with conn.transaction():
        row = await conn.fetchrow(QUERIES.create_account, name)
        key = await create_key(conn, row["id"], DEFAULT_KEY_NAME, "full")
    return NewAccount(row["id"], row["name"], key.api_key)


async def create_key(conn: asyncpg.Connection | asyncpg.Pool, account_id: int, name: str,
                     scope: str) -> NewKey:
    """A new key. A live key of the account with the same name is a KeyRequestError."""
    name, scope = check_key_name(name), check_scope(scope)
    key_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(32)
    try:
        row = await conn.fetchrow(QUERIES.create_key, account_id, key_id, _hash(secret),
                                  name, scope)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "api_keys_live_name":
            raise KeyRequestError(f"name: the account has a key named {name!r} already") from None
        raise  # the one-in-4-billion key id already taken: a 500, retried by the caller
    except asyncpg.ForeignKeyViolationError:
        raise LookupError(f"no account {account_id}") from None
    return NewKey(row["key_id"], row["name"], row["scope"], row["created_at"],
                  f"{_PREFIX}_{account_id}_{key_id}_{secret}")


async def list_keys(conn: asyncpg.Connection | asyncpg.Pool,
                    account_id: int) -> list[dict[str, Any]]:
    return [key_json(r) for r in await conn.fetch(QUERIES.list_keys, account_id)]


async def revoke_key(conn: asyncpg.Connection, account_id: int, key_id: str, *,
                     keep_a_full_key: bool = True) -> dict[str, Any] | None:
    """Revoke a live key (None: no such key). With `keep_a_full_key`, the account's last
    full key is refused (LastFullKey): nothing could manage the account through the API."""
    async with conn.transaction():
        await conn.execute(QUERIES.lock_account_keys, account_id)
        row = await conn.fetchrow(QUERIES.get_key, account_id, key_id)
        if row is None:
            return None
        if (keep_a_full_key and row["scope"] == "full"
                and not await conn.fetchval(QUERIES.other_full_keys, account_id, key_id)):
            raise LastFullKey("this is the account's only full key: create another full key "
                              "before revoking it (or rotate it)")
        revoked = await conn.fetchrow(QUERIES.revoke_key, account_id, key_id)
    return key_json(revoked) if revoked is not None else None


async def rotate_key(conn: asyncpg.Connection, account_id: int, key_id: str) -> NewKey | None:
    """A new key (id and secret) with the old one's name and scope; the old one is revoked
    in the same transaction, so it is refused from the moment the new one exists."""
    async with conn.transaction():
        await conn.execute(QUERIES.lock_account_keys, account_id)
        old = await conn.fetchrow(QUERIES.revoke_key, account_id, key_id)
        if old is None:
            return None
        return await create_key(conn, account_id, old["name"], old["scope"])


def key_json(row: asyncpg.Record) -> dict[str, Any]:
    used = row["last_used_at"]
    return {"id": row["key_id"], "name": row["name"], "scope": row["scope"],
            "created_at": row["created_at"].isoformat(),
            "last_used_at": used.isoformat() if used is not None else None}


def _parts(api_key: str) -> tuple[int, str, str] | None:
    parts = api_key.split("_", 3)
    if (len(parts) != 4 or parts[0] != _PREFIX or not parts[1].isascii()
            or not parts[1].isdigit() or len(parts[1]) > 18):
        return None
    return int(parts[1]), parts[2], parts[3]


async def authenticate(pool: asyncpg.Pool, api_key: str) -> Key | None:
    """The live key `api_key` is, or None. The secret is compared in constant time."""
    parts = _parts(api_key)
    if parts is None:
        return None
    account_id, key_id, secret = parts
    row = await pool.fetchrow(QUERIES.key_to_check, account_id, key_id)
    # Compare against something even when the key id is unknown, so timing tells nothing.
    expected = row["secret_hash"] if row is not None else b"\0" * 32
    if hmac.compare_digest(expected, _hash(secret)) and row is not None:
        return Key(account_id, key_id, row["name"], row["scope"], row["stale"])
    return None


async def note_use(pool: asyncpg.Pool, key: Key) -> None:
    """Write the key's last use, if it is older than a minute (`key.stale`)."""
    if key.stale:
        await pool.execute(QUERIES.note_key_use, key.account_id, key.key_id)


async def list_accounts(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    def state(row: asyncpg.Record) -> str:
        if row["purge_finished_at"] is not None:
            return "purged"
        return "deleted" if row["deleted_at"] is not None else "active"

    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return [{"id": str(r["id"]), "name": r["name"], "state": state(r),
             "created_at": r["created_at"].isoformat(), "deleted_at": iso(r["deleted_at"]),
             "keys": r["keys"], "campaigns": r["campaigns"],
             "last_used_at": iso(r["last_used_at"])}
            for r in await conn.fetch(QUERIES.list_accounts)]
