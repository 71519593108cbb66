"""The one hit path: a tracking request becomes an event in the writer, or a counted drop.

Every way a hit arrives ends in `Capture.record`: the wire protocol's answers
(ingest/protocol.py), the ASGI endpoints (ingest/endpoints.py), the pixel hits recorded
a moment after their answer (`defer_open`) and the hits held while a privacy change was
applied (`release_held`). In order:

1. the token: unknown, truncated or tampered is `invalid_token`;
2. a privacy change this worker has not applied yet: the hit is held, and recorded when
   it has (privacy/sync.py), never under the old rules;
3. the privacy screen (ingest/suppression.py): a deleted account, an opted-out or erased
   recipient, Sec-GPC or DNT where the account honours them;
4. the pipeline (ingest/pipeline.py): `head_open`, `campaign_disabled`, else the event
   with what the campaign's policy lets through;
5. the writer: memory and the journal full (`buffer_full`, `journal_full`).

Each refusal is a `DropReason`, a closed set, counted here; the writer counts only the
events it loses after taking them (store/backlog.py). Nothing here awaits the database.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable, MutableMapping
from typing import Any, Protocol

from tracker.ingest.addresses import ClientAddress
from tracker.ingest.pipeline import DropReason, EventRecord, Pipeline
from tracker.ingest.tokens import ClickToken, OpenToken, Signer

log = logging.getLogger("tracker.ingest.capture")

Scope = MutableMapping[str, Any]
Token = OpenToken | ClickToken
OPEN, CLICK = "open", "click"
# The user agent is cut here before it is parsed, classified or used as a cache key: the
# parsers look at no more than this anyway, and the caches hold 16,384 entries each, so
# uncut half-megabyte agents would pin gigabytes per worker.
MAX_AGENT_BYTES = 1024


class EventSink(Protocol):
    """Where events go (the batch writer)."""

    def add(self, record: EventRecord) -> DropReason | None: ...

    def synced(self) -> Awaitable[object] | None: ...


class HitCounter(Protocol):
    """Where hits and drops are counted (/metrics)."""

    def count_hit(self, endpoint: str, machine: bool) -> None: ...

    def count_drop(self, reason: DropReason) -> None: ...


class PrivacyScreen(Protocol):
    """Who must not be recorded (ingest/suppression.py)."""

    def screen(self, token: Token, signalled: bool) -> DropReason | None: ...


class PrivacyClock(Protocol):
    """Whether a privacy change waits to be applied in this worker (privacy/sync.py)."""

    def behind(self) -> bool: ...

    def wake(self) -> None: ...


class Capture:
    """Tokens, the privacy screen, the pipeline and the writer, for one worker.

    `durable` (TRACKER_DURABILITY=journal): a hit is answered only once its event is on
    disk (`synced`); else it is answered first and recorded after. `max_held`: how many
    hits wait for a privacy change at most (past it they are dropped, `buffer_full`)."""

    def __init__(self, signer: Signer, pipeline: Pipeline, addresses: ClientAddress,
                 sink: EventSink, counter: HitCounter, screen: PrivacyScreen,
                 clock: PrivacyClock | None = None, *, durable: bool = False,
                 max_held: int = 100_000) -> None:
        self.signer = signer
        self.pipeline = pipeline
        self.addresses = addresses
        self.durable = durable
        self._sink = sink
        self._counter = counter
        self._screen = screen
        self._clock = clock
        self._max_held = max_held
        self._held: list[tuple[Scope, Token, int]] = []
        self._deferred: list[tuple[Scope, int]] = []
        self._deferred_clicks: list[tuple[Scope, ClickToken | None, int]] = []

    # -- the ways in -----------------------------------------------------------------------

    def open(self, scope: Scope, at_us: int | None = None) -> None:
        """A pixel request: its token is read from the path here."""
        path: str = scope["path"]
        token = self.signer.verify_open(path[3:-4]) if path.endswith(".gif") else None
        self.record(OPEN, scope, token, _now() if at_us is None else at_us)

    def click(self, scope: Scope, token: ClickToken | None, at_us: int | None = None) -> None:
        """A click request, its token verified already (the redirect needed it)."""
        self.record(CLICK, scope, token, _now() if at_us is None else at_us)

    def defer_open(self, scope: Scope) -> None:
        """Records a pixel hit once the event loop has read what is ready on every
        connection, with the hits of the others: the answer does not depend on it, and run
        together the hits find the interpreter's caches warm. Costs a tuple and an append
        now; the time recorded is the request's."""
        if not (self._deferred or self._deferred_clicks):
            asyncio.get_running_loop().call_soon(self.record_deferred)
        self._deferred.append((scope, _time_ns() // 1000))  # _now(), without the call

    def defer_click(self, scope: Scope, token: ClickToken | None) -> None:
        """A click request recorded as `defer_open`'s, its token verified already (the
        redirect needed it)."""
        if not (self._deferred or self._deferred_clicks):
            asyncio.get_running_loop().call_soon(self.record_deferred)
        self._deferred_clicks.append((scope, token, _time_ns() // 1000))  # as defer_open's

    def record_deferred(self) -> None:
        """Records every deferred hit now (also before the writer closes); a privacy
        change applied since is applied to them (`_refusal`). `open` and `record`, inlined:
        two calls a hit fewer."""
        deferred, self._deferred = self._deferred, []
        clicks, self._deferred_clicks = self._deferred_clicks, []
        verify_open, refusal = self.signer.verify_open, self._refusal
        for scope, at_us in deferred:
            try:
                path: str = scope["path"]
                refused = refusal(scope, verify_open(path[3:-4]) if path.endswith(".gif")
                                  else None, at_us)
            except Exception:
                log.exception("could not record a hit (%s)", OPEN)
                continue
            if refused is not None:
                self._counter.count_drop(refused)
        for scope, token, at_us in clicks:
            self.record(CLICK, scope, token, at_us)

    def release_held(self) -> None:
        """Records the held hits, with the time of each request (a privacy change is
        applied now; a hit held again is held for a later one)."""
        held, self._held = self._held, []
        for scope, token, at_us in held:
            self.record(OPEN if isinstance(token, OpenToken) else CLICK, scope, token, at_us)

    @property
    def held(self) -> int:
        return len(self._held)

    async def synced(self) -> None:
        """Wait until what was recorded so far is on disk; never raises."""
        waiter = self._sink.synced() if self.durable else None
        if waiter is not None:
            try:
                await waiter
            except Exception:
                log.exception("could not wait for the journal")

    # -- the one path ----------------------------------------------------------------------

    def record(self, endpoint: str, scope: Scope, token: Token | None, at_us: int) -> None:
        """A request to a tracking endpoint, as an event or a counted drop; never raises
        (the answer has gone, or goes, whatever happens here)."""
        try:
            refused = self._refusal(scope, token, at_us)
        except Exception:
            log.exception("could not record a hit (%s)", endpoint)
            return
        if refused is not None:
            self._counter.count_drop(refused)

    def _refusal(self, scope: Scope, token: Token | None, at_us: int) -> DropReason | None:
        if token is None:
            return DropReason.INVALID_TOKEN
        clock = self._clock
        if clock is not None and clock.behind():
            if len(self._held) >= self._max_held:
                return DropReason.BUFFER_FULL
            self._held.append((scope, token, at_us))
            clock.wake()
            return None
        raw_agent, forwarded, signalled = client_headers(scope["headers"])
        refused = self._screen.screen(token, signalled)
        if refused is not None:
            return refused
        # The raw agent and address live only in this call.
        client = scope.get("client")
        client_ip = self.addresses.resolve(client[0] if client else None, forwarded)
        user_agent = raw_agent[:MAX_AGENT_BYTES].decode("latin-1")
        if isinstance(token, OpenToken):
            outcome = self.pipeline.open(token, scope["method"], user_agent, client_ip, at_us)
            endpoint = OPEN
        else:
            outcome = self.pipeline.click(token, scope["method"], user_agent, client_ip, at_us)
            endpoint = CLICK
        if isinstance(outcome, str):  # a DropReason (a str): isinstance of an enum class
            return outcome  # goes through its metaclass, ~60 ns more on every hit
        refused = self._sink.add(outcome)
        if refused is None:
            self._counter.count_hit(endpoint, outcome[2])
        return refused



def client_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes, bytes | None, bool]:
    """What a hit's headers say, in one pass: the user agent, the X-Forwarded-For chain
    (several headers joined), and whether it carries a privacy signal (`Sec-GPC: 1` or
    `DNT: 1`: both are defined as exactly "1", the server has stripped the white space
    around it, and anything else expresses no preference)."""
    user_agent = b""
    forwarded: bytes | None = None
    signalled = False
    for name, value in headers:
        if name == b"user-agent":
            user_agent = value
        elif name == b"x-forwarded-for":
            forwarded = value if forwarded is None else forwarded + b"," + value
        elif value == b"1" and (name == b"sec-gpc" or name == b"dnt"):
            signalled = True
    return user_agent, forwarded, signalled


_time_ns = time.time_ns


def _now() -> int:
    return _time_ns() // 1000
