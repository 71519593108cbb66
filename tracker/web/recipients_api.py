"""The privacy lifecycle's endpoints (docs/privacy.md).

- `GET|PATCH /api/account`: the account's default retention, whether Sec-GPC / DNT
  are honoured, and the consent new campaigns require. (Deleting an account is the
  operator's: `tracker accounts delete`.)
- `POST /api/campaigns/{id}/restore`: undo a campaign's deletion within the grace period.
- `GET /api/campaigns/{id}/privacy`: the campaign's policy in plain language.
- `DELETE /api/recipients/{address}`: erasure; `GET .../export`: everything stored;
  `GET|POST|DELETE .../opt-out`: the recipient's tracking opt-out;
  `PUT|GET .../consent`: the recipient's consent to tracking (privacy/consent.py).

An address is the rest of the path (`ada@example.com`, or percent-encoded
`ada%40example.com`); one with a `/` in it is named with `%2F` or as is. Addresses are
checked by `check_address` (privacy/recipients.py), the check registration makes: every
recipient that could be registered can be exported, opted out and erased.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tracker.ingest.policy import MAX_RETENTION_DAYS, PolicyError, consent_fields
from tracker.privacy import consent, data_subjects, notice
from tracker.privacy.recipients import InvalidAddress, check_address
from tracker.store import campaigns
from tracker.store.queries import QUERIES
from tracker.web.campaigns_api import own_campaign
from tracker.web.http import (
    JSON,
    HttpError,
    authenticated,
    json_body,
    json_object,
    object_id,
    runtime_of,
)


class _AddressConvertor(Convertor[str]):
    """The rest of the path, whatever it holds: a "/" (an address may have one), and also
    a line break or another control character, so that check_address refuses those with
    a 422 rather than the router with a 404."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("address", _AddressConvertor())

_ACCOUNT_FIELDS = {"retention_days", "honour_privacy_signals", "consent"}


def _address(request: Request) -> str:
    try:
        return check_address(request.path_params["address"])
    except InvalidAddress as exc:
        raise HttpError(422, str(exc)) from None


@authenticated
async def get_account(request: Request, account_id: int) -> Response:
    pool = runtime_of(request).pool
    row = await pool.fetchrow(QUERIES.account_settings, account_id)
    if row is None:
        raise HttpError(404, "account not found")
    return JSON({**_account_json(row), "consent": await consent.account_default(pool,
                                                                             account_id)})


@authenticated
async def patch_account(request: Request, account_id: int) -> Response:
    runtime = runtime_of(request)
    body = await json_object(request, _ACCOUNT_FIELDS)
    async with runtime.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(QUERIES.account_settings, account_id)
        if row is None:
            raise HttpError(404, "account not found")
        days = body.get("retention_days", row["retention_days"])
        if days is not None and (isinstance(days, bool) or not isinstance(days, int)
                                 or not 1 <= days <= MAX_RETENTION_DAYS):
            raise HttpError(422, f"retention_days: must be null or 1 to {MAX_RETENTION_DAYS}")
        honour = body.get("honour_privacy_signals", row["honour_privacy_signals"])
        if not isinstance(honour, bool):
            raise HttpError(422, "honour_privacy_signals: must be true or false")
        required = await consent.account_default(conn, account_id)
        if "consent" in body:
            try:
                changes = consent_fields(body["consent"], "consent")
            except PolicyError as exc:
                raise HttpError(422, str(exc)) from None
            required = {kind: changes.get(f"consent_{kind}", required[kind])
                        for kind in ("opens", "clicks")}
            await consent.set_account_default(conn, account_id, required["opens"],
                                              required["clicks"])
        updated = await conn.fetchrow(QUERIES.update_account_settings, account_id,
                                      days, honour)
    runtime.suppressions.put_account(account_id, disabled=False, honours_signals=honour)
    await runtime.privacy_changed()
    return JSON({**_account_json(updated), "consent": required})


@authenticated
async def restore_campaign(request: Request, account_id: int) -> Response:
    runtime = runtime_of(request)
    campaign_id = object_id(request)
    row = await runtime.pool.fetchrow(QUERIES.restore_campaign, account_id, campaign_id)
    if row is None:  # restoring a campaign that is not deleted changes nothing
        row = await own_campaign(runtime.pool, account_id, campaign_id)
    runtime.remember_campaign(account_id, campaign_id, campaigns.policy_of(row), recording=True)
    await runtime.privacy_changed()
    return JSON(campaigns.campaign_json(row))


@authenticated
async def campaign_privacy(request: Request, account_id: int) -> Response:
    row = await runtime_of(request).pool.fetchrow(QUERIES.campaign_privacy, account_id,
                                                  object_id(request))
    if row is None:
        raise HttpError(404, "campaign not found")
    return JSON(notice.campaign_summary(row))


@authenticated
async def erase_recipient(request: Request, account_id: int) -> Response:
    runtime = runtime_of(request)
    erased = await data_subjects.erase(runtime.pool, account_id, _address(request),
                                       runtime.suppressions,
                                       lambda: runtime.privacy_changed(erasure=True))
    await runtime.readers_caught_up()  # what was deleted is gone from the replica too
    if runtime.jobs is not None:
        runtime.jobs.sweep_later(account_id, erased.recipient_key, erased.through,
                                 list(erased.message_ids))
    return JSON(erased.as_json())


@authenticated
async def export_recipient(request: Request, account_id: int) -> Response:
    address = _address(request)
    async with runtime_of(request).pool.acquire() as conn, conn.transaction(
            isolation="repeatable_read", readonly=True):
        return JSON(await data_subjects.export(conn, account_id, address))


@authenticated
async def get_opt_out(request: Request, account_id: int) -> Response:
    address = _address(request)
    state = await data_subjects.tracking_state(runtime_of(request).pool, account_id, address)
    return JSON({"address": address, **state})


@authenticated
async def opt_out(request: Request, account_id: int) -> Response:
    runtime = runtime_of(request)
    address = _address(request)
    state = await data_subjects.opt_out(runtime.pool, account_id, address, runtime.suppressions)
    await runtime.privacy_changed()
    return JSON({"address": address, **state})


@authenticated
async def withdraw_opt_out(request: Request, account_id: int) -> Response:
    runtime = runtime_of(request)
    address = _address(request)
    state = await data_subjects.withdraw_opt_out(runtime.pool, account_id, address,
                                                 runtime.suppressions)
    await runtime.privacy_changed()
    return JSON({"address": address, **state})


@authenticated
async def get_consent(request: Request, account_id: int) -> Response:
    address = _address(request)
    record = await consent.current(runtime_of(request).pool, account_id, address)
    if record is None:
        raise HttpError(404, "no consent is on record for this recipient")
    return JSON(record)


@authenticated
async def put_consent(request: Request, account_id: int) -> Response:
    """Record consent given, refused or withdrawn: it holds in every worker when this
    answers (a withdrawal also for the mail sent before)."""
    runtime = runtime_of(request)
    address = _address(request)
    try:
        given = consent.parse(await json_body(request))
    except consent.InvalidConsent as exc:
        raise HttpError(422, str(exc)) from None
    record = await consent.record(runtime.pool, account_id, address, given,
                                  runtime.suppressions)
    await runtime.privacy_changed()
    return JSON(record)


def _account_json(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": str(row["id"]), "name": row["name"], "created_at": _iso(row["created_at"]),
            "retention_days": row["retention_days"],
            "honour_privacy_signals": row["honour_privacy_signals"]}


def _iso(value: datetime) -> str:
    return value.isoformat()


_RECIPIENT = "/api/recipients/{address:address}"
ROUTES = [
    Route("/api/account", get_account, methods=["GET"]),
    Route("/api/account", patch_account, methods=["PATCH"]),
    Route("/api/campaigns/{id}/restore", restore_campaign, methods=["POST"]),
    Route("/api/campaigns/{id}/privacy", campaign_privacy, methods=["GET"]),
    Route(_RECIPIENT + "/export", export_recipient, methods=["GET"]),
    Route(_RECIPIENT + "/opt-out", get_opt_out, methods=["GET"]),
    Route(_RECIPIENT + "/opt-out", opt_out, methods=["POST"]),
    Route(_RECIPIENT + "/opt-out", withdraw_opt_out, methods=["DELETE"]),
    Route(_RECIPIENT + "/consent", get_consent, methods=["GET"]),
    Route(_RECIPIENT + "/consent", put_consent, methods=["PUT"]),
    Route(_RECIPIENT, erase_recipient, methods=["DELETE"]),
]
