"""IP addresses from text, parsed by the C library rather than `ipaddress`, and the
client's address from the peer and X-Forwarded-For (`ClientAddress`).

Every reader opens and clicks from an address of their own, so the hit path's caches
keyed by address (trusted proxy, stored form, Apple's ranges) miss on much real
traffic. On a miss, `socket.inet_pton` and `inet_ntop` parse an address in an eighth of
what `ipaddress.ip_address` costs, once for all three steps. They
accept the same strings (`tests/test_addresses.py` checks them against `ipaddress`),
and the text is the same canonical form `ipaddress` writes.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Address, IPv6Network

from tracker.ingest.recent import Recent

_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_ZEROS_10 = bytes(10)
_ZEROS_12 = bytes(12)
_TRANSLATED_PREFIX = bytes(8) + b"\xff\xff\x00\x00"  # ::ffff:0:0/96 (SIIT, RFC 2765)
_6TO4_PREFIX = b"\x20\x02"  # 2002::/16 (RFC 3056): the IPv4 in bits 16-47
_TEREDO_PREFIX = b"\x20\x01\x00\x00"  # 2001::/32 (RFC 4380): the client's IPv4, inverted,
# in the last 32 bits (bits 32-63 are the Teredo server's, not the client's)
_NAT64_PREFIX = b"\x00\x64\xff\x9b" + bytes(8)  # 64:ff9b::/96 (RFC 6052)
_NAT64_LOCAL_PREFIX = b"\x00\x64\xff\x9b\x00\x01"  # 64:ff9b:1::/48 (RFC 8215)
_NOT_COMPATIBLE = (bytes(4), b"\x00\x00\x00\x01")  # "::" and "::1" are no IPv4-compatible


def packed(text: str) -> bytes | None:
    """The address's 4 (IPv4) or 16 (IPv6) bytes; an IPv4-mapped IPv6 address gives its
    IPv4 (what a dual-stack listener reports for IPv4 peers). None if the text is not an
    address; a zone id ("fe80::1%eth0") is free text a client never sends, so it is not."""
    try:
        if ":" not in text:
            return socket.inet_pton(socket.AF_INET, text)
        raw = socket.inet_pton(socket.AF_INET6, text)
    except (OSError, ValueError):  # ValueError: NUL or not encodable
        return None
    return raw[12:] if raw.startswith(_MAPPED_PREFIX) else raw


def text_of(raw: bytes) -> str:
    """The canonical text of packed address bytes, as `ipaddress` writes it."""
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if raw.startswith(_ZEROS_10):
        # The C library writes an IPv4 tail here ("::1.2.3.4"); ipaddress does not.
        return str(IPv6Address(raw))
    return socket.inet_ntop(socket.AF_INET6, raw)


def canonical(text: str) -> str | None:
    """The address in canonical text (IPv4-mapped as IPv4), or None if not an address."""
    raw = packed(text)
    return None if raw is None else text_of(raw)


def embedded_ipv4(raw: bytes) -> bytes | None:
    """The client's IPv4 address inside an IPv6 address that carries one, else None.

    Transition mechanisms write the IPv4 address of the host into the IPv6 one: 6to4,
    Teredo (inverted), NAT64 and SIIT translators (an IPv4 client seen by an IPv6-only
    server through one), IPv4-mapped, -translated and -compatible addresses. For such an
    address the /48 keeps the whole IPv4 address (6to4) or the rest says where the host
    is; the IPv4 address is what truncation and location must work on. In the local-use
    NAT64 prefix the IPv4 address is taken from the last 32 bits, where a /96 translator
    prefix (the usual one) puts it."""
    if len(raw) != 16:
        return None
    if raw.startswith(_6TO4_PREFIX):
        return raw[2:6]
    if raw.startswith(_TEREDO_PREFIX):
        return bytes(b ^ 0xFF for b in raw[12:])
    if raw.startswith((_NAT64_PREFIX, _NAT64_LOCAL_PREFIX, _MAPPED_PREFIX,
                       _TRANSLATED_PREFIX)):
        return raw[12:]
    if raw.startswith(_ZEROS_12) and raw[12:] not in _NOT_COMPATIBLE:
        return raw[12:]  # IPv4-compatible (deprecated, RFC 4291): ::a.b.c.d
    return None


def truncated(raw: bytes) -> str:
    """The network an address is kept as under `ip: "truncated"`: /24 (IPv4) or /48 (IPv6);
    an IPv6 address that carries an IPv4 one (`embedded_ipv4`) is kept as that IPv4
    address's /24, never as a /48 that would hold all of it."""
    if len(raw) == 16:
        raw = embedded_ipv4(raw) or raw
    if len(raw) == 4:
        return text_of(raw[:3] + b"\0") + "/24"
    return text_of(raw[:6] + bytes(10)) + "/48"


def locatable(text: str) -> str:
    """The address to look up a place for: the IPv4 address an IPv6 one carries (a geo
    database may not know the IPv6 form, or, for Teredo, would give the relay's place),
    else the address as given."""
    if ":" not in text:
        return text
    raw = packed(text)  # IPv4-mapped comes back as the IPv4 address's 4 bytes
    inner = (raw if len(raw) == 4 else embedded_ipv4(raw)) if raw is not None else None
    return text if inner is None else text_of(inner)


class Networks:
    """A few IP networks (trusted proxies), tested against packed addresses with integer
    masks."""

    def __init__(self, networks: Iterable[IPv4Network | IPv6Network]) -> None:
        self._masks: dict[int, list[tuple[int, int]]] = {4: [], 16: []}
        for net in networks:
            size = 4 if net.version == 4 else 16
            self._masks[size].append((int(net.network_address), int(net.netmask)))

    def __contains__(self, raw: bytes) -> bool:
        value = int.from_bytes(raw)
        return any(value & mask == network for network, mask in self._masks.get(len(raw), ()))


_MAX_FORWARDED_CHARS = 2048
_KEPT_ADDRESSES = 16384
_KEPT_FORWARDED_BYTES = 128  # a client and a few proxies


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

    def __init__(self, trusted: Iterable[IPv4Network | IPv6Network]) -> None:
        self._trusted = Networks(trusted)
        # Bounded: junk headers and countless addresses must not grow memory.
        self._known: Recent[str, tuple[str | None, bool]] = Recent(_KEPT_ADDRESSES)
        # X-Forwarded-For as a trusted proxy sent it -> the client (every hit behind a
        # proxy has one: decoding, splitting and parsing it cost ~1 µs).
        self._forwarded: Recent[bytes, str] = Recent(_KEPT_ADDRESSES)

    def _lookup(self, text: str) -> tuple[str | None, bool]:
        """(canonical address or None if not one, whether it is a trusted proxy); cached."""
        known = self._known.get(text)
        if known is None:
            raw = packed(text)
            known = (None, False) if raw is None else (text_of(raw), raw in self._trusted)
            self._known.put(text, known)
        return known

    def is_trusted(self, address: str) -> bool:
        return self._lookup(address)[1]

    def resolve(self, peer: str | None, forwarded: bytes | None) -> str | None:
        if peer is None:
            return None
        client, trusted = self._lookup(peer)
        if forwarded is None or not trusted:
            return client
        found = self._forwarded.get(forwarded)
        if found is None:
            found = self._from_forwarded(forwarded)
            if found is not None and len(forwarded) <= _KEPT_FORWARDED_BYTES:
                self._forwarded.put(forwarded, found)
        return found

    def _from_forwarded(self, forwarded: bytes) -> str | None:
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
