"""How long the web app takes to answer, and with what status, by endpoint group.

An ASGI wrapper around the web app (everything but the tracking answers, which the fast
path counts itself: ingest/endpoints.py) that puts each request in one group and
observes, per group, the time from the request's arrival to its answer's last byte and
the answer's status code. A group is a few kinds of work with their own latency: a
report is not a health check. The cost is a clock read and a few integer additions per
request; none of it is on the tracking path.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from tracker.web.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Answers that stream for as long as the data lasts (exports) are a group of their own, so
# that their seconds do not hide the API's milliseconds.
GROUPS = ("api", "export", "dashboard", "metrics", "health", "other")


def group_of(path: str) -> str:
    if path.startswith("/api/"):
        if path.endswith("/export") or "/export/" in path or path.endswith("/events"):
            return "export"
        return "api"
    if path.startswith("/dashboard"):
        return "dashboard"
    if path == "/metrics":
        return "metrics"
    if path in ("/healthz", "/readyz"):
        return "health"
    return "other"


class RequestMetrics:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, observed)
        finally:
            # status 0: the app failed before answering, and the server answers 500.
            self._metrics.observe_request(group_of(scope["path"]), status or 500,
                                          time.perf_counter() - started)
