"""What each campaign policy lets reach PostgreSQL: exactly the allowed fields, nothing else.

Every test registers a message in a campaign of its own, fetches the pixel and the
link through a real server (the client address set with X-Forwarded-For, which the
server believes from loopback by default), then reads the events rows back. Each
test uses a client address and a user agent of its own, so a scan of the whole
database for them can only find what that test's hits left there.
"""

from __future__ import annotations

import ipaddress
import itertools
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tracker.store.embedded_db import POSTGRES_BIN_PATH

from .geodb import EXPECTED_CITY, build_test_city_db
from .support import Server, campaign, db_fetch, new_account, register, wait_for

DESTINATION = "https://example.com/landing?utm_source=mail&x=1"
# Both in networks of the test City database (81.2.69.0/24 and 2001:db8:1::/48).
PLACE = {4: EXPECTED_CITY["81.2.69.142"], 6: EXPECTED_CITY["2001:db8:1::1"]}
assert PLACE[4] == ("DE", "Hesse", "Frankfurt am Main")
assert PLACE[6] == ("FR", "Île-de-France", "Paris")
# What ua-parser makes of `_user_agent()`.
DEVICE = ("Chrome", "Windows", "desktop")
NO_DEVICE = (None, None, None)
IMAGE_PROXY_UA = ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 "
                  "(via ggpht.com GoogleImageProxy)")
_LOCATION_FIELDS = {"none": 0, "country": 1, "region": 2, "city": 3}

# Three-digit last octets and four-digit last hextets without zero groups: no address
# used here is a substring of another, and Python and PostgreSQL print them alike.
_hosts = itertools.count(101)


def _address(family: int) -> str:
    host = next(_hosts)
    assert host < 255
    return f"81.2.69.{host}" if family == 4 else f"2001:db8:1:7:aaaa:bbbb:cccc:{host + 4096:x}"


def _truncated(family: int) -> str:
    return "81.2.69.0/24" if family == 4 else "2001:db8:1::/48"


def _user_agent(marker: str) -> str:
    return (f"Mozilla/5.0 (Windows NT 10.0; Win64; x64; {marker}) AppleWebKit/537.36 "
            "(KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36")


def _place(location: str, family: int) -> tuple[str | None, ...]:
    place = PLACE[family]
    assert place is not None
    kept = _LOCATION_FIELDS[location]
    return tuple(value if i < kept else None for i, value in enumerate(place))


@dataclass
class Recorded:
    campaign_id: str
    message_id: int
    address: str
    user_agent: str
    marker: str
    recipient: str
    rows: list[dict[str, Any]]


@pytest.fixture(scope="module")
def city_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_city_db(tmp_path_factory.mktemp("geo") / "city.mmdb")


@pytest.fixture(scope="module")
def geo_server(module_dsn: str, city_db: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(module_dsn, tmp_path_factory.mktemp("server"),
                 env={"TRACKER_GEOIP_DB": str(city_db)}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(geo_server: Server, module_dsn: str) -> Iterator[httpx.Client]:
    with geo_server.client(new_account(module_dsn, "policy")) as client:
        yield client


def events(dsn: str, message_id: int) -> list[dict[str, Any]]:
    rows = db_fetch(dsn, "select type, country, region, city, browser, os, device, ip, machine,"
                         " reason, url_id from events_decoded where message_id = $1 order by type",
                    message_id)
    return [{**dict(row), "ip": None if row["ip"] is None else str(row["ip"])} for row in rows]


def wait_for_events(dsn: str, message_id: int, count: int) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]]:
        rows = events(dsn, message_id)
        assert len(rows) <= count, rows
        return rows if len(rows) == count else []

    return wait_for(enough, message=f"{count} events of message {message_id}")


def fetch(url: str, user_agent: str, address: str) -> httpx.Response:
    return httpx.get(url, headers={"user-agent": user_agent, "x-forwarded-for": address},
                     follow_redirects=False, timeout=10)


def record(api: httpx.Client, dsn: str, policy: dict[str, Any], family: int = 4) -> Recorded:
    """A campaign with `policy`, one message, one open and one click from a fresh address."""
    marker = f"probe-{uuid.uuid4().hex[:12]}"
    recipient = f"reader-{uuid.uuid4().hex[:12]}@example.com"
    address, user_agent = _address(family), _user_agent(marker)
    campaign_id = campaign(api, policy)
    message = register(api, campaign_id, [DESTINATION], recipient=recipient)
    pixel = fetch(message["pixel_url"], user_agent, address)
    assert pixel.status_code == 200
    click = fetch(message["links"][0]["tracked_url"], user_agent, address)
    assert click.status_code == 302 and click.headers["location"] == DESTINATION
    message_id = int(message["id"])
    rows = wait_for_events(dsn, message_id, 2)
    assert [row["type"] for row in rows] == ["click", "open"]
    return Recorded(campaign_id, message_id, address, user_agent, marker, recipient, rows)


def place_of(row: dict[str, Any]) -> tuple[str | None, ...]:
    return row["country"], row["region"], row["city"]


def device_of(row: dict[str, Any]) -> tuple[str | None, ...]:
    return row["browser"], row["os"], row["device"]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("location", ["none", "country", "region", "city"])
def test_location_policy_stores_only_the_allowed_place_fields(
        api: httpx.Client, module_dsn: str, location: str, family: int) -> None:
    recorded = record(api, module_dsn, {"location": location}, family)
    for row in recorded.rows:
        assert place_of(row) == _place(location, family), row
        # The other policy fields keep their defaults: device on, no address.
        assert device_of(row) == DEVICE and row["ip"] is None, row
        assert row["machine"] is False, row


@pytest.mark.parametrize("device", [True, False])
def test_device_policy_stores_browser_os_and_device_only_when_true(
        api: httpx.Client, module_dsn: str, device: bool) -> None:
    recorded = record(api, module_dsn, {"device": device, "location": "city"})
    for row in recorded.rows:
        assert device_of(row) == (DEVICE if device else NO_DEVICE), row
        assert place_of(row) == PLACE[4], row


@pytest.mark.parametrize(("ip", "family"), [
    ("none", 4), ("none", 6), ("truncated", 4), ("truncated", 6), ("full", 4), ("full", 6)])
@pytest.mark.slow
def test_ip_policy_stores_no_address_a_truncated_network_or_the_address(
        api: httpx.Client, module_dsn: str, ip: str, family: int) -> None:
    recorded = record(api, module_dsn, {"ip": ip}, family)
    expected = {"none": None, "truncated": _truncated(family), "full": recorded.address}[ip]
    for row in recorded.rows:
        assert row["ip"] == expected, row


def test_truncated_ip_is_stored_as_a_network_with_its_prefix_length(
        api: httpx.Client, module_dsn: str) -> None:
    recorded = record(api, module_dsn, {"ip": "truncated"})
    rows = db_fetch(module_dsn, "select host(ip) as host, masklen(ip) as bits from events"
                                " where message_id = $1", recorded.message_id)
    assert [(r["host"], r["bits"]) for r in rows] == [("81.2.69.0", 24)] * 2


# 81.2.69.142 (Frankfurt in the test database) written into IPv6 forms that carry it.
_CARRYING_81_2_69_142 = {"6to4": "2002:5102:458e::1",
                         "Teredo": "2001:0:4136:e378:8000:63bf:aefd:ba71",
                         "NAT64": "64:ff9b::5102:458e"}


@pytest.mark.parametrize("form", _CARRYING_81_2_69_142)
def test_an_ipv6_client_carrying_an_ipv4_address_is_truncated_and_located_by_it(
        api: httpx.Client, module_dsn: str, form: str) -> None:
    """A /48 of 2002:5102:458e::1 would be 2002:5102:458e::/48, the whole of 81.2.69.142:
    truncation and location work on the IPv4 address the IPv6 one carries."""
    cid = campaign(api, {"ip": "truncated", "location": "city"})
    message = register(api, cid, [DESTINATION], recipient=f"{form}@example.com")
    address = _CARRYING_81_2_69_142[form]
    assert fetch(message["pixel_url"], _user_agent(form), address).status_code == 200
    (row,) = wait_for_events(module_dsn, int(message["id"]), 1)
    assert row["ip"] == "81.2.69.0/24", row
    assert place_of(row) == PLACE[4], row


def _dump(dsn: str) -> bytes:
    """Every row of every table of the database, as pg_dump writes it."""
    done = subprocess.run([str(POSTGRES_BIN_PATH / "pg_dump"), "--data-only", "--no-owner",
                           "--dbname", dsn], capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def _files(root: Path) -> Iterator[tuple[Path, bytes]]:
    for path in sorted(root.rglob("*")) if root.is_dir() else ():
        if path.is_file():
            yield path, path.read_bytes()


def _address_forms(address: str) -> list[str]:
    ip = ipaddress.ip_address(address)
    return sorted({address, str(ip), ip.exploded})


@pytest.mark.parametrize(("policy", "family"), [
    ({"location": "none", "device": False, "ip": "none"}, 4),
    ({"location": "none", "device": False, "ip": "none"}, 6),
    ({"location": "city", "device": True, "ip": "none"}, 4),
    ({"location": "city", "device": True, "ip": "truncated"}, 4),
    ({"location": "city", "device": True, "ip": "truncated"}, 6),
    ({"location": "region", "device": False, "ip": "full"}, 4),
    ({"location": "region", "device": False, "ip": "full"}, 6),
])
@pytest.mark.slow
def test_raw_user_agent_and_forbidden_address_are_in_no_table_file_or_log(
        api: httpx.Client, geo_server: Server, module_dsn: str, policy: dict[str, Any],
        family: int) -> None:
    recorded = record(api, module_dsn, policy, family)
    dump = _dump(module_dsn)
    # The scan sees what was stored: the recipient is there, and so is the address
    # when the policy keeps it whole.
    assert recorded.recipient.encode() in dump
    for needle in (recorded.user_agent, recorded.marker):
        assert needle.encode() not in dump, f"the raw user agent was stored: {needle}"
    forms = _address_forms(recorded.address)
    if policy["ip"] == "full":
        assert recorded.address.encode() in dump
    else:
        for form in forms:
            assert form.encode() not in dump, f"the client address was stored: {form}"

    forbidden = [recorded.marker] + ([] if policy["ip"] == "full" else forms)
    data_dir = geo_server.log_path.parent / "data"
    for path, content in [(geo_server.log_path, geo_server.log_path.read_bytes()),
                          *_files(data_dir)]:
        for needle in forbidden:
            assert needle.encode() not in content, f"{needle} written to {path}"


POLICIES_SHOWN = [
    {"location": "none", "device": False},
    {"location": "country", "device": True},
    {"location": "region", "device": False},
    {"location": "city", "device": True},
]


@pytest.mark.parametrize("policy", POLICIES_SHOWN, ids=lambda p: f"{p['location']}-{p['device']}")
def test_message_activity_shows_null_for_fields_the_policy_did_not_allow(
        api: httpx.Client, module_dsn: str, policy: dict[str, Any]) -> None:
    recorded = record(api, module_dsn, policy)
    response = api.get(f"/api/messages/{recorded.message_id}")
    assert response.status_code == 200, response.text
    shown = sorted(response.json()["events"], key=lambda e: str(e["type"]))
    assert [e["type"] for e in shown] == ["click", "open"]
    assert [e["url"] for e in shown] == [DESTINATION, None]
    for event in shown:
        assert place_of(event) == _place(policy["location"], 4), event
        assert device_of(event) == (DEVICE if policy["device"] else NO_DEVICE), event
        assert event["machine"] is False
        assert "ip" not in event and "user_agent" not in event


@pytest.mark.parametrize("policy", POLICIES_SHOWN, ids=lambda p: f"{p['location']}-{p['device']}")
@pytest.mark.slow
def test_report_breakdown_counts_disallowed_fields_as_unknown(
        api: httpx.Client, module_dsn: str, policy: dict[str, Any]) -> None:
    recorded = record(api, module_dsn, policy)
    response = api.get(f"/api/campaigns/{recorded.campaign_id}/report")
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["opens"]["total"] == 1 and report["clicks"]["total"] == 1
    country, region, _ = _place(policy["location"], 4)
    browser, os_name, device = DEVICE if policy["device"] else NO_DEVICE
    expected = {"country": country, "region": region, "browser": browser, "os": os_name,
                "device": device}
    for kind in ("opens", "clicks"):
        # A browser opening the pixel is webmail; a click says nothing of the mail client.
        expected["client"] = "webmail" if policy["device"] and kind == "opens" else None
        assert report["breakdown"][kind] == {
            dim: {value or "unknown": 1} for dim, value in expected.items()}, kind


def test_deleted_campaign_still_redirects_but_records_nothing(
        api: httpx.Client, module_dsn: str) -> None:
    gone = campaign(api, {"location": "city", "ip": "full"}, name="deleted")
    message = register(api, gone, [DESTINATION])
    assert api.delete(f"/api/campaigns/{gone}").status_code == 204
    user_agent, address = _user_agent("deleted-campaign"), _address(4)

    click = fetch(message["links"][0]["tracked_url"], user_agent, address)
    assert click.status_code == 302 and click.headers["location"] == DESTINATION
    pixel = fetch(message["pixel_url"], user_agent, address)
    assert pixel.status_code == 200 and pixel.headers["content-type"] == "image/gif"

    # One worker, one ordered buffer: once a later hit is in the table, the hits on the
    # deleted campaign would be too, had they been recorded.
    later = record(api, module_dsn, {})
    assert later.rows
    assert events(module_dsn, int(message["id"])) == []
    assert db_fetch(module_dsn, "select 1 from events where campaign_id = $1", int(gone)) == []


def test_image_proxy_open_has_no_location_even_with_city_policy(
        api: httpx.Client, module_dsn: str) -> None:
    campaign_id = campaign(api, {"location": "city", "device": True}, name="proxied")
    message = register(api, campaign_id, [DESTINATION])
    address = _address(4)
    assert fetch(message["pixel_url"], IMAGE_PROXY_UA, address).status_code == 200
    # The same address without the proxy is located: the database does know it.
    assert fetch(message["pixel_url"], _user_agent("direct"), address).status_code == 200
    message_id = int(message["id"])
    rows = wait_for_events(module_dsn, message_id, 2)
    proxied = [r for r in rows if r["browser"] != "Chrome"]
    direct = [r for r in rows if r["browser"] == "Chrome"]
    assert len(proxied) == 1 and len(direct) == 1, rows
    assert place_of(proxied[0]) == (None, None, None)
    assert proxied[0]["machine"] is False
    assert place_of(direct[0]) == PLACE[4]

    shown = api.get(f"/api/messages/{message_id}").json()["events"]
    assert sorted((e["country"] or "") for e in shown) == ["", "DE"]
    report = api.get(f"/api/campaigns/{campaign_id}/report").json()
    assert report["opens"]["total"] == 2 and report["opens"]["machine"] == 0
    assert report["breakdown"]["opens"]["country"] == {"DE": 1, "unknown": 1}
