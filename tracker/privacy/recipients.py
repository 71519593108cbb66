"""Recipients as tracker knows them, without their address: keys and pseudonyms.

Every account has a random key of its own (`accounts.recipient_secret`). A
recipient's normalized address, HMAC-SHA256'd under it, gives

- the recipient key: the first 8 bytes, as a signed 64-bit integer. Every message
  stores it, and every token of the message carries it (ingest/tokens.py), so the hot path
  can refuse to record hits of an opted-out or erased recipient from memory
  (ingest/suppression.py), and erasure, opt-out and export find a recipient's messages from
  the plain address whatever the campaign stored;
- the pseudonym: `psn_` and the first 16 bytes in hex, stored instead of the address
  when the campaign's policy says `"recipient": "pseudonym"`.

Neither can be turned back into the address without the account's key; with the key,
a guessed address can be confirmed (that is what lets erasure and export work from the
address), which is why the key never leaves the database and is replaced when the
account is purged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from dataclasses import dataclass

import asyncpg

from tracker.store.queries import QUERIES

PSEUDONYM_PREFIX = "psn_"
MAX_ADDRESS_CHARS = 320
_ANGLE_ADDRESS = re.compile(r"<([^<>]*)>\s*$")


class InvalidAddress(ValueError):
    """A recipient address tracker refuses; the message names where and why."""


def check_address(value: object, where: str = "address") -> str:
    """The one check of a recipient address, wherever one comes in (registration, the
    recipient endpoints): what registration accepts, erasure, export and opt-out accept
    too. Returns it without the white space around it.

    Checked before that white space is taken off: str.strip() also takes TAB and the
    control characters \x1c-\x1f for white space, and an address with those in it must
    be refused, not quietly become another one."""
    if not isinstance(value, str):
        raise InvalidAddress(f"{where}: must be a non-empty string")
    if len(value) > MAX_ADDRESS_CHARS:
        raise InvalidAddress(f"{where}: longer than {MAX_ADDRESS_CHARS} characters")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise InvalidAddress(f"{where}: contains a control character")
    value = value.strip()
    if not value:
        raise InvalidAddress(f"{where}: must be a non-empty string")
    if not normalize(value):
        raise InvalidAddress(f"{where}: has no address in its angle brackets")
    return value


def normalize(address: str) -> str:
    """The form of an address that keys and pseudonyms are made from: the addr-spec of
    `Name <addr>`, trimmed, NFC, lower case. Lower-casing the local part is what every
    mail provider in practice does; doing it means `Ada@Example.com` and
    `ada@example.com` are one recipient for erasure and opt-out."""
    match = _ANGLE_ADDRESS.search(address)
    spec = match.group(1) if match else address
    return unicodedata.normalize("NFC", spec.strip()).lower()


@dataclass(frozen=True, slots=True)
class Recipient:
    key: int  # signed 64-bit, never 0 (0 in a token means "unknown")
    pseudonym: str


def identify(secret: bytes, address: str) -> Recipient:
    digest = hmac.digest(secret, normalize(address).encode(), hashlib.sha256)
    key = int.from_bytes(digest[:8], "big", signed=True) or 1
    return Recipient(key, PSEUDONYM_PREFIX + digest[:16].hex())


def stored_recipient(mode: str, address: str, recipient: Recipient) -> str:
    """What `messages.recipient` holds under a policy's `recipient` mode."""
    return recipient.pseudonym if mode == "pseudonym" else address


def is_recipient(stored: str, address: str, recipient: Recipient) -> bool:
    """Whether a message's stored recipient is this address (or its pseudonym): the
    recipient key finds candidates, this rules out the one-in-2^64 collision."""
    return stored == recipient.pseudonym or normalize(stored) == normalize(address)


async def run_block(conn: asyncpg.Connection, block: str, *args: object) -> None:
    """Run a named block of several statements, each with the same arguments, in order."""
    code = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("--"))
    for statement in code.split(";"):
        if statement.strip():
            await conn.execute(statement, *args)


async def account_secret(conn: asyncpg.Connection | asyncpg.Pool, account_id: int) -> bytes:
    secret: bytes | None = await conn.fetchval(QUERIES.account_secret, account_id)
    if secret is None:
        raise LookupError(f"account {account_id} does not exist")
    return secret
