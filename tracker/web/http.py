"""What every web endpoint shares: the one error type, JSON in and out, ids from the path,
the worker's runtime, and authentication by API key.

An endpoint raises `HttpError` for anything a client did wrong or asked for in vain; the
API renders it as `{"error": "..."}` (`api_error`), the dashboard as a page. Another
account's object is a 404, never a 403: the API does not reveal that it exists.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from functools import wraps
from typing import TYPE_CHECKING, Any, cast, overload

import asyncpg
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from tracker.store import accounts
from tracker.web.throttle import client_of

if TYPE_CHECKING:
    from tracker.lifespan import Runtime

log = logging.getLogger("tracker.web")

# A batch of 5,000 messages with their HTML fits; anything larger is refused unread.
MAX_BODY_BYTES = 128 * 1024 * 1024
_MAX_ID = 2**63 - 1
# What a request meets while PostgreSQL is down or going down. InternalClientError is
# what asyncpg's pool raises when it resets a connection the server just killed.
UNAVAILABLE = (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
               asyncpg.CannotConnectNowError, asyncpg.OperatorInterventionError,
               asyncpg.InternalClientError)

Endpoint = Callable[[Request], Awaitable[Response]]
AccountEndpoint = Callable[[Request, int], Awaitable[Response]]


class HttpError(Exception):
    """An answer other than success: its status, a message for people, and headers."""

    def __init__(self, status: int, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSON:
    return JSON({"error": message}, status_code=status, headers=headers)


def runtime_of(request: Request) -> Runtime:
    """The worker's runtime (lifespan.py), which build_api keeps in the app's state."""
    return cast("Runtime", request.app.state.runtime)


def route_of(request: Request) -> str:
    """The route's template for a log line, never the path: a path can hold an email
    address (/api/recipients/{address}), and logs keep no personal data."""
    return str(getattr(request.scope.get("route"), "path", "?"))


def object_id(request: Request, name: str = "id") -> int:
    raw = request.path_params[name]
    # Ids are positive integers; anything else cannot name an object, which is a 404.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > _MAX_ID:
        raise HttpError(404, "not found")
    return int(raw)


async def json_body(request: Request) -> Any:
    # Refused from the header alone: a client announcing gigabytes gets its answer at once,
    # rather than after we have read 128 MB of it.
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise HttpError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    size = 0
    chunks = []
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise HttpError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # The body ended early: the client went away, or its chunked encoding was broken.
        # Not a server error, and not worth a traceback in the log each time.
        raise HttpError(400, "the request body was cut short or malformed") from None
    if not chunks:
        raise HttpError(400, "a JSON body is required")
    try:
        return orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as exc:
        raise HttpError(400, f"the body is not valid JSON: {exc}") from None


async def json_object(request: Request, allowed: set[str]) -> dict[str, Any]:
    """A JSON object body with no field but `allowed`."""
    body = await json_body(request)
    if not isinstance(body, dict):
        raise HttpError(422, "the body must be a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise HttpError(422, f"unknown field(s): {', '.join(sorted(unknown))}")
    return body


def api_error(endpoint: Endpoint) -> Endpoint:
    """Every API endpoint's answer when it fails: an HttpError as JSON, the database down
    as a 503 to retry, anything else as a 500 with the traceback in the log."""
    @wraps(endpoint)
    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except HttpError as exc:
            return json_error(exc.status, exc.message, exc.headers)
        except UNAVAILABLE as exc:
            runtime_of(request).metrics.count_db_error("api")
            log.warning("database unavailable for %s %s: %s", request.method,
                        route_of(request), type(exc).__name__)
            return json_error(503, "the database is unavailable; try again shortly",
                              {"retry-after": "5"})
        except Exception:
            log.exception("unexpected error in %s %s", request.method, route_of(request))
            return json_error(500, "internal error")
    return answer


# What each method needs of a key by default: reading, or changing anything.
_WRITE_SCOPE = "full"


@overload
def authenticated(endpoint: AccountEndpoint) -> Endpoint: ...


@overload
def authenticated(*, scope: str | None = None,
                  params: Iterable[str] = ()) -> Callable[[AccountEndpoint], Endpoint]: ...


def authenticated(endpoint: AccountEndpoint | None = None, *, scope: str | None = None,
                  params: Iterable[str] = ()
                  ) -> Endpoint | Callable[[AccountEndpoint], Endpoint]:
    """An API endpoint for an account: its key in `Authorization: Bearer`, checked after the
    sign-in throttle (a flood of guesses costs no query).

    `scope`: what the key must be allowed (store/accounts.py): by default `read` for GET and
    HEAD and `full` for any other method; a key short of it gets a 403 before anything else
    is looked at, so the answer says nothing of the object. `params`: the query
    parameters the endpoint reads; any other is refused (422), never ignored.

    Used bare (`@authenticated`) or with arguments (`@authenticated(params={"tz"})`)."""
    if endpoint is None:
        return lambda inner: _authenticated(inner, scope, frozenset(params))
    return _authenticated(endpoint, scope, frozenset(params))


def _authenticated(endpoint: AccountEndpoint, scope: str | None,
                   allowed: frozenset[str]) -> Endpoint:
    @wraps(endpoint)
    async def with_account(request: Request) -> Response:
        runtime = runtime_of(request)
        client = client_of(request, request.app.state.addresses)
        wait = runtime.auth_throttle.retry_after(client)
        if wait is not None:
            runtime.metrics.auth_throttled += 1
            raise HttpError(429, "too many failed authentications from your address; "
                            "try again later", {"retry-after": str(wait)})
        authorization, _, key = request.headers.get("authorization", "").partition(" ")
        found = (await accounts.authenticate(runtime.pool, key.strip())
                 if authorization.lower() == "bearer" and key.strip() else None)
        if found is None:
            runtime.auth_throttle.failed(client)
            runtime.metrics.auth_failures += 1
            raise HttpError(401, "missing or invalid API key",
                            {"www-authenticate": 'Bearer realm="tracker"'})
        needed = scope or ("read" if request.method in ("GET", "HEAD") else _WRITE_SCOPE)
        if not found.allows(needed):
            raise HttpError(403, f"this API key's scope is {found.scope!r}; this needs a "
                            f"{needed!r} key" + (" (a read key cannot make changes)"
                                                 if found.scope == "read" else ""))
        unknown = sorted(set(request.query_params.keys()) - allowed)
        if unknown:
            raise HttpError(422, f"unknown query parameter(s): {', '.join(unknown)}"
                            + (f" (this endpoint takes {', '.join(sorted(allowed))})"
                               if allowed else " (this endpoint takes none)"))
        try:
            return await endpoint(request, found.account_id)
        finally:
            await _note_use(request, found)
    return api_error(with_account)


async def _note_use(request: Request, key: accounts.Key) -> None:
    """The key's last-used time, written at most once a minute per key (store/accounts.py);
    never a reason for a request to fail."""
    if not key.stale:
        return
    try:
        await accounts.note_use(runtime_of(request).pool, key)
    except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
        log.debug("could not note the use of a key: %s", exc)
