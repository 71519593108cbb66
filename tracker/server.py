"""Runs the ASGI app under uvicorn (the default, with tracker.protocol: fastest here) or granian.

Each worker process builds its own app (and so its own pool, writer and caches)
from the environment; `tracker serve` has put the resolved settings there.
"""

from __future__ import annotations

import os
import signal

from tracker.settings import Settings

APP_FACTORY = "tracker.app:create_app_from_env"
# Long enough for the writer's shutdown flush (10 s) plus the pool's close.
_WORKER_SHUTDOWN_S = 30


def run(settings: Settings, env: dict[str, str]) -> None:
    os.environ.update(env)
    if settings.server == "uvicorn":
        _run_uvicorn(settings)
    else:
        _run_granian(settings)


def _run_granian(settings: Settings) -> None:
    from granian.constants import HTTPModes, Interfaces, Loops, RuntimeModes
    from granian.server import Server

    Server(
        APP_FACTORY,
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        factory=True,
        workers=settings.workers,
        runtime_mode=RuntimeModes.st,
        loop=Loops.uvloop,
        http=HTTPModes.http1,
        websockets=False,
        backlog=2048,
        log_access=False,  # an access log would hold addresses the policy may forbid
        log_level=settings.log_level,  # type: ignore[arg-type]
        workers_kill_timeout=_WORKER_SHUTDOWN_S,
    ).serve()


def _run_uvicorn(settings: Settings) -> None:
    import uvicorn

    from tracker.protocol import TrackingHttpProtocol

    # After a graceful shutdown uvicorn re-raises the signal that stopped it, under the
    # handler that was there before it; with this one that is a no-op, so a clean stop
    # exits 0 instead of dying by SIGTERM (143).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)

    uvicorn.run(
        APP_FACTORY,
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http=TrackingHttpProtocol,  # httptools, with the tracking paths answered in place
        ws="none",
        lifespan="on",
        access_log=False,  # an access log would hold addresses the policy may forbid
        # X-Forwarded-For is read by tracker itself, only from TRACKER_TRUSTED_PROXIES;
        # uvicorn's own handling would trust 127.0.0.1 and rewrite the client address.
        proxy_headers=False,
        log_level=settings.log_level,
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=_WORKER_SHUTDOWN_S,
    )
