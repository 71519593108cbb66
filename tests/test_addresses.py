"""tracker.addresses parses with the C library; it must agree with `ipaddress` exactly."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracker.ingest.addresses import (
    Networks,
    canonical,
    embedded_ipv4,
    locatable,
    packed,
    text_of,
    truncated,
)


def reference(text: str) -> str | None:
    """What tracker did with `ipaddress`: canonical text, IPv4-mapped as IPv4, no zones."""
    if "%" in text:
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


EDGES = [
    "0.0.0.0", "255.255.255.255", "81.2.69.142", "01.2.3.4", "1.2.3.04", "1.2.3", "256.1.1.1",
    "1.2.3.4.5", " 1.2.3.4", "1.2.3.4 ", "0x1.2.3.4", "134744072", "1.2.3.4\x00", "١.2.3.4",
    "1.2.3.4/24", "", ":", "::", "::1", "1::", "::ffff:1.2.3.4", "::FFFF:102:304", "::1.2.3.4",
    "::0.0.0.1", "::ffff:0.0.0.0", "::ffff:0:1.2.3.4", "1:2:3:4:5:6:1.2.3.4", "2001:DB8::1",
    "2001:db8:0:0:1:0:0:1", "1:0:0:0:0:0:0:0", "0:0:0:0:0:1:0:0", "1:2:3:4:5:6:7::",
    "::2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8:9", "1::2::3", "00001::", "fe80::1%eth0", "[::1]",
    "::ffff:01.2.3.4", "2001:db8::1\n",
]


@pytest.mark.parametrize("text", EDGES)
def test_canonical_agrees_with_ipaddress_on_edge_cases(text: str) -> None:
    assert canonical(text) == reference(text)


@given(st.ip_addresses())
def test_canonical_agrees_with_ipaddress_on_any_address(ip: ipaddress._BaseAddress) -> None:
    for text in (str(ip), ip.exploded, str(ip).upper()):
        assert canonical(text) == reference(text)


@given(st.ip_addresses(v=6).map(lambda ip: ipaddress.IPv6Address(int(ip) & ((1 << 48) - 1))))
def test_addresses_with_leading_zero_groups_agree(ip: ipaddress.IPv6Address) -> None:
    # Where the C library would write an IPv4 tail ("::1.2.3.4") and ipaddress does not.
    assert canonical(str(ip)) == reference(str(ip))


def reference_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries, by `ipaddress` and the prefixes' RFCs."""
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # (server, client): the client
    low = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    for prefix in ("64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0/96", "::ffff:0:0:0/96"):
        if ip in ipaddress.ip_network(prefix):
            return low
    if ip in ipaddress.ip_network("::/96") and int(ip) > 1:
        return low  # IPv4-compatible
    return None


@given(st.ip_addresses() | st.ip_addresses(v=6).map(lambda ip: ipaddress.IPv6Address(
    (int(ip) & ((1 << 112) - 1)) | (0x2002 << 112))))
def test_truncated_is_the_24_or_48_network(ip: ipaddress._BaseAddress) -> None:
    raw = packed(str(ip))
    assert raw is not None
    address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(text_of(raw))
    if isinstance(address, ipaddress.IPv6Address):
        address = reference_ipv4(address) or address
    prefix = 24 if address.version == 4 else 48
    assert truncated(raw) == str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


# 175.16.199.1 written into each IPv6 form that carries an IPv4 address.
CARRIERS = {
    "6to4": "2002:af10:c701::1",
    "6to4, other host bits": "2002:af10:c701:1234:5678:9abc:def0:1",
    "Teredo (server 65.54.227.120, client port 40000)": "2001:0:4136:e378:8000:63bf:50ef:38fe",
    "NAT64": "64:ff9b::af10:c701",
    "NAT64, dotted": "64:ff9b::175.16.199.1",
    "local-use NAT64": "64:ff9b:1:abcd:ef01:2345:af10:c701",
    "IPv4-mapped": "::ffff:175.16.199.1",
    "IPv4-translated": "::ffff:0:175.16.199.1",
    "IPv4-compatible": "::175.16.199.1",
}


@pytest.mark.parametrize("text", CARRIERS.values(), ids=CARRIERS.keys())
def test_an_ipv6_address_carrying_an_ipv4_one_is_truncated_to_that_ipv4_network(
        text: str) -> None:
    raw = packed(text)
    assert raw is not None
    assert (embedded_ipv4(raw) or raw) == bytes([175, 16, 199, 1])  # mapped: packed as IPv4
    assert truncated(raw) == "175.16.199.0/24"
    assert locatable(text) == "175.16.199.1"


@pytest.mark.parametrize("text", ["::", "::1", "2001:db8::1", "2003:af10:c701::1",
                                  "64:ff9b:2::af10:c701", "2001:1::af10:c701"])
def test_other_ipv6_addresses_keep_their_48(text: str) -> None:
    raw = packed(text)
    assert raw is not None and embedded_ipv4(raw) is None
    assert truncated(raw).endswith("/48") and locatable(text) == text


def test_networks_contain_only_their_own_version() -> None:
    networks = Networks([ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"),
                         ipaddress.ip_network("127.0.0.1/32")])
    inside = ["10.255.0.1", "::ffff:10.1.2.3", "2001:db8:ffff::1", "127.0.0.1"]
    outside = ["11.0.0.1", "127.0.0.2", "2001:db9::1", "::a00:1"]  # ::a00:1 is not 10.0.0.1
    for text in inside + outside:
        raw = packed(text)
        assert raw is not None
        assert (raw in networks) == (text in inside), text
