"""Which address is the client's: the peer, or X-Forwarded-For when the peer is a trusted proxy.

The unit tests pin `ClientAddress.resolve`; the wire tests check on stored rows
(policy ip "full", so the row shows which address was used) that a server believes
the header only from the proxies it was told to trust.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tracker.ingest.addresses import ClientAddress
from tracker.ingest.capture import Capture, client_headers
from tracker.ingest.geo import no_location
from tracker.ingest.pipeline import Pipeline
from tracker.ingest.policy import PolicyBook
from tracker.ingest.tokens import Signer
from tracker.ingest.useragent import parse_agent
from tracker.settings import IPNetwork
from tracker.web.throttle import BURST, AuthThrottle

from .geodb import build_test_city_db
from .support import SECRET, Server, campaign, db_fetch, new_account, register, wait_for

LOOPBACK = "127.0.0.1"
CLIENT = "81.2.69.142"  # in the test City database: DE, Hesse, Frankfurt am Main
SPOOFED = "6.6.6.6"


def _networks(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


DEFAULT_TRUST = _networks("127.0.0.1/32", "::1/128")
PROXY_CHAIN_TRUST = _networks("127.0.0.1/32", "::1/128", "10.0.0.0/8", "fd00::/8")


def resolve(peer: str | None, forwarded: bytes | None,
            trusted: tuple[IPNetwork, ...] = DEFAULT_TRUST) -> str | None:
    return ClientAddress(trusted).resolve(peer, forwarded)


# -- ClientAddress.resolve -------------------------------------------------------------------


def test_trusted_peer_with_one_forwarded_address_gives_that_address() -> None:
    assert resolve(LOOPBACK, CLIENT.encode()) == CLIENT
    assert resolve("::1", CLIENT.encode()) == CLIENT


def test_right_most_untrusted_forwarded_address_wins_over_client_written_ones() -> None:
    # Everything left of the address our proxy appended came from the client itself.
    assert resolve(LOOPBACK, f"{SPOOFED}, {CLIENT}".encode()) == CLIENT
    assert resolve(LOOPBACK, f"1.1.1.1,{SPOOFED},{CLIENT}".encode()) == CLIENT


def test_malformed_element_among_trusted_proxies_leaves_the_client_unknown() -> None:
    assert resolve(LOOPBACK, f"{CLIENT},,10.0.0.1".encode(), PROXY_CHAIN_TRUST) is None
    assert resolve(LOOPBACK, f"{CLIENT}, junk, 10.0.0.1".encode(), PROXY_CHAIN_TRUST) is None


def test_chain_of_trusted_proxies_is_skipped_from_the_right() -> None:
    header = f"{SPOOFED}, {CLIENT}, 10.1.2.3, 10.0.0.1".encode()
    assert resolve(LOOPBACK, header, PROXY_CHAIN_TRUST) == CLIENT
    header = f"{SPOOFED}, 2001:db8:1::1, fd00::2, 10.0.0.1".encode()
    assert resolve("::1", header, PROXY_CHAIN_TRUST) == "2001:db8:1::1"


def test_trusted_proxy_in_the_chain_is_not_trusted_without_its_network() -> None:
    # 10.0.0.1 is a proxy only when the setting says so; by default it is the client.
    assert resolve(LOOPBACK, f"{CLIENT}, 10.0.0.1".encode()) == "10.0.0.1"


def test_chain_of_only_trusted_addresses_gives_the_left_most() -> None:
    assert resolve(LOOPBACK, b"10.0.0.2, 10.0.0.1", PROXY_CHAIN_TRUST) == "10.0.0.2"


def test_untrusted_peer_forwarded_header_is_ignored() -> None:
    assert resolve("203.0.113.7", CLIENT.encode()) == "203.0.113.7"
    assert resolve("2001:db8:2::7", CLIENT.encode()) == "2001:db8:2::7"
    # Loopback is trusted only by default; a setting without it makes loopback a client.
    assert resolve(LOOPBACK, CLIENT.encode(), _networks("10.255.255.0/24")) == LOOPBACK


def test_no_forwarded_header_or_no_peer() -> None:
    assert resolve(LOOPBACK, None) == LOOPBACK
    assert resolve(None, CLIENT.encode()) is None
    assert resolve(None, None) is None


@pytest.mark.parametrize("header", [
    b"garbage",
    b"unknown",
    b"for=81.2.69.142",  # RFC 7239 syntax belongs in Forwarded, not here
    b"81.2.69.142/24",
    b"081.2.69.142",
    b"81.2.69",
    b"256.2.69.142",
    b"0x51.2.69.142",
    b"1359103374",  # inet_aton's integer form of 81.2.69.142
    b"81.2.69.142 81.2.69.143",
    b"81.2.69.142;81.2.69.143",
    b"",
    b" ",
    b",",
    b"81.2.69.142,",
    b"81.2.69.142, garbage",
    b"\xff\xfe81.2.69.142",
    b"81.2.69.142\xc3",
    b"\xb9.2.69.142",  # latin-1 superscript one: a digit to str.isdigit, not to an address
    b"81.2.69.142\x00",
    b"[2001:db8:1::1",
    b"2001:db8:1::1]",
    b"2001:db8:1:::1",
])
def test_malformed_forwarded_header_leaves_the_client_unknown(header: bytes) -> None:
    # What our own proxy wrote is broken: the client is not known, and is not the proxy
    # (whose address would be stored and located, and on loopback is never throttled).
    assert resolve(LOOPBACK, header) is None
    assert resolve(LOOPBACK, header, PROXY_CHAIN_TRUST) is None


@pytest.mark.parametrize("header", [
    b",81.2.69.142",
    b"6.6.6.6,,81.2.69.142",
    b"6.6.6.6, , 81.2.69.142",
    b"garbage, 81.2.69.142",
    b"\xc3\xa9, 81.2.69.142",
    b"for=1.2.3.4, 81.2.69.142:443",
])
def test_what_the_client_wrote_left_of_its_address_is_not_read(header: bytes) -> None:
    assert resolve(LOOPBACK, header) == CLIENT


@pytest.mark.parametrize("header", [
    b"81.2.69.142:notaport",
    b"81.2.69.142:",
    b"81.2.69.142:99999",
    b"[2001:db8:1::1]:443junk",
    b"[2001:db8:1::1]junk",
])
def test_forwarded_address_with_a_malformed_port_leaves_the_client_unknown(
        header: bytes) -> None:
    assert resolve(LOOPBACK, header) is None


def test_too_long_forwarded_header_is_read_from_the_right_as_far_as_2048_characters() -> None:
    # Longer than any real chain of proxies writes: the client's own padding on the left
    # cannot hide the address our proxy appended...
    header = ", ".join(["10.0.0.1"] * 300 + [CLIENT]).encode()
    assert len(header) > 2048
    assert resolve(LOOPBACK, header) == CLIENT
    assert resolve(LOOPBACK, header, PROXY_CHAIN_TRUST) == CLIENT
    # ... but if the trusted hops go on past the bound, the client is unknown.
    assert resolve(LOOPBACK, ", ".join([CLIENT] + ["10.0.0.1"] * 300).encode(),
                   PROXY_CHAIN_TRUST) is None
    assert resolve(LOOPBACK, b"x" * 100_000) is None
    assert resolve(LOOPBACK, b"x" * 100_000 + b", " + CLIENT.encode()) == CLIENT


@pytest.mark.parametrize(("header", "client"), [
    (b"[2001:db8:1::1]:443", "2001:db8:1::1"),
    (b"[2001:db8:1::1]", "2001:db8:1::1"),
    (b"2001:db8:1::1", "2001:db8:1::1"),
    (b"2001:DB8:1:0:0:0:0:1", "2001:db8:1::1"),
    (b"81.2.69.142:8080", CLIENT),
    (b"81.2.69.142:1", CLIENT),
    (b"  81.2.69.142  ", CLIENT),
    (b"6.6.6.6 ,\t81.2.69.142:443", CLIENT),
    (b"[2001:db8:1::1]:443, ::1", "2001:db8:1::1"),
])
def test_forwarded_address_forms_with_brackets_and_ports(header: bytes, client: str) -> None:
    assert resolve(LOOPBACK, header) == client


def test_forwarded_address_is_normalised() -> None:
    assert resolve(LOOPBACK, b"2001:0db8:0001:0000:0000:0000:0000:0001") == "2001:db8:1::1"


def test_forwarded_ipv6_zone_id_does_not_become_part_of_the_client_address() -> None:
    # A zone id names an interface of the host that wrote it: meaningless here, and
    # free text (ipaddress takes "%a b" or 1,500 x's) that must not travel with the address.
    for header in (b"2001:db8:1::1%eth0", b"2001:db8:1::1%a b", b"2001:db8:1::1%" + b"x" * 1500):
        assert resolve(LOOPBACK, header) in (None, "2001:db8:1::1"), header


def test_ipv4_mapped_loopback_peer_is_the_trusted_loopback() -> None:
    # A dual-stack listener ("::") reports IPv4 peers as ::ffff:a.b.c.d.
    assert resolve("::ffff:127.0.0.1", CLIENT.encode()) == CLIENT


@pytest.mark.parametrize("header", [b"::ffff:81.2.69.142", b"[::ffff:81.2.69.142]:80",
                                    b"::FFFF:5102:458E"])
def test_ipv4_mapped_forwarded_address_is_the_ipv4_client(header: bytes) -> None:
    # What nginx on a dual-stack listener writes for an IPv4 client. Kept as IPv6 it is
    # neither located as 81.2.69.142 nor truncated to its /24.
    assert resolve(LOOPBACK, header) == CLIENT


def _capture(trusted: tuple[IPNetwork, ...] = DEFAULT_TRUST) -> Capture:
    pipeline = Pipeline(PolicyBook(), parse_agent, no_location)
    return Capture(Signer([SECRET]), pipeline, ClientAddress(trusted),
                   lambda row: True, lambda reason: None, lambda endpoint, machine: None)


def _scope(peer: str, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": "/o/x.gif", "headers": list(headers),
            "client": (peer, 40000)}


def _client_of(capture: Capture, scope: dict[str, Any]) -> str | None:
    """The client address a hit is recorded with, as `Capture` reads it."""
    return capture.addresses.resolve(scope["client"][0], client_headers(scope["headers"])[1])


def test_several_forwarded_headers_read_as_one_list_in_order() -> None:
    capture = _capture()
    scope = _scope(LOOPBACK, (b"x-forwarded-for", SPOOFED.encode()), (b"user-agent", b"UA"),
                   (b"x-forwarded-for", CLIENT.encode()))
    assert _client_of(capture, scope) == CLIENT
    scope = _scope(LOOPBACK, (b"x-forwarded-for", f"{SPOOFED}, {CLIENT}".encode()),
                   (b"x-forwarded-for", b"10.0.0.1"))
    assert _client_of(capture, scope) == "10.0.0.1"
    assert _client_of(_capture(PROXY_CHAIN_TRUST), scope) == CLIENT


def test_malformed_second_forwarded_header_leaves_the_client_unknown() -> None:
    scope = _scope(LOOPBACK, (b"x-forwarded-for", CLIENT.encode()),
                   (b"x-forwarded-for", b"garbage"))
    assert _client_of(_capture(), scope) is None


def test_an_unknown_client_is_throttled_in_one_bucket_for_all_unknown_clients() -> None:
    throttle = AuthThrottle()
    for _ in range(BURST):
        assert throttle.retry_after(None) is None
        throttle.failed(None)
    assert throttle.retry_after(None) is not None
    assert throttle.retry_after(CLIENT) is None


def test_forwarded_headers_from_an_untrusted_peer_are_ignored() -> None:
    scope = _scope("203.0.113.7", (b"x-forwarded-for", CLIENT.encode()),
                   (b"x-forwarded-for", CLIENT.encode()))
    assert _client_of(_capture(), scope) == "203.0.113.7"


# -- on the wire -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def city_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_city_db(tmp_path_factory.mktemp("geo") / "city.mmdb")


def _start(dsn: str, tmp: Path, city_db: Path, **env: str) -> Server:
    return Server(dsn, tmp, env={"TRACKER_GEOIP_DB": str(city_db), **env}).start()


@pytest.fixture(scope="module")
def trusting_server(module_dsn: str, city_db: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = _start(module_dsn, tmp_path_factory.mktemp("trusting"), city_db)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def distrusting_server(module_dsn: str, city_db: Path,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = _start(module_dsn, tmp_path_factory.mktemp("distrusting"), city_db,
                 TRACKER_TRUSTED_PROXIES="10.255.255.0/24")
    yield srv
    srv.stop()


def _raw_get(server: Server, path: str, headers: list[tuple[str, str]]) -> bytes:
    """A GET over a plain socket, so the same header can be sent more than once."""
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.split(b"\r\n", 1)[0]


def _open_from(server: Server, dsn: str, headers: list[tuple[str, str]],
               ip: str = "full") -> dict[str, Any]:
    """One open in a campaign that keeps the address (whole by default) and the city;
    the open's stored row."""
    with server.client(new_account(dsn, "forwarded")) as api:
        message = register(api, campaign(api, {"location": "city", "ip": ip}))
    status = _raw_get(server, str(message["pixel_url"]).removeprefix(server.url), headers)
    assert status.startswith(b"HTTP/1.1 200"), status

    def stored() -> dict[str, Any]:
        rows = db_fetch(dsn, "select ip, country, region, city from events_decoded"
                             " where message_id = $1", int(message["id"]))
        assert len(rows) <= 1
        ip = rows[0]["ip"] if rows else None
        return {**dict(rows[0]), "ip": None if ip is None else str(ip)} if rows else {}

    return wait_for(stored, message="the open's row")


def test_default_server_believes_forwarded_for_from_loopback(
        trusting_server: Server, module_dsn: str) -> None:
    row = _open_from(trusting_server, module_dsn, [("X-Forwarded-For", CLIENT)])
    assert row == {"ip": CLIENT, "country": "DE", "region": "Hesse", "city": "Frankfurt am Main"}


def test_server_not_trusting_loopback_ignores_forwarded_for_and_keeps_the_peer(
        distrusting_server: Server, module_dsn: str) -> None:
    row = _open_from(distrusting_server, module_dsn, [("X-Forwarded-For", CLIENT)])
    assert row == {"ip": LOOPBACK, "country": None, "region": None, "city": None}


def test_server_uses_right_most_of_several_forwarded_headers(
        trusting_server: Server, module_dsn: str) -> None:
    row = _open_from(trusting_server, module_dsn,
                     [("X-Forwarded-For", SPOOFED), ("X-Forwarded-For", CLIENT)])
    assert row["ip"] == CLIENT and row["country"] == "DE"


def test_server_stores_no_address_for_a_malformed_forwarded_for(
        trusting_server: Server, module_dsn: str) -> None:
    row = _open_from(trusting_server, module_dsn, [("X-Forwarded-For", f"{CLIENT}, garbage")])
    assert row == {"ip": None, "country": None, "region": None, "city": None}
    row = _open_from(trusting_server, module_dsn, [("X-Forwarded-For", "x" * 3000)])
    assert row == {"ip": None, "country": None, "region": None, "city": None}


def test_server_reads_a_forwarded_for_only_up_to_the_address_its_proxy_appended(
        trusting_server: Server, module_dsn: str) -> None:
    row = _open_from(trusting_server, module_dsn, [("X-Forwarded-For", f"garbage, {CLIENT}")])
    assert row == {"ip": CLIENT, "country": "DE", "region": "Hesse", "city": "Frankfurt am Main"}


def test_failed_sign_ins_of_clients_behind_a_broken_forwarded_for_are_throttled(
        trusting_server: Server) -> None:
    # Unknown clients share one bucket; they were the loopback proxy, never throttled.
    with trusting_server.client("not-a-key") as api:
        statuses = [api.get("/api/campaigns", headers={"x-forwarded-for": "garbage"}).status_code
                    for _ in range(BURST + 1)]
        other = api.get("/api/campaigns", headers={"x-forwarded-for": CLIENT}).status_code
    assert statuses == [401] * BURST + [429]
    assert other == 401


def test_server_locates_a_forwarded_ipv6_client(
        trusting_server: Server, module_dsn: str) -> None:
    row = _open_from(trusting_server, module_dsn, [("X-Forwarded-For", "[2001:db8:1::1]:443")])
    assert row == {"ip": "2001:db8:1::1", "country": "FR", "region": "Île-de-France",
                   "city": "Paris"}



def test_server_locates_and_truncates_an_ipv4_mapped_client_as_ipv4(
        trusting_server: Server, module_dsn: str) -> None:
    row = _open_from(trusting_server, module_dsn, [("X-Forwarded-For", "::ffff:81.2.69.142")],
                     ip="truncated")
    assert row == {"ip": "81.2.69.0/24", "country": "DE", "region": "Hesse",
                   "city": "Frankfurt am Main"}


@pytest.mark.slow
def test_server_on_an_ipv4_mapped_loopback_address_believes_its_loopback_proxy(
        module_dsn: str, city_db: Path, tmp_path: Path) -> None:
    # Bound to ::ffff:127.0.0.1, the server sees the loopback proxy as ::ffff:127.0.0.1,
    # as it does every IPv4 peer when it listens on "::" (which would leave loopback).
    # Two workers: their sockets are tracker's own (server.py), which can bind such an
    # address; asyncio's, which uvicorn opens for a single worker, are IPv6-only.
    server = _start(module_dsn, tmp_path, city_db, TRACKER_HOST="::ffff:127.0.0.1",
                    TRACKER_WORKERS="2")
    try:
        row = _open_from(server, module_dsn, [("X-Forwarded-For", CLIENT)])
    finally:
        server.stop()
    assert row["ip"] == CLIENT and row["country"] == "DE"
