"""uvicorn's protocol with tracking requests answered in place (tracker/ingest/protocol.py).

The same server is started twice on one database: in the default durability mode,
where tracking requests are answered from the parser's callbacks, and with
TRACKER_DURABILITY=journal, where every request goes through uvicorn's ASGI
machinery. Both must answer every request with the same bytes.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .support import Server, campaign, db_fetch, db_value, new_account, register, wait_for

DESTINATION = "https://example.com/p?q=1&r=%20x#frag"


@pytest.fixture(scope="module")
def servers(module_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[Server, Server]]:
    fast = Server(module_dsn, tmp_path_factory.mktemp("fast")).start()
    asgi = Server(module_dsn, tmp_path_factory.mktemp("asgi"),
                  {"TRACKER_DURABILITY": "journal"}).start()
    yield fast, asgi
    fast.stop()
    asgi.stop()


@pytest.fixture(scope="module")
def tokens(servers: tuple[Server, Server], module_dsn: str) -> dict[str, str]:
    fast, _ = servers
    with fast.client(new_account(module_dsn)) as client:
        message = register(client, campaign(client), [DESTINATION])
    return {"pixel": message["pixel_url"].removeprefix(fast.url),
            "click": message["links"][0]["tracked_url"].removeprefix(fast.url),
            "message": message["id"], "key": client.headers["authorization"]}


def exchange(port: int, data: bytes, expect_close: bool = True) -> bytes:
    """Sends raw bytes; returns everything read until the server closes (or goes quiet)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        if not expect_close:
            sock.settimeout(1.0)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


def _request(method: str, target: str, version: str = "1.1", extra: str = "") -> bytes:
    return (f"{method} {target} HTTP/{version}\r\nHost: track.example\r\n"
            f"User-Agent: Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0\r\n{extra}"
            "Connection: close\r\n\r\n").encode("latin-1")


def _cases(tokens: dict[str, str]) -> list[bytes]:
    pixel, click = tokens["pixel"], tokens["click"]
    return [
        _request("GET", pixel), _request("HEAD", pixel), _request("GET", pixel + "?x=1"),
        _request("GET", click), _request("HEAD", click), _request("GET", click + "?utm=1"),
        _request("GET", "/o/not-a-token.gif"), _request("GET", "/c/not-a-token"),
        _request("HEAD", "/c/not-a-token"), _request("GET", "/c/"), _request("GET", "/o/"),
        _request("POST", pixel, extra="Content-Length: 3\r\n") + b"abc",
        _request("DELETE", click), _request("GET", click, version="1.0"),
        _request("GET", pixel, extra="Content-Length: 5\r\n") + b"hello",
    ]


def test_answers_are_byte_for_byte_those_of_the_asgi_way(
        servers: tuple[Server, Server], tokens: dict[str, str]) -> None:
    fast, asgi = servers
    for case in _cases(tokens):
        answer = exchange(fast.port, case)
        assert answer, case
        assert answer == exchange(asgi.port, case), case


def test_paths_it_does_not_handle_go_the_asgi_way_with_the_same_result(
        servers: tuple[Server, Server], tokens: dict[str, str]) -> None:
    fast, asgi = servers
    pixel = tokens["pixel"]
    escaped = pixel[:3] + "%" + format(ord(pixel[3]), "02X") + pixel[4:]
    for case in (_request("GET", escaped), _request("GET", f"http://track.example{pixel}"),
                 _request("GET", "/api/campaigns")):
        answer = exchange(fast.port, case)
        assert answer == exchange(asgi.port, case), case
    assert exchange(fast.port, _request("GET", escaped)).startswith(b"HTTP/1.1 200 OK")


def test_pipelined_requests_are_answered_in_order_across_both_ways(
        servers: tuple[Server, Server], tokens: dict[str, str]) -> None:
    fast, _ = servers
    keep = "Connection: keep-alive\r\n"
    api = f"GET /api/messages/{tokens['message']} HTTP/1.1\r\nHost: x\r\n" \
          f"Authorization: {tokens['key']}\r\n\r\n"
    pipelined = (
        f"GET {tokens['pixel']} HTTP/1.1\r\nHost: x\r\n{keep}\r\n" + api
        + f"GET {tokens['click']} HTTP/1.1\r\nHost: x\r\n\r\n" + api
        + "GET /o/bad.gif HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").encode()
    answer = exchange(fast.port, pipelined)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)  # bodies have no line ends
    assert statuses == [b"200", b"200", b"302", b"200", b"200"], answer
    assert answer.count(b"content-type: image/gif") == 2
    assert answer.count(b"location: " + DESTINATION.encode()) == 1


@pytest.mark.parametrize(("version", "header", "kept"), [
    ("1.1", "", True), ("1.1", "Connection: keep-alive\r\n", True),
    ("1.1", "Connection: close\r\n", False), ("1.0", "", False),
    ("1.0", "Connection: keep-alive\r\n", False),
    ("1.0", "Proxy-Connection: keep-alive\r\n", False),
    ("1.0", "X-Connection: keep-alive\r\n", False)])
def test_a_tracking_answer_keeps_the_connection_only_for_http_1_1(
        servers: tuple[Server, Server], tokens: dict[str, str], version: str, header: str,
        kept: bool) -> None:
    # A second request follows at once: it is answered only on a connection kept alive.
    fast, asgi = servers
    for path in (tokens["pixel"], tokens["click"]):
        first = f"GET {path} HTTP/{version}\r\nHost: x\r\n{header}\r\n".encode()
        answer = exchange(fast.port, first + _request("GET", path))
        assert len(re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)) == (2 if kept else 1), answer
        assert answer.count(b"connection: close") == 1
        assert answer == exchange(asgi.port, first + _request("GET", path))


def test_a_malformed_request_is_refused_after_the_answers_before_it(
        servers: tuple[Server, Server], tokens: dict[str, str]) -> None:
    fast, _ = servers
    hits = (f"GET {tokens['pixel']} HTTP/1.1\r\nHost: x\r\n\r\n"
            f"GET {tokens['click']} HTTP/1.1\r\nHost: x\r\n\r\n").encode()
    answer = exchange(fast.port, hits + b"GET /o/x.gif HTTP/1.1\r\nBad Header\r\n\r\n")
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"302", b"400"], answer
    assert answer.endswith(b'{"error":"malformed HTTP request"}')


@pytest.mark.slow
def test_every_pipelined_hit_is_recorded_once(
        servers: tuple[Server, Server], tokens: dict[str, str], module_dsn: str) -> None:
    fast, _ = servers
    message = int(tokens["message"])

    def opens() -> int:
        return int(db_value(module_dsn, "select count(*) from events where message_id = $1 "
                            "and type = 'open'", message))

    before = steady(opens)
    burst = b"".join(f"GET {tokens['pixel']} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                     for _ in range(200))
    answer = exchange(fast.port, burst + _request("GET", "/o/bad.gif"))
    assert answer.count(b"HTTP/1.1 200 OK") == 201
    wait_for(lambda: opens() == before + 200, timeout=15,
             message="200 pipelined opens in PostgreSQL")


def steady(count: Callable[[], int]) -> int:
    """The value of a counter once it stops moving for half a second (within 30 s)."""
    seen: list[int] = []  # one reading per try, half a second apart

    def settled() -> bool:
        seen.append(count())
        return len(seen) >= 2 and seen[-1] == seen[-2]

    wait_for(settled, timeout=30, interval=0.5, message="the count to stop moving")
    return seen[-1]


@pytest.mark.slow
def test_an_idle_keep_alive_connection_is_closed_after_the_timeout(
        servers: tuple[Server, Server], tokens: dict[str, str]) -> None:
    fast, _ = servers
    with socket.create_connection(("127.0.0.1", fast.port), timeout=15) as sock:
        sock.sendall(f"GET {tokens['pixel']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        started = time.monotonic()
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        waited = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 200 OK")
    assert b"connection: close" not in received
    assert 4.0 <= waited <= 12.0, waited  # uvicorn's keep-alive timeout is 5 s


def test_a_client_that_never_reads_does_not_stop_the_server(
        servers: tuple[Server, Server], tokens: dict[str, str]) -> None:
    fast, _ = servers
    hog = socket.create_connection(("127.0.0.1", fast.port), timeout=10)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    request = f"GET {tokens['pixel']} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    hog.setblocking(False)
    blocked = False
    try:
        # Far more than the kernel's buffers hold on both sides (several MB each way).
        for _ in range(400_000):
            try:
                hog.send(request)
            except BlockingIOError:
                blocked = True  # the server stopped reading from us: that is the point
                break
        answer = exchange(fast.port, _request("GET", tokens["pixel"]))
        assert answer.startswith(b"HTTP/1.1 200 OK")
    finally:
        hog.close()
    assert blocked, "the server kept reading requests whose answers nobody read"


def send_until_answered(port: int, head: bytes, filler: bytes, limit: int) -> tuple[bytes, int]:
    """Sends `head`, then `filler` over and over (up to `limit` bytes in all) until the server
    answers; reads the answer to its end. Returns it and how much was sent. Reading as it
    sends: a server that refuses closes after a while, and a reset connection loses what
    was not read yet."""
    received = b""
    sent = 0
    pending = memoryview(head)
    deadline = time.monotonic() + 60
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setblocking(False)
        while time.monotonic() < deadline:  # not a wait: select blocks on the socket
            want_write = sent < limit and not received
            readable, writable, _ = select.select([sock], [sock] if want_write else [], [], 10)
            if readable:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                received += chunk
            elif writable:
                if not pending:
                    pending = memoryview(filler)
                try:
                    written = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    continue  # closed: what it said is read next
                pending = pending[written:]
                sent += written
            elif not want_write:
                break  # nothing more to send and nothing said for 10 s
    return received, sent


@pytest.mark.parametrize("shape", ["value", "name", "trailer"])
def test_a_header_line_that_never_ends_is_refused_with_431(
        servers: tuple[Server, Server], shape: str) -> None:
    heads = {"value": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: ",
             "name": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long",
             "trailer": b"POST /o/x.gif HTTP/1.1\r\nHost: x\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Long: "}
    for server in servers:
        answer, sent = send_until_answered(server.port, heads[shape], b"a" * 65536,
                                           16 * 1024 * 1024)
        # (With the trailer, an answer to the request may come first: the 405 of a POST.)
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
        assert statuses and statuses[-1] == b"431", (shape, sent, answer[:300])
        assert answer.endswith(b'{"error":"request header fields too large"}')


def test_a_long_head_within_the_bounds_is_answered(servers: tuple[Server, Server]) -> None:
    fast, _ = servers
    fields = "".join(f"X-Field-{i:03}: {'v' * 2100}\r\n" for i in range(120))  # ~250 KB
    answer = exchange(fast.port, (f"GET /healthz HTTP/1.1\r\nHost: x\r\n{fields}"
                                  "Connection: close\r\n\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]


def rss_mb(server: Server) -> float:
    """The server process's resident memory (one worker: uvicorn runs in it)."""
    assert server.proc is not None
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(status.split("VmRSS:", 1)[1].split()[0]) / 1024


def pipeline_unread(port: int, request: bytes, limit: int) -> int:
    """Pipelines `request` over and over on one connection and never reads an answer; stops
    at `limit` bytes or when the server has taken nothing for 2 s. Returns bytes sent."""
    burst = memoryview(request * (65536 // len(request)))
    sent = offset = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setblocking(False)
        while sent < limit:
            if not select.select([], [sock], [], 2)[1]:
                break  # the server stopped reading
            written = sock.send(burst[offset:])
            sent += written
            offset = (offset + written) % len(burst)
    return sent


@pytest.mark.slow
def test_pipelined_requests_of_a_client_that_never_reads_are_not_read_on_every_path(
        servers: tuple[Server, Server]) -> None:
    # Each request waiting to be answered the ASGI way costs the server a few KB; read
    # as fast as they come, 8 MB of them held ~500 MB (the kernel's buffers on both sides
    # take up to ~36 MB here, so that the client cannot tell by being blocked).
    fast, _ = servers
    before = rss_mb(fast)
    pipeline_unread(fast.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 8 * 1024 * 1024)
    grown = max(rss_mb(fast) - before for _ in poll(seconds=2))
    assert grown < 64, f"the server grew by {grown:.0f} MB"


def poll(seconds: float) -> Iterator[None]:
    """Yields every 50 ms for `seconds`: samples over a span of time, not a wait."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # not a wait: a sampling window
        yield
        time.sleep(0.05)  # not a wait: the sampling rate


def test_many_pipelined_requests_on_both_ways_are_all_answered_in_order(
        servers: tuple[Server, Server], tokens: dict[str, str]) -> None:
    # More than one read's worth: parsing stops while requests wait behind one answered
    # the ASGI way, and goes on from where it stopped.
    fast, _ = servers
    pair = (f"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            f"GET {tokens['click']} HTTP/1.1\r\nHost: x\r\n\r\n").encode()
    answer = exchange(fast.port, pair * 1000 + _request("GET", "/o/bad.gif"))
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert statuses == [b"200", b"302"] * 1000 + [b"200"]


@pytest.mark.parametrize("refused", [
    b"GET /o/x.gif HTTP/1.1\r\nBad Header\r\n\r\n",  # malformed: 400
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",  # target too long: 414
    b"POST /api/campaigns HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # body: 400
])
def test_a_refused_request_comes_after_the_api_answers_before_it_in_full(
        servers: tuple[Server, Server], tokens: dict[str, str], refused: bytes) -> None:
    fast, asgi = servers
    api = f"GET /api/messages/{tokens['message']} HTTP/1.1\r\nHost: x\r\n" \
          f"Authorization: {tokens['key']}\r\n\r\n"
    for server in (fast, asgi):
        logged = len(server.log())
        answer = exchange(server.port, ("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + api
                                        + f"GET {tokens['pixel']} HTTP/1.1\r\n\r\n").encode()
                          + refused)
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
        assert statuses[:3] == [b"200", b"200", b"200"] and len(statuses) == 4, answer
        assert statuses[3] in (b"400", b"414"), answer
        assert b'{"status":"ok"}' in answer and b'"recipient":' in answer
        assert "Traceback" not in server.log()[logged:]


def _message_with_two_links(server: Server, key: str) -> dict[str, Any]:
    with httpx.Client(base_url=server.url, headers={"authorization": key}, timeout=10) as api:
        message = register(api, campaign(api), ["https://example.com/a", "https://example.com/b"])
    return {"id": int(message["id"]), "pixel": message["pixel_url"].removeprefix(server.url),
            "clicks": [link["tracked_url"].removeprefix(server.url)
                       for link in message["links"]]}


def _events_after_marker(dsn: str, server: Server, message: dict[str, Any]) -> list[Any]:
    """The message's events once a complete click on its second link (the marker, written
    after anything before it: one message's events go through one writer lane in order)
    is stored."""
    answer = exchange(server.port, _request("GET", message["clicks"][1]))
    assert answer.startswith(b"HTTP/1.1 302 "), answer

    def events() -> list[Any]:
        rows = db_fetch(dsn, "select type, link_position from events where message_id = $1",
                        message["id"])
        return rows if any(row["link_position"] == 1 for row in rows) else []

    return [tuple(row) for row in wait_for(events, timeout=15, message="the marker click")]


@pytest.mark.slow
def test_a_pixel_whose_body_is_refused_is_not_recorded(
        servers: tuple[Server, Server], tokens: dict[str, str], module_dsn: str) -> None:
    for server in servers:
        message = _message_with_two_links(server, tokens["key"])
        answer = exchange(server.port, f"GET {message['pixel']} HTTP/1.1\r\nHost: x\r\n"
                                       "Transfer-Encoding: chunked\r\n\r\nzz\r\n".encode())
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"400"], answer
        assert _events_after_marker(module_dsn, server, message) == [("click", 1)]


@pytest.mark.slow
def test_a_click_whose_body_never_comes_is_not_recorded(
        servers: tuple[Server, Server], tokens: dict[str, str], module_dsn: str) -> None:
    for server in servers:
        message = _message_with_two_links(server, tokens["key"])
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(f"GET {message['clicks'][0]} HTTP/1.1\r\nHost: x\r\n"
                         "Content-Length: 100\r\n\r\n0123456789".encode())
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                sock.recv(100)  # no answer to an incomplete request
        assert _events_after_marker(module_dsn, server, message) == [("click", 1)]


@pytest.mark.parametrize("kind", ["pixel", "click"])
def test_expect_100_continue_on_a_tracking_path_is_answered_then_the_request(
        servers: tuple[Server, Server], tokens: dict[str, str], kind: str) -> None:
    for server in servers:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(f"GET {tokens[kind]} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                         "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode())
            interim = b""
            while not interim.endswith(b"\r\n\r\n"):
                interim += sock.recv(1)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(b"hello")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 302 " if kind == "click" else b"HTTP/1.1 200 ")


@pytest.mark.slow
def test_a_request_head_that_does_not_arrive_in_time_is_refused_with_408(
        servers: tuple[Server, Server], tokens: dict[str, str]) -> None:
    # Slowloris: heads dripped a byte at a time, to both ways; connections that say
    # nothing; a tracking request whose body never comes. All are let go after
    # HEAD_TIMEOUT_S (10 s), which no dripping resets.
    started = time.monotonic()
    clients: list[tuple[socket.socket, bytes]] = []
    for server in servers:
        for head, count in ((f"GET {tokens['pixel']} HTTP/1.1\r\nHost: x\r\n", 20),
                            ("GET /healthz HTTP/1.1\r\nHost: x\r\n", 20), ("", 5),
                            (f"GET {tokens['click']} HTTP/1.1\r\nContent-Length: 9\r\n\r\n", 5)):
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                sock.sendall(head.encode())
                sock.setblocking(False)
                clients.append((sock, head.encode()))
    outcomes: dict[int, tuple[float, bytes]] = {}
    try:
        deadline = started + 40
        while len(outcomes) < len(clients) and time.monotonic() < deadline:  # not a wait: paced
            for index, (sock, head) in enumerate(clients):
                if index in outcomes:
                    continue
                try:
                    received = sock.recv(65536)
                except BlockingIOError:
                    # One more byte of a header name, until just before the bound (bytes
                    # sent after the server is done with us could reset the connection).
                    if (head and not head.endswith(b"\r\n\r\n")
                            and time.monotonic() - started < 9):
                        with contextlib.suppress(OSError):
                            sock.send(b"X")
                    continue
                except ConnectionResetError:
                    received = b""
                outcomes[index] = (time.monotonic() - started, received)
            time.sleep(0.5)  # not a wait: the dripping's pace, the behaviour under test
    finally:
        for sock, _ in clients:
            sock.close()
    assert len(outcomes) == len(clients), f"{len(clients) - len(outcomes)} still open after 40 s"
    for index, (after, received) in outcomes.items():
        assert after >= 9.5, after
        if clients[index][1]:
            assert received.startswith(b"HTTP/1.1 408 "), received
        else:
            assert received == b""
