"""The account's API keys (store/accounts.py): `POST|GET /api/keys`, `DELETE /api/keys/{id}`,
`POST /api/keys/{id}/rotate`.

Managing keys takes a `full` key, reading the list included: a read or register key gets
a 403. A key's secret is in the answer that creates it and nowhere else, ever. Revoking
and rotating take effect at once in every worker and node: every request reads its key
from PostgreSQL.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tracker.store import accounts
from tracker.web.http import JSON, HttpError, authenticated, json_object, runtime_of

_KEY_ID = re.compile(r"[0-9a-f]{8}")


def _key_id(request: Request) -> str:
    key_id: str = request.path_params["id"]
    if not _KEY_ID.fullmatch(key_id):
        raise HttpError(404, "key not found")
    return key_id


@authenticated(scope="full")
async def create_key(request: Request, account_id: int) -> Response:
    body = await json_object(request, {"name", "scope"})
    missing = [name for name in ("name", "scope") if name not in body]
    if missing:
        raise HttpError(422, f"{', '.join(missing)}: required")
    try:
        key = await accounts.create_key(runtime_of(request).pool, account_id, body["name"],
                                        body["scope"])
    except accounts.KeyRequestError as exc:
        raise HttpError(422, str(exc)) from None
    return JSON(key.as_json(), status_code=201)


@authenticated(scope="full")
async def list_keys(request: Request, account_id: int) -> Response:
    return JSON(await accounts.list_keys(runtime_of(request).pool, account_id))


@authenticated(scope="full")
async def revoke_key(request: Request, account_id: int) -> Response:
    key_id = _key_id(request)
    async with runtime_of(request).pool.acquire() as conn:
        try:
            revoked = await accounts.revoke_key(conn, account_id, key_id)
        except accounts.LastFullKey as exc:
            raise HttpError(409, str(exc)) from None
    if revoked is None:
        raise HttpError(404, "key not found")
    return Response(status_code=204)


@authenticated(scope="full")
async def rotate_key(request: Request, account_id: int) -> Response:
    key_id = _key_id(request)
    async with runtime_of(request).pool.acquire() as conn:
        key = await accounts.rotate_key(conn, account_id, key_id)
    if key is None:
        raise HttpError(404, "key not found")
    return JSON(key.as_json(), status_code=201)


ROUTES = [
    Route("/api/keys", create_key, methods=["POST"]),
    Route("/api/keys", list_keys, methods=["GET"]),
    Route("/api/keys/{id}", revoke_key, methods=["DELETE"]),
    Route("/api/keys/{id}/rotate", rotate_key, methods=["POST"]),
]
