"""The management API's campaigns, messages and reports (README: Management API).

- `POST|GET /api/campaigns`, `GET|PATCH|DELETE /api/campaigns/{id}`;
- `POST /api/campaigns/{id}/messages` (and `.../messages/batch`): register messages;
- `GET /api/campaigns/{id}/report` and `.../export`; `GET /api/messages/{id}`.

A change to a campaign's policy holds in every worker once the answer is given
(`Runtime.privacy_changed`).
"""

from __future__ import annotations

from typing import Any

import asyncpg
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tracker.ingest.policy import DEFAULT, Policy, PolicyError
from tracker.mail.registration import (
    InvalidBatch,
    InvalidInput,
    parse_batch,
    parse_message,
    registered_json,
)
from tracker.store import campaigns, reports
from tracker.store.queries import QUERIES
from tracker.web import export
from tracker.web.http import (
    JSON,
    HttpError,
    authenticated,
    json_body,
    json_object,
    object_id,
    runtime_of,
)


async def own_campaign(conn: Any, account_id: int, campaign_id: int) -> asyncpg.Record:
    row = await campaigns.get(conn, account_id, campaign_id)
    if row is None:
        raise HttpError(404, "campaign not found")
    return row


async def _campaign_fields(request: Request, name: str | None,
                           policy: Policy) -> tuple[str, Policy]:
    """The name and policy a POST or PATCH body asks for, over the current ones."""
    body = await json_object(request, {"name", "policy"})
    try:
        if "name" in body or name is None:
            name = campaigns.check_name(body.get("name"))
        if body.get("policy") is not None:
            policy = policy.updated(body["policy"])
    except (ValueError, PolicyError) as exc:
        raise HttpError(422, str(exc)) from None
    return name, policy


@authenticated
async def create_campaign(request: Request, account_id: int) -> Response:
    runtime = runtime_of(request)
    name, policy = await _campaign_fields(request, None, DEFAULT)
    row = await campaigns.create(runtime.pool, account_id, name, policy)
    runtime.remember_campaign(account_id, row["id"], policy, recording=True)
    # Every worker knows its policy before its links are handed out: one that did not
    # would store the strictest policy's fields only.
    await runtime.privacy_changed()
    return JSON(campaigns.campaign_json(row), status_code=201)


@authenticated
async def list_campaigns(request: Request, account_id: int) -> Response:
    rows = await runtime_of(request).read_pool.fetch(QUERIES.list_campaigns, account_id)
    return JSON([campaigns.campaign_json(r) for r in rows])


@authenticated
async def get_campaign(request: Request, account_id: int) -> Response:
    row = await own_campaign(runtime_of(request).read_pool, account_id, object_id(request))
    return JSON(campaigns.campaign_json(row))


@authenticated
async def patch_campaign(request: Request, account_id: int) -> Response:
    runtime = runtime_of(request)
    campaign_id = object_id(request)
    row = await own_campaign(runtime.pool, account_id, campaign_id)
    name, policy = await _campaign_fields(request, row["name"], campaigns.policy_of(row))
    updated = await campaigns.update(runtime.pool, account_id, campaign_id, name, policy)
    if updated is None:
        raise HttpError(404, "campaign not found")
    runtime.remember_campaign(account_id, campaign_id, policy, recording=True)
    await runtime.privacy_changed()
    return JSON(campaigns.campaign_json(updated))


@authenticated
async def delete_campaign(request: Request, account_id: int) -> Response:
    runtime = runtime_of(request)
    campaign_id = object_id(request)
    row = await runtime.pool.fetchrow(QUERIES.delete_campaign, account_id, campaign_id)
    if row is None:
        raise HttpError(404, "campaign not found")
    runtime.remember_campaign(account_id, campaign_id, campaigns.policy_of(row),
                              recording=False)
    await runtime.privacy_changed()
    return Response(status_code=204)


@authenticated
async def register_message(request: Request, account_id: int) -> Response:
    runtime = runtime_of(request)
    campaign_id = object_id(request)
    await own_campaign(runtime.pool, account_id, campaign_id)
    try:
        message = parse_message(await json_body(request))
    except InvalidInput as exc:
        raise HttpError(422, str(exc)) from None
    async with runtime.pool.acquire() as conn:
        (registered,) = await request.app.state.registrar.register(
            conn, account_id, campaign_id, [message])
    return JSON(registered_json(registered), status_code=201)


@authenticated
async def register_batch(request: Request, account_id: int) -> Response:
    runtime = runtime_of(request)
    campaign_id = object_id(request)
    await own_campaign(runtime.pool, account_id, campaign_id)
    try:
        messages = await parse_batch(await json_body(request))
    except InvalidBatch as exc:
        return JSON({"error": str(exc), "errors": [
            {"index": index, "error": error} for index, error in exc.errors]},
            status_code=422)
    except InvalidInput as exc:
        raise HttpError(422, str(exc)) from None
    async with runtime.pool.acquire() as conn:
        registered = await request.app.state.registrar.register(
            conn, account_id, campaign_id, messages)
    return JSON({"messages": [registered_json(r) for r in registered]}, status_code=201)


@authenticated
async def campaign_report(request: Request, account_id: int) -> Response:
    campaign_id = object_id(request)
    tz = request.query_params.get("tz", "UTC")
    async with runtime_of(request).read_pool.acquire() as conn:
        await own_campaign(conn, account_id, campaign_id)
        try:
            report = await reports.campaign_report(conn, account_id, campaign_id, tz)
        except reports.UnknownTimeZone as exc:
            raise HttpError(422, str(exc)) from None
    return JSON(report)


@authenticated
async def export_events(request: Request, account_id: int) -> Response:
    pool = runtime_of(request).read_pool
    campaign_id = object_id(request)
    # The campaign first: another account's campaign is a 404 whatever the format, so a
    # bad format cannot tell whether it exists.
    await own_campaign(pool, account_id, campaign_id)
    fmt = export.FORMATS.get(request.query_params.get("format", "csv"))
    if fmt is None:
        raise HttpError(422, f"format: must be one of {', '.join(export.FORMATS)}")
    return await export.open_export(pool, account_id, campaign_id, fmt)


@authenticated
async def get_message(request: Request, account_id: int) -> Response:
    activity = await reports.message_activity(runtime_of(request).read_pool, account_id,
                                              object_id(request))
    if activity is None:
        raise HttpError(404, "message not found")
    return JSON(activity)


ROUTES = [
    Route("/api/campaigns", create_campaign, methods=["POST"]),
    Route("/api/campaigns", list_campaigns, methods=["GET"]),
    Route("/api/campaigns/{id}", get_campaign, methods=["GET"]),
    Route("/api/campaigns/{id}", patch_campaign, methods=["PATCH"]),
    Route("/api/campaigns/{id}", delete_campaign, methods=["DELETE"]),
    Route("/api/campaigns/{id}/messages", register_message, methods=["POST"]),
    Route("/api/campaigns/{id}/messages/batch", register_batch, methods=["POST"]),
    Route("/api/campaigns/{id}/report", campaign_report, methods=["GET"]),
    Route("/api/campaigns/{id}/export", export_events, methods=["GET"]),
    Route("/api/messages/{id}", get_message, methods=["GET"]),
]
