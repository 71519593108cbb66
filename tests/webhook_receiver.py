"""A real HTTP receiver of webhook deliveries on loopback, for the tests and the benchmark.

It verifies every delivery with the Standard Webhooks reference library and keeps the
events of those it accepted (answered 2xx) by id. Its `mode` says how it answers:
`ok`, `error` (500), `slow` (answers after `slow_s`), `hang` (never in time: it waits
`hang_s` and the sender has given up by then); `stop()` takes it off the port (down) and
`start()` puts it back on the same one.
"""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from .support import free_port


class Receiver:
    def __init__(self, secret: str | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.secret = secret
        self.mode = "ok"
        self.slow_s = 0.3
        self.hang_s = 2.0
        self.lock = threading.Lock()
        self.accepted: Counter[str] = Counter()  # event id -> times accepted
        self.events: dict[str, dict[str, Any]] = {}
        self.requests: Counter[str] = Counter()  # mode -> requests answered so
        self.bad_signatures = 0
        self.webhook_ids: list[str] = []
        self._server: ThreadingHTTPServer | None = None
        # What a slow or hanging answer waits on: set when the receiver stops, so no
        # handler outlives it.
        self._stopped = threading.Event()

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.answer(self, body)

            def log_message(self, *args: Any) -> None:
                pass

        self._stopped.clear()
        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def answer(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        mode = self.mode
        with self.lock:
            self.requests[mode] += 1
        if mode == "error":
            self._reply(handler, 500, b"receiver error")
            return
        if mode == "hang":
            self._stopped.wait(self.hang_s)  # the answer comes after the sender gave up
            self._reply(handler, 503, b"too late")
            return
        if mode == "slow":
            self._stopped.wait(self.slow_s)  # late, within the sender's timeout
        headers = {k: v for k, v in handler.headers.items()}
        if self.secret is not None:
            try:
                Webhook(self.secret).verify(body, headers)
            except WebhookVerificationError:
                with self.lock:
                    self.bad_signatures += 1
                self._reply(handler, 401, b"bad signature")
                return
        payload = orjson.loads(body)
        with self.lock:
            self.webhook_ids.append(headers.get("webhook-id", headers.get("Webhook-Id", "")))
            for event in payload["events"]:
                self.accepted[event["id"]] += 1
                self.events[event["id"]] = event
        self._reply(handler, 204, b"")

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        try:
            handler.send_response(status)
            handler.send_header("content-length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        except OSError:
            pass  # the sender gave up waiting

    def ids(self) -> set[str]:
        with self.lock:
            return set(self.accepted)

    def doubled(self) -> dict[str, int]:
        with self.lock:
            return {i: n for i, n in self.accepted.items() if n > 1}
