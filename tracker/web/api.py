"""The web app behind the tracking endpoints: the management API (campaigns_api.py,
recipients_api.py, keys_api.py), the dashboard, and the server's own endpoints (service.py), with
what they share kept in the app's state for this worker's runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from tracker.ingest.addresses import ClientAddress
from tracker.mail.registration import Registrar
from tracker.web import campaigns_api, dashboard, keys_api, recipients_api, service
from tracker.web.health import Readiness
from tracker.web.http import json_error
from tracker.web.metrics import registry_for

if TYPE_CHECKING:
    from tracker.lifespan import Runtime


def build_api(runtime: Runtime) -> Starlette:
    routes: list[Route] = [*service.ROUTES, *campaigns_api.ROUTES, *recipients_api.ROUTES,
                           *keys_api.ROUTES, *dashboard.routes(runtime)]

    async def http_error(request: Request, exc: Exception) -> Response:
        """What Starlette itself refuses (no route, a method not allowed), as the API's
        JSON error."""
        assert isinstance(exc, HTTPException)
        headers = {name.lower(): value for name, value in (exc.headers or {}).items()}
        if exc.status_code == 405:
            # Starlette's Allow names the methods of the first route for the path only; a
            # path served by several routes (one per method) must list them all.
            headers["allow"] = ", ".join(sorted({
                method for route in routes if route.matches(request.scope)[0] != Match.NONE
                for method in route.methods or ()}))
        return json_error(exc.status_code, exc.detail, headers)

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.runtime = runtime
    app.state.addresses = ClientAddress(runtime.settings.trusted_proxies)
    app.state.registrar = Registrar(runtime.signer, runtime.settings.base_url)
    app.state.registry = registry_for(runtime.collector)
    app.state.readiness = Readiness(
        runtime.ping_database, lambda: runtime.writer,
        batch_size=runtime.settings.batch_size, max_buffered=runtime.settings.buffer_max_events,
        on_database_error=lambda: runtime.metrics.count_db_error("readiness"))
    # Starlette would answer `/api/campaigns/` with a 307 to an absolute URL built from the
    # request's Host header: a redirect to wherever the client says we are. A path with a
    # slash too many is simply not one of ours (404, the API's JSON error).
    app.router.redirect_slashes = False
    return app
