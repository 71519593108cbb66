"""Tenant isolation on every endpoint of the app, enumerated from its routes.

The routes come from the Starlette app itself at test time, so an endpoint added
without a tenant case here fails `test_every_route_has_a_tenant_case` (or has to be
listed in PUBLIC as serving no account's data). Each case asks, as account B, for
account A's objects: the answer must be exactly what a never-existing id gets (a 404,
never a 403: nothing may reveal that A's object exists), A's objects must come out
unchanged, and lists and reports of each account must hold only its own objects and hits.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.routing import Route

from tracker.ingest.tokens import Signer
from tracker.lifespan import Runtime
from tracker.settings import load
from tracker.web.api import build_api

from .support import SECRET, Server, campaign, db_value, new_account, register, wait_for

NEVER = "999999999"  # an id no object has
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")
A_LINK = "https://a.example/offer"
B_LINK = "https://b.example/offer"

# Routes that serve no account's data, so there is nothing to isolate.
PUBLIC = {
    ("GET", "/"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
    ("GET", "/api/openapi.json"),
    ("GET", "/dashboard"), ("GET", "/dashboard/"), ("GET", "/dashboard/sign-in"),
    ("POST", "/dashboard/sign-in"), ("POST", "/dashboard/sign-out"),
    ("GET", "/dashboard/static/{path:path}"),
}


def app_routes(tmp_path: Path, dsn: str) -> set[tuple[str, str]]:
    """(method, path template) of every route the server's Starlette app has."""
    settings = load({"TRACKER_DATABASE_URL": dsn, "TRACKER_SECRET_KEY": SECRET,
                     "TRACKER_DATA_DIR": str(tmp_path), "TRACKER_GEOIP_FETCH": "off"})
    app = build_api(Runtime(settings, Signer.from_setting(SECRET), dsn))
    found = set()
    for route in app.routes:
        assert isinstance(route, Route), route  # a Mount would hide routes from this test
        methods = set(route.methods or ())
        if "GET" in methods:
            methods.discard("HEAD")  # Starlette adds HEAD to every GET route
        # As the OpenAPI writes it: "{address}", not "{address:address}".
        path = route.path.replace("{address:address}", "{address}")
        found |= {(method, path) for method in methods}
    return found


@dataclass
class Tenant:
    api: httpx.Client
    campaign: str
    message: dict[str, Any]
    recipient: str
    opens: int
    clicks: int


@dataclass
class World:
    server: Server
    dsn: str
    a: Tenant
    b: Tenant
    b_key: str


def _tenant(server: Server, key: str, link: str, opens: int, clicks: int) -> Tenant:
    api = server.client(key)
    cid = campaign(api, name=f"campaign of {link}")
    recipient = f"reader@{link.split('/')[2]}"
    message = register(api, cid, [link], recipient=recipient)
    with httpx.Client(timeout=10) as public:
        for _ in range(opens):
            assert public.get(message["pixel_url"], headers={"user-agent": CHROME}
                              ).status_code == 200
        for _ in range(clicks):
            assert public.get(message["links"][0]["tracked_url"],
                              headers={"user-agent": CHROME}).status_code == 302
    return Tenant(api, cid, message, recipient, opens, clicks)


@pytest.fixture(scope="module")
def world(server: Server, module_dsn: str) -> Iterator[World]:
    """Accounts A and B, each with a campaign, a message, and hits of their own."""
    b_key = new_account(module_dsn, "B")
    a = _tenant(server, new_account(module_dsn, "A"), A_LINK, opens=1, clicks=2)
    b = _tenant(server, b_key, B_LINK, opens=3, clicks=1)
    for tenant in (a, b):
        wait_for(lambda t=tenant: _report(t.api, t.campaign)["opens"]["total"] == t.opens
                 and _report(t.api, t.campaign)["clicks"]["total"] == t.clicks,
                 message="the hits to be written")
    yield World(server, module_dsn, a, b, b_key)
    a.api.close()
    b.api.close()


def _report(api: httpx.Client, campaign_id: str) -> dict[str, Any]:
    response = api.get(f"/api/campaigns/{campaign_id}/report")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def _as_if_never(api: httpx.Client, method: str, template: str, ids: dict[str, str],
                 status: int = 404, **kwargs: Any) -> httpx.Response:
    """B's request for A's object answers exactly what it answers for an id nobody has."""
    response = api.request(method, template.format(**ids), **kwargs)
    never = api.request(method, template.format(**dict.fromkeys(ids, NEVER)), **kwargs)
    assert response.status_code == status, (method, template, response.text)
    assert (response.status_code, response.content) == (never.status_code, never.content), (
        method, template)
    return response


def _a_unchanged(world: World, check: Callable[[], None]) -> None:
    a = world.a
    campaign_before = a.api.get(f"/api/campaigns/{a.campaign}").json()
    messages_before = db_value(world.dsn, "select count(*) from messages where campaign_id = $1",
                               int(a.campaign))
    report_before = _report(a.api, a.campaign)
    check()
    assert a.api.get(f"/api/campaigns/{a.campaign}").json() == campaign_before
    assert db_value(world.dsn, "select count(*) from messages where campaign_id = $1",
                    int(a.campaign)) == messages_before
    assert _report(a.api, a.campaign) == report_before


# --- the cases, one per route ----------------------------------------------------------------


def list_campaigns(w: World) -> None:
    a_ids = {c["id"] for c in w.a.api.get("/api/campaigns").json()}
    b_ids = {c["id"] for c in w.b.api.get("/api/campaigns").json()}
    assert w.a.campaign in a_ids and w.b.campaign in b_ids
    assert not a_ids & b_ids


def create_campaign(w: World) -> None:
    made = w.b.api.post("/api/campaigns", json={"name": "made by B"})
    assert made.status_code == 201
    assert made.json()["id"] not in {c["id"] for c in w.a.api.get("/api/campaigns").json()}
    assert w.a.api.get(f"/api/campaigns/{made.json()['id']}").status_code == 404


def get_campaign(w: World) -> None:
    _as_if_never(w.b.api, "GET", "/api/campaigns/{c}", {"c": w.a.campaign})


def patch_campaign(w: World) -> None:
    def attempt() -> None:
        for body in ({"name": "taken", "policy": {"ip": "full"}}, {"policy": {"ip": "bogus"}},
                     {"bogus": 1}, {}):
            _as_if_never(w.b.api, "PATCH", "/api/campaigns/{c}", {"c": w.a.campaign}, json=body)
    _a_unchanged(w, attempt)


def delete_campaign(w: World) -> None:
    _a_unchanged(w, lambda: _as_if_never(w.b.api, "DELETE", "/api/campaigns/{c}",
                                         {"c": w.a.campaign}))


def register_message(w: World) -> None:
    def attempt() -> None:
        for body in ({"recipient": "b@b.example", "links": [B_LINK]}, {"recipient": ""}):
            _as_if_never(w.b.api, "POST", "/api/campaigns/{c}/messages", {"c": w.a.campaign},
                         json=body)
    _a_unchanged(w, attempt)


def register_batch(w: World) -> None:
    def attempt() -> None:
        for body in ({"messages": [{"recipient": "b@b.example"}]}, {"messages": []}):
            _as_if_never(w.b.api, "POST", "/api/campaigns/{c}/messages/batch",
                         {"c": w.a.campaign}, json=body)
    _a_unchanged(w, attempt)


def campaign_report(w: World) -> None:
    for params in ({}, {"tz": "Europe/Berlin"}, {"tz": "Mars/Olympus"}):
        _as_if_never(w.b.api, "GET", "/api/campaigns/{c}/report", {"c": w.a.campaign},
                     params=params)
    # Each report counts its own account's hits only.
    for tenant, link in ((w.a, A_LINK), (w.b, B_LINK)):
        report = _report(tenant.api, tenant.campaign)
        assert report["messages"] == 1
        assert report["opens"]["total"] == tenant.opens
        assert report["clicks"]["total"] == tenant.clicks
        assert [row["url"] for row in report["links"]] == [link]


def export_events(w: World) -> None:
    # An unknown format too: the campaign is looked up first, as everywhere in the API.
    for params in ({}, {"format": "jsonl"}, {"format": "csv"}, {"format": "bogus"}):
        _as_if_never(w.b.api, "GET", "/api/campaigns/{c}/export", {"c": w.a.campaign},
                     params=params)
    for tenant in (w.a, w.b):
        response = tenant.api.get(f"/api/campaigns/{tenant.campaign}/export",
                                  params={"format": "jsonl"})
        assert response.status_code == 200, response.text
        rows = [orjson.loads(line) for line in response.content.splitlines() if line]
        assert len(rows) == tenant.opens + tenant.clicks
        assert {row["message_id"] for row in rows} == {tenant.message["id"]}


def get_message(w: World) -> None:
    _as_if_never(w.b.api, "GET", "/api/messages/{m}", {"m": w.a.message["id"]})
    for tenant in (w.a, w.b):
        events = tenant.api.get(f"/api/messages/{tenant.message['id']}").json()["events"]
        assert sorted(e["type"] for e in events) == sorted(
            ["open"] * tenant.opens + ["click"] * tenant.clicks)


def get_account(w: World) -> None:
    a, b = w.a.api.get("/api/account").json(), w.b.api.get("/api/account").json()
    assert (a["name"], b["name"]) == ("A", "B") and a["id"] != b["id"]


def patch_account(w: World) -> None:
    before = w.a.api.get("/api/account").json()
    changed = w.b.api.patch("/api/account", json={"retention_days": 7,
                                                  "honour_privacy_signals": True})
    assert changed.status_code == 200, changed.text
    assert w.a.api.get("/api/account").json() == before


def restore_campaign(w: World) -> None:
    deleted = campaign(w.a.api, name="deleted by A")
    assert w.a.api.delete(f"/api/campaigns/{deleted}").status_code == 204
    for cid in (deleted, w.a.campaign):
        _as_if_never(w.b.api, "POST", "/api/campaigns/{c}/restore", {"c": cid})
    assert w.a.api.get(f"/api/campaigns/{deleted}").status_code == 404  # still deleted


def campaign_privacy(w: World) -> None:
    _as_if_never(w.b.api, "GET", "/api/campaigns/{c}/privacy", {"c": w.a.campaign})


def erase_recipient(w: World) -> None:
    def attempt() -> None:
        erased = w.b.api.delete(f"/api/recipients/{w.a.recipient}")
        assert erased.status_code == 200, erased.text
        assert erased.json() == {"messages": 0, "events": 0, "links": 0}
    _a_unchanged(w, attempt)
    activity = w.a.api.get(f"/api/messages/{w.a.message['id']}").json()
    assert activity["recipient"] == w.a.recipient
    assert len(activity["events"]) == w.a.opens + w.a.clicks


def export_recipient(w: World) -> None:
    theirs = w.b.api.get(f"/api/recipients/{w.a.recipient}/export")
    assert theirs.status_code == 200, theirs.text
    assert theirs.json()["messages"] == []
    own = w.a.api.get(f"/api/recipients/{w.a.recipient}/export").json()
    assert [m["id"] for m in own["messages"]] == [w.a.message["id"]]


def opt_out_state(w: World) -> None:
    for tenant in (w.a, w.b):
        state = tenant.api.get(f"/api/recipients/{w.a.recipient}/opt-out")
        assert state.status_code == 200 and state.json()["opted_out"] is False, state.text


def opt_out(w: World) -> None:
    # A message of A's own to the same address: B opting the address out must not stop
    # A from recording its hits.
    probe = campaign(w.a.api, name="opt-out probe")
    message = register(w.a.api, probe, recipient=w.a.recipient)
    assert w.b.api.post(f"/api/recipients/{w.a.recipient}/opt-out").json()["opted_out"]
    assert w.a.api.get(f"/api/recipients/{w.a.recipient}/opt-out").json()["opted_out"] is False
    with httpx.Client(timeout=10) as public:
        assert public.get(message["pixel_url"], headers={"user-agent": CHROME}
                          ).status_code == 200
    wait_for(lambda: _report(w.a.api, probe)["opens"]["total"] == 1,
             message="A's hit to be recorded despite B's opt-out of the address")
    assert w.b.api.delete(f"/api/recipients/{w.a.recipient}/opt-out").status_code == 200


def withdraw_opt_out(w: World) -> None:
    assert w.a.api.post(f"/api/recipients/{w.b.recipient}/opt-out").json()["opted_out"]
    try:
        withdrawn = w.b.api.delete(f"/api/recipients/{w.b.recipient}/opt-out")
        assert withdrawn.status_code == 200 and withdrawn.json()["opted_out"] is False
        # B's withdrawal is B's: A's opt-out of the same address stands.
        assert w.a.api.get(f"/api/recipients/{w.b.recipient}/opt-out").json()["opted_out"]
    finally:
        w.a.api.delete(f"/api/recipients/{w.b.recipient}/opt-out")


def list_messages(w: World) -> None:
    for params in ({}, {"status": "opened"}, {"format": "csv"}, {"status": "bogus"},
                   {"link": A_LINK}, {"search": w.a.recipient}):
        _as_if_never(w.b.api, "GET", "/api/campaigns/{c}/messages", {"c": w.a.campaign},
                     params=params)
    for tenant in (w.a, w.b):
        listed = tenant.api.get(f"/api/campaigns/{tenant.campaign}/messages").json()
        assert [(m["id"], m["opens"], m["clicks"]) for m in listed["messages"]] == [
            (tenant.message["id"], tenant.opens, tenant.clicks)]


def put_consent(w: World) -> None:
    # B's record for the address is B's: A's campaign that requires consent still has it.
    probe = campaign(w.a.api, {"consent": {"opens": True, "clicks": True}},
                     name="consent probe")
    given = {"opens": True, "clicks": True, "method": "signup form"}
    assert w.a.api.put(f"/api/recipients/{w.b.recipient}/consent", json=given
                       ).status_code == 200
    try:
        message = register(w.a.api, probe, [A_LINK], recipient=w.b.recipient)
        refused = w.b.api.put(f"/api/recipients/{w.b.recipient}/consent",
                              json={**given, "opens": False, "clicks": False})
        assert refused.status_code == 200, refused.text
        assert w.a.api.get(f"/api/recipients/{w.b.recipient}/consent").json()["opens"] is True
        with httpx.Client(timeout=10) as public:
            assert public.get(message["pixel_url"], headers={"user-agent": CHROME}
                              ).status_code == 200
        wait_for(lambda: _report(w.a.api, probe)["opens"]["total"] == 1,
                 message="A's hit to be recorded despite B's refusal for the address")
    finally:
        w.b.api.put(f"/api/recipients/{w.b.recipient}/consent", json=given)


def get_consent(w: World) -> None:
    given = {"opens": True, "clicks": False, "method": "A's form", "wording": "A's words"}
    assert w.a.api.put(f"/api/recipients/{w.a.recipient}/consent", json=given
                       ).status_code == 200
    theirs = w.b.api.get(f"/api/recipients/{w.a.recipient}/consent")
    never = w.b.api.get("/api/recipients/nobody-ever@example.com/consent")
    assert theirs.status_code == never.status_code == 404, theirs.text
    assert theirs.json() == {"error": "no consent is on record for this recipient"}
    assert w.a.api.get(f"/api/recipients/{w.a.recipient}/consent").json()["wording"] == (
        "A's words")


def _key_ids(tenant: Tenant) -> set[str]:
    return {key["id"] for key in tenant.api.get("/api/keys").json()}


def list_keys(w: World) -> None:
    assert _key_ids(w.a) and _key_ids(w.b) and not _key_ids(w.a) & _key_ids(w.b)


def create_key(w: World) -> None:
    made = w.b.api.post("/api/keys", json={"name": "made by B", "scope": "read"})
    assert made.status_code == 201, made.text
    assert made.json()["id"] in _key_ids(w.b) and made.json()["id"] not in _key_ids(w.a)
    with w.server.client(made.json()["api_key"]) as reader:
        assert reader.get(f"/api/campaigns/{w.a.campaign}").status_code == 404


def revoke_key(w: World) -> None:
    before = _key_ids(w.a)
    for key_id in before:
        _as_if_never(w.b.api, "DELETE", "/api/keys/{k}", {"k": key_id})
        _as_if_never(w.b.api, "DELETE", "/api/keys/{k}", {"k": "0" * 8})
    assert _key_ids(w.a) == before


def rotate_key(w: World) -> None:
    before = _key_ids(w.a)
    for key_id in before:
        _as_if_never(w.b.api, "POST", "/api/keys/{k}/rotate", {"k": key_id})
    assert _key_ids(w.a) == before


@contextmanager
def _signed_in(w: World, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=w.server.url, timeout=10) as browser:
        form = browser.get("/dashboard/sign-in").text
        token = re.search(r'name="form_token" value="([^"]+)"', form)
        assert token, form
        response = browser.post("/dashboard/sign-in", data={"form_token": token.group(1),
                                                            "api_key": key})
        assert response.status_code == 303, response.text
        yield browser


def dashboard_page(template: str) -> Callable[[World], None]:
    def case(w: World) -> None:
        with _signed_in(w, w.b_key) as browser:
            ids = {"c": w.a.campaign, "m": w.a.message["id"]}
            response = browser.get(template.format(**ids))
            never = browser.get(template.format(c=NEVER, m=NEVER))
            assert response.status_code == never.status_code == 404, template
            assert "a.example" not in response.text and "campaign of" not in response.text
    return case


def dashboard_campaigns(w: World) -> None:
    with _signed_in(w, w.b_key) as browser:
        page = browser.get("/dashboard/campaigns")
        assert page.status_code == 200
        assert "campaign of https://b.example/offer" in page.text
        assert "a.example" not in page.text


CASES: dict[tuple[str, str], Callable[[World], None]] = {
    ("GET", "/api/campaigns"): list_campaigns,
    ("POST", "/api/campaigns"): create_campaign,
    ("GET", "/api/campaigns/{id}"): get_campaign,
    ("PATCH", "/api/campaigns/{id}"): patch_campaign,
    ("DELETE", "/api/campaigns/{id}"): delete_campaign,
    ("POST", "/api/campaigns/{id}/messages"): register_message,
    ("POST", "/api/campaigns/{id}/messages/batch"): register_batch,
    ("GET", "/api/campaigns/{id}/report"): campaign_report,
    ("GET", "/api/campaigns/{id}/export"): export_events,
    ("GET", "/api/messages/{id}"): get_message,
    ("GET", "/api/account"): get_account,
    ("PATCH", "/api/account"): patch_account,
    ("POST", "/api/campaigns/{id}/restore"): restore_campaign,
    ("GET", "/api/campaigns/{id}/privacy"): campaign_privacy,
    ("DELETE", "/api/recipients/{address}"): erase_recipient,
    ("GET", "/api/recipients/{address}/export"): export_recipient,
    ("GET", "/api/recipients/{address}/opt-out"): opt_out_state,
    ("POST", "/api/recipients/{address}/opt-out"): opt_out,
    ("DELETE", "/api/recipients/{address}/opt-out"): withdraw_opt_out,
    ("GET", "/api/campaigns/{id}/messages"): list_messages,
    ("PUT", "/api/recipients/{address}/consent"): put_consent,
    ("GET", "/api/recipients/{address}/consent"): get_consent,
    ("GET", "/api/keys"): list_keys,
    ("POST", "/api/keys"): create_key,
    ("DELETE", "/api/keys/{id}"): revoke_key,
    ("POST", "/api/keys/{id}/rotate"): rotate_key,
    ("GET", "/dashboard/campaigns"): dashboard_campaigns,
    ("GET", "/dashboard/campaigns/{id}"): dashboard_page("/dashboard/campaigns/{c}"),
    ("GET", "/dashboard/campaigns/{id}/messages"): dashboard_page(
        "/dashboard/campaigns/{c}/messages"),
    ("GET", "/dashboard/campaigns/{id}/messages/export"): dashboard_page(
        "/dashboard/campaigns/{c}/messages/export?format=csv"),
    ("GET", "/dashboard/messages/{id}"): dashboard_page("/dashboard/messages/{m}"),
}


@pytest.mark.slow
def test_every_route_has_a_tenant_case(tmp_path: Path, module_dsn: str) -> None:
    routes = app_routes(tmp_path, module_dsn)
    missing = routes - PUBLIC - set(CASES)
    assert not missing, (
        f"routes without a tenant-isolation case in tests/test_isolation.py: {sorted(missing)}"
        " (add one to CASES, or to PUBLIC if the route serves no account's data)")
    gone = (set(CASES) | PUBLIC) - routes
    assert not gone, f"cases for routes the app no longer has: {sorted(gone)}"


@pytest.mark.parametrize("route", sorted(CASES), ids=lambda r: f"{r[0]} {r[1]}")
def test_another_accounts_objects_stay_invisible(world: World, route: tuple[str, str]) -> None:
    CASES[route](world)
