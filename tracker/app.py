"""Builds the ASGI app: the tracking fast path in front, Starlette behind it for the API."""

from __future__ import annotations

import sys

from tracker import logs
from tracker.ingest.endpoints import ASGIApp, FastPath
from tracker.ingest.tokens import Signer, SigningKeyError
from tracker.lifespan import Runtime
from tracker.settings import Settings, SettingsError, load
from tracker.web.api import build_api
from tracker.web.request_metrics import RequestMetrics


def create_app(settings: Settings, signer: Signer, dsn: str, *,
               freeze_heap: bool = False) -> ASGIApp:
    runtime = Runtime(settings, signer, dsn, freeze_heap=freeze_heap)
    app = FastPath(RequestMetrics(build_api(runtime), runtime.metrics), runtime)
    runtime.collector.tracking_answers = lambda: app.answered
    return app


def create_app_from_env() -> ASGIApp:
    """The factory each worker process calls. `tracker serve` has resolved the database
    and the signing keys and handed them down as TRACKER_DATABASE_URL and TRACKER_SECRET_KEY."""
    settings = load()
    logs.configure(settings.log_level, settings.log_format)
    # The event loop answers hits; CPU-bound work that would hold it (a registration
    # batch, journal reads and spills) runs in threads. A thread holding the interpreter
    # gives it back when the loop asks after this long (Python's default is 5 ms, most
    # of the latency budget of a hit).
    sys.setswitchinterval(0.001)
    if not settings.database_url:
        raise SettingsError(
            "TRACKER_DATABASE_URL: not set for the worker; start with tracker serve")
    if not settings.secret_key:
        raise SettingsError("TRACKER_SECRET_KEY: not set for the worker; start with tracker serve")
    try:
        signer = Signer.from_setting(settings.secret_key)
    except SigningKeyError as exc:
        raise SettingsError(f"TRACKER_SECRET_KEY: {exc}") from None
    return create_app(settings, signer, settings.database_url, freeze_heap=True)
