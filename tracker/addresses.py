"""IP addresses from text, parsed by the C library rather than `ipaddress`.

Every reader opens and clicks from an address of their own, so the hit path's caches
keyed by address (trusted proxy, stored form, Apple's ranges) miss on much real
traffic. On a miss, `ipaddress.ip_address` costs ~6 µs here, and each of those three
steps used to parse again; `socket.inet_pton` and `inet_ntop` do it in ~0.7 µs. They
accept the same strings (`tests/test_addresses.py` checks them against `ipaddress`),
and the text is the same canonical form `ipaddress` writes.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Address, IPv6Network

_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_ZEROS_10 = bytes(10)


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


def truncated(raw: bytes) -> str:
    """The network an address is kept as under `ip: "truncated"`: /24 (IPv4) or /48 (IPv6)."""
    if len(raw) == 4:
        return text_of(raw[:3] + b"\0") + "/24"
    return text_of(raw[:6] + bytes(10)) + "/48"


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
