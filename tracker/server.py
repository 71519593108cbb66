"""Runs the ASGI app under uvicorn, with tracker's own protocol (tracker/ingest/protocol.py)
answering the tracking paths.

Each worker process builds its own app (and so its own pool, writer and caches)
from the environment; `tracker serve` has put the resolved settings there.

Several uvicorn workers each listen on a socket of their own (SO_REUSEPORT), so the
kernel spreads new connections over them. On one shared socket every worker wakes for a
connection and the first one accepts all that are waiting: a client opening a few
connections at once had them all on one worker, the others idle.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
from typing import Any

from tracker import logs
from tracker.settings import Settings, SettingsError

log = logging.getLogger("tracker.server")

APP_FACTORY = "tracker.app:create_app_from_env"
# Long enough for the writer's shutdown flush (10 s) plus the pool's close.
_WORKER_SHUTDOWN_S = 30


def listen_url(settings: Settings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.port}"


def _family(host: str) -> socket.AddressFamily:
    # As uvicorn chooses it: a host with a colon is IPv6, anything else IPv4 (or a name).
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_listen(settings: Settings) -> None:
    """Bind the address and let it go: a port in use or an address this machine does not
    have stops `serve` here, in one line naming the setting, before the database starts
    and before any worker would fail on it alone."""
    host, port = settings.host, settings.port
    host_name, port_name = settings.named("TRACKER_HOST"), settings.named("TRACKER_PORT")
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            probe.bind((host, port))
        except socket.gaierror as exc:
            raise SettingsError(f"{host_name}: {host!r} is not an address or a host name "
                                f"this machine can resolve ({exc.strerror})") from None
        except (UnicodeError, ValueError) as exc:
            raise SettingsError(f"{host_name}: {host!r} is not an address: {exc}") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise SettingsError(f"{port_name}: port {port} on {host} is in use by another "
                                    f"program ({exc.strerror})") from None
            if exc.errno == errno.EACCES:
                raise SettingsError(f"{port_name}: not allowed to listen on port {port} (below "
                                    "1024 it takes privileges)") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise SettingsError(f"{host_name}: {host} is not an address of this "
                                    "machine") from None
            raise SettingsError(f"{host_name}: cannot listen on {host}:{port}: "
                                f"{exc.strerror or exc}") from None


def warn_about_public_url(settings: Settings) -> None:
    """Listening on every address, the default public URL is one no reader can reach."""
    if settings.public_url:
        return
    try:
        unspecified = ipaddress.ip_address(settings.host.strip("[]")).is_unspecified
    except ValueError:
        return
    if unspecified:
        log.warning("%s is %s and TRACKER_PUBLIC_URL is not set: the pixel and link URLs "
                    "handed out will say %s, which readers cannot reach; set "
                    "TRACKER_PUBLIC_URL to the address they use (https://t.example.com)",
                    settings.named("TRACKER_HOST"), settings.host, settings.base_url)


def run(settings: Settings, env: dict[str, str]) -> None:
    """Serve until stopped; the workers build their app from `env` (the resolved settings)."""
    os.environ.update(env)
    import uvicorn

    from tracker.ingest.protocol import TrackingHttpProtocol

    # After a graceful shutdown uvicorn re-raises the signal that stopped it, under the
    # handler that was there before it; with this one that is a no-op, so a clean stop
    # exits 0 instead of dying by SIGTERM (143).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)

    options: dict[str, Any] = dict(
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
    log_config = logs.uvicorn_config(settings.log_format)
    if log_config is not None:  # else uvicorn's own
        options["log_config"] = log_config
    if settings.workers == 1 or not _SHARES_PORTS:
        uvicorn.run(APP_FACTORY, **options)
        return
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(APP_FACTORY, **options)
    # Taken and let go: if the port is in use, uvicorn says so and exits now, rather than
    # every worker failing on its own; and it prints the address it runs on.
    config.bind_socket().close()
    placeholder = _OwnListener(config.host, config.port)
    try:
        Multiprocess(config, sockets=[placeholder]).run()
    except KeyboardInterrupt:
        pass
    finally:
        placeholder.close()


# Linux spreads connections over the sockets sharing a port; other systems may not.
_SHARES_PORTS = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


class _OwnListener(socket.socket):
    """What uvicorn hands each worker process as its listening socket: unpickled there (the
    workers are spawned), it becomes a new socket of the worker's own, bound to the port
    with SO_REUSEPORT. It joins the port's group when uvicorn listens on it, after the
    worker's start-up, and leaves it when the worker exits: no connection waits on a
    socket that no worker accepts from."""

    def __init__(self, host: str, port: int) -> None:
        self.family_ = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__(self.family_, socket.SOCK_STREAM)
        self.address = (host, port)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_listen_own, (self.family_, self.address))


def _listen_own(family: int, address: tuple[str, int]) -> socket.socket:
    """(In a worker.) A socket bound to the shared port; uvicorn listens on it."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        log.error("cannot listen on %s:%d: %s", *address, exc.strerror or exc)
        raise SystemExit(3) from None  # uvicorn's start-up failure status
    return sock
