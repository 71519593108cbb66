"""The tracking endpoints on the wire: exact bytes, status codes and headers."""

from __future__ import annotations

import socket

import pytest

from tracker.ingest.endpoints import PIXEL_GIF
from tracker.ingest.tokens import Signer

from .support import SECRET, Server, campaign, db_fetch, new_account, register, wait_for

DESTINATIONS = [
    "https://example.com/",
    "https://example.com/path?a=1&b=two&c=%20space&d=%E2%9C%93",
    "https://example.com/p#section-2",
    "https://example.com/p?q=1#frag?not=query",
    "http://example.com:8080/x;params?utm_source=mail&utm_medium=email",
    "https://bücher.example/straße?q=ä€",
    "https://example.com/a%2Fb/../c?x=%25",
    "HTTPS://EXAMPLE.COM/UPPER",
]


def raw_get(server: Server, path: str, method: str = "GET",
            headers: dict[str, str] | None = None) -> tuple[bytes, dict[bytes, list[bytes]], bytes]:
    """One HTTP/1.1 request over a plain socket; returns status line, headers, body as bytes."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *header_lines = head.split(b"\r\n")
    parsed: dict[bytes, list[bytes]] = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        parsed.setdefault(name.strip().lower(), []).append(value.strip())
    return status, parsed, body


@pytest.fixture(scope="module")
def registered(server: Server, module_dsn: str) -> dict[str, object]:
    with server.client(new_account(module_dsn)) as client:
        return register(client, campaign(client), DESTINATIONS)


@pytest.mark.parametrize("index", range(len(DESTINATIONS)))
def test_redirect_location_is_the_registered_destination_byte_for_byte(
        server: Server, registered: dict[str, list[dict[str, str]]], index: int) -> None:
    link = registered["links"][index]
    assert link["url"] == DESTINATIONS[index]
    path = link["tracked_url"].removeprefix(server.url)
    status, headers, _ = raw_get(server, path + "?extra=ignored")
    assert status.startswith(b"HTTP/1.1 302")
    assert headers[b"location"] == [DESTINATIONS[index].encode()]
    assert headers[b"cache-control"] == [b"no-store"]


def _tampered(token: str) -> list[str]:
    flipped = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    return [flipped, token[:-1], token[:-8], token[:20], token + "A", "", "not-a-token",
            "%00%ff", "x" * 5000]


def test_tampered_truncated_and_garbage_click_tokens_are_404_without_location(
        server: Server, registered: dict[str, list[dict[str, str]]]) -> None:
    token = registered["links"][0]["tracked_url"].rsplit("/", 1)[1]
    for bad in _tampered(token):
        for method in ("GET", "HEAD"):
            status, headers, _ = raw_get(server, f"/c/{bad}", method)
            assert status.startswith(b"HTTP/1.1 404"), (bad, method, status)
            assert b"location" not in headers


def test_click_token_signed_with_a_foreign_key_is_404() -> None:
    foreign = Signer(["someone-elses-key-0123456789"])
    token = foreign.click_token(1, 1, 1, 0, 0, 1, "https://evil.example/")
    assert Signer([SECRET]).verify_click(token) is None


def test_click_token_signed_with_a_foreign_key_is_404_on_the_wire(server: Server) -> None:
    token = Signer(["someone-elses-key-0123456789"]).click_token(1, 1, 1, 0, 0, 1,
                                                                 "https://evil.example/")
    status, headers, _ = raw_get(server, f"/c/{token}")
    assert status.startswith(b"HTTP/1.1 404")
    assert b"location" not in headers


def test_pixel_token_is_not_a_click_token(
        server: Server, registered: dict[str, str]) -> None:
    pixel = str(registered["pixel_url"]).rsplit("/", 1)[1].removesuffix(".gif")
    status, headers, _ = raw_get(server, f"/c/{pixel}")
    assert status.startswith(b"HTTP/1.1 404") and b"location" not in headers


@pytest.mark.parametrize("path", ["/o/{pixel}.gif", "/o/garbage.gif", "/o/.gif", "/o/x",
                                  "/o/{pixel}.gif?utm=1"])
def test_pixel_answers_the_gif_whatever_the_token(
        server: Server, registered: dict[str, str], path: str) -> None:
    pixel = str(registered["pixel_url"]).rsplit("/", 1)[1].removesuffix(".gif")
    status, headers, body = raw_get(server, path.format(pixel=pixel))
    assert status.startswith(b"HTTP/1.1 200")
    assert body == PIXEL_GIF
    assert headers[b"content-type"] == [b"image/gif"]
    assert headers[b"cache-control"] == [b"no-store, no-cache, must-revalidate, max-age=0"]


def test_pixel_head_has_the_same_headers_and_no_body(
        server: Server, registered: dict[str, str]) -> None:
    path = str(registered["pixel_url"]).removeprefix(server.url)
    _, get_headers, _ = raw_get(server, path)
    status, head_headers, body = raw_get(server, path, "HEAD")
    assert status.startswith(b"HTTP/1.1 200") and body == b""
    for name in (b"content-type", b"cache-control", b"content-length"):
        assert head_headers[name] == get_headers[name]


def test_no_set_cookie_on_tracking_paths(
        server: Server, registered: dict[str, list[dict[str, str]]]) -> None:
    pixel = str(registered["pixel_url"]).removeprefix(server.url)
    click = registered["links"][0]["tracked_url"].removeprefix(server.url)
    for path in (pixel, click, "/o/bad.gif", "/c/bad"):
        for method in ("GET", "HEAD"):
            _, headers, _ = raw_get(server, path, method, {"Cookie": "session=1"})
            assert b"set-cookie" not in headers, (path, method)


def test_other_methods_on_tracking_paths_are_405(server: Server) -> None:
    for path in ("/o/x.gif", "/c/x"):
        status, headers, _ = raw_get(server, path, "POST", {"Content-Length": "0"})
        assert status.startswith(b"HTTP/1.1 405")
        assert headers[b"allow"] == [b"GET, HEAD"]


ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _spellings(token: str) -> list[str]:
    """Other spellings of a token: each other last character, padding, padding escaped."""
    return ([token[:-1] + c for c in ALPHABET if c != token[-1]]
            + [token + "=", token + "==", token + "%3D%3D", token + "%3d", token + "%3D%3D%3D"])


def test_a_click_token_is_accepted_in_its_one_spelling_only(
        server: Server, registered: dict[str, list[dict[str, str]]]) -> None:
    tokens = [link["tracked_url"].rsplit("/", 1)[1] for link in registered["links"]]
    assert {len(token) % 4 for token in tokens} >= {2, 3}
    for token in tokens:
        for variant in _spellings(token):
            status, headers, _ = raw_get(server, f"/c/{variant}")
            assert status.startswith(b"HTTP/1.1 404"), variant
            assert b"location" not in headers


def test_a_pixel_token_records_in_its_one_spelling_only(server: Server, module_dsn: str) -> None:
    with server.client(new_account(module_dsn)) as client:
        message = register(client, campaign(client), ["https://example.com/"])
    pixel = str(message["pixel_url"]).rsplit("/", 1)[1].removesuffix(".gif")
    for variant in _spellings(pixel):
        status, _, body = raw_get(server, f"/o/{variant}.gif")
        assert status.startswith(b"HTTP/1.1 200") and body == PIXEL_GIF
    # The marker: a click of the same message, stored after whatever came before it.
    status, _, _ = raw_get(server, message["links"][0]["tracked_url"].removeprefix(server.url))
    assert status.startswith(b"HTTP/1.1 302")

    def stored() -> list[str]:
        rows = db_fetch(module_dsn, "select type from events where message_id = $1",
                        int(message["id"]))
        return [row["type"] for row in rows] if any(row["type"] == "click" for row in rows) \
            else []

    assert wait_for(stored, timeout=15, message="the marker click") == ["click"]
