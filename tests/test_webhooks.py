"""Events out: webhook endpoints, delivery to a real receiver on loopback through failures,
restarts and a PostgreSQL outage, signatures, re-labels, erasure, replay and the pull stream."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from tracker.ingest.tokens import FLAG_HONEYPOT, Signer
from tracker.mail.client import Client, InvalidRequest

from .support import SECRET, Server, campaign, db_fetch, new_account, register, wait_for
from .test_outage import database_down
from .webhook_receiver import Receiver

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")
# Short delivery timings, so that every failure mode and its recovery take seconds.
FAST = {"TRACKER_WEBHOOK_TIMEOUT_MS": "1500", "TRACKER_WEBHOOK_RETRY_MS": "200",
        "TRACKER_WEBHOOK_RETRY_MAX_MS": "800", "TRACKER_WEBHOOK_POLL_MS": "100",
        "TRACKER_WEBHOOK_BATCH": "7", "TRACKER_FLUSH_INTERVAL_MS": "50"}
DELIVERED_S = 60.0


@pytest.fixture(scope="module")
def hook_server(module_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(module_dsn, tmp_path_factory.mktemp("webhooks"), env=FAST).start()
    yield srv
    srv.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def _endpoint(api: httpx.Client, receiver: Receiver, **fields: Any) -> dict[str, Any]:
    response = api.post("/api/webhooks", json={"url": receiver.url, **fields})
    assert response.status_code == 201, response.text
    hook: dict[str, Any] = response.json()
    receiver.secret = hook["secret"]
    return hook


def _hit(server: Server, message: dict[str, Any], opens: int = 1) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as public:
        for _ in range(opens):
            assert public.get(message["pixel_url"].removeprefix(server.url),
                              headers={"user-agent": CHROME}).status_code == 200
        for link in message["links"]:
            assert public.get(link["tracked_url"].removeprefix(server.url),
                              headers={"user-agent": CHROME}).status_code == 302


def _stored_ids(dsn: str, message_ids: list[int], at_least: int) -> set[str]:
    def stored() -> set[str] | None:
        rows = db_fetch(dsn, "select id from events where message_id = any($1::bigint[])",
                        message_ids)
        return {str(r["id"]) for r in rows} if len(rows) >= at_least else None
    return wait_for(stored, DELIVERED_S, message="the events to be stored")


def _all_delivered(receiver: Receiver, ids: set[str]) -> None:
    wait_for(lambda: ids <= receiver.ids(), DELIVERED_S,
             message=f"{len(ids)} events at the receiver (has {len(receiver.ids())})")
    assert receiver.doubled() == {}
    assert receiver.bad_signatures == 0


def _stats(api: httpx.Client, hook: dict[str, Any]) -> dict[str, Any]:
    stats: dict[str, Any] = api.get(f"/api/webhooks/{hook['id']}").json()["stats"]
    return stats


def test_every_event_arrives_once_across_errors_timeouts_slowness_and_downtime(
        hook_server: Server, module_dsn: str, receiver: Receiver) -> None:
    key = new_account(module_dsn, "failing receiver")
    with hook_server.client(key) as api:
        hook = _endpoint(api, receiver, concurrency=2)
        cid = campaign(api)
        messages = [register(api, cid, [f"https://example.com/{m}/{k}" for k in range(2)],
                             f"r{m}@example.com") for m in range(6)]
        ids: set[str] = set()
        for mode in ("error", "hang", "slow", "down", "ok"):
            if mode == "down":
                receiver.stop()
            else:
                receiver.mode = mode
            batch = messages[len(ids) // 3 % 6:][:2] or messages[:2]
            for message in batch:
                _hit(hook_server, message)
            ids = _stored_ids(module_dsn, [int(m["id"]) for m in messages], len(ids) + 6)
            if mode in ("error", "hang", "slow"):
                wait_for(lambda m=mode: receiver.requests[m] >= 2, DELIVERED_S,
                         message=f"deliveries to a receiver in mode {mode}")
            if mode == "down":
                wait_for(lambda: _stats(api, hook)["retrying"] > 0, DELIVERED_S,
                         message="a retry against the receiver that is down")
                receiver.start()
        _all_delivered(receiver, ids)
        assert receiver.requests["slow"] >= 1
        assert not receiver.events.keys() - ids  # nothing that was not stored
        stats = _stats(api, hook)
        assert stats["failed"] >= 4 and stats["delivered"] == len(ids)
        log = api.get(f"/api/webhooks/{hook['id']}/deliveries").json()["deliveries"]
        assert {d["status"] for d in log} >= {500, 204, None}
        assert all("events" not in d or isinstance(d["events"], int) for d in log)
        metrics = hook_server.client().get("/metrics").text
        assert any(line.startswith("tracker_webhook_delivered_events_total{")
                   and f'endpoint="{hook["id"]}"' in line for line in metrics.splitlines())


def test_deliveries_carry_the_event_and_verify_with_the_reference_library(
        hook_server: Server, module_dsn: str, receiver: Receiver) -> None:
    key = new_account(module_dsn, "signed")
    with hook_server.client(key) as api:
        hook = _endpoint(api, receiver, events=["click"])
        assert "secret" not in api.get(f"/api/webhooks/{hook['id']}").json()
        cid = campaign(api, policy={"location": "none", "device": False})
        message = register(api, cid, ["https://example.com/a?x=1"])
        _hit(hook_server, message)
        ids = _stored_ids(module_dsn, [int(message["id"])], 2)
        wait_for(lambda: len(receiver.ids()) == 1, DELIVERED_S, message="the click")
        (event,) = receiver.events.values()
        assert event["id"] in ids and event["type"] == "click"
        assert event["message_id"] == message["id"] and event["campaign_id"] == cid
        assert event["url"] == "https://example.com/a?x=1" and event["machine"] is False
        # What the policy does not store is not sent either.
        assert event["browser"] is None and event["country"] is None
        assert receiver.bad_signatures == 0 and receiver.webhook_ids[0].startswith("msg_")
        # A rotated secret: both sign until the old one expires; either verifies.
        old = receiver.secret
        rotated = api.post(f"/api/webhooks/{hook['id']}/rotate-secret").json()
        assert rotated["secret"] != old
        receiver.secret = old
        _hit(hook_server, register(api, cid, ["https://example.com/b"]))
        wait_for(lambda: len(receiver.ids()) == 2, DELIVERED_S, message="the second click")
        assert receiver.bad_signatures == 0


def test_signature_is_standard_webhooks() -> None:
    from tracker.delivery.signing import signed_request
    from tracker.store.webhooks import new_secret
    secret = new_secret()
    webhook_id, body, headers = signed_request(4, [secret], [{"id": "e1", "type": "open"}])
    assert Webhook(secret).verify(body, headers) == {"events": [{"id": "e1", "type": "open"}]}
    assert signed_request(4, [secret], [{"id": "e1"}])[0] == webhook_id  # same events, same id
    assert signed_request(5, [secret], [{"id": "e1"}])[0] != webhook_id


def test_a_relabel_follows_the_clicks_a_honeypot_hit_makes_machine(
        hook_server: Server, module_dsn: str, receiver: Receiver) -> None:
    key = new_account(module_dsn, "relabel")
    with hook_server.client(key) as api, httpx.Client(base_url=hook_server.url,
                                                      timeout=10) as public:
        _endpoint(api, receiver, events=["click", "relabel"], machine=False)
        cid = campaign(api)
        message = register(api, cid, ["https://example.com/real"])
        tracked = message["links"][0]["tracked_url"]
        assert public.get(tracked.removeprefix(hook_server.url),
                          headers={"user-agent": CHROME}).status_code == 302
        (human,) = _stored_ids(module_dsn, [int(message["id"])], 1)
        wait_for(lambda: human in receiver.ids(), DELIVERED_S, message="the human click")
        assert receiver.events[human]["machine"] is False
        signer = Signer([SECRET])
        token = signer.verify_click(tracked.rsplit("/", 1)[1])
        assert token is not None
        trap = signer.click_token(token.account_id, token.campaign_id, token.message_id,
                                  token.sent_at, 7, 0, "https://example.com/trap",
                                  flags=FLAG_HONEYPOT)
        assert public.get(f"/c/{trap}", headers={"user-agent": CHROME}).status_code == 302
        relabels = lambda: [e for e in receiver.events.values()  # noqa: E731
                            if e["type"] == "relabel"]
        wait_for(relabels, DELIVERED_S, message="the re-label")
        (relabel,) = relabels()
        assert relabel["events"] == [human] and relabel["reason"] == "honeypot"
        assert relabel["message_id"] == message["id"]
        # The honeypot hit itself is machine: this endpoint takes human events only.
        assert {e["type"] for e in receiver.events.values()} == {"click", "relabel"}
        assert len(receiver.events) == 2


def test_erasure_opt_out_and_withdrawn_consent_stop_queued_deliveries(
        hook_server: Server, module_dsn: str, receiver: Receiver) -> None:
    key = new_account(module_dsn, "erasure")
    with hook_server.client(key) as api:
        hook = _endpoint(api, receiver)
        receiver.mode = "error"
        cid = campaign(api)
        erased = register(api, cid, ["https://example.com/e"], "erased@example.com")
        opted = register(api, cid, ["https://example.com/o"], "opted@example.com")
        withdrawn = register(api, cid, ["https://example.com/w"], "withdrawn@example.com")
        kept = register(api, cid, ["https://example.com/k"], "kept@example.com")
        for message in (erased, opted, withdrawn, kept):
            _hit(hook_server, message)
        kept_ids = _stored_ids(module_dsn, [int(kept["id"])], 2)
        _stored_ids(module_dsn, [int(m["id"]) for m in (erased, opted, withdrawn)], 6)
        wait_for(lambda: receiver.requests["error"] >= 1, DELIVERED_S,
                 message="a failed delivery")
        assert api.delete("/api/recipients/erased@example.com").status_code == 200
        assert api.post("/api/recipients/opted@example.com/opt-out").status_code == 200
        assert api.put("/api/recipients/withdrawn@example.com/consent", json={
            "opens": False, "clicks": False, "method": "preference centre"}).status_code == 200
        receiver.mode = "ok"
        _all_delivered(receiver, kept_ids)
        wait_for(lambda: _stats(api, hook)["retrying"] == 0, DELIVERED_S,
                 message="the queue to drain")
        assert receiver.ids() == kept_ids
        assert {e["message_id"] for e in receiver.events.values()} == {kept["id"]}


def test_replay_sends_a_time_range_again_with_the_same_ids(
        hook_server: Server, module_dsn: str, receiver: Receiver) -> None:
    key = new_account(module_dsn, "replay")
    with hook_server.client(key) as api:
        hook = _endpoint(api, receiver)
        cid = campaign(api)
        message = register(api, cid, ["https://example.com/r"])
        _hit(hook_server, message, opens=2)
        ids = _stored_ids(module_dsn, [int(message["id"])], 3)
        _all_delivered(receiver, ids)
        now = datetime.now(UTC)
        response = api.post(f"/api/webhooks/{hook['id']}/replay", json={
            "from": (now - timedelta(hours=1)).isoformat(), "to": now.isoformat()})
        assert response.status_code == 202, response.text
        wait_for(lambda: all(receiver.accepted[i] == 2 for i in ids), DELIVERED_S,
                 message="the replayed events")
        bad = api.post(f"/api/webhooks/{hook['id']}/replay", json={"from": "yesterday"})
        assert bad.status_code == 422


def test_a_failing_endpoint_is_disabled_with_its_reason_and_catches_up_when_enabled(
        module_dsn: str, tmp_path: Path, receiver: Receiver) -> None:
    env = {**FAST, "TRACKER_WEBHOOK_DISABLE_AFTER_S": "1"}
    server = Server(module_dsn, tmp_path, env=env).start()
    try:
        key = new_account(module_dsn, "disabled")
        with server.client(key) as api:
            hook = _endpoint(api, receiver)
            receiver.mode = "error"
            cid = campaign(api)
            message = register(api, cid, ["https://example.com/d"])
            _hit(server, message)
            ids = _stored_ids(module_dsn, [int(message["id"])], 2)
            shown = lambda: api.get(f"/api/webhooks/{hook['id']}").json()  # noqa: E731
            wait_for(lambda: not shown()["enabled"], DELIVERED_S, message="the endpoint "
                     "to be disabled")
            reason = shown()["disabled_reason"]
            assert "HTTP 500: receiver error" in reason and "failing for" in reason
            receiver.mode = "ok"
            assert api.patch(f"/api/webhooks/{hook['id']}",
                             json={"enabled": True}).json()["enabled"] is True
            _all_delivered(receiver, ids)
            assert shown()["disabled_reason"] is None
    finally:
        server.stop()


def test_delivery_goes_on_after_a_restart(
        module_dsn: str, tmp_path: Path, receiver: Receiver) -> None:
    server = Server(module_dsn, tmp_path, env=FAST).start()
    key = new_account(module_dsn, "restart")
    with server.client(key) as api:
        _endpoint(api, receiver)
        cid = campaign(api)
        messages = [register(api, cid, ["https://example.com/x"], f"m{i}@example.com")
                    for i in range(4)]
    receiver.mode = "hang"
    for message in messages[:2]:
        _hit(server, message)
    wait_for(lambda: receiver.requests["hang"] >= 1, DELIVERED_S, message="a hanging delivery")
    for message in messages[2:]:
        _hit(server, message)
    server.signal(signal.SIGTERM)  # a delivery is in flight
    assert server.wait() == 0
    ids = _stored_ids(module_dsn, [int(m["id"]) for m in messages], 8)
    receiver.mode = "ok"
    server = Server(module_dsn, tmp_path, env=FAST).start()
    try:
        _all_delivered(receiver, ids)
    finally:
        server.stop()


def test_delivery_survives_a_postgresql_outage(
        own_postgres: Any, own_dsn: str, tmp_path: Path, receiver: Receiver) -> None:
    server = Server(own_dsn, tmp_path, env=FAST).start()
    try:
        key = new_account(own_dsn, "outage")
        with server.client(key) as api:
            _endpoint(api, receiver)
            cid = campaign(api)
            messages = [register(api, cid, ["https://example.com/p"], f"p{i}@example.com")
                        for i in range(4)]
        _hit(server, messages[0])
        with database_down(own_postgres):
            for message in messages[1:]:
                _hit(server, message)  # answered; journalled or in memory
        ids = _stored_ids(own_dsn, [int(m["id"]) for m in messages], 8)
        _all_delivered(receiver, ids)
    finally:
        server.stop()


def test_webhook_api_refuses_bad_input_and_other_accounts(
        hook_server: Server, module_dsn: str, receiver: Receiver) -> None:
    key, other = new_account(module_dsn, "api"), new_account(module_dsn, "other")
    with hook_server.client(key) as api, hook_server.client(other) as stranger:
        for body, field in (({"url": "http://example.com/hook"}, "url"),
                            ({"url": "ftp://127.0.0.1/x"}, "url"),
                            ({"url": receiver.url, "events": ["bounce"]}, "events"),
                            ({"url": receiver.url, "campaign_id": "999999"}, "campaign_id"),
                            ({"url": receiver.url, "concurrency": 99}, "concurrency"),
                            ({"events": ["open"]}, "url")):
            response = api.post("/api/webhooks", json=body)
            assert response.status_code == 422 and response.json()["error"].startswith(field)
        hook = _endpoint(api, receiver, events=["open"])
        assert hook["events"] == ["open"] and hook["secret"].startswith("whsec_")
        assert stranger.get(f"/api/webhooks/{hook['id']}").status_code == 404
        assert stranger.delete(f"/api/webhooks/{hook['id']}").status_code == 404
        assert [h["id"] for h in api.get("/api/webhooks").json()] == [hook["id"]]
        patched = api.patch(f"/api/webhooks/{hook['id']}", json={"events": ["click"]})
        assert patched.json()["events"] == ["click"]
        assert api.delete(f"/api/webhooks/{hook['id']}").status_code == 204
        assert api.get(f"/api/webhooks/{hook['id']}").status_code == 404
        assert api.get("/api/events?after=nonsense").status_code == 400
        assert api.get("/api/events?limit=0").status_code == 400


def test_pull_stream_pages_through_stored_events_in_order_and_forgets_erased_ones(
        hook_server: Server, module_dsn: str) -> None:
    key = new_account(module_dsn, "pull")
    with hook_server.client(key) as api:
        cid = campaign(api)
        messages = [register(api, cid, ["https://example.com/s"], f"s{i}@example.com")
                    for i in range(5)]
        for message in messages:
            _hit(hook_server, message)
        ids = _stored_ids(module_dsn, [int(m["id"]) for m in messages], 10)

        def pull_all() -> list[dict[str, Any]]:
            events: list[dict[str, Any]] = []
            after = None
            while True:
                page = api.get("/api/events", params={"limit": 3, **(
                    {"after": after} if after else {})}).json()
                events += page["events"]
                if page["next"] is None:
                    return events
                after = page["next"]

        pulled = wait_for(lambda: (lambda e: e if len(e) == len(ids) else None)(pull_all()),
                          DELIVERED_S, message="every event in the stream")
        assert {e["id"] for e in pulled} == ids
        assert api.delete("/api/recipients/s0@example.com").status_code == 200
        after = {e["id"] for e in pull_all()}
        assert len(after) == 8 and after < ids
        assert api.get("/api/events").json()["events"][0]["message_id"] != messages[0]["id"]


def test_the_python_client_and_the_cli_manage_endpoints_and_pull_events(
        hook_server: Server, module_dsn: str, receiver: Receiver) -> None:
    key = new_account(module_dsn, "client")
    with Client(hook_server.url, key) as client:
        hook = client.create_webhook(receiver.url, events=["open"], machine=False)
        assert hook.secret is not None and hook.events == ("open",) and not hook.machine
        assert [h.id for h in client.list_webhooks()] == [hook.id]
        assert client.get_webhook(hook.id).secret is None
        assert client.update_webhook(hook.id, enabled=False).enabled is False
        assert client.rotate_webhook_secret(hook.id).secret not in (None, hook.secret)
        with pytest.raises(InvalidRequest):
            client.create_webhook("http://example.com/")
        cid = client.create_campaign("pulled").id
        message = client.register_message(cid, "p@example.com", links=["https://example.com/"])
        _hit(hook_server, {"pixel_url": message.pixel_url, "links": [
            {"tracked_url": link.tracked_url} for link in message.links]})
        ids = _stored_ids(module_dsn, [int(message.id)], 2)
        page = wait_for(lambda: (lambda p: p if len(p.events) == 2 else None)(
            client.pull_events(limit=10)), DELIVERED_S, message="the pulled events")
        assert {e["id"] for e in page.events} == ids and page.next is not None
        assert client.pull_events(after=page.next).events == []
    env = {**os.environ, "TRACKER_API_URL": hook_server.url, "TRACKER_API_KEY": key}
    cli = [sys.executable, "-m", "tracker", "webhooks"]
    made = subprocess.run([*cli, "create", receiver.url, "--events", "click", "--json"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["events"] == ["click"] and created["secret"].startswith("whsec_")
    listed = subprocess.run([*cli, "list"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert created["id"] in listed.stdout and "secret" not in listed.stdout
    refused = subprocess.run([*cli, "create", "ftp://x"], env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1 and refused.stderr.startswith("tracker: error: url:")
    gone = subprocess.run([*cli, "delete", created["id"]], env=env, capture_output=True,
                          text=True, timeout=60)
    assert gone.returncode == 0 and gone.stdout == ""


def test_the_dashboard_adds_shows_and_disables_endpoints_with_their_deliveries(
        hook_server: Server, module_dsn: str, receiver: Receiver) -> None:
    from .test_dashboard import _csrf_token, _sign_in
    key = new_account(module_dsn, "dashboard")
    with httpx.Client(base_url=hook_server.url, timeout=10) as browser:
        assert _sign_in(browser, key).status_code in (200, 303)
        page = browser.get("/dashboard/webhooks")
        assert page.status_code == 200 and "No webhook endpoints yet" in page.text
        csrf = _csrf_token(page.text)
        refused = browser.post("/dashboard/webhooks", data={"url": receiver.url})
        assert refused.status_code == 403
        bad = browser.post("/dashboard/webhooks", data={"csrf_token": csrf, "url": "http://x.org",
                                                        "event_open": "on"})
        assert bad.status_code == 422 and "url: must be https" in bad.text
        added = browser.post("/dashboard/webhooks", data={
            "csrf_token": csrf, "url": receiver.url, "event_open": "on", "event_click": "on"})
        assert added.status_code == 200
        match = re.search(r"<pre><code>(whsec_[^<]+)</code></pre>", added.text)
        assert match is not None
        receiver.secret = match.group(1)
        (hook,) = httpx.get(f"{hook_server.url}/api/webhooks",
                            headers={"authorization": f"Bearer {key}"}).json()
        with hook_server.client(key) as api:
            message = register(api, campaign(api), ["https://example.com/dash"])
        _hit(hook_server, message)
        wait_for(lambda: len(receiver.ids()) == 2, DELIVERED_S, message="the deliveries")
        shown = wait_for(lambda: (lambda t: t if 'data-stat="delivered">2<' in t else None)(
            browser.get("/dashboard/webhooks").text), DELIVERED_S, message="the stats")
        assert "whsec_" not in shown and "<td>204</td>" in shown
        assert browser.post(f"/dashboard/webhooks/{hook['id']}", data={
            "csrf_token": csrf, "action": "disable"}).status_code == 303
        assert "Disabled" in browser.get("/dashboard/webhooks").text
