"""Consent to tracking, per recipient and account: given or refused, for opens and for clicks,
when, how, and the wording the recipient saw (proof, kept with every change).

How it acts (docs/privacy.md, "Consent"):

- A campaign's policy may require consent for opens and/or for clicks
  (`policy.consent`; an account's `consent` setting is what new campaigns take). Where it
  is required and the recipient has not given it, registration hands out no pixel
  (`pixel_url: null`, no pixel in the HTML) and/or no tracked links (`tracked_url: null`,
  the HTML keeps the original links).
- Consent on record when a message is registered is written into its tokens
  (ingest/tokens.py `FLAG_CONSENT`): a campaign that requires consent records only hits of
  tokens that carry it, also when its policy starts requiring consent after the message
  was sent.
- A refusal or withdrawal holds in every campaign of the account, whether it requires
  consent or not, and for mail already sent: it is kept with the other reasons a recipient
  is not recorded (`recipient_suppressions`), which every worker holds in memory
  (ingest/suppression.py) and applies before the API answers (privacy/sync.py).
- Erasure removes the record and its history; a refusal stays in force, as an opt-out
  does, so mail registered later is not tracked against it.

A wording is stored once per account however many recipients saw it (`consent_wordings`).
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from tracker.ingest.suppression import SuppressionBook
from tracker.privacy.recipients import account_secret, identify, run_block
from tracker.store.queries import QUERIES

MAX_METHOD_CHARS = 100
MAX_WORDING_CHARS = 10_000
HISTORY_SHOWN = 100
# A consent given "in the future" is a clock problem at the caller's; a little skew is not.
_CLOCK_SKEW = timedelta(minutes=5)
_FIELDS = {"opens", "clicks", "method", "wording", "at"}


class InvalidConsent(ValueError):
    """A consent record the API refuses (422); the message says where and why."""


@dataclass(frozen=True)
class Consent:
    opens: bool
    clicks: bool
    method: str
    wording: str | None
    at: datetime | None  # when the recipient gave or refused it; None: now


@dataclass(frozen=True, slots=True)
class RecipientState:
    """What registration needs to know of a recipient (privacy/recipients.py key)."""
    opted_out: bool = False
    refused_opens: bool = False
    refused_clicks: bool = False
    consented_opens: bool = False
    consented_clicks: bool = False


NOTHING_ON_RECORD = RecipientState()


def parse(body: object, now: datetime | None = None) -> Consent:
    """A consent record from the API: `{"opens": bool, "clicks": bool, "method": str,
    "wording": str?, "at": iso8601?}`."""
    if not isinstance(body, dict):
        raise InvalidConsent("the body must be a JSON object")
    unknown = set(body) - _FIELDS
    if unknown:
        raise InvalidConsent(f"unknown field(s): {', '.join(sorted(unknown))}")
    for kind in ("opens", "clicks"):
        if not isinstance(body.get(kind), bool):
            raise InvalidConsent(f"{kind}: required, true (consent given) or false (refused "
                                 "or withdrawn)")
    method = body.get("method")
    if not isinstance(method, str) or not method.strip():
        raise InvalidConsent("method: required, how consent was asked for (\"signup form\", "
                             "\"import\", \"preference center\", ...)")
    if len(method.strip()) > MAX_METHOD_CHARS or _has_control(method):
        raise InvalidConsent(f"method: at most {MAX_METHOD_CHARS} characters, no control "
                             "characters")
    wording = body.get("wording")
    if wording is not None:
        if not isinstance(wording, str) or not wording.strip():
            raise InvalidConsent("wording: must be null or the text the recipient was shown")
        if len(wording) > MAX_WORDING_CHARS:
            raise InvalidConsent(f"wording: longer than {MAX_WORDING_CHARS} characters")
        if _has_control(wording.replace("\n", "").replace("\r", "").replace("\t", "")):
            raise InvalidConsent("wording: contains a control character")
    at = _given_at(body.get("at"), now or datetime.now(UTC))
    return Consent(body["opens"], body["clicks"], method.strip(), wording, at)


def _given_at(value: object, now: datetime) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidConsent("at: must be an ISO 8601 date-time")
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidConsent(f"at: {value!r} is not an ISO 8601 date-time") from None
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    if at > now + _CLOCK_SKEW:
        raise InvalidConsent("at: in the future")
    if at.year < 1970:
        raise InvalidConsent("at: before 1970")
    return at


def _has_control(value: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in value)


async def record(pool: asyncpg.Pool, account_id: int, address: str, consent: Consent,
                 book: SuppressionBook | None = None) -> dict[str, Any]:
    """Store the recipient's consent (and the change in its history); tell `book`, this
    process's, at once. The caller then has every other worker apply it
    (Runtime.privacy_changed)."""
    async with pool.acquire() as conn, conn.transaction():
        key = identify(await account_secret(conn, account_id), address).key
        digest = None
        if consent.wording is not None:
            digest = hashlib.sha256(consent.wording.encode()).digest()
            await conn.execute(QUERIES.save_wording, account_id, digest,
                               consent.wording)
        given_at = consent.at or datetime.now(UTC)
        row = await conn.fetchrow(QUERIES.save_consent, account_id, key, consent.opens,
                                  consent.clicks, consent.method, digest, given_at)
        await conn.execute(QUERIES.record_consent_history, account_id, key,
                           consent.opens, consent.clicks, consent.method, digest, given_at)
        refused = (not consent.opens, not consent.clicks)
        if any(refused):
            state = await conn.fetchrow(QUERIES.refuse_consent, account_id, key,
                                        *refused)
        else:
            state = await conn.fetchrow(QUERIES.clear_consent_refusal, account_id, key)
    if book is not None and (state is not None or any(refused)):
        book.put_recipient(account_id, key, state["opted_out"] if state else False,
                           state["erased_through"] if state else None, refused)
    return _record_json(address, row, consent.wording)


async def current(conn: asyncpg.Connection | asyncpg.Pool, account_id: int, address: str,
                  history: int | None = HISTORY_SHOWN) -> dict[str, Any] | None:
    """The recipient's consent as it stands and its latest changes (newest first), or None
    when none was ever recorded (or it was erased)."""
    key = identify(await account_secret(conn, account_id), address).key
    row = await conn.fetchrow(QUERIES.consent_record, account_id, key)
    if row is None:
        return None
    changes = await conn.fetch(QUERIES.consent_history, account_id, key, history)
    return {**_record_json(address, row, row["wording"]),
            "history": [_change_json(change) for change in changes]}


async def refusals(conn: asyncpg.Connection | asyncpg.Pool, account_id: int,
                   recipient_key: int) -> dict[str, bool]:
    """Which kinds of tracking the recipient's refusal stops (also after an erasure)."""
    row = await conn.fetchrow(QUERIES.consent_refusals, account_id, recipient_key)
    return {"opens": bool(row and row["consent_refused_opens"]),
            "clicks": bool(row and row["consent_refused_clicks"])}


async def export(conn: asyncpg.Connection, account_id: int,
                 recipient_key: int) -> dict[str, Any] | None:
    """The record and its whole history, for the recipient's data export."""
    row = await conn.fetchrow(QUERIES.consent_record, account_id, recipient_key)
    if row is None:
        return None
    changes = await conn.fetch(QUERIES.consent_history, account_id, recipient_key,
                               None)
    return {**_change_json(row), "history": [_change_json(change) for change in changes]}


async def erase(conn: asyncpg.Connection, account_id: int, recipient_key: int) -> None:
    await run_block(conn, QUERIES.erase_consent, account_id, recipient_key)


async def for_registration(conn: asyncpg.Connection, account_id: int,
                           recipient_keys: list[int]) -> dict[int, RecipientState]:
    """Each recipient's opt-out and consent, for those with something on record."""
    rows = await conn.fetch(QUERIES.registration_consents, account_id,
                            sorted(set(recipient_keys)))
    return {r["recipient_key"]: RecipientState(r["opted_out"], r["refused_opens"],
                                               r["refused_clicks"], r["consented_opens"],
                                               r["consented_clicks"]) for r in rows}


async def account_default(conn: asyncpg.Connection | asyncpg.Pool,
                          account_id: int) -> dict[str, bool]:
    """The consent requirement new campaigns of the account take."""
    row = await conn.fetchrow(QUERIES.account_consent_default, account_id)
    return {"opens": bool(row and row["consent_opens"]),
            "clicks": bool(row and row["consent_clicks"])}


async def set_account_default(conn: asyncpg.Connection | asyncpg.Pool, account_id: int,
                              opens: bool, clicks: bool) -> None:
    await conn.execute(QUERIES.set_account_consent_default, account_id, opens, clicks)


def _record_json(address: str, row: asyncpg.Record, wording: str | None) -> dict[str, Any]:
    return {"address": address, "opens": row["opens"], "clicks": row["clicks"],
            "method": row["method"], "wording": wording, "at": row["given_at"].isoformat(),
            "recorded_at": row["recorded_at"].isoformat()}


def _change_json(row: asyncpg.Record) -> dict[str, Any]:
    return {"opens": row["opens"], "clicks": row["clicks"], "method": row["method"],
            "wording": row["wording"], "at": row["given_at"].isoformat(),
            "recorded_at": row["recorded_at"].isoformat()}
