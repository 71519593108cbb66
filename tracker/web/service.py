"""The server's own endpoints: `/healthz`, `/readyz`, `/metrics` (docs/metrics.md), the
API's description at `/api/openapi.json`, and `/`."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tracker.web.http import JSON
from tracker.web.metrics import exposition

# The API's description, written by hand and checked against the running server by
# tests/test_fuzz.py.
OPENAPI = (Path(__file__).with_name("openapi.json")).read_bytes()


async def healthz(request: Request) -> Response:
    return JSON({"status": "ok"})


async def readyz(request: Request) -> Response:
    verdict = await request.app.state.readiness.check()
    return JSON(verdict.as_json(), status_code=200 if verdict.ready else 503,
                headers={"cache-control": "no-store"})


async def metrics(request: Request) -> Response:
    body, content_type = exposition(request.app.state.registry, request.headers.get("accept"))
    return Response(body, headers={"content-type": content_type, "cache-control": "no-store"})


async def openapi(request: Request) -> Response:
    return Response(OPENAPI, media_type="application/json")


async def home(request: Request) -> Response:
    # Also where the honeypot link of an instrumented message leads.
    return PlainTextResponse("tracker: email open and click analytics\n")


ROUTES = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/api/openapi.json", openapi, methods=["GET"]),
    Route("/", home, methods=["GET", "HEAD"]),
]
