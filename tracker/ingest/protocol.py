"""uvicorn's httptools protocol, answering tracking requests without an ASGI task each.

Through ASGI a hit costs a task, a scope, two `send` awaits and the server's
response assembly: a bare ASGI app that only returns the GIF answers a quarter as many
requests as the same answer written from httptools' callbacks (benchmarks/README.md,
"Decided"). So a plain
`GET|HEAD /o/...` or `/c/...` is answered from inside the parser's
`on_message_complete`: `FastPath.answer` records the hit and returns the whole
response, which is written at once. Everything else, and any request this path is
not sure about, goes through uvicorn's own ASGI machinery unchanged:

- a request pipelined behind an API request still in progress (answers keep order);
- a path with percent-escapes, a fragment or non-ASCII (uvicorn decodes those);
- absolute-form targets (`GET http://host/o/...`), upgrades;
- TRACKER_DURABILITY=journal, where an answer waits for the journal.

Answers are written together, once the loop has read every connection that was ready
(`_Outbox`): written as each request was parsed, every answer woke the idle load
generator or proxy on the other side, and that wake-up (an inter-processor interrupt,
costly in a VM) was 17 % of the server's CPU on the redirect here.

It also bounds what one request may make the server hold, which uvicorn leaves
open with httptools: a request target longer than 8 KiB is refused with 414, more
than 128 header fields or 256 KiB of them with 431 (a 100 KB user agent still passes),
and so is a head still unfinished after MAX_HEAD_BYTES: httptools keeps a header line
(name or value, in the head or in a chunked body's trailer) until it ends, so a line
that never ends would grow without bound, and each piece of it is appended by copying
the whole (a 150 MB line took seconds of the loop). A head must also be in within
HEAD_TIMEOUT_S of its first byte (`_check_head`: slowloris clients held connections for
minutes); the bounds are in ingest/limits.py. A refused request is answered after the
answers to those before it, and its connection lingers before it closes (`_linger`), so
the client reads the answer.

And it stops reading from a client that does not read its answers, on every path: while
the connection's write buffer is over its high-water mark, or while requests wait behind
one that is still being answered the ASGI way, nothing more is read or parsed (what was
read already is held, unparsed: `_held`). uvicorn pauses for the second only until the
next answer, then reads a whole buffer of requests again (a client pipelining /healthz
without reading made one connection hold ~2 GB of waiting requests).

Supported versions. `HttpToolsProtocol` is not uvicorn's public API: this module overrides
its methods, calls others, and uses its attributes, its request cycles', its flow
control's and httptools' parser callbacks. So pyproject.toml holds uvicorn and httptools to
the series this module was reviewed against, uvicorn 0.55.0, httptools 0.9.0 (any 0.55.x
and 0.9.x), and tests/test_protocol_internals.py checks every one of those internals
against the installed versions, naming what changed. To move to a newer uvicorn: raise the
bounds in pyproject.toml and REVIEWED in that test, refresh the lock
(requirements/refresh.sh) and install it, run that test and follow what it names, then
run tests/test_protocol.py and tests/test_wire.py.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from http import HTTPStatus
from typing import Any

import httptools
import orjson
from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from tracker.ingest.endpoints import FastPath
from tracker.ingest.limits import (
    FEED_BYTES,
    HEAD_TIMEOUT_S,
    MAX_HEAD_BYTES,
    MAX_HEADER_BYTES,
    MAX_HEADER_FIELDS,
    MAX_TARGET_BYTES,
)

_CLOSE = b"\r\nconnection: close\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# The pixel's and the redirect's paths, for one startswith (a click's: one call, not two).
_TRACKING_PATHS = (b"/o/", b"/c/")
# What one connection may have read before the loop serves the others (data_received).
TURN_BYTES = 256 * 1024
# After a refusal, how long the rest of the request is read and dropped (_linger).
LINGER_S = 2.0
# The clock of the head and keep-alive timeouts: uvloop's loop.time() costs twice as much,
# and two are read a request.
_now = time.monotonic


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that is too large."""


class _Outbox:
    """The tracking answers of one loop iteration, written together after it.

    The loop reads every ready connection first (I/O callbacks), then runs what was
    scheduled with `call_soon`: so the writes come in one burst, and a peer that was
    woken by the first is still awake for the others. A connection's answers keep their
    order; a request that goes the ASGI way is answered by a task that runs after this
    flush (scheduled earlier), so order holds across the two ways too."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._answers: list[tuple[TrackingHttpProtocol, bytes, bool]] = []
        self._scheduled = False

    def expect(self) -> None:
        """Schedules the flush now, before the hit's own deferred work (the pixel's
        recording, `Capture.defer_open`), so answers leave before that work runs."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def put(self, protocol: TrackingHttpProtocol, answer: bytes, close: bool) -> None:
        if not self._scheduled:  # expect(), inlined: every tracking answer comes here
            self._scheduled = True
            self._loop.call_soon(self.flush)
        self._answers.append((protocol, answer, close))

    def flush(self) -> None:
        self._scheduled = False
        answers, self._answers = self._answers, []
        for protocol, answer, close in answers:
            protocol.send_answer(answer, close)


# One outbox per server (its ServerState is shared by all its connections).
_outboxes: weakref.WeakKeyDictionary[ServerState, _Outbox] = weakref.WeakKeyDictionary()


class TrackingHttpProtocol(HttpToolsProtocol):
    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._fast_path = _find_fast_path(self.app)
        # Fixed from start-up on (connections are taken once the app has started).
        self._answers_in_place = (self._fast_path is not None
                                  and self._fast_path.answers_in_place())
        outbox = _outboxes.get(server_state)
        if outbox is None:
            outbox = _outboxes[server_state] = _Outbox(self.loop)
        self._outbox = outbox
        # The tracking request being parsed (what FastPath.answer needs of it): answered and
        # recorded once it is complete; and whether it awaits `100 Continue` for its body.
        self._tracking: dict[str, Any] | None = None
        self._continue = False
        # Whether the request has a Connection (or Proxy-Connection) header: only then can
        # llhttp call an HTTP/1.0 request keep-alive, which is answered and closed here. (So
        # the version, ~0.3 µs to ask httptools for, is asked only then.)
        self._names_connection = False
        # What was read but not parsed yet, while the client must first read its answers.
        self._held = b""
        # Bytes read since the connection's last turn ended (TURN_BYTES), and whether it
        # has ended: reading is paused until the loop has served the others.
        self._turn_bytes = 0
        self._turn_over = False
        # Keep-alive after tracking answers: one timer that re-arms itself, rather than
        # uvicorn's timer made and cancelled for every request (~1 µs each).
        self._idle_since: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        # Whether the parser is inside a head (or a trailer section), where it keeps an
        # unfinished header line whole; and how many bytes of it were fed so far.
        self._in_head = False
        self._head_bytes = 0
        self._refusal: HTTPStatus | None = None
        # A request was refused: nothing more is parsed, what still comes is dropped.
        self._refused = False
        # The refusal's answer, while it waits for the answers to the requests before it.
        self._refusal_answer: bytes | None = None
        # The request being answered the ASGI way (uvicorn's `cycle` is the last one parsed,
        # `pipeline` those waiting behind the one being answered).
        self._answering: RequestResponseCycle | None = None
        # Since when the head being read (or a tracking request, whole) has been awaited,
        # or None between requests; checked by one timer that re-arms itself.
        self._head_since: float | None = None
        self._head_begun = False
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_since = _now()  # the first request's, from the connection on
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._check_head)

    def data_received(self, data: bytes) -> None:
        # uvicorn's, with more outcomes: a request refused for its size, and reading
        # paused until the client has read its answers.
        if self._refused:
            return  # what follows a refused request: dropped
        if self._held:
            # Read although paused (uvicorn resumes reading when an app awaits a body):
            # behind what is held, in order.
            self._held += data
            self.flow.pause_reading()
            return
        size = len(data)
        self._turn_bytes += size
        if self._turn_bytes >= TURN_BYTES:
            self._end_turn()
        if size > FEED_BYTES or self._in_head or self.flow.write_paused or self.pipeline:
            self._parse(data)
            return
        # The common case, inlined (it is every hit's): one slice, between two requests.
        if self.timeout_keep_alive_task is not None:
            self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parser_stopped(exc)
            return
        if self._continue:
            self._ask_for_body()

    def _end_turn(self) -> None:
        """libuv reads a ready connection up to 32 times before the loop goes on to the
        others: a client sending requests as fast as it could had ~60,000 of them parsed
        in one go while everyone else waited (a /healthz probe: 2-3 s). So, a turn's
        worth, then the others get theirs."""
        if not self._turn_over:
            self._turn_over = True
            self.flow.pause_reading()
            self.loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._turn_bytes = 0
        self._turn_over = False
        self._resume_parsing()

    def _must_wait(self) -> bool:
        """Whether the client must read answers before more of its requests are parsed."""
        return self.flow.write_paused or bool(self.pipeline)

    def _parse(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        view = memoryview(data)
        for start in range(0, len(data), FEED_BYTES):
            if self._must_wait():
                self._held = bytes(view[start:])
                self.flow.pause_reading()
                return
            if not self._feed(view[start:start + FEED_BYTES]):
                return

    def _resume_parsing(self) -> None:
        """Parses what was held, then reads again, unless the client must still wait."""
        if self._refused or self.transport.is_closing() or self._must_wait():
            return
        held, self._held = self._held, b""
        if held:
            self._parse(held)
        if not (self._held or self._must_wait() or self._refused or self._turn_over):
            self.flow.resume_reading()

    def _feed(self, data: bytes | memoryview) -> bool:
        """Parses one slice; False if the rest must not be parsed (refused, upgraded)."""
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
                return False
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parser_stopped(exc)
            return False  # (after an upgrade, uvicorn drops the rest of what was read)
        if self._continue:
            self._ask_for_body()
        return not self._refused

    def _parser_stopped(self, stop: Exception) -> None:
        if isinstance(stop, httptools.HttpParserUpgrade):
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        else:
            self._refuse(self._refusal or HTTPStatus.BAD_REQUEST, None if self._refusal
                         else "malformed HTTP request")

    def _ask_for_body(self) -> None:
        """`100 Continue` for a tracking request whose client waits to be asked for its
        body (which means nothing here, but is part of the request: it is answered once
        whole)."""
        self._continue = False
        self._outbox.put(self, _CONTINUE, False)

    def send_400_response(self, msg: str) -> None:
        self._refuse(HTTPStatus.BAD_REQUEST, "malformed HTTP request")

    def _refuse(self, status: HTTPStatus, reason: str | None = None) -> None:
        """Answers in the API's error shape and closes: the rest of the stream is unusable.

        The answers to the requests before the refused one go first, in full: one still
        being answered the ASGI way (or waiting for its turn) is finished before the
        refusal is written (on_response_complete). The refused request itself gets only
        the refusal: a tracking request's answer is dropped (nothing was recorded), and
        the app answering it the ASGI way, if it got that far, sees the client leave."""
        body = orjson.dumps({"error": reason or status.phrase.lower()})
        self._refused = True
        self._held = b""
        self._tracking = None
        self._continue = False
        self._refusal_answer = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                                b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                                % (status, status.phrase.encode(), len(body), body))
        refused = self.cycle
        if (refused is not None and refused.more_body and not refused.response_complete
                and not refused.response_started):
            # Its body is what was refused: it is not answered, and not waited for.
            for waiting in self.pipeline:
                if waiting[0] is refused:
                    self.pipeline.remove(waiting)
                    break
            refused.disconnected = True
            refused.message_event.set()
        if not self._answers_pending():
            self._send_refusal()

    def _answers_pending(self) -> bool:
        """Whether a request before the refused one is still to be answered the ASGI way."""
        cycle = self._answering
        return bool(self.pipeline) or (cycle is not None and not cycle.response_complete
                                       and not cycle.disconnected)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        self._answering = cycle
        super()._start_asgi_task(cycle, app)

    def _send_refusal(self) -> None:
        answer, self._refusal_answer = self._refusal_answer, None
        if answer is None or self.transport.is_closing():
            return
        self._outbox.flush()  # the tracking answers before it
        self.transport.write(answer)
        self._linger()

    def _linger(self) -> None:
        """Closes after a refusal without losing the answer (nginx's lingering close).
        Closed with the rest of the request unread, the connection is reset, and a client
        still sending it may never read the answer. So: the answer, then our end of the
        stream; what still comes is read and dropped, until the client closes its end or
        LINGER_S have passed."""
        transport = self.transport
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if self.flow.read_paused:
            self.flow.resume_reading()
        self.loop.call_later(LINGER_S, transport.close)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_TARGET_BYTES:
            self._refusal = HTTPStatus.REQUEST_URI_TOO_LONG
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        # uvicorn's, inlined (a call less per header), with the bound added. llhttp keeps
        # a value's trailing whitespace, which is not part of it (RFC 9110, 5.5).
        name = name.lower()
        value = value.rstrip(b" \t")
        if name == b"expect":
            if value.lower() == b"100-continue":
                self.expect_100_continue = True
        elif name == b"connection" or name == b"proxy-connection":
            self._names_connection = True
        self.headers.append((name, value))
        self._header_bytes += len(name) + len(value)
        if len(self.headers) > MAX_HEADER_FIELDS or self._header_bytes > MAX_HEADER_BYTES:
            self._refusal = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
            raise _Refused

    def on_message_begin(self) -> None:
        # uvicorn builds the ASGI scope here; a tracking request needs four of its keys,
        # so the scope is built only when the request goes the ASGI way.
        self.url = b""
        self.expect_100_continue = False
        self._names_connection = False
        self.headers = []
        self._header_bytes = 0
        self._in_head = True
        self._head_bytes = 0
        self._idle_since = None
        self._head_since = _now()
        self._head_begun = True
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._check_head)

    def on_headers_complete(self) -> None:
        self._in_head = False
        url = self.url
        if (self._answers_in_place and url.startswith(_TRACKING_PATHS)
                and (self.cycle is None or self.cycle.response_complete)
                and not self.parser.should_upgrade()):
            path = url.partition(b"?")[0]
            if path.isascii() and b"%" not in path and b"#" not in url:
                # Answered and recorded when complete (on_message_complete): a request whose
                # body never comes, or is refused, is neither.
                self._tracking = {
                    "method": self.parser.get_method().decode("ascii"),
                    "path": path.decode("ascii"), "headers": self.headers,
                    "client": self.client}
                if self.expect_100_continue and self.parser.get_http_version() != "1.0":
                    self._continue = True
                return
        if not url.startswith(_TRACKING_PATHS):
            self._head_since = None  # its head is in; a tracking request is timed whole
        # The ASGI way: uvicorn's scope (its on_message_begin resets what was read so far).
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        self.url, self.headers, self.expect_100_continue = url, headers, expect
        self.scope["headers"] = headers
        super().on_headers_complete()

    def on_chunk_header(self) -> None:
        # Either a chunk's data follows (on_body), or, after the last chunk, the trailer
        # section: header lines again.
        self._in_head = True
        self._head_bytes = 0

    def on_chunk_complete(self) -> None:
        self._in_head = False

    def on_body(self, body: bytes) -> None:
        self._in_head = False
        if self._tracking is None:
            super().on_body(body)
        # A body on a tracking GET means nothing; it is read and dropped.

    def on_message_complete(self) -> None:
        self._in_head = False
        self._head_since = None
        tracking = self._tracking
        if tracking is None:
            return super().on_message_complete()
        self._tracking = None
        self._continue = False
        assert self._fast_path is not None  # (a tracking request was taken with it)
        self._outbox.expect()
        answer = self._fast_path.answer(tracking)
        self.server_state.total_requests += 1
        parser = self.parser
        if parser.should_keep_alive() and not (self._names_connection
                                               and parser.get_http_version() == "1.0"):
            self._outbox.put(self, answer, False)
            self._idle_since = _now()
            if self._idle_timer is None:
                self._idle_timer = self.loop.call_later(self.timeout_keep_alive,
                                                        self._close_if_idle)
        else:
            self._outbox.put(self, answer.replace(b"\r\n\r\n", _CLOSE, 1), True)

    def send_answer(self, answer: bytes, close: bool) -> None:
        """Writes a tracking answer (from the outbox), then closes if it said so."""
        transport = self.transport
        if transport.is_closing():
            return  # the client left, or an earlier answer closed the connection
        transport.write(answer)
        if close:
            transport.close()

    def shutdown(self) -> None:
        # Graceful shutdown closes idle connections at once: answers still in the outbox
        # are written first.
        self._outbox.flush()
        super().shutdown()

    def _close_if_idle(self) -> None:
        self._idle_timer = None
        if self._idle_since is None or self.transport.is_closing():
            return  # a request is under way (its own timeout rules apply) or it is closed
        idle_for = _now() - self._idle_since
        if idle_for >= self.timeout_keep_alive:
            self.transport.close()
        else:
            self._idle_timer = self.loop.call_later(self.timeout_keep_alive - idle_for,
                                                    self._close_if_idle)

    def _check_head(self) -> None:
        """Refuses a request whose head (a tracking request: whole) is late with 408, and
        closes a connection whose first request has not begun in time."""
        self._head_timer = None
        since = self._head_since
        if since is None or self._refused or self.transport.is_closing():
            return  # between requests (the keep-alive timeout rules), or done
        now = _now()
        if self._held or self.flow.read_paused:
            # Not reading: the rest may be here already, waiting for the client to read
            # its answers (or for the answers before it).
            since = self._head_since = now
        waited = now - since
        if waited < HEAD_TIMEOUT_S:
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S - waited, self._check_head)
        elif self._head_begun:
            self._refuse(HTTPStatus.REQUEST_TIMEOUT, "request not received in time")
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its requests, whichever
        # path answers them (and stop parsing those read already: _parse).
        super().pause_writing()
        self.flow.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._resume_parsing()

    def on_response_complete(self) -> None:
        # uvicorn's resumes reading and starts the next request waiting (if any); reading
        # stays paused while others still wait, and what was held is parsed once none do.
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._refused:
            if not self._answers_pending():
                self._send_refusal()  # (if still to be sent: a refusal is sent once)
            return
        if self._held or self._must_wait():
            self.flow.pause_reading()
            if not self._must_wait():
                self.loop.call_soon(self._resume_parsing)


def _find_fast_path(app: Any) -> FastPath | None:
    """tracker's FastPath under whatever middleware uvicorn wrapped around it."""
    for _ in range(8):
        if isinstance(app, FastPath):
            return app
        app = getattr(app, "app", None)
    return None
