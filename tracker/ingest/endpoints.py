"""The tracking endpoints, as a plain ASGI callable in front of Starlette.

`GET|HEAD /o/{token}.gif` and `GET|HEAD /c/{token}` answer from memory: token
check, user agent and location from caches, policy from the policy book, event
into the writer's buffer. Nothing here awaits the database, so both answer at
full speed while PostgreSQL is slow or down. Everything else goes to Starlette.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any, Protocol

from tracker.ingest.addresses import Networks, packed, text_of
from tracker.ingest.pipeline import DropReason, EventRecord, Pipeline
from tracker.ingest.tokens import ClickToken, OpenToken, Signer
from tracker.settings import IPNetwork

log = logging.getLogger("tracker.ingest.endpoints")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The smallest transparent 1x1 GIF (43 bytes).
PIXEL_GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\x00\x00\x00"
             b"!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
_NO_STORE = b"no-store, no-cache, must-revalidate, max-age=0"
_PIXEL_START = {"type": "http.response.start", "status": 200, "headers": [
    (b"content-type", b"image/gif"), (b"content-length", b"43"), (b"cache-control", _NO_STORE),
    (b"pragma", b"no-cache"), (b"expires", b"0")]}
_PIXEL_BODY = {"type": "http.response.body", "body": PIXEL_GIF}
_EMPTY_BODY = {"type": "http.response.body", "body": b""}
_NOT_FOUND_START = {"type": "http.response.start", "status": 404, "headers": [
    (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"10"),
    (b"cache-control", b"no-store")]}
_NOT_FOUND_BODY = {"type": "http.response.body", "body": b"not found\n"}
_NOT_ALLOWED_START = {"type": "http.response.start", "status": 405, "headers": [
    (b"allow", b"GET, HEAD"), (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", b"19"), (b"cache-control", b"no-store")]}
_NOT_ALLOWED_BODY = {"type": "http.response.body", "body": b"method not allowed\n"}
_MALFORMED_START = {"type": "http.response.start", "status": 400, "headers": [
    (b"content-type", b"application/json"), (b"content-length", b"34"),
    (b"connection", b"close")]}
_MALFORMED_BODY = {"type": "http.response.body", "body": b'{"error":"malformed HTTP request"}'}


def wire_response(start: Message, body: Message) -> bytes:
    """An ASGI response as the HTTP/1.1 bytes uvicorn would write for it, so the tracking
    protocol (tracker.protocol) sends exactly what the ASGI way sends."""
    status = start["status"]
    head = [b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())]
    head += [name + b": " + value + b"\r\n" for name, value in start["headers"]]
    content: bytes = body["body"]
    return b"".join(head) + b"\r\n" + content


_WIRE_PIXEL = wire_response(_PIXEL_START, _PIXEL_BODY)
_WIRE_PIXEL_HEAD = wire_response(_PIXEL_START, _EMPTY_BODY)
_WIRE_NOT_FOUND = wire_response(_NOT_FOUND_START, _NOT_FOUND_BODY)
_WIRE_NOT_FOUND_HEAD = wire_response(_NOT_FOUND_START, _EMPTY_BODY)
_WIRE_NOT_ALLOWED = wire_response(_NOT_ALLOWED_START, _NOT_ALLOWED_BODY)
_WIRE_REDIRECT_START = b"HTTP/1.1 302 Found\r\nlocation: "
_WIRE_REDIRECT_END = b"\r\ncache-control: no-store\r\ncontent-length: 0\r\n\r\n"
_MAX_FORWARDED_CHARS = 2048
# The user agent is cut here before it is parsed, classified or used as a cache key: the
# parsers look at no more than this anyway, and the caches hold 16,384 entries each, so
# uncut agents of up to a head's bound (limits.py: 256 KiB) would pin gigabytes per worker.
MAX_AGENT_BYTES = 1024


class ClientAddress:
    """The client's address: the peer, or from X-Forwarded-For when the peer is a trusted proxy.

    The right-most address not in a trusted network is the client: everything to its
    left was written by parties we cannot vouch for, and is not read. When what our own
    proxies wrote (the elements from the right up to the client's) is malformed, or the
    header is longer than any real chain writes and the client is not within its last
    _MAX_FORWARDED_CHARS, the client is unknown (None): never the proxy, whose address
    would be located, stored and, on loopback, exempt from the sign-in throttle. Addresses
    come out canonical, IPv4-mapped IPv6 (what a dual-stack listener reports for IPv4
    peers) as plain IPv4, so geolocation and truncation see IPv4.
    """

    def __init__(self, trusted: tuple[IPNetwork, ...]) -> None:
        self._trusted = Networks(trusted)
        self._known: dict[str, tuple[str | None, bool]] = {}

    def _lookup(self, text: str) -> tuple[str | None, bool]:
        """(canonical address or None if not one, whether it is a trusted proxy); cached."""
        known = self._known.get(text)
        if known is None:
            raw = packed(text)
            address, trusted = (None, False) if raw is None else (text_of(raw),
                                                                   raw in self._trusted)
            if len(self._known) >= 4096:
                self._known.clear()  # junk headers must not grow memory without bound
            known = self._known[text] = (address, trusted)
        return known

    def is_trusted(self, address: str) -> bool:
        return self._lookup(address)[1]

    def resolve(self, peer: str | None, forwarded: bytes | None) -> str | None:
        if peer is None:
            return None
        client, trusted = self._lookup(peer)
        if forwarded is None or not trusted:
            return client
        cut = len(forwarded) > _MAX_FORWARDED_CHARS
        hops = forwarded[-_MAX_FORWARDED_CHARS:].decode("latin-1").split(",")
        if cut:
            del hops[0]  # cut short, perhaps in the middle of an address
        address = None
        for part in reversed(hops):
            host = _host(part.strip())
            address, hop_trusted = self._lookup(host) if host is not None else (None, False)
            if address is None or not hop_trusted:
                return address
        # Every address a trusted proxy: the left-most, unless the header went on further.
        return None if cut else address


def _host(hop: str) -> str | None:
    """The address in an X-Forwarded-For element, with an optional port; None if malformed."""
    if hop.startswith("["):  # "[2001:db8::1]" or "[2001:db8::1]:443"
        end = hop.find("]")
        if end < 0 or not _is_port_suffix(hop[end + 1:]):
            return None
        return hop[1:end]
    if hop.count(":") == 1:  # "203.0.113.9:443"
        host, _, port = hop.partition(":")
        return host if _is_port_suffix(":" + port) else None
    return hop


def _is_port_suffix(rest: str) -> bool:
    if not rest:
        return True
    port = rest[1:]
    return (rest[0] == ":" and port.isascii() and port.isdigit() and len(port) <= 5
            and 1 <= int(port) <= 65535)


class Capture:
    """Verified token + request -> event in the writer, or a counted drop."""

    def __init__(self, signer: Signer, pipeline: Pipeline, addresses: ClientAddress,
                 add_event: Callable[[EventRecord], bool],
                 count_drop: Callable[[DropReason], None],
                 count_hit: Callable[[str, bool], None],
                 sync: Callable[[], Awaitable[object] | None] | None = None) -> None:
        self.signer = signer
        self.pipeline = pipeline
        self.addresses = addresses
        self._add_event = add_event
        self._count_drop = count_drop
        self._count_hit = count_hit
        # TRACKER_DURABILITY=journal: what a hit awaits before it is answered (the writer's
        # group commit); None: answered first, recorded after.
        self.sync = sync
        # The privacy screen (ingest/suppression.py): why a hit must record nothing, before the
        # pipeline looks at it; None records everything the policy allows.
        self.screen: Callable[[Any, OpenToken | ClickToken], DropReason | None] | None = None
        # The privacy check (privacy/sync.py): true while a privacy change has been made
        # that this worker has not applied yet. Hits are then held, not recorded, and
        # recorded by `release_held` once it has (`wake` starts the catching up).
        self.behind: Callable[[], bool] | None = None
        self.wake: Callable[[], None] = lambda: None
        self.max_held = 100_000
        self._held: list[tuple[str, Scope, OpenToken | ClickToken, int]] = []
        self._deferred: list[tuple[Scope, int]] = []

    async def synced(self) -> None:
        """Wait until what was recorded so far is on disk; never raises."""
        waiter = self.sync() if self.sync is not None else None
        if waiter is not None:
            try:
                await waiter
            except Exception:
                log.exception("could not wait for the journal")

    def open(self, scope: Scope, token: OpenToken, at_us: int | None = None) -> None:
        if self.behind is not None and self.behind():
            self._hold("open", scope, token, at_us)
            return
        if self.screen is not None and (refused := self.screen(scope["headers"], token)):
            self._count_drop(refused)
            return
        user_agent, client_ip = self._client(scope)
        self.record("open", self.pipeline.open(
            token, scope["method"], user_agent, client_ip,
            time.time_ns() // 1000 if at_us is None else at_us))

    def click(self, scope: Scope, token: ClickToken, at_us: int | None = None) -> None:
        if self.behind is not None and self.behind():
            self._hold("click", scope, token, at_us)
            return
        if self.screen is not None and (refused := self.screen(scope["headers"], token)):
            self._count_drop(refused)
            return
        user_agent, client_ip = self._client(scope)
        self.record("click", self.pipeline.click(
            token, scope["method"], user_agent, client_ip,
            time.time_ns() // 1000 if at_us is None else at_us))

    def _hold(self, kind: str, scope: Scope, token: OpenToken | ClickToken,
              at_us: int | None) -> None:
        if len(self._held) >= self.max_held:
            self._count_drop(DropReason.BUFFER_FULL)
            return
        self._held.append((kind, scope, token, time.time_ns() // 1000 if at_us is None
                           else at_us))
        self.wake()

    def release_held(self) -> None:
        """Records the held hits, with the time of each request (a privacy change is
        applied now; a hit held again is held for a later one)."""
        held, self._held = self._held, []
        for kind, scope, token, at_us in held:
            try:
                if isinstance(token, OpenToken):
                    self.open(scope, token, at_us)
                else:
                    self.click(scope, token, at_us)
            except Exception:
                log.exception("could not record a held %s", kind)

    @property
    def held(self) -> int:
        return len(self._held)

    def defer_open(self, scope: Scope) -> None:
        """Records a pixel hit (its token is checked then) once the event loop has read
        what is ready on every connection, with the hits of the others.

        The answer does not depend on it, and run together the hits find the interpreter's
        caches warm: one at a time, between two system calls, a hit took 10–15 % more CPU
        here (benchmarks/README.md, `benchmarks/ab.py`). Costs a tuple and an append
        now; the time recorded is the request's."""
        if not self._deferred:
            asyncio.get_running_loop().call_soon(self.record_deferred)
        self._deferred.append((scope, time.time_ns() // 1000))

    def record_deferred(self) -> None:
        """Records every deferred hit now (also before the writer closes)."""
        deferred, self._deferred = self._deferred, []
        for scope, at_us in deferred:
            _record_open(self, scope, at_us)

    def _client(self, scope: Scope) -> tuple[str, str | None]:
        """The user agent and the client address; the raw values live only in this call."""
        user_agent = b""
        forwarded: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"user-agent":
                user_agent = value
            elif name == b"x-forwarded-for":
                forwarded = value if forwarded is None else forwarded + b"," + value
        client = scope.get("client")
        return (user_agent[:MAX_AGENT_BYTES].decode("latin-1"),
                self.addresses.resolve(client[0] if client else None, forwarded))

    def record(self, endpoint: str, outcome: EventRecord | DropReason) -> None:
        if isinstance(outcome, DropReason):
            self._count_drop(outcome)
        elif self._add_event(outcome):
            self._count_hit(endpoint, outcome[2])


class Lifecycle(Protocol):
    capture: Capture | None

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class FastPath:
    """The outermost ASGI app: lifespan, the tracking endpoints, then everything else."""

    def __init__(self, fallback: ASGIApp, runtime: Lifecycle) -> None:
        self._fallback = fallback
        self._runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path.startswith("/o/") or path.startswith("/c/"):
                # A hit counts once its request is whole: a request whose body never comes
                # (or comes broken, and is refused by the server) is neither answered nor
                # recorded.
                if not await _read_to_the_end(receive):
                    # The protocol has answered (or the client left): this goes nowhere,
                    # and is here for an ASGI server that leaves the answer to the app.
                    await send(_MALFORMED_START)
                    await send(_MALFORMED_BODY)
                    return
                if path[1] == "o":
                    return await self._pixel(scope, send)
                return await self._click(scope, send)
        elif kind == "lifespan":
            return await self._lifespan(receive, send)
        await self._fallback(scope, receive, send)

    def _capture(self) -> Capture | None:
        return self._runtime.capture

    def answers_in_place(self) -> bool:
        """Whether `answer` may answer tracking requests: not when an answer must wait for
        the journal (TRACKER_DURABILITY=journal); such requests go the ASGI way."""
        capture = self._runtime.capture
        return capture is None or capture.sync is None

    def answer(self, scope: Scope) -> bytes:
        """The whole response to a tracking request (a path under /o/ or /c/) as bytes, the
        hit recorded; for a server that writes it from its parser's callbacks with no task
        per request (tracker.protocol), once the request is complete, and only while
        `answers_in_place()`.

        The same answers as `__call__`, byte for byte (tested); the hit is recorded a
        moment later for the pixel, with the others the loop has read
        (`Capture.defer_open`)."""
        capture = self._runtime.capture
        method = scope["method"]
        if method != "GET" and method != "HEAD":
            return _WIRE_NOT_ALLOWED
        path: str = scope["path"]
        if path.startswith("/o/"):
            if capture is not None:
                capture.defer_open(scope)
            return _WIRE_PIXEL if method == "GET" else _WIRE_PIXEL_HEAD
        token = capture.signer.verify_click(path[3:]) if capture else None
        if token is None:
            if capture is not None:
                capture.record("click", DropReason.INVALID_TOKEN)
            return _WIRE_NOT_FOUND if method == "GET" else _WIRE_NOT_FOUND_HEAD
        assert capture is not None  # a token was verified with it
        # Recorded at once: its token is checked for the answer anyway, and deferring the
        # rest (as the pixel's is) did not measure faster.
        _record_click(capture, scope, token)
        return _WIRE_REDIRECT_START + token.destination + _WIRE_REDIRECT_END

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._runtime.start()
                except Exception as exc:
                    log.error("start-up failed: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self._runtime.stop()
                except Exception:
                    log.exception("shutdown did not complete cleanly")
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _pixel(self, scope: Scope, send: Send) -> None:
        """Whatever happens, render the image: a broken image in a reader's mail is our fault."""
        method = scope["method"]
        if method != "GET" and method != "HEAD":
            await send(_NOT_ALLOWED_START)
            await send(_NOT_ALLOWED_BODY)
            return
        capture = self._capture()
        if capture is not None and capture.sync is not None:
            _record_open(capture, scope)  # durable: recorded and on disk before the answer
            await capture.synced()
            capture = None
        await send(_PIXEL_START)
        await send(_PIXEL_BODY if method == "GET" else _EMPTY_BODY)
        if capture is not None:
            _record_open(capture, scope)

    async def _click(self, scope: Scope, send: Send) -> None:
        method = scope["method"]
        if method != "GET" and method != "HEAD":
            await send(_NOT_ALLOWED_START)
            await send(_NOT_ALLOWED_BODY)
            return
        capture = self._capture()
        token = capture.signer.verify_click(scope["path"][3:]) if capture else None
        if token is None:
            if capture is not None:
                capture.record("click", DropReason.INVALID_TOKEN)
            await send(_NOT_FOUND_START)
            await send(_NOT_FOUND_BODY if method == "GET" else _EMPTY_BODY)
            return
        assert capture is not None  # a token was verified with it
        durable = capture.sync is not None
        if durable:
            _record_click(capture, scope, token)  # durable: recorded and on disk before the answer
            await capture.synced()
        await send({"type": "http.response.start", "status": 302, "headers": [
            (b"location", token.destination), (b"cache-control", b"no-store"),
            (b"content-length", b"0")]})
        await send(_EMPTY_BODY)
        if not durable:
            _record_click(capture, scope, token)


async def _read_to_the_end(receive: Receive) -> bool:
    """Reads a request's body (meaningless on a tracking path) to its end; False if the
    client left first. Asking for it is also what makes the server answer
    `Expect: 100-continue`."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False
        if not message.get("more_body", False):
            return True


def _record_open(capture: Capture, scope: Scope, at_us: int | None = None) -> None:
    try:
        path: str = scope["path"]
        token = capture.signer.verify_open(path[3:-4]) if path.endswith(".gif") else None
        if token is None:
            capture.record("open", DropReason.INVALID_TOKEN)
        else:
            capture.open(scope, token, at_us)
    except Exception:
        log.exception("could not record an open")


def _record_click(capture: Capture, scope: Scope, token: ClickToken) -> None:
    try:
        capture.click(scope, token)
    except Exception:
        log.exception("could not record a click")
