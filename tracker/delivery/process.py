"""The delivery process: `tracker serve` runs one beside its workers, at the lowest CPU
priority, so that delivering never takes a core from the tracking endpoints: under a load
that fills the cores, deliveries wait in PostgreSQL (durably, in bounded memory here) and
catch up as soon as there is room. Every node's delivery process shares the queues.

    python -m tracker.delivery.process      (with the TRACKER_* environment serve sets)

It stops on SIGTERM or SIGINT, giving back the deliveries in flight, and by itself when
the server that started it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading

from tracker import logs
from tracker.delivery.loop import Delivery, DeliverySettings
from tracker.settings import Settings, load
from tracker.store.database import create_pool

log = logging.getLogger("tracker.delivery")

# The nicest of nice: CFS gives a nice-19 process ~1.5 % of a core a nice-0 one wants.
NICENESS = 19
_PARENT_CHECK_S = 1.0
_STOP_S = 15.0
_RESTART_S = 2.0


def settings_of(settings: Settings) -> DeliverySettings:
    return DeliverySettings(
        timeout_s=settings.webhook_timeout_ms / 1000, retry_s=settings.webhook_retry_ms / 1000,
        retry_max_s=settings.webhook_retry_max_ms / 1000,
        disable_after_s=float(settings.webhook_disable_after_s), batch=settings.webhook_batch,
        poll_s=settings.webhook_poll_ms / 1000, sends=settings.webhook_sends)


async def deliver_until_stopped(dsn: str, settings: Settings) -> None:
    parent = os.getppid()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    pool = await create_pool(dsn, max_size=settings.webhook_sends + 2)
    delivery = Delivery(pool, settings_of(settings))
    delivery.start()
    try:
        while not stopping.is_set() and os.getppid() == parent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), _PARENT_CHECK_S)
    finally:
        await delivery.stop()
        await pool.close()


class Supervisor:
    """(In `tracker serve`.) Runs the delivery process, starts it again if it dies, and
    stops it when the server stops."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._keep_running, name="tracker-delivery",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "tracker.delivery.process"],
                                env=self._env)

    def _keep_running(self) -> None:
        while not self._stopping.is_set():
            self._proc = self._spawn()
            code = self._proc.wait()
            if not self._stopping.is_set():
                log.error("the webhook delivery process exited with %d; starting it again",
                          code)
                self._stopping.wait(_RESTART_S)

    def stop(self) -> None:
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._thread.join(_STOP_S)


def main() -> int:
    os.nice(NICENESS)
    settings = load()
    logs.configure(settings.log_level, settings.log_format)
    if not settings.database_url:
        log.error("TRACKER_DATABASE_URL: not set; the delivery process is started by "
                  "tracker serve")
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(deliver_until_stopped(settings.database_url, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
