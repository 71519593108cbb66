"""The tracking endpoints' answers, as a plain ASGI callable in front of Starlette and as
the bytes the wire protocol writes (ingest/protocol.py) for them.

`GET|HEAD /o/{token}.gif` and `GET|HEAD /c/{token}` answer from memory; the hit goes
the one way every hit goes (ingest/capture.py). Nothing here awaits the database, so
both answer at full speed while PostgreSQL is slow or down. Everything else goes to
Starlette.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any, Protocol

from tracker.ingest.capture import CLICK, Capture
from tracker.ingest.recent import Recent
from tracker.ingest.tokens import KEPT_CLICK_CHARS, KEPT_CLICKS, ClickToken, Signer

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
    protocol (ingest/protocol.py) sends exactly what the ASGI way sends."""
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

# The tracking answers by endpoint and status, counted in `FastPath.answered` as plain
# integers (an index each): /metrics reads them at scrape time (web/metrics/collectors.py).
ANSWERS = (("open", 200), ("open", 405), ("click", 302), ("click", 404), ("click", 405))
_OPEN_200, _OPEN_405, _CLICK_302, _CLICK_404, _CLICK_405 = range(len(ANSWERS))


class Lifecycle(Protocol):
    capture: Capture | None

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class FastPath:
    """The outermost ASGI app: lifespan, the tracking endpoints, then everything else."""

    def __init__(self, fallback: ASGIApp, runtime: Lifecycle) -> None:
        self._fallback = fallback
        self._runtime = runtime
        self.answered = [0] * len(ANSWERS)
        # Redirects answered lately: the path -> its token's fields and the whole answer,
        # so a kept link's hit costs one lookup, not a slice, the signer's cache and building
        # the answer (~0.2 µs of a click's). In place of the signer's cache (tokens are
        # verified with keep=False), kept as it keeps click tokens: only those that
        # verified, as long and as many, so bounded the same way (the answer adds the
        # destination again); for one signer (`_redirects_for`: the runtime's).
        self._redirects: Recent[str, tuple[ClickToken, bytes]] = Recent(KEPT_CLICKS)
        self._redirects_for: Signer | None = None

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
        return capture is None or not capture.durable

    def answer(self, scope: Scope) -> bytes:
        """The whole response to a tracking request (a path under /o/ or /c/) as bytes, the
        hit recorded; for a server that writes it from its parser's callbacks with no task
        per request (tracker.protocol), once the request is complete, and only while
        `answers_in_place()`.

        The same answers as `__call__`, byte for byte (tested); the hit is recorded a
        moment later, with the others the loop has read (`Capture.defer_open`,
        `defer_click`)."""
        capture = self._runtime.capture
        method = scope["method"]
        path: str = scope["path"]
        if method != "GET" and method != "HEAD":
            self.answered[_OPEN_405 if path[1] == "o" else _CLICK_405] += 1
            return _WIRE_NOT_ALLOWED
        if path.startswith("/o/"):
            if capture is not None:
                capture.defer_open(scope)
            self.answered[_OPEN_200] += 1
            return _WIRE_PIXEL if method == "GET" else _WIRE_PIXEL_HEAD
        if capture is None:
            self.answered[_CLICK_404] += 1
            return _WIRE_NOT_FOUND if method == "GET" else _WIRE_NOT_FOUND_HEAD
        kept = self._redirects.get(path) if capture.signer is self._redirects_for else None
        if kept is None:
            kept = self._redirect(capture.signer, path)
            if kept is None:
                capture.defer_click(scope, None)
                self.answered[_CLICK_404] += 1
                return _WIRE_NOT_FOUND if method == "GET" else _WIRE_NOT_FOUND_HEAD
        capture.defer_click(scope, kept[0])
        self.answered[_CLICK_302] += 1
        return kept[1]

    def _redirect(self, signer: Signer, path: str) -> tuple[ClickToken, bytes] | None:
        """A click path's token fields and its whole answer (the same for GET and HEAD: it
        has no body), if its token verifies; kept (`_redirects`, by the path: no slice)."""
        if signer is not self._redirects_for:
            self._redirects.clear()
            self._redirects_for = signer
        token = signer.verify_click(path[3:], keep=False)  # kept here, with its answer
        if token is None:
            return None
        answer = _WIRE_REDIRECT_START + token.destination + _WIRE_REDIRECT_END
        if len(path) <= KEPT_CLICK_CHARS + 3:
            self._redirects.put(path, (token, answer))
        return token, answer

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
            self.answered[_OPEN_405] += 1
            await send(_NOT_ALLOWED_START)
            await send(_NOT_ALLOWED_BODY)
            return
        self.answered[_OPEN_200] += 1
        capture = self._capture()
        if capture is not None and capture.durable:
            capture.open(scope)  # recorded and on disk before the answer
            await capture.synced()
            capture = None
        await send(_PIXEL_START)
        await send(_PIXEL_BODY if method == "GET" else _EMPTY_BODY)
        if capture is not None:
            capture.open(scope)

    async def _click(self, scope: Scope, send: Send) -> None:
        method = scope["method"]
        if method != "GET" and method != "HEAD":
            self.answered[_CLICK_405] += 1
            await send(_NOT_ALLOWED_START)
            await send(_NOT_ALLOWED_BODY)
            return
        capture = self._capture()
        token = capture.signer.verify_click(scope["path"][3:]) if capture else None
        if token is None or capture is None:
            self.answered[_CLICK_404] += 1
            if capture is not None:
                capture.record(CLICK, scope, None, 0)
            await send(_NOT_FOUND_START)
            await send(_NOT_FOUND_BODY if method == "GET" else _EMPTY_BODY)
            return
        self.answered[_CLICK_302] += 1
        if capture.durable:
            capture.click(scope, token)  # recorded and on disk before the answer
            await capture.synced()
        await send({"type": "http.response.start", "status": 302, "headers": [
            (b"location", token.destination), (b"cache-control", b"no-store"),
            (b"content-length", b"0")]})
        await send(_EMPTY_BODY)
        if not capture.durable:
            capture.click(scope, token)


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


