"""The management API: JSON endpoints over the domain modules, Bearer-authenticated.

One error type, `ApiError`, rendered as `{"error": "..."}`. Another account's
object is a 404, never a 403: the API does not reveal that it exists.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Match, Route

from tracker.ingest.addresses import ClientAddress
from tracker.ingest.policy import DEFAULT, Policy, PolicyError
from tracker.lifespan import Runtime
from tracker.mail.registration import (
    InvalidBatch,
    InvalidInput,
    Registrar,
    parse_batch,
    parse_message,
    registered_json,
)
from tracker.store import accounts, campaigns, reports
from tracker.store.queries import QUERIES
from tracker.web import dashboard, export
from tracker.web.health import Readiness
from tracker.web.metrics import exposition, registry_for
from tracker.web.throttle import client_of

log = logging.getLogger("tracker.web.api")

# A batch of 5,000 messages with their HTML fits; anything larger is refused unread.
MAX_BODY_BYTES = 128 * 1024 * 1024
_MAX_ID = 2**63 - 1
# The API's description, written by hand (tracker/web/openapi.json) and checked against the
# running server by tests/test_fuzz.py.
OPENAPI = (Path(__file__).with_name("openapi.json")).read_bytes()


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSON:
    return JSON({"error": message}, status_code=status, headers=headers)


async def _body(request: Request) -> Any:
    # Refused from the header alone: a client announcing gigabytes gets its answer at once,
    # rather than after we have read 128 MB of it.
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    size = 0
    chunks = []
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # The body ended early: the client went away, or its chunked encoding was broken
        # (then granian still delivers this answer). Not a server error, and not worth a
        # traceback in the log each time a client wants one.
        raise ApiError(400, "the request body was cut short or malformed") from None
    if not chunks:
        raise ApiError(400, "a JSON body is required")
    try:
        return orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None


def _object_id(request: Request, name: str) -> int:
    raw = request.path_params[name]
    # Ids are positive integers; anything else cannot name an object, which is a 404.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > _MAX_ID:
        raise ApiError(404, "not found")
    return int(raw)


def _route_of(request: Request) -> str:
    """The route's template for a log line, never the path: a path can hold an email
    address (/api/recipients/{address}), and logs keep no personal data."""
    return str(getattr(request.scope.get("route"), "path", "?"))


Handler = Callable[[Request, int], Awaitable[Response]]
# What a request meets while PostgreSQL is down or going down. InternalClientError is
# what asyncpg's pool raises when it resets a connection the server just killed.
_UNAVAILABLE = (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                asyncpg.CannotConnectNowError, asyncpg.OperatorInterventionError,
                asyncpg.InternalClientError)


def build_api(runtime: Runtime) -> Starlette:
    registrar = Registrar(runtime.signer, runtime.settings.base_url)
    addresses = ClientAddress(runtime.settings.trusted_proxies)
    registry = registry_for(runtime.collector)
    readiness = Readiness(lambda: runtime.pool.fetchval(QUERIES.ping), lambda: runtime.writer,
                          batch_size=runtime.settings.batch_size,
                          max_buffered=runtime.settings.buffer_max_events,
                          on_database_error=lambda: runtime.metrics.count_db_error("readiness"))

    def authenticated(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                # Throttled before the key is looked at: a flood of guesses costs no query.
                client = client_of(request, addresses)
                wait = runtime.auth_throttle.retry_after(client)
                if wait is not None:
                    runtime.metrics.auth_throttled += 1
                    return _error(429, "too many failed authentications from your address; "
                                  "try again later", {"retry-after": str(wait)})
                header = request.headers.get("authorization", "")
                scheme, _, key = header.partition(" ")
                account_id = (await accounts.authenticate(runtime.pool, key.strip())
                              if scheme.lower() == "bearer" and key.strip() else None)
                if account_id is None:
                    runtime.auth_throttle.failed(client)
                    runtime.metrics.auth_failures += 1
                    return _error(401, "missing or invalid API key",
                                  {"www-authenticate": 'Bearer realm="tracker"'})
                return await handler(request, account_id)
            except ApiError as exc:
                return _error(exc.status, exc.message)
            except _UNAVAILABLE as exc:
                runtime.metrics.count_db_error("api")
                log.warning("database unavailable for %s %s: %s", request.method,
                            _route_of(request), type(exc).__name__)
                return _error(503, "the database is unavailable; try again shortly",
                              {"retry-after": "5"})
            except Exception:
                log.exception("unexpected error in %s %s", request.method, _route_of(request))
                return _error(500, "internal error")
        return endpoint

    async def _campaign(conn: Any, account_id: int, campaign_id: int) -> asyncpg.Record:
        row = await campaigns.get(conn, account_id, campaign_id)
        if row is None:
            raise ApiError(404, "campaign not found")
        return row

    async def campaign_fields(request: Request, name: str | None,
                              policy: Policy) -> tuple[str, Policy]:
        """The name and policy a POST or PATCH body asks for, over the current ones."""
        body = await _body(request)
        if not isinstance(body, dict):
            raise ApiError(422, "the body must be a JSON object")
        unknown = set(body) - {"name", "policy"}
        if unknown:
            raise ApiError(422, f"unknown field(s): {', '.join(sorted(unknown))}")
        try:
            if "name" in body or name is None:
                name = campaigns.check_name(body.get("name"))
            if body.get("policy") is not None:
                policy = policy.updated(body["policy"])
        except (ValueError, PolicyError) as exc:
            raise ApiError(422, str(exc)) from None
        return name, policy

    async def create_campaign(request: Request, account_id: int) -> Response:
        name, policy = await campaign_fields(request, None, DEFAULT)
        row = await campaigns.create(runtime.pool, account_id, name, policy)
        runtime.remember_campaign(account_id, row["id"], policy, recording=True)
        # Every worker knows its policy before its links are handed out: one that did not
        # would store the strictest policy's fields only.
        await runtime.privacy_changed()
        return JSON(campaigns.campaign_json(row), status_code=201)

    async def list_campaigns(request: Request, account_id: int) -> Response:
        rows = await runtime.pool.fetch(QUERIES.list_campaigns, account_id)
        return JSON([campaigns.campaign_json(r) for r in rows])

    async def get_campaign(request: Request, account_id: int) -> Response:
        row = await _campaign(runtime.pool, account_id, _object_id(request, "id"))
        return JSON(campaigns.campaign_json(row))

    async def patch_campaign(request: Request, account_id: int) -> Response:
        campaign_id = _object_id(request, "id")
        row = await _campaign(runtime.pool, account_id, campaign_id)
        name, policy = await campaign_fields(request, row["name"], campaigns.policy_of(row))
        updated = await campaigns.update(runtime.pool, account_id, campaign_id, name, policy)
        if updated is None:
            raise ApiError(404, "campaign not found")
        runtime.remember_campaign(account_id, campaign_id, policy, recording=True)
        await runtime.privacy_changed()
        return JSON(campaigns.campaign_json(updated))

    async def delete_campaign(request: Request, account_id: int) -> Response:
        campaign_id = _object_id(request, "id")
        row = await runtime.pool.fetchrow(QUERIES.delete_campaign, account_id, campaign_id)
        if row is None:
            raise ApiError(404, "campaign not found")
        runtime.remember_campaign(account_id, campaign_id, campaigns.policy_of(row),
                                  recording=False)
        await runtime.privacy_changed()
        return Response(status_code=204)

    async def register_message(request: Request, account_id: int) -> Response:
        campaign_id = _object_id(request, "id")
        await _campaign(runtime.pool, account_id, campaign_id)
        try:
            message = parse_message(await _body(request))
        except InvalidInput as exc:
            raise ApiError(422, str(exc)) from None
        async with runtime.pool.acquire() as conn:
            (registered,) = await registrar.register(conn, account_id, campaign_id, [message])
        return JSON(registered_json(registered), status_code=201)

    async def register_batch(request: Request, account_id: int) -> Response:
        campaign_id = _object_id(request, "id")
        await _campaign(runtime.pool, account_id, campaign_id)
        try:
            messages = await parse_batch(await _body(request))
        except InvalidBatch as exc:
            return JSON({"error": str(exc), "errors": [
                {"index": index, "error": error} for index, error in exc.errors]},
                status_code=422)
        except InvalidInput as exc:
            raise ApiError(422, str(exc)) from None
        async with runtime.pool.acquire() as conn:
            registered = await registrar.register(conn, account_id, campaign_id, messages)
        return JSON({"messages": [registered_json(r) for r in registered]}, status_code=201)

    async def campaign_report(request: Request, account_id: int) -> Response:
        campaign_id = _object_id(request, "id")
        tz = request.query_params.get("tz", "UTC")
        async with runtime.pool.acquire() as conn:
            await _campaign(conn, account_id, campaign_id)
            try:
                report = await reports.campaign_report(conn, account_id, campaign_id, tz)
            except reports.UnknownTimeZone as exc:
                raise ApiError(422, str(exc)) from None
        return JSON(report)

    async def export_events(request: Request, account_id: int) -> Response:
        campaign_id = _object_id(request, "id")
        # The campaign first: another account's campaign is a 404 whatever the format, so
        # a bad format cannot tell whether it exists.
        await _campaign(runtime.pool, account_id, campaign_id)
        fmt = export.FORMATS.get(request.query_params.get("format", "csv"))
        if fmt is None:
            raise ApiError(422, f"format: must be one of {', '.join(export.FORMATS)}")
        return await export.open_export(runtime.pool, account_id, campaign_id, fmt)

    async def get_message(request: Request, account_id: int) -> Response:
        activity = await reports.message_activity(runtime.pool, account_id,
                                                  _object_id(request, "id"))
        if activity is None:
            raise ApiError(404, "message not found")
        return JSON(activity)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        headers = {name.lower(): value for name, value in (exc.headers or {}).items()}
        if exc.status_code == 405:
            # Starlette's Allow names the methods of the first route for the path only; a
            # path served by several routes (one per method) must list them all.
            headers["allow"] = ", ".join(sorted({
                method for route in routes if route.matches(request.scope)[0] != Match.NONE
                for method in route.methods or ()}))
        return _error(exc.status_code, exc.detail, headers)

    async def healthz(request: Request) -> Response:
        return JSON({"status": "ok"})

    async def readyz(request: Request) -> Response:
        verdict = await readiness.check()
        return JSON(verdict.as_json(), status_code=200 if verdict.ready else 503,
                    headers={"cache-control": "no-store"})

    async def metrics(request: Request) -> Response:
        body, content_type = exposition(registry, request.headers.get("accept"))
        return Response(body, headers={"content-type": content_type,
                                       "cache-control": "no-store"})

    async def openapi(request: Request) -> Response:
        return Response(OPENAPI, media_type="application/json")

    async def home(request: Request) -> Response:
        # Also where the honeypot link of an instrumented message leads.
        return PlainTextResponse("tracker: email open and click analytics\n")

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/api/openapi.json", openapi, methods=["GET"]),
        Route("/", home, methods=["GET", "HEAD"]),
        Route("/api/campaigns", authenticated(create_campaign), methods=["POST"]),
        Route("/api/campaigns", authenticated(list_campaigns), methods=["GET"]),
        Route("/api/campaigns/{id}", authenticated(get_campaign), methods=["GET"]),
        Route("/api/campaigns/{id}", authenticated(patch_campaign), methods=["PATCH"]),
        Route("/api/campaigns/{id}", authenticated(delete_campaign), methods=["DELETE"]),
        Route("/api/campaigns/{id}/messages", authenticated(register_message), methods=["POST"]),
        Route("/api/campaigns/{id}/messages/batch", authenticated(register_batch),
              methods=["POST"]),
        Route("/api/campaigns/{id}/report", authenticated(campaign_report), methods=["GET"]),
        Route("/api/campaigns/{id}/export", authenticated(export_events), methods=["GET"]),
        Route("/api/messages/{id}", authenticated(get_message), methods=["GET"]),
    ]
    routes += dashboard.routes(runtime)
    from tracker.web import recipients_api  # it builds on this module's helpers

    routes += recipients_api.routes(runtime, authenticated)
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    # Starlette would answer `/api/campaigns/` with a 307 to an absolute URL built from the
    # request's Host header: a redirect to wherever the client says we are. A path with a
    # slash too many is simply not one of ours (404, the API's JSON error).
    app.router.redirect_slashes = False
    return app
