"""The audit: after a mixed workload, nothing beyond what the policies allow is anywhere.

It runs with one worker and with two: a privacy change (the opt-out, the erasure) must
hold in every worker from the moment the API answers.

A real server (durable journal, debug logging, a City database) takes opens and clicks
from known addresses (set with X-Forwarded-For, which it believes from loopback) and
known user agents, for campaigns with four different policies, for an erased
recipient, an opted-out one and a reader sending Sec-GPC; every message is registered
with an HTML body. Then PostgreSQL refuses connections, so a second round of hits can
only go to the journal, and the server is stopped with it there. Then:

- `pg_dump` of the whole database, every journal file in the data dir and the server's
  log hold no raw user agent (nor its marker), no email body, no address the policy did
  not keep (a truncated one only in its truncated form), no place or device field the
  policy did not allow, no pseudonymous recipient's address, and nothing at all of the
  erased, opted-out and GPC hits;
- the rows hold exactly the allowed fields, campaign by campaign.

This test is the proof behind the promises in docs/privacy.md.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tracker.store.embedded_db import POSTGRES_BIN_PATH

from .geodb import build_test_city_db
from .support import Server, campaign, connected, db_fetch, new_account, register, wait_for

RUN = uuid.uuid4().hex[:10]
LINK = "https://example.com/audit?utm_campaign=audit"
BODY = f"confidential-body-{RUN}"
UNSUBSCRIBE = "https://example.com/unsubscribe?email="


def _html(recipient: str) -> str:
    """Every message's body: the same text, and a link that names its recipient (URL-encoded)."""
    return (f"<html><body><p>Dear reader, {BODY}: your statement is attached.</p>"
            f'<a href="{LINK}">Read more</a> '
            f'<a href="{UNSUBSCRIBE}{quote(recipient, safe="")}">Unsubscribe</a></body></html>')


def _chrome(marker: str) -> str:
    return (f"Mozilla/5.0 (Windows NT 10.0; Win64; x64; {marker}) AppleWebKit/537.36 "
            "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36")


def _iphone(marker: str) -> str:
    return (f"Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X; {marker}) "
            "AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1")


def _firefox(marker: str) -> str:
    return f"Mozilla/5.0 (X11; Linux x86_64; rv:126.0; {marker}) Gecko/20100101 Firefox/126.0"


@dataclass(frozen=True)
class Client:
    address: str
    user_agent: str
    marker: str


def _client(address: str, make_agent: Any, name: str) -> Client:
    marker = f"ua-{name}-{RUN}"
    return Client(address, make_agent(marker), marker)


# Each campaign's hits come from a place of its own in the test City database, so a
# place field one policy forbids cannot be in the dump because another allowed it.
POLICIES: dict[str, dict[str, Any]] = {
    "strict": {"location": "none", "device": False, "ip": "none", "recipient": "pseudonym"},
    "country": {"location": "country", "device": True, "ip": "truncated"},
    "city": {"location": "city", "device": True, "ip": "full"},
    "region": {"location": "region", "device": False, "ip": "none"},
}
CLIENTS = {
    "strict": _client("89.160.20.113", _iphone, "strict"),  # SE, Östergötland, Linköping
    "country": _client("2.125.160.216", _chrome, "country"),  # GB, England, Boxford
    "country6": _client("2001:db8:1:9::1234", _chrome, "country6"),  # FR, Île-de-France, Paris
    "city": _client("81.2.69.160", _chrome, "city"),  # DE, Hesse, Frankfurt am Main
    "region": _client("2001:db8:1:7::abcd", _firefox, "region"),  # FR, Île-de-France, Paris
}
# What each campaign's rows must hold: (country, region, city, browser, os, device, ip).
EXPECTED = {
    "strict": {(None, None, None, None, None, None, None)},
    "country": {("GB", None, None, "Chrome", "Windows", "desktop", "2.125.160.0/24"),
                ("FR", None, None, "Chrome", "Windows", "desktop", "2001:db8:1::/48")},
    "city": {("DE", "Hesse", "Frankfurt am Main", "Chrome", "Windows", "desktop",
              "81.2.69.160")},
    "region": {("FR", "Île-de-France", None, None, None, None, None)},
}
# Values a policy forbade that no other campaign may store either.
FORBIDDEN_VALUES = ["Linköping", "Östergötland", "England", "Boxford", "Paris", "Firefox",
                    "Mobile Safari", "Linux"]
# Hits that must leave nothing anywhere: erased, opted out, Sec-GPC.
ERASED = _client("81.2.69.161", _chrome, "erased")
OPTED_OUT = _client("81.2.69.162", _chrome, "optout")
SIGNALLING = _client("81.2.69.163", _chrome, "gpc")
# The journal round, while PostgreSQL refuses connections.
JOURNALED = {"country": _client("2.125.160.217", _chrome, "journal-country"),
             "city": _client("81.2.69.164", _chrome, "journal-city"),
             "strict": _client("89.160.20.114", _iphone, "journal-strict")}


def _forms(address: str) -> set[str]:
    ip = ipaddress.ip_address(address)
    return {address, str(ip), ip.exploded}


def _hit(url: str, client: Client, **headers: str) -> None:
    response = httpx.get(url, headers={"user-agent": client.user_agent,
                                       "x-forwarded-for": client.address, **headers},
                         timeout=30, follow_redirects=False)
    assert response.status_code in (200, 302), response.status_code


def _read_all(message: dict[str, Any], client: Client, **headers: str) -> None:
    _hit(message["pixel_url"], client, **headers)
    for link in message["links"]:
        _hit(link["tracked_url"], client, **headers)


async def _allow_connections(admin_dsn: str, name: str, allowed: bool) -> None:
    async with connected(admin_dsn) as admin:
        await admin.execute(f'alter database "{name}" with allow_connections {allowed}')
        if not allowed:
            await admin.execute("select pg_terminate_backend(pid) from pg_stat_activity "
                                "where datname = $1", name)


# One worker with text logs, two with JSON logs: the rule holds for both formats.
@pytest.fixture(params=[(1, "text"), (2, "json")],
                ids=["one worker, text logs", "two workers, json logs"])
def audited(dsn: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    city_db = build_test_city_db(tmp_path / "city.mmdb")
    workers, log_format = request.param
    server = Server(dsn, tmp_path, env={"TRACKER_GEOIP_DB": str(city_db),
                                        "TRACKER_DURABILITY": "journal",
                                        "TRACKER_LOG_LEVEL": "debug",
                                        "TRACKER_LOG_FORMAT": log_format,
                                        "TRACKER_WORKERS": str(workers)}).start()
    yield server
    server.stop()


@pytest.mark.slow
def test_nothing_beyond_the_policies_is_in_the_database_the_journal_or_the_logs(
        audited: Server, dsn: str, admin_dsn: str, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    server = audited
    recipients = {name: f"reader-{name}-{RUN}@example.com" for name in POLICIES}
    with server.client(new_account(dsn, "audit")) as api:
        ids = {name: campaign(api, policy, name=f"audit {name}")
               for name, policy in POLICIES.items()}
        messages = {name: register(api, ids[name], [], recipient=recipients[name],
                                   subject=f"Statement {RUN}", html=_html(recipients[name]))
                    for name in POLICIES}
        assert all(BODY in m["html"] for m in messages.values())  # instrumented, not stored
        erased = register(api, ids["city"], [], recipient=f"erased-{RUN}@example.com",
                          html=_html(f"erased-{RUN}@example.com"))
        opted_out = register(api, ids["city"], [], recipient=f"optout-{RUN}@example.com",
                             html=_html(f"optout-{RUN}@example.com"))
        signalled = register(api, ids["city"], [], recipient=f"gpc-{RUN}@example.com",
                             html=_html(f"gpc-{RUN}@example.com"))

        # Round 1: PostgreSQL up.
        for name in POLICIES:
            _read_all(messages[name], CLIENTS[name])
        _read_all(messages["country"], CLIENTS["country6"])
        _read_all(erased, ERASED)
        assert api.post(f"/api/recipients/optout-{RUN}@example.com/opt-out").status_code == 200
        _read_all(opted_out, OPTED_OUT)
        _read_all(signalled, SIGNALLING, **{"sec-gpc": "1"})
        hits = 3  # the pixel and the two links of the html (the honeypot is not hit)
        expected_rows = {"strict": hits, "country": 2 * hits, "city": 2 * hits,
                         "region": hits}

        def written() -> bool:
            counts = {name: len(_rows(dsn, ids[name])) for name in POLICIES}
            return counts == expected_rows
        wait_for(written, message="round 1 to be written")
        response = api.delete(f"/api/recipients/erased-{RUN}@example.com")
        assert response.status_code == 200 and response.json()["events"] == hits

    for name, expected in EXPECTED.items():
        assert {row[:7] for row in _rows(dsn, ids[name])} == expected, name

    # Round 2: PostgreSQL refuses connections; durable hits go to the journal only.
    database = db_fetch(dsn, "select current_database()")[0][0]
    asyncio.run(_allow_connections(admin_dsn, database, False))
    try:
        for name, client in JOURNALED.items():
            _read_all(messages[name], client)
        _read_all(opted_out, OPTED_OUT)
        _read_all(erased, ERASED)
        server.stop()
    finally:
        asyncio.run(_allow_connections(admin_dsn, database, True))

    journal = b"".join(content for _, content in _files(tmp_path / "data" / "journal"))
    assert b"2.125.160.0/24" in journal and b"81.2.69.164" in journal, (
        "the journal round left nothing to audit in the journal")
    dump = _dump(dsn)
    assert recipients["city"].encode() in dump and b"2.125.160.0/24" in dump  # a real dump
    log = server.log_path.read_bytes()
    if request.node.callspec.params["audited"][1] == "json":
        # Every line one JSON object; the messages as they read once decoded are audited
        # too (JSON escapes some characters a needle could hold).
        records, not_json = [], []
        for line in log.splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                not_json.append(line)
        assert not not_json, f"lines that are not JSON: {not_json[:5]}"
        assert records, "the server logged nothing"
        log += "\n".join(str(record.get("message", "")) + str(record.get("exception", ""))
                         for record in records).encode()

    # What must be nowhere.
    # (The opted-out and signalling readers' messages stay: only their hits leave nothing.)
    # (Addresses also as the links of the html name them, URL-encoded.)
    everywhere = [recipients["strict"], quote(recipients["strict"], safe=""),
                  f"erased-{RUN}@", f"erased-{RUN}%40", BODY]
    for client in (*CLIENTS.values(), *JOURNALED.values(), ERASED, OPTED_OUT, SIGNALLING):
        everywhere += [client.user_agent, client.marker]
    for client in (CLIENTS["strict"], CLIENTS["country"], CLIENTS["country6"],
                   CLIENTS["region"], ERASED, OPTED_OUT, SIGNALLING, *JOURNALED.values()):
        if client is not JOURNALED["city"]:
            everywhere += sorted(_forms(client.address))
    places = [(f"pg_dump of {dsn}", dump), (str(server.log_path), log),
              *((str(path), content) for path, content in _files(tmp_path / "data"))]
    for where, content in places:
        for needle in everywhere:
            assert needle.encode() not in content, f"{needle!r} found in {where}"
        for value in FORBIDDEN_VALUES:
            assert value.encode() not in content, f"{value!r} (forbidden) found in {where}"
        assert not re.search(rb"\biOS\b", content), f"an OS the policy forbade in {where}"
    # The full address of the one campaign that keeps it, and nothing else of it.
    assert b"81.2.69.160" in dump
    assert not re.search(rb"81\.2\.69\.16[1-3]\b", dump + log + journal)


def _rows(dsn: str, campaign_id: str) -> list[tuple[Any, ...]]:
    return [(r["country"], r["region"], r["city"], r["browser"], r["os"], r["device"],
             r["ip"]) for r in db_fetch(
        dsn, "select country, region, city, browser, os, device, abbrev(ip) as ip "
             "from events_decoded where campaign_id = $1", int(campaign_id))]


def _dump(dsn: str) -> bytes:
    """The whole database, schema and rows, as pg_dump writes it."""
    done = subprocess.run([str(POSTGRES_BIN_PATH / "pg_dump"), "--no-owner", "--dbname", dsn],
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def _files(root: Path) -> Iterator[tuple[Path, bytes]]:
    for path in sorted(root.rglob("*")) if root.is_dir() else ():
        if path.is_file() and path.suffix != ".mmdb":
            yield path, path.read_bytes()
