"""Consent mode against a real server and PostgreSQL: a campaign that requires consent hands
out no pixel and no tracked links to a recipient without it; consent given, refused and
withdrawn through the API, the Python client and the CLI, with its wording and history; a
withdrawal holds in every worker from the moment the API answers, for mail already sent; the
recipient's export holds the record and erasure removes it; the privacy paragraph says how
consent works."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest

from tracker.mail.client import Client, TrackerError

from .support import Server, campaign, db_value, new_account, register, wait_for
from .test_privacy_workers import CHROME, one_connection_per_worker

LINK = "https://example.com/offer?utm_source=mail"
OTHER = "https://example.com/other"
BOTH = {"consent": {"opens": True, "clicks": True}}
HTML = (f'<html><body><p>Hello</p><a href="{LINK}">Offer</a> <a href="{OTHER}">More</a>'
        "</body></html>")
WORDING = "May we see when you open our letters and which links you follow?"


def _consent_path(address: str) -> str:
    return f"/api/recipients/{quote(address, safe='@')}/consent"


def _give(api: httpx.Client, address: str, opens: bool = True, clicks: bool = True,
          **extra: Any) -> dict[str, Any]:
    response = api.put(_consent_path(address), json={"opens": opens, "clicks": clicks,
                                                      "method": "signup form", **extra})
    assert response.status_code == 200, response.text
    record: dict[str, Any] = response.json()
    return record


def _hit(url: str) -> None:
    response = httpx.get(url, headers={"user-agent": CHROME}, timeout=10, follow_redirects=False)
    assert response.status_code in (200, 302), response.status_code


def _events(dsn: str, *messages: dict[str, Any]) -> int:
    return int(db_value(dsn, "select count(*) from events where message_id = any($1::bigint[])",
                        [int(m["id"]) for m in messages]))


@pytest.mark.slow
def test_without_required_consent_no_pixel_and_the_original_links(
        server: Server, module_dsn: str) -> None:
    key = new_account(module_dsn, "consent required")
    with server.client(key) as api:
        cid = campaign(api, BOTH, name="asks first")
        made = register(api, cid, [], recipient="ann@example.com", html=HTML)
        assert made["pixel_url"] is None
        assert [link["tracked_url"] for link in made["links"]] == [None, None]
        assert made["html"] == HTML  # no pixel, the links as they were

        # Only opens required: the links are tracked, there is no pixel.
        opens_only = campaign(api, {"consent": {"opens": True, "clicks": False}}, name="opens")
        half = register(api, opens_only, [], recipient="ann@example.com", html=HTML)
        assert half["pixel_url"] is None and half["links"][0]["tracked_url"]
        assert "<img" not in half["html"] and half["links"][0]["tracked_url"] in half["html"]

        record = _give(api, "Ann <ANN@example.com>", wording=WORDING)
        assert (record["opens"], record["clicks"], record["method"], record["wording"]) == (
            True, True, "signup form", WORDING)
        assert datetime.fromisoformat(record["at"]) <= datetime.now(UTC)
        tracked = register(api, cid, [], recipient="ann@example.com", html=HTML)
        assert tracked["pixel_url"] and tracked["links"][0]["tracked_url"]
        assert tracked["pixel_url"] in tracked["html"]
        _hit(tracked["pixel_url"])
        _hit(tracked["links"][0]["tracked_url"])
        wait_for(lambda: _events(module_dsn, tracked) == 2, message="the consented hits")
        # The message list knows which were sent untracked.
        untracked = api.get(f"/api/campaigns/{cid}/messages", params={"status": "untracked"})
        assert [m["id"] for m in untracked.json()["messages"]] == [made["id"]]


@pytest.mark.slow
def test_a_withdrawal_holds_in_every_worker_from_the_moment_the_api_answers(
        dsn: str, tmp_path: Path) -> None:
    """Two workers. For each recipient: consent given, a message registered (its tokens carry
    the consent), then the withdrawal through one worker and at once the message's pixel and
    link on both. Also a campaign that does not require consent: a refusal holds there too.
    And a campaign whose policy starts requiring consent: its earlier tokens, made without
    consent, record nothing from the moment the PATCH answers. Nothing of it is recorded."""
    rounds = 10
    server = Server(dsn, tmp_path, env={"TRACKER_WORKERS": "2"}).start()
    try:
        key = new_account(dsn, "withdrawals")
        auth = {"authorization": f"Bearer {key}"}
        with server.client(key) as api, one_connection_per_worker(server, 2) as workers:
            required = campaign(api, BOTH, name="required")
            free = campaign(api, name="not required")
            # A control: consent given and kept, hits on both workers are recorded.
            _give(api, "keeps@example.com")
            kept = register(api, required, [LINK], recipient="keeps@example.com")
            for worker in workers:
                worker.hit(kept["pixel_url"], "198.51.100.20")
                worker.hit(kept["links"][0]["tracked_url"], "198.51.100.20")
            withdrawn = []
            for i in range(rounds):
                address = f"withdraws-{i}@example.com"
                _give(api, address, wording=WORDING)
                messages = [register(api, cid, [LINK], recipient=address)
                            for cid in (required, free)]
                assert all(m["pixel_url"] for m in messages)
                withdrawn += messages
                changing, other = workers[i % 2], workers[(i + 1) % 2]
                status, body, _ = changing.request(
                    "PUT", _consent_path(address), {"opens": False, "clicks": False,
                                                    "method": "preference center"}, auth)
                assert status == 200, body
                for worker in (other, changing):
                    for message in messages:
                        worker.hit(message["pixel_url"], "198.51.100.20")
                        worker.hit(message["links"][0]["tracked_url"], "198.51.100.20")

            # Earlier tokens, made without consent, of a campaign that starts requiring it.
            later = [campaign(api, name=f"requires later {i}") for i in range(rounds)]
            before = [register(api, cid, [LINK], recipient=f"never-asked-{i}@example.com")
                      for i, cid in enumerate(later)]
            for i, (cid, message) in enumerate(zip(later, before, strict=True)):
                changing, other = workers[i % 2], workers[(i + 1) % 2]
                status, body, _ = changing.request("PATCH", f"/api/campaigns/{cid}",
                                                   {"policy": BOTH}, auth)
                assert status == 200, body
                for worker in (other, changing):
                    worker.hit(message["pixel_url"], "198.51.100.20")
                    worker.hit(message["links"][0]["tracked_url"], "198.51.100.20")
        assert server.stop() == 0  # every worker writes what it captured before it exits
    finally:
        server.stop()
    assert _events(dsn, kept) == 4
    assert _events(dsn, *withdrawn) == 0
    assert _events(dsn, *before) == 0
    assert db_value(dsn, "select coalesce(sum(opens + clicks + machine_opens + machine_clicks), "
                         "0) from rollup_message where message_id = any($1::bigint[])",
                    [int(m["id"]) for m in withdrawn + before]) == 0


def test_export_holds_the_record_and_its_history_and_erasure_removes_them(
        server: Server, module_dsn: str) -> None:
    key = new_account(module_dsn, "proof")
    address = "bea@example.com"
    with server.client(key) as api:
        _give(api, address, wording=WORDING, at="2026-03-01T10:00:00+00:00")
        _give(api, address, opens=False, clicks=True, wording="Only my clicks, please.")
        shown = api.get(_consent_path(address)).json()
        assert (shown["opens"], shown["clicks"], shown["wording"]) == (
            False, True, "Only my clicks, please.")
        assert [(c["opens"], c["wording"]) for c in shown["history"]] == [
            (False, "Only my clicks, please."), (True, WORDING)]
        assert shown["history"][1]["at"] == "2026-03-01T10:00:00+00:00"

        exported = api.get(f"/api/recipients/{address}/export").json()
        assert exported["consent"]["method"] == "signup form"
        assert [c["wording"] for c in exported["consent"]["history"]] == [
            "Only my clicks, please.", WORDING]
        assert exported["tracking"]["consent_refused"] == {"opens": True, "clicks": False}

        account_id = int(key.split("_")[1])
        stored = ("select (select count(*) from recipient_consents where account_id = $1) + "
                  "(select count(*) from consent_history where account_id = $1)")
        assert db_value(module_dsn, stored, account_id) == 3
        assert api.delete(f"/api/recipients/{address}").status_code == 200
        assert db_value(module_dsn, stored, account_id) == 0
        assert api.get(_consent_path(address)).status_code == 404
        after = api.get(f"/api/recipients/{address}/export").json()
        assert after["consent"] is None
        # The refusal stays in force, as an opt-out does.
        assert after["tracking"]["consent_refused"] == {"opens": True, "clicks": False}
        again = register(api, campaign(api, name="after erasure"), [LINK], recipient=address)
        assert again["pixel_url"] is None and again["links"][0]["tracked_url"]


@pytest.mark.parametrize(("body", "error"), [
    ({"opens": True, "clicks": True}, "method"),
    ({"opens": "yes", "clicks": True, "method": "form"}, "opens"),
    ({"opens": True, "method": "form"}, "clicks"),
    ({"opens": True, "clicks": True, "method": "form", "extra": 1}, "extra"),
    ({"opens": True, "clicks": True, "method": "x" * 101}, "method"),
    ({"opens": True, "clicks": True, "method": "form", "wording": "w" * 10_001}, "wording"),
    ({"opens": True, "clicks": True, "method": "form", "at": "2999-01-01T00:00:00Z"}, "future"),
    ({"opens": True, "clicks": True, "method": "form", "at": "yesterday"}, "at"),
    ([], "object"),
])
def test_a_bad_consent_is_a_422_that_says_why_and_stores_nothing(
        server: Server, module_dsn: str, body: Any, error: str) -> None:
    key = new_account(module_dsn, "bad consent")
    with server.client(key) as api:
        response = api.put(_consent_path("cid@example.com"), json=body)
        assert response.status_code == 422, response.text
        assert error in response.json()["error"]
        assert api.get(_consent_path("cid@example.com")).status_code == 404


def test_the_account_default_and_the_privacy_paragraph(server: Server, module_dsn: str) -> None:
    key = new_account(module_dsn, "default")
    with server.client(key) as api:
        assert api.get("/api/account").json()["consent"] == {"opens": False, "clicks": False}
        changed = api.patch("/api/account", json={"consent": {"opens": True}})
        assert changed.status_code == 200, changed.text
        assert api.get("/api/account").json()["consent"] == {"opens": True, "clicks": False}
        cid = campaign(api, name="takes the default")
        policy = api.get(f"/api/campaigns/{cid}").json()["policy"]
        assert policy["consent"] == {"opens": True, "clicks": False}
        text = api.get(f"/api/campaigns/{cid}/privacy").text
        assert "only if you have agreed" in text and "withdraw" in text
        assert api.patch("/api/account", json={"consent": {"opens": 1}}).status_code == 422


def _cli(server: Server, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracker", *args, "--api-url", server.url],
                          env={**os.environ, "TRACKER_API_KEY": key}, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.slow
def test_consent_through_the_client_and_the_cli(server: Server, module_dsn: str,
                                                tmp_path: Path) -> None:
    key = new_account(module_dsn, "tools")
    with Client(server.url, key) as client:
        assert client.get_consent("dan@example.com") is None
        given = client.set_consent("dan@example.com", opens=True, clicks=False,
                                   method="import", wording=WORDING,
                                   at=datetime.now(UTC) - timedelta(days=3))
        assert (given.opens, given.clicks, given.method, given.wording) == (
            True, False, "import", WORDING)
        shown = client.get_consent("dan@example.com")
        assert shown is not None and (shown.at, shown.wording) == (given.at, WORDING)
        assert len(shown.history) == 1
        with pytest.raises(TrackerError, match="method"):
            client.set_consent("dan@example.com", opens=True, clicks=True, method="")

    wording = tmp_path / "wording.txt"
    wording.write_text(WORDING, encoding="utf-8")
    made = _cli(server, key, "consent", "set", "eve@example.com", "--opens", "yes",
                "--clicks", "yes", "--method", "signup form", "--wording-file", str(wording),
                "--json")
    assert made.returncode == 0, made.stderr
    assert orjson.loads(made.stdout)["wording"] == WORDING
    withdrawn = _cli(server, key, "consent", "withdraw", "eve@example.com", "--only", "clicks",
                     "--json")
    assert withdrawn.returncode == 0, withdrawn.stderr
    record = orjson.loads(withdrawn.stdout)
    assert (record["opens"], record["clicks"]) == (True, False)
    printed = _cli(server, key, "consent", "show", "eve@example.com")
    assert printed.returncode == 0 and "eve@example.com" in printed.stdout, printed.stderr
    missing = _cli(server, key, "consent", "show", "nobody@example.com")
    assert missing.returncode == 1 and missing.stderr.startswith("tracker: ")
    assert "Traceback" not in missing.stderr
