"""Events out through the API (README: Events out).

- `POST|GET /api/webhooks`, `GET|PATCH|DELETE /api/webhooks/{id}`: an account's endpoints;
  the signing secret is in the answer to POST and to `POST /api/webhooks/{id}/rotate-secret`
  only;
- `POST /api/webhooks/{id}/replay` `{"from": iso8601, "to": iso8601}`: send the endpoint's
  events stored for that time range again (with their ids: a receiver drops what it has);
- `GET /api/webhooks/{id}/deliveries`: the delivery log (status codes and timings);
- `GET /api/events?after=CURSOR&limit=N`: the pull stream, in stored order.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tracker.store import outbox, webhooks
from tracker.store.queries import QUERIES
from tracker.web.campaigns_api import own_campaign
from tracker.web.http import JSON, HttpError, authenticated, json_object, object_id, runtime_of

_FIELDS = {"url", "events", "campaign_id", "machine", "enabled", "concurrency"}
MAX_PAGE = 1000
DEFAULT_PAGE = 100
RECENT_ATTEMPTS = 50


async def _fields(request: Request, account_id: int,
                  current: webhooks.EndpointFields, *, new: bool) -> webhooks.EndpointFields:
    body = await json_object(request, _FIELDS)
    if new and "url" not in body:
        raise HttpError(422, "url: required")
    if not new and "concurrency" in body:
        raise HttpError(422, "concurrency: set when the endpoint is made (make a new one "
                        "to change it)")
    try:
        fields = current.updated(body)
    except webhooks.InvalidWebhook as exc:
        raise HttpError(422, str(exc)) from None
    if fields.campaign_id is not None and fields.campaign_id != current.campaign_id:
        try:
            await own_campaign(runtime_of(request).pool, account_id, fields.campaign_id)
        except HttpError:
            raise HttpError(422, "campaign_id: no such campaign") from None
    return fields


async def _own(request: Request, account_id: int) -> tuple[int, Any]:
    endpoint_id = object_id(request)
    row = await webhooks.get(runtime_of(request).pool, account_id, endpoint_id)
    if row is None:
        raise HttpError(404, "webhook not found")
    return endpoint_id, row


@authenticated
async def create_webhook(request: Request, account_id: int) -> Response:
    fields = await _fields(request, account_id, webhooks.NEW, new=True)
    row = await webhooks.create(runtime_of(request).pool, account_id, fields)
    return JSON(webhooks.webhook_json(row, secret=True), status_code=201)


@authenticated
async def list_webhooks(request: Request, account_id: int) -> Response:
    pool = runtime_of(request).pool
    rows = await pool.fetch(QUERIES.list_webhooks, account_id)
    stats = {r["id"]: r for r in await pool.fetch(QUERIES.webhook_stats, account_id)}
    return JSON([_with_stats(r, stats.get(r["id"])) for r in rows])


@authenticated
async def get_webhook(request: Request, account_id: int) -> Response:
    endpoint_id, row = await _own(request, account_id)
    stats = [r for r in await runtime_of(request).pool.fetch(QUERIES.webhook_stats, account_id)
             if r["id"] == endpoint_id]
    return JSON(_with_stats(row, stats[0] if stats else None))


def _with_stats(row: Any, stats: Any) -> dict[str, Any]:
    answer = webhooks.webhook_json(row)
    if stats is not None:
        answer["stats"] = webhooks.stats_json(stats)
    return answer


@authenticated
async def patch_webhook(request: Request, account_id: int) -> Response:
    endpoint_id, row = await _own(request, account_id)
    fields = await _fields(request, account_id, webhooks.fields_of(row), new=False)
    updated = await webhooks.update(runtime_of(request).pool, account_id, endpoint_id, fields)
    if updated is None:
        raise HttpError(404, "webhook not found")
    return JSON(webhooks.webhook_json(updated))


@authenticated
async def delete_webhook(request: Request, account_id: int) -> Response:
    endpoint_id = object_id(request)
    if await runtime_of(request).pool.fetchval(QUERIES.delete_webhook, account_id,
                                                endpoint_id) is None:
        raise HttpError(404, "webhook not found")
    return Response(status_code=204)


@authenticated
async def rotate_secret(request: Request, account_id: int) -> Response:
    endpoint_id, _ = await _own(request, account_id)
    row = await webhooks.rotate_secret(runtime_of(request).pool, account_id, endpoint_id)
    if row is None:
        raise HttpError(404, "webhook not found")
    return JSON(webhooks.webhook_json(row, secret=True))


@authenticated
async def replay(request: Request, account_id: int) -> Response:
    endpoint_id, _ = await _own(request, account_id)
    body = await json_object(request, {"from", "to"})
    since, until = _time(body, "from"), _time(body, "to")
    if until <= since:
        raise HttpError(422, "to: must be after from")
    row = await runtime_of(request).pool.fetchrow(QUERIES.replay_webhook, account_id,
                                                   endpoint_id, since, until)
    if row is None:
        raise HttpError(404, "webhook not found")
    return JSON({"replay": str(row["id"]), "from": row["since"].isoformat(),
                 "to": row["until"].isoformat()}, status_code=202)


def _time(body: dict[str, Any], name: str) -> datetime:
    value = body.get(name)
    try:
        at = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        at = None
    if at is None or at.tzinfo is None or not 1970 <= at.year <= 9000:
        raise HttpError(422, f"{name}: must be an ISO 8601 time with a time zone, "
                        "from 1970 to 9000")
    return at


@authenticated
async def deliveries(request: Request, account_id: int) -> Response:
    endpoint_id, _ = await _own(request, account_id)
    rows = await runtime_of(request).pool.fetch(QUERIES.webhook_attempts, account_id,
                                                 endpoint_id, RECENT_ATTEMPTS)
    return JSON({"deliveries": [webhooks.attempt_json(r) for r in rows]})


@authenticated(params={"after", "limit"})
async def pull_events(request: Request, account_id: int) -> Response:
    params = request.query_params
    try:
        after = outbox.Position.decode(params["after"]) if "after" in params else outbox.START
    except outbox.BadCursor as exc:
        raise HttpError(400, f"after: {exc}") from None
    raw = params.get("limit", str(DEFAULT_PAGE))
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_PAGE:
        raise HttpError(400, f"limit: must be a whole number from 1 to {MAX_PAGE}")
    page = await outbox.stream(runtime_of(request).pool, account_id, after, int(raw))
    last = page.last
    after_last = None if last is None else outbox.Position(int(last["xid"]), last["id"])
    return JSON({"events": page.events,
                 "next": None if after_last is None else after_last.encode()})


ROUTES = [
    Route("/api/webhooks", create_webhook, methods=["POST"]),
    Route("/api/webhooks", list_webhooks, methods=["GET"]),
    Route("/api/webhooks/{id}", get_webhook, methods=["GET"]),
    Route("/api/webhooks/{id}", patch_webhook, methods=["PATCH"]),
    Route("/api/webhooks/{id}", delete_webhook, methods=["DELETE"]),
    Route("/api/webhooks/{id}/rotate-secret", rotate_secret, methods=["POST"]),
    Route("/api/webhooks/{id}/replay", replay, methods=["POST"]),
    Route("/api/webhooks/{id}/deliveries", deliveries, methods=["GET"]),
    Route("/api/events", pull_events, methods=["GET"]),
]
