"""The delivery loop: every worker of every node leases due queues and sends their events.

A queue (sql/0011_webhooks.sql) is leased with `for update skip locked`, so workers and
nodes share the work without meeting, and one that dies leaves leases that run out and are
taken over. A worker holds at most `sends` leases at once, each with at most `batch`
events in memory: that is its whole memory for delivery, whatever the backlog, which
waits in PostgreSQL (and survives restarts there).

A lease reads its queue's next rows, sends the events among them in one signed request,
and moves the cursor only when the receiver answered 2xx: an event is delivered until it
is taken, with the same id each time. A failure leaves the cursor, and the queue is due
again after an exponential backoff with jitter (`retry_s`, doubling, up to `retry_max_s`);
a queue failing for `disable_after_s` disables its endpoint, with the reason shown in the
API and the dashboard. An endpoint's events go through `concurrency` queues (by message),
so that is how many requests it gets at once.

It runs in a process of its own at the lowest CPU priority (delivery/process.py), never
in the workers that answer tracking requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx

from tracker.delivery.signing import signed_request
from tracker.store import outbox
from tracker.store.outbox import Lease, Page
from tracker.store.queries import QUERIES

log = logging.getLogger("tracker.delivery")

_DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
# A delivery log row is kept this long; it holds no payload.
ATTEMPTS_KEPT = timedelta(days=7)
_HOUSEKEEPING_S = 600.0
_STATS_S = 2.0
# Most of a receiver's answer kept as the error (it is the receiver's text, for its owner).
_ERROR_CHARS = 300
# Batches one lease sends before it is given back for others (fairness between endpoints).
_ROUNDS_PER_LEASE = 20


@dataclass(frozen=True)
class DeliverySettings:
    timeout_s: float = 10.0
    retry_s: float = 5.0
    retry_max_s: float = 3600.0
    disable_after_s: float = 86400.0
    batch: int = 100
    poll_s: float = 1.0
    sends: int = 8

    @property
    def lease_s(self) -> float:
        """Longer than a lease's longest round (a read, a request, a write) by far."""
        return 2 * self.timeout_s + 10.0

    def backoff_s(self, attempts: int) -> float:
        """The wait after the `attempts`-th failure in a row: doubling, capped, and
        jittered so that queues failing together do not retry together."""
        delay = min(self.retry_s * 2 ** min(attempts - 1, 40), self.retry_max_s)
        return random.uniform(delay / 2, delay)  # noqa: S311 -- jitter, not a secret


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    status: int | None
    error: str | None
    duration_ms: int


class Delivery:
    def __init__(self, pool: asyncpg.Pool, settings: DeliverySettings,
                 client: httpx.AsyncClient | None = None) -> None:
        self._pool = pool
        self._settings = settings
        self._client = client or httpx.AsyncClient(
            follow_redirects=False, trust_env=False,
            limits=httpx.Limits(max_connections=settings.sends * 2))
        self._sending: dict[tuple[int, int, int], asyncio.Task[None]] = {}
        self._leases: dict[tuple[int, int, int], Lease] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._db_failing = False
        self._housekept_at = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tracker-delivery")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        """Stop leasing; requests in flight are cut short and their leases given back, so
        another worker (or the next start) sends them at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        sending = list(self._sending.values())
        for task in sending:
            task.cancel()
        await asyncio.gather(*sending, return_exceptions=True)
        for lease in list(self._leases.values()):
            with contextlib.suppress(*_DB_ERRORS):
                await asyncio.wait_for(outbox.release(self._pool, lease), 2)
        if sending:
            log.info("webhook deliveries stopped: %d in flight given back", len(sending))
        await self._client.aclose()

    async def _run(self) -> None:
        while True:
            try:
                await self._lease_due()
                await self._now_and_then()
                if self._db_failing:
                    log.warning("webhook delivery: the database answers again")
                    self._db_failing = False
            except _DB_ERRORS as exc:
                if not self._db_failing:
                    log.warning("webhook delivery waits for the database: %s",
                                type(exc).__name__)
                    self._db_failing = True
            except Exception:
                log.exception("unexpected error in the webhook delivery loop")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.poll_s)
            self._wake.clear()

    async def _lease_due(self) -> None:
        free = self._settings.sends - len(self._sending)
        if free <= 0:
            return
        for lease in await outbox.lease(self._pool, free, self._settings.lease_s):
            self._leases[lease.key] = lease
            self._sending[lease.key] = asyncio.create_task(
                self._serve(lease), name="tracker-delivery-send")

    async def _serve(self, lease: Lease) -> None:
        try:
            await self._rounds(lease)
        except _DB_ERRORS as exc:
            # The lease runs out and the queue is taken up again; nothing was moved.
            log.warning("webhook delivery to endpoint %d interrupted: %s", lease.endpoint_id,
                        type(exc).__name__)
        except Exception:
            log.exception("unexpected error delivering to endpoint %d", lease.endpoint_id)
        finally:
            self._sending.pop(lease.key, None)
            self._leases.pop(lease.key, None)
            self._wake.set()  # a send slot is free

    async def _rounds(self, lease: Lease) -> None:
        settings = self._settings
        deadline = time.monotonic() + settings.lease_s - settings.timeout_s - 5.0
        for round_ in range(1, _ROUNDS_PER_LEASE + 1):
            page = await lease.read(self._pool, settings.batch)
            full = page.scanned >= settings.batch
            if page.events:
                outcome = await self._send(lease, page)
                if not outcome.ok:
                    await self._failed(lease, outcome)
                    return
            if page.last is not None:
                lease.move_past(page.last)
            # Kept for another round while there is more and time; else given back (due
            # at once when there is more), so that no lease waits out its expiry.
            more = full and round_ < _ROUNDS_PER_LEASE and time.monotonic() < deadline
            kept = await outbox.advance(
                self._pool, lease, keep=more, next_in_s=0.0 if full else settings.poll_s,
                delivered=len(page.events), waiting=full)
            if kept and lease.replay and not full:
                await outbox.finish_replay(self._pool, lease)  # the range is delivered
            if not (kept and more):
                return

    async def _send(self, lease: Lease, page: Page) -> _Outcome:
        webhook_id, body, headers = signed_request(lease.endpoint_id, lease.secrets,
                                                   page.events)
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        try:
            async with self._client.stream("POST", lease.url, content=body, headers=headers,
                                           timeout=self._settings.timeout_s) as response:
                status = response.status_code
                if not 200 <= status < 300:
                    error = f"HTTP {status}: {await _start_of(response)}"
        except httpx.TimeoutException:
            error = f"no answer within {self._settings.timeout_s:g} s"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            error = f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]
        outcome = _Outcome(error is None, status, error,
                           int((time.perf_counter() - started) * 1000))
        await self._pool.execute(QUERIES.record_webhook_attempt, lease.account_id,
                                 lease.endpoint_id, webhook_id, len(page.events), status,
                                 outcome.duration_ms, error)
        return outcome

    async def _failed(self, lease: Lease, outcome: _Outcome) -> None:
        retry_in = self._settings.backoff_s(lease.attempts + 1)
        row = await outbox.fail(self._pool, lease, retry_in, outcome.error or "failed")
        if row is None:
            return  # the lease ran out meanwhile: whoever has it now decides
        failing_for = (datetime.now(UTC) - row["failing_since"]).total_seconds()
        if failing_for >= self._settings.disable_after_s:
            reason = (f"disabled after failing for {_duration(failing_for)} "
                      f"({row['attempts']} attempts in a row); last error: {outcome.error}")
            await self._pool.execute(QUERIES.disable_webhook, lease.account_id,
                                     lease.endpoint_id, reason)
            log.warning("webhook endpoint %d of account %d disabled: %s", lease.endpoint_id,
                        lease.account_id, reason)

    async def _now_and_then(self) -> None:
        now = time.monotonic()
        if now - self._housekept_at >= _HOUSEKEEPING_S:
            self._housekept_at = now
            await self._pool.execute(QUERIES.forget_old_webhook_attempts,
                                     datetime.now(UTC) - ATTEMPTS_KEPT)


class EndpointStats:
    """(In each worker.) Every endpoint's delivery stats, read every few seconds for
    /metrics, whichever process or node delivers."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._task: asyncio.Task[None] | None = None
        self.rows: list[asyncpg.Record] = []  # sql/webhooks.sql webhook-stats

    def start(self) -> None:
        self._task = asyncio.create_task(self._read_forever(), name="tracker-webhook-stats")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _read_forever(self) -> None:
        while True:
            with contextlib.suppress(*_DB_ERRORS):
                self.rows = await self._pool.fetch(QUERIES.webhook_stats, None)
            await asyncio.sleep(_STATS_S)


async def _start_of(response: httpx.Response) -> str:
    """The first bytes of an answer, never the whole of it (a receiver may send anything)."""
    taken = b""
    async for chunk in response.aiter_raw():
        taken += chunk
        if len(taken) >= _ERROR_CHARS:
            break
    text = taken[:_ERROR_CHARS].decode("utf-8", "replace")
    return " ".join(text.split()) or "(no body)"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"
