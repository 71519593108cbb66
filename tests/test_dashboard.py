"""The web dashboard against a real server and a real database, and in real headless Chromium.

The hits are real requests on the tracking endpoints; the pages' numbers are read from
the DOM and compared with the API's report; the charts are checked on a screenshot.
The browser is driven over the DevTools protocol (a small client below, on the
`websockets` package), each test in its own browser context, so cookies never leak
between tests.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import httpx
import pytest
from PIL import Image
from starlette.requests import Request
from websockets.sync.client import ClientConnection, connect

from tests.geodb import build_test_city_db
from tracker.ingest.policy import DEFAULT, Policy
from tracker.ingest.tokens import Signer
from tracker.lifespan import Runtime
from tracker.settings import load
from tracker.web import dashboard, sessions
from tracker.web.charts import breakdown_rows, campaign_view, timeline_series
from tracker.web.sessions import SessionKeys

from .support import Server, campaign, db_fetch, new_account, register, wait_for

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")
IPHONE_SAFARI = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
                 "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1")
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0"
FRANKFURT, BOXFORD, LINKOPING = "81.2.69.142", "2.125.160.216", "89.160.20.112"
APPLE_MAIL = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
              "(KHTML, like Gecko)")
APPLE_PROXY = "17.58.101.9"
# Angle brackets and quotes in a name: the page must show them as text, never as markup.
CAMPAIGN_NAME = 'Spring <b>sale</b> & "friends"'
SCREENSHOT = Path("/tmp/tracker-dashboard-campaign.png")
PHONE_SCREENSHOT = Path("/tmp/tracker-dashboard-campaign-phone.png")
MESSAGE_SCREENSHOT = Path("/tmp/tracker-dashboard-message.png")
MESSAGES_SCREENSHOT = Path("/tmp/tracker-dashboard-messages.png")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# --- a real server with real hits ------------------------------------------------------------

@dataclass(frozen=True)
class Seeded:
    key: str
    other_key: str
    campaign_id: str
    other_campaign_id: str
    other_message_id: str
    message_ids: list[str]


@pytest.fixture(scope="module")
def server(module_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("dashboard-server")
    geo_db = build_test_city_db(tmp / "city.mmdb")
    srv = Server(module_dsn, tmp, env={"TRACKER_GEOIP_DB": str(geo_db),
                                       "TRACKER_FLUSH_INTERVAL_MS": "50"}).start()
    yield srv
    srv.stop()


def _hit(public: httpx.Client, url: str, agent: str, ip: str | None = None,
         method: str = "GET") -> None:
    headers = {"user-agent": agent, **({"x-forwarded-for": ip} if ip else {})}
    response = public.request(method, url.removeprefix(str(public.base_url).rstrip("/")),
                              headers=headers)
    assert response.status_code in (200, 302), response.status_code


def _report(api: httpx.Client, campaign_id: str) -> dict[str, Any]:
    response = api.get(f"/api/campaigns/{campaign_id}/report")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def _recorded(report: dict[str, Any]) -> int:
    return sum(report[kind][n] for kind in ("opens", "clicks") for n in ("total", "machine"))


@pytest.fixture(scope="module")
def seeded(server: Server, module_dsn: str) -> Seeded:
    key, other_key = new_account(module_dsn, "acme"), new_account(module_dsn, "rival")
    # Sent an hour ago, so no click counts as a scanner's for coming seconds after sending.
    sent_at = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    links = ["https://example.com/sale?utm_source=mail", "https://example.com/blog/spring",
             "https://example.org/unsubscribe"]
    with server.client(key) as api, server.client(other_key) as rival, \
            httpx.Client(base_url=server.url, timeout=10) as public:
        campaign_id = campaign(api, name=CAMPAIGN_NAME)
        messages = [register(api, campaign_id, links, recipient=f"reader{i}@example.com",
                             subject=f"Spring news {i}", sent_at=sent_at) for i in range(4)]
        other_campaign_id = campaign(rival, name="Rival's secret campaign")
        other_message = register(rival, other_campaign_id, links[:1],
                                 recipient="secret@rival.example")

        first, second, third, fourth = messages
        _hit(public, first["pixel_url"], CHROME, FRANKFURT)
        _hit(public, first["links"][0]["tracked_url"], CHROME, FRANKFURT)
        _hit(public, second["pixel_url"], IPHONE_SAFARI, BOXFORD)
        _hit(public, second["pixel_url"], IPHONE_SAFARI, BOXFORD)
        _hit(public, second["links"][1]["tracked_url"], IPHONE_SAFARI, BOXFORD)
        _hit(public, third["pixel_url"], FIREFOX, LINKOPING)
        _hit(public, third["links"][0]["tracked_url"], FIREFOX, LINKOPING, method="HEAD")
        _hit(public, fourth["links"][0]["tracked_url"], CHROME, FRANKFURT, method="HEAD")
        _hit(public, fourth["pixel_url"], APPLE_MAIL, APPLE_PROXY)  # MPP's prefetch
        hits = 9

        def settled() -> dict[str, Any]:
            report = _report(api, campaign_id)
            return report if _recorded(report) >= hits else {}

        report = wait_for(settled, message="the hits in the report")
        # What the charts and the comparisons below need: readers and machines both.
        assert report["opens"]["total"] > 0 and report["clicks"]["total"] > 0, report
        assert report["clicks"]["machine"] >= 2, report  # HEAD is never a human click
    return Seeded(key, other_key, campaign_id, other_campaign_id, other_message["id"],
                  [m["id"] for m in messages])


# --- plain HTTP: cookies, CSRF, headers ------------------------------------------------------

def _form_token(html: str) -> str:
    match = re.search(r'name="form_token" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


def _csrf_token(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


def _sign_in(client: httpx.Client, key: str, **headers: str) -> httpx.Response:
    token = _form_token(client.get("/dashboard/sign-in").text)
    return client.post("/dashboard/sign-in", data={"form_token": token, "api_key": key},
                       headers=headers)


@pytest.fixture
def browserless(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10, follow_redirects=False) as client:
        yield client


def test_sign_in_sets_a_strict_http_only_session_cookie_that_is_not_the_key(
        browserless: httpx.Client, seeded: Seeded) -> None:
    response = _sign_in(browserless, seeded.key)
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/dashboard/campaigns"
    (cookie,) = response.headers.get_list("set-cookie")
    name, _, rest = cookie.partition("=")
    value, *attributes = [part.strip() for part in rest.split(";")]
    assert name == "tracker_session"
    assert set(attributes) == {"Max-Age=43200", "Path=/", "HttpOnly", "SameSite=Strict"}
    secret = seeded.key.split("_", 3)[3]
    assert secret not in value and seeded.key not in value and len(value) > 40
    page = browserless.get("/dashboard/campaigns")
    assert page.status_code == 200
    assert "Spring &lt;b&gt;sale&lt;/b&gt; &amp; &#34;friends&#34;" in page.text
    assert "Rival" not in page.text


def test_cookie_is_secure_and_host_prefixed_behind_a_trusted_https_proxy(
        browserless: httpx.Client, seeded: Seeded) -> None:
    response = _sign_in(browserless, seeded.key, **{"x-forwarded-proto": "https"})
    assert response.status_code == 303
    (cookie,) = response.headers.get_list("set-cookie")
    assert cookie.startswith("__Host-tracker_session=")
    assert {p.strip() for p in cookie.split(";")[1:]} == {
        "Max-Age=43200", "Path=/", "HttpOnly", "SameSite=Strict", "Secure"}
    # The HTTPS cookie is not read over plain HTTP. (Sent by hand: httpx, like a browser,
    # keeps a Secure cookie off a plain-HTTP connection.)
    pair = cookie.partition(";")[0]
    assert browserless.get("/dashboard/campaigns", headers={"cookie": pair}).status_code == 303
    assert browserless.get("/dashboard/campaigns", headers={
        "cookie": pair, "x-forwarded-proto": "https"}).status_code == 200


def test_x_forwarded_proto_is_believed_only_from_a_trusted_proxy() -> None:
    def request(peer: str, proto: str | None, scheme: str = "http") -> Request:
        headers = [(b"x-forwarded-proto", proto.encode())] if proto else []
        return Request({"type": "http", "scheme": scheme, "method": "GET", "path": "/",
                        "query_string": b"", "headers": headers, "client": (peer, 4242),
                        "server": ("127.0.0.1", 8000)})

    # Only settings are needed: nothing here touches the database.
    settings = load({"TRACKER_SECRET_KEY": "y" * 32, "TRACKER_TRUSTED_PROXIES": "10.0.0.0/8"})
    board = dashboard.Dashboard(Runtime(settings, Signer(["y" * 32]), "postgresql://unused"))
    assert board._https(request("10.1.2.3", "https"))
    assert board._https(request("10.1.2.3", "https, http"))
    assert not board._https(request("203.0.113.9", "https"))
    assert not board._https(request("10.1.2.3", "http"))
    assert board._https(request("203.0.113.9", None, scheme="https"))


def test_wrong_key_is_401_with_the_form_again_and_no_cookie(browserless: httpx.Client,
                                                           seeded: Seeded) -> None:
    for wrong in (seeded.key[:-2] + "xx", "tk_1_nokey_secret", "not a key", ""):
        response = _sign_in(browserless, wrong)
        assert response.status_code == 401, wrong
        assert "set-cookie" not in response.headers
        assert "That API key is not valid." in response.text
        assert 'name="api_key"' in response.text


def test_failed_sign_ins_are_throttled_per_address_with_retry_after(
        browserless: httpx.Client, seeded: Seeded) -> None:
    attacker = {"x-forwarded-for": "198.51.100.20"}  # the loopback peer is a trusted proxy
    wrong = seeded.key[:-4] + "AAAA"
    assert [_sign_in(browserless, wrong, **attacker).status_code for _ in range(10)] == [401] * 10
    refused = _sign_in(browserless, wrong, **attacker)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 6
    assert "Too many failed sign-ins from your address" in refused.text
    assert 'name="api_key"' in refused.text  # the form again, as for a wrong key
    assert "set-cookie" not in refused.headers
    assert refused.headers["content-security-policy"] == dashboard.CSP
    # The right key from that address waits too: the key is not even looked at.
    right = _sign_in(browserless, seeded.key, **attacker)
    assert right.status_code == 429 and "set-cookie" not in right.headers
    # Another address is not affected.
    assert _sign_in(browserless, seeded.key,
                    **{"x-forwarded-for": "198.51.100.21"}).status_code == 303


def test_sign_in_and_api_take_guesses_from_one_bucket_per_address(
        server: Server, browserless: httpx.Client, seeded: Seeded) -> None:
    # Alternating between the API and the dashboard buys an attacker no extra guesses.
    attacker = {"x-forwarded-for": "198.51.100.22"}
    wrong = seeded.key[:-4] + "AAAA"
    with httpx.Client(base_url=server.url, timeout=10) as api:
        for _ in range(5):
            assert api.get("/api/campaigns", headers={
                **attacker, "authorization": f"Bearer {wrong}"}).status_code == 401
            assert _sign_in(browserless, wrong, **attacker).status_code == 401
        assert _sign_in(browserless, wrong, **attacker).status_code == 429
        refused = api.get("/api/campaigns", headers={
            **attacker, "authorization": f"Bearer {seeded.key}"})
        assert refused.status_code == 429 and refused.json().keys() == {"error"}


def test_sign_in_post_from_another_site_or_without_its_form_token_is_refused(
        browserless: httpx.Client, seeded: Seeded) -> None:
    # Login CSRF: another site signing the visitor into the attacker's account.
    cross_site = _sign_in(browserless, seeded.key, **{"sec-fetch-site": "cross-site"})
    assert cross_site.status_code == 403 and "set-cookie" not in cross_site.headers
    foreign_origin = _sign_in(browserless, seeded.key, origin="https://evil.example")
    assert foreign_origin.status_code == 403 and "set-cookie" not in foreign_origin.headers
    no_token = browserless.post("/dashboard/sign-in", data={"api_key": seeded.key})
    assert no_token.status_code == 403 and "set-cookie" not in no_token.headers
    forged = browserless.post("/dashboard/sign-in",
                              data={"api_key": seeded.key, "form_token": "AAAA" * 20})
    assert forged.status_code == 403 and "set-cookie" not in forged.headers


def test_sign_out_without_the_csrf_token_is_refused(browserless: httpx.Client,
                                                     seeded: Seeded) -> None:
    assert _sign_in(browserless, seeded.key).status_code == 303
    page = browserless.get("/dashboard/campaigns")
    token = _csrf_token(page.text)
    for data in ({}, {"csrf_token": ""}, {"csrf_token": token[:-3] + "AAA"}):
        refused = browserless.post("/dashboard/sign-out", data=data)
        assert refused.status_code == 403, data
        assert "set-cookie" not in refused.headers
    cross_site = browserless.post("/dashboard/sign-out", data={"csrf_token": token},
                                  headers={"sec-fetch-site": "cross-site"})
    assert cross_site.status_code == 403
    assert browserless.get("/dashboard/campaigns").status_code == 200  # still signed in

    signed_out = browserless.post("/dashboard/sign-out", data={"csrf_token": token})
    assert signed_out.status_code == 303
    assert signed_out.headers["location"] == "/dashboard/sign-in?signed-out"
    assert "Max-Age=0" in signed_out.headers["set-cookie"]
    assert browserless.get("/dashboard/campaigns").status_code == 303


@pytest.mark.slow
def test_signing_out_ends_the_session_for_a_copied_cookie_in_every_worker(
        module_dsn: str, tmp_path: Path) -> None:
    """Signing out revokes the session on the server: the cookie's value, copied before,
    gets nowhere afterwards, whichever worker a new connection lands on."""
    srv = Server(module_dsn, tmp_path, env={"TRACKER_WORKERS": "2"}).start()
    try:
        key = new_account(module_dsn, "signing out")
        with httpx.Client(base_url=srv.url, timeout=10, follow_redirects=False) as browser:
            assert _sign_in(browser, key).status_code == 303
            copied = browser.cookies["tracker_session"]
            token = _csrf_token(browser.get("/dashboard/campaigns").text)

            def page_with_the_copy() -> int:
                # A connection of its own each time: the kernel spreads them over the workers.
                return httpx.get(srv.url + "/dashboard/campaigns", timeout=10,
                                 cookies={"tracker_session": copied}).status_code

            assert [page_with_the_copy() for _ in range(8)] == [200] * 8
            assert browser.post("/dashboard/sign-out",
                                data={"csrf_token": token}).status_code == 303
            assert [page_with_the_copy() for _ in range(16)] == [303] * 16
            # Signing in again makes a new session, which works.
            assert _sign_in(browser, key).status_code == 303
            assert browser.get("/dashboard/campaigns").status_code == 200
    finally:
        srv.stop()


def test_pages_without_a_valid_session_redirect_to_sign_in(browserless: httpx.Client,
                                                           seeded: Seeded) -> None:
    path = f"/dashboard/campaigns/{seeded.campaign_id}?tz=Europe/Berlin"
    response = browserless.get(path)
    assert response.status_code == 303
    assert response.headers["location"] == (
        f"/dashboard/sign-in?next=/dashboard/campaigns/{seeded.campaign_id}%3Ftz%3DEurope/Berlin")
    signed_in = _sign_in(browserless, seeded.key)
    value = signed_in.cookies["tracker_session"]
    tampered = value[:-4] + ("AAAA" if not value.endswith("AAAA") else "BBBB")
    browserless.cookies.clear()
    browserless.cookies.set("tracker_session", tampered)
    assert browserless.get("/dashboard/campaigns").status_code == 303
    # The API key is not a session: a cookie holding it gets nowhere either.
    browserless.cookies.set("tracker_session", seeded.key)
    assert browserless.get("/dashboard/campaigns").status_code == 303


def test_a_link_followed_from_another_site_goes_on_from_a_page_of_our_own(
        browserless: httpx.Client, seeded: Seeded) -> None:
    # SameSite=Strict: the browser sends no cookie on a navigation that starts elsewhere.
    path = f"/dashboard/campaigns/{seeded.campaign_id}?tz=Europe/Berlin&x=%27%22;url=//evil"
    response = browserless.get(path, headers={"sec-fetch-site": "cross-site",
                                              "sec-fetch-mode": "navigate"})
    assert response.status_code == 200 and "set-cookie" not in response.headers
    match = re.search(r'<meta http-equiv="refresh" content="0; url=([^"]*)">', response.text)
    assert match, response.text
    # The same page, as a path of ours; nothing in it that could end the URL early.
    target = html.unescape(match.group(1))
    assert target.startswith(f"/dashboard/campaigns/{seeded.campaign_id}?tz=Europe/Berlin&x=")
    assert not set(target) & set("'\";<> ")
    assert browserless.get(path).status_code == 303  # not from another site: sign in


def test_revoking_the_api_key_ends_its_sessions(browserless: httpx.Client, server: Server,
                                                module_dsn: str, seeded: Seeded) -> None:
    key = new_account(module_dsn, "short-lived")
    assert _sign_in(browserless, key).status_code == 303
    assert browserless.get("/dashboard/campaigns").status_code == 200
    account_id, key_id = key.split("_")[1:3]
    db_fetch(module_dsn, "update api_keys set revoked_at = now() "
             "where account_id = $1 and key_id = $2", int(account_id), key_id)
    assert browserless.get("/dashboard/campaigns").status_code == 303


def test_another_accounts_campaign_and_message_are_404(browserless: httpx.Client,
                                                       seeded: Seeded) -> None:
    assert _sign_in(browserless, seeded.key).status_code == 303
    for path in (f"/dashboard/campaigns/{seeded.other_campaign_id}",
                 f"/dashboard/campaigns/{seeded.other_campaign_id}/messages",
                 f"/dashboard/messages/{seeded.other_message_id}",
                 "/dashboard/campaigns/999999", "/dashboard/campaigns/abc",
                 "/dashboard/messages/99999999999999999999"):
        response = browserless.get(path)
        assert response.status_code == 404, path
        assert "Rival" not in response.text and "secret@rival" not in response.text
    own = browserless.get(f"/dashboard/messages/{seeded.message_ids[0]}")
    assert own.status_code == 200 and "reader0@example.com" in own.text


def test_every_page_has_the_security_headers_and_no_store(browserless: httpx.Client,
                                                          seeded: Seeded) -> None:
    responses = [browserless.get("/dashboard/sign-in"), _sign_in(browserless, "wrong")]
    assert _sign_in(browserless, seeded.key).status_code == 303
    responses += [browserless.get(p) for p in (
        "/dashboard/campaigns", f"/dashboard/campaigns/{seeded.campaign_id}",
        f"/dashboard/campaigns/{seeded.campaign_id}/messages",
        f"/dashboard/messages/{seeded.message_ids[0]}", "/dashboard/campaigns/0",
        f"/dashboard/campaigns/{seeded.campaign_id}?tz=Mars/Olympus")]
    assert [r.status_code for r in responses] == [200, 401, 200, 200, 200, 200, 404, 400]
    for response in responses:
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "same-origin"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        # No inline script or style for the CSP to have to allow.
        assert "<style" not in response.text and " style=" not in response.text
        assert not re.search(r"<script(?![^>]*(\bsrc=|application/json))", response.text)


def test_static_files_are_served_from_the_package_only(browserless: httpx.Client) -> None:
    page = browserless.get("/dashboard/sign-in").text
    match = re.search(r'href="(/dashboard/static/dashboard\.css\?v=[0-9a-f]+)"', page)
    assert match
    css = browserless.get(match.group(1))
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "immutable" in css.headers["cache-control"]
    assert browserless.get(match.group(1), headers={"if-none-match": css.headers["etag"]}
                           ).status_code == 304
    chart = browserless.get("/dashboard/static/vendor/chart.js/chart.umd.min.js")
    assert chart.status_code == 200 and b"Chart.js v4" in chart.content[:200]
    assert chart.headers["cache-control"] == "no-cache"  # no version: revalidate
    # Files that exist beside the static directory: a way out of it would serve them.
    for path in ("/dashboard/static/../api.py", "/dashboard/static/%2e%2e/api.py",
                 "/dashboard/static/%2e%2e/dashboard/app.py",
                 "/dashboard/static/vendor/chart.js/LICENSE.md", "/dashboard/static/nope.js"):
        assert browserless.get(path).status_code == 404, path


def test_tracking_endpoints_set_no_cookie_even_for_a_signed_in_browser(
        browserless: httpx.Client, server: Server, seeded: Seeded) -> None:
    assert _sign_in(browserless, seeded.key).status_code == 303
    for path in ("/o/whatever.gif", "/c/whatever"):
        response = browserless.get(path)
        assert "set-cookie" not in response.headers, path


# --- pure parts --------------------------------------------------------------------------------

def test_session_tokens_expire_do_not_verify_under_another_key_and_survive_rotation() -> None:
    old, new = SessionKeys("old-key-0123456789abcdef"), SessionKeys("other-key-0123456789abcdef")
    now = time.time()
    token = old.issue(7, "abcd1234", now)
    session = old.verify(token, now + 60)
    assert session is not None and (session.account_id, session.key_id) == (7, "abcd1234")
    assert old.verify(token, now + sessions.SESSION_LIFETIME_S + 1) is None
    assert new.verify(token, now) is None
    rotated = SessionKeys("other-key-0123456789abcdef,old-key-0123456789abcdef")
    assert rotated.verify(token, now) is not None
    assert rotated.check_csrf(session, old.csrf(session))
    assert not new.check_csrf(session, old.csrf(session))
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[1] ^= 1  # another account id, same MAC
    forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    assert old.verify(forged, now) is None
    assert old.check_sign_in_form(old.sign_in_form(now), now + 10)
    assert not old.check_sign_in_form(old.sign_in_form(now), now + 7200)
    assert not old.check_sign_in_form(token, now)  # a session token is no form token


def test_timeline_fills_empty_hours_and_switches_to_days_past_two_weeks() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    points = [{"at": "2025-03-01T10:00:00+01:00", "opens": 2, "clicks": 1},
              {"at": "2025-03-01T13:00:00+01:00", "opens": 1, "clicks": 0}]
    unit, labels, opens, clicks = timeline_series(points, berlin)
    # At least twelve hours, ending with the last one that has anything.
    assert unit == "hour" and len(labels) == 12
    assert labels[0] == "Mar 1, 02:00" and labels[-4:] == [
        "Mar 1, 10:00", "Mar 1, 11:00", "Mar 1, 12:00", "Mar 1, 13:00"]
    assert (opens, clicks) == ([0] * 8 + [2, 0, 0, 1], [0] * 8 + [1, 0, 0, 0])
    # Across a change to summer time the hours stay an hour apart (no 02:00 on Mar 30).
    dst = [{"at": "2025-03-30T01:00:00+01:00", "opens": 1, "clicks": 0},
           {"at": "2025-03-30T13:00:00+02:00", "opens": 1, "clicks": 0}]
    _, labels, opens, _ = timeline_series(dst, berlin)
    assert len(labels) == 12 and "Mar 30, 02:00" not in labels and "Mar 30, 03:00" in labels
    assert opens[0] == 1 and opens[-1] == 1
    points.append({"at": "2025-03-20T23:00:00+01:00", "opens": 4, "clicks": 3})
    unit, labels, opens, clicks = timeline_series(points, berlin)
    assert unit == "day" and len(labels) == 20 and labels[0] == "Mar 1" and labels[-1] == "Mar 20"
    assert (opens[0], opens[-1], sum(opens), sum(clicks)) == (3, 4, 7, 4)
    assert timeline_series([], berlin) == ("hour", [], [], [])


def test_campaign_view_keeps_top_values_and_respects_the_policy() -> None:
    breakdown = {"opens": {"country": {f"C{i}": 100 - i for i in range(15)} | {"unknown": 1},
                           "region": {}, "browser": {"Chrome": 3}, "os": {}, "device": {}},
                 "clicks": {"country": {"C0": 5}, "region": {}, "browser": {}, "os": {},
                            "device": {"mobile": 2}}}
    rows = breakdown_rows(breakdown, "country")
    assert rows[0] == ("C0", 100, 5) and rows[-1] == ("unknown", 1, 0)
    report = {"timeline": [], "links": [], "breakdown": breakdown,
              "opens": {"total": 0, "unique": 0, "machine": 0},
              "clicks": {"total": 0, "unique": 0, "machine": 0}}
    view = campaign_view(report, DEFAULT, ZoneInfo("UTC"))
    country = next(c for c in view["charts"] if c["id"] == "country")
    assert len(country["labels"]) == 10 and country["labels"][-1] == "Other"
    assert sum(country["series"][0]["values"]) == sum(breakdown["opens"]["country"].values())
    assert "device" not in view["chart_ids"]  # clicks only: a doughnut of opens would be empty
    private = campaign_view(report, Policy(location="none", device=False), ZoneInfo("UTC"))
    assert not {"country", "region", "browser"} & private["chart_ids"]
    assert not any(d["allowed"] for d in private["dimensions"])


# --- in Chromium ---------------------------------------------------------------------------------

class CDPError(RuntimeError):
    pass


class Browser:
    """Headless Chromium, driven over the DevTools protocol on its browser websocket."""

    def __init__(self, executable: str, profile: Path) -> None:
        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"

        def endpoint() -> str:
            if self.proc.poll() is not None:
                raise AssertionError(f"chromium exited with {self.proc.returncode}")
            lines = port_file.read_text().split("\n") if port_file.exists() else []
            return f"ws://127.0.0.1:{lines[0]}{lines[1]}" if len(lines) >= 2 and lines[1] else ""

        self._stack = ExitStack()
        self.ws: ClientConnection = self._stack.enter_context(connect(
            wait_for(endpoint, 30, message="chromium's port"), max_size=None, open_timeout=10))
        self._next = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None, timeout: float = 20) -> dict[str, Any]:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no answer to {method} within {timeout}s")
            data = json.loads(self.ws.recv(timeout=remaining))
            if data.get("id") == self._next:
                if "error" in data:
                    raise CDPError(f"{method}: {data['error']}")
                result: dict[str, Any] = data["result"]
                return result
            if "method" in data:
                self.events.append(data)

    def close(self) -> None:
        with suppress(Exception):  # the process is stopped below either way
            self.send("Browser.close", timeout=5)
        self._stack.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# Runs before any page script (the DevTools protocol is not subject to the page's CSP):
# records every CSP violation the page meets.
_VIOLATION_RECORDER = """
window.__csp = [];
document.addEventListener("securitypolicyviolation",
    e => window.__csp.push(e.effectiveDirective + " " + e.blockedURI));
"""


class Tab:
    """A page in a browser context of its own (its own cookie jar)."""

    def __init__(self, browser: Browser, base_url: str, width: int = 1280, height: int = 900,
                 mobile: bool = False) -> None:
        self.browser = browser
        self.base_url = base_url
        self.context = browser.send("Target.createBrowserContext")["browserContextId"]
        target = browser.send("Target.createTarget", {"url": "about:blank",
                                                      "browserContextId": self.context})
        self.session = browser.send("Target.attachToTarget", {
            "targetId": target["targetId"], "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send("Page.addScriptToEvaluateOnNewDocument", {"source": _VIOLATION_RECORDER})
        self.width, self.mobile = width, mobile
        self._resize(height)

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.send(method, params, session=self.session)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def _loaded_after(self, action: Any) -> None:
        """Runs `action` (which navigates) and waits until a new document has loaded."""
        self.evaluate("window.__old = true")
        action()
        wait_for(lambda: self._fresh(), 15, message="the next page to load")

    def _fresh(self) -> bool:
        try:
            return bool(self.evaluate("!window.__old && document.readyState === 'complete'"))
        except (AssertionError, CDPError):  # the page is between documents
            return False

    def goto(self, path: str) -> None:
        self.goto_url(self.base_url + path)

    def goto_url(self, url: str) -> None:
        self._loaded_after(lambda: self.send("Page.navigate", {"url": url}))

    def submit(self, form_selector: str, fields: dict[str, str]) -> None:
        fill = "".join(f"f.elements[{name!r}].value = {value!r};" for name, value in fields.items())
        self._loaded_after(lambda: self.evaluate(
            f"(() => {{ const f = document.querySelector({form_selector!r}); {fill}"
            "f.querySelector('button[type=submit]').click(); })()"))

    def click(self, selector: str) -> None:
        self._loaded_after(lambda: self.evaluate(f"document.querySelector({selector!r}).click()"))

    def path(self) -> str:
        return str(self.evaluate("location.pathname + location.search"))

    def cookies(self) -> list[dict[str, Any]]:
        cookies: list[dict[str, Any]] = self.browser.send(
            "Storage.getCookies", {"browserContextId": self.context})["cookies"]
        return cookies

    def violations(self) -> list[str]:
        return list(self.evaluate("window.__csp"))

    def _resize(self, height: int) -> None:
        self.send("Emulation.setDeviceMetricsOverride", {
            "width": self.width, "height": height, "deviceScaleFactor": 1, "mobile": self.mobile})

    def screenshot(self, path: Path) -> bytes:
        """The whole page, with the window made as tall as the page, and left so: what is
        measured afterwards (getBoundingClientRect) matches the picture pixel for pixel."""
        height = 0
        while height != (height := int(self.evaluate("document.documentElement.scrollHeight"))):
            self._resize(height)
            # Two frames: layout, then Chart.js redrawing at the new size.
            self.evaluate("new Promise(r => requestAnimationFrame(() => "
                          "requestAnimationFrame(() => r(0))))")
        data = base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])
        path.write_bytes(data)
        return data

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and CSP reports seen in this tab so far."""
        self.send("Runtime.evaluate", {"expression": "0"})  # lets queued events arrive
        found = []
        for event in self.browser.events:
            if event.get("sessionId") != self.session:
                continue
            method, params = event["method"], event["params"]
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails']}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(f"console.{params['type']}: {params['args']}")
            elif method == "Log.entryAdded":
                entry = params["entry"]
                # The 401/403 answers the tests provoke on purpose are logged as network errors.
                if entry["level"] == "error" and entry.get("source") != "network":
                    found.append(f"log: {entry['text']}")
                if "Content Security Policy" in entry["text"]:
                    found.append(f"csp: {entry['text']}")
        return found

    def close(self) -> None:
        self.browser.send("Target.disposeBrowserContext", {"browserContextId": self.context})


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("needs Chromium for the browser tests: apt-get install chromium (Debian)")
    chromium = Browser(CHROMIUM, tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


@pytest.fixture
def tab(browser: Browser, server: Server) -> Iterator[Tab]:
    page = Tab(browser, server.url)
    yield page
    page.close()


def _browser_sign_in(tab: Tab, key: str) -> None:
    tab.goto("/dashboard/sign-in")
    tab.submit("form[action='/dashboard/sign-in']", {"api_key": key})


def _metrics(tab: Tab) -> dict[str, str]:
    return dict(tab.evaluate("[...document.querySelectorAll('[data-metric]')]"
                             ".map(e => [e.dataset.metric, e.textContent.trim()])"))


def _shown(text: str) -> float:
    """A number as the page shows it: "1,234" or "33.3%"."""
    return float(text[:-1]) / 100 if text.endswith("%") else float(text.replace(",", ""))


def _api_value(report: dict[str, Any], dotted: str) -> float:
    value: Any = report
    for part in dotted.split("."):
        value = value[part]
    return float(value)


@pytest.mark.slow
def test_browser_wrong_key_shows_an_error_and_sets_no_cookie(tab: Tab, seeded: Seeded) -> None:
    _browser_sign_in(tab, seeded.key[:-4] + "oops")
    assert tab.path() == "/dashboard/sign-in"
    error = tab.evaluate("document.getElementById('sign-in-error')?.textContent")
    assert error == "That API key is not valid."
    assert tab.cookies() == []
    tab.goto("/dashboard/campaigns")
    assert tab.path().startswith("/dashboard/sign-in?next=")
    assert tab.problems() == [] and tab.violations() == []


@pytest.mark.slow
def test_browser_campaign_page_shows_the_api_numbers_and_draws_the_charts(
        tab: Tab, server: Server, seeded: Seeded) -> None:
    _browser_sign_in(tab, seeded.key)
    assert tab.path() == "/dashboard/campaigns"
    (cookie,) = tab.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["secure"],
            cookie["path"]) == ("tracker_session", True, "Strict", False, "/")
    assert seeded.key.split("_", 3)[3] not in cookie["value"]
    assert tab.evaluate("document.cookie") == ""  # HttpOnly: no script can read it

    names = tab.evaluate("[...document.querySelectorAll('#campaigns a')].map(a => a.textContent)")
    assert names == [CAMPAIGN_NAME]
    tab.click(f"a[data-campaign-id='{seeded.campaign_id}']")
    assert tab.path() == f"/dashboard/campaigns/{seeded.campaign_id}"
    assert tab.evaluate("document.querySelector('h1').textContent") == CAMPAIGN_NAME
    assert tab.evaluate("document.querySelector('h1 b')") is None

    with server.client(seeded.key) as api:
        report = _report(api, seeded.campaign_id)
        first_message = api.get(f"/api/messages/{seeded.message_ids[0]}").json()
    metrics = _metrics(tab)
    assert set(metrics) == {"messages", "opens.unique", "open_rate", "clicks.unique",
                            "click_rate", "click_to_open_rate", "opens.total", "clicks.total",
                            "opens.machine", "clicks.machine", "estimated_open_rate"}
    # One of four messages MPP prefetched and no reader seen: 3 opened of the other 3.
    assert (report["open_rate"], report["estimated_open_rate"]) == (0.75, 1.0)
    for name, text in metrics.items():
        expected = _api_value(report, name)
        if name.endswith("rate"):
            assert _shown(text) == pytest.approx(round(expected * 100, 1) / 100), name
        else:
            assert _shown(text) == expected, name
    links = tab.evaluate("[...document.querySelectorAll('#links-table tbody tr')].map(r => "
                         "[r.querySelector('a').title, ...[...r.querySelectorAll('td.num')]"
                         ".map(td => Number(td.textContent.replace(/,/g, '')))])")
    assert links == [[link["url"], link["clicks"], link["unique_clicks"]]
                     for link in report["links"]]
    charts = json.loads(tab.evaluate("document.getElementById('chart-data').textContent"))
    timeline = next(c for c in charts if c["id"] == "timeline")
    assert [sum(s["values"]) for s in timeline["series"]] == [
        sum(p["opens"] for p in report["timeline"]), sum(p["clicks"] for p in report["timeline"])]

    # Every chart drawn, each with its series' colours on the screenshot.
    expected_charts = {"timeline", "machines", "links", "client", "country", "region",
                       "browser", "os", "device"}
    reasons = tab.evaluate("[...document.querySelectorAll('#reasons-table tbody tr')].map(r => "
                           "[...r.querySelectorAll('td.num')].map(td => Number(td.textContent)))")
    by_reason = report["opens"]["machine_by_reason"], report["clicks"]["machine_by_reason"]
    assert sorted(map(tuple, reasons)) == sorted(
        (by_reason[0].get(k, 0), by_reason[1].get(k, 0)) for k in {*by_reason[0], *by_reason[1]})
    assert by_reason == ({"apple_mpp": 1}, {"head": 2})
    assert {c["id"] for c in charts} == expected_charts
    assert tab.evaluate("document.documentElement.dataset.chartsDrawn") == str(len(charts))
    png = tab.screenshot(SCREENSHOT)
    boxes = tab.evaluate("Object.fromEntries([...document.querySelectorAll('canvas')].map(c => "
                         "{const r = c.getBoundingClientRect(); return [c.id.slice(6), "
                         "[r.left + scrollX, r.top + scrollY, r.right + scrollX, "
                         "r.bottom + scrollY]]}))")
    assert set(boxes) == expected_charts
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = {"opens": (37, 99, 235), "clicks": (234, 88, 12), "human": (13, 148, 136),
               "machine": (161, 161, 170)}
    for chart_id, box in boxes.items():
        crop = image.crop(tuple(round(v) for v in box))
        assert crop.width > 200 and crop.height > 100, (chart_id, crop.size)
        area = crop.width * crop.height
        counts = cast(list[tuple[int, tuple[int, int, int]]], crop.getcolors(maxcolors=area))
        inked = area - max(n for n, _ in counts)  # all but the background
        assert inked > 0.02 * area, (chart_id, inked, area)
        assert len(counts) > 20, chart_id  # text, grid and bars, not a flat fill
        roles = {s["role"] for c in charts if c["id"] == chart_id for s in c["series"]}
        for role in roles & set(colours):
            near = sum(n for n, rgb in counts
                       if sum(abs(a - b) for a, b in zip(rgb, colours[role], strict=True)) < 30)
            assert near > 30, (chart_id, role, near)

    # The per-message page agrees with the API's message activity.
    tab.click(f"a[href='/dashboard/messages/{seeded.message_ids[0]}']")
    assert tab.path() == f"/dashboard/messages/{seeded.message_ids[0]}"
    shown = {k: int(v) for k, v in _metrics(tab).items()}
    events = first_message["events"]
    assert shown == {
        "opens": sum(1 for e in events if e["type"] == "open" and not e["machine"]),
        "clicks": sum(1 for e in events if e["type"] == "click" and not e["machine"]),
        "machine": sum(1 for e in events if e["machine"])}
    assert tab.evaluate("document.querySelectorAll('#events-table tbody tr').length") == len(
        events)
    tab.screenshot(MESSAGE_SCREENSHOT)
    assert tab.problems() == [] and tab.violations() == []


@pytest.mark.slow
def test_browser_csp_is_enforced_and_the_page_breaks_none_of_it(tab: Tab,
                                                                seeded: Seeded) -> None:
    _browser_sign_in(tab, seeded.key)
    tab.goto(f"/dashboard/campaigns/{seeded.campaign_id}")
    assert tab.violations() == [] and tab.problems() == []
    # The recorder does see a violation when there is one: inline style and script are refused.
    tab.evaluate("document.body.insertAdjacentHTML('beforeend', "
                 "'<p style=\"color: red\">x</p>'); "
                 "const s = document.createElement('script'); s.textContent = 'window.ran = 1'; "
                 "document.body.appendChild(s); new Promise(r => setTimeout(r, 50))")
    assert tab.evaluate("window.ran") is None
    seen = tab.violations()
    assert any(v.startswith("style-src") for v in seen), seen
    assert any(v.startswith("script-src") for v in seen), seen


@pytest.mark.slow
def test_browser_post_without_csrf_token_is_refused_and_sign_out_works(
        tab: Tab, seeded: Seeded) -> None:
    _browser_sign_in(tab, seeded.key)
    statuses = tab.evaluate(
        "Promise.all([{}, {csrf_token: 'forged'}].map(body => fetch('/dashboard/sign-out', "
        "{method: 'POST', body: new URLSearchParams(body), redirect: 'manual'})"
        ".then(r => r.status)))")
    assert statuses == [403, 403]
    assert [c["name"] for c in tab.cookies()] == ["tracker_session"]
    tab.goto("/dashboard/campaigns")
    assert tab.path() == "/dashboard/campaigns"

    tab.click("#sign-out")
    assert tab.path() == "/dashboard/sign-in?signed-out"
    assert tab.cookies() == []
    tab.goto(f"/dashboard/campaigns/{seeded.campaign_id}")
    assert tab.path().startswith("/dashboard/sign-in?next=")


@pytest.mark.slow
def test_browser_link_from_another_site_opens_the_page_when_signed_in(
        tab: Tab, server: Server, seeded: Seeded) -> None:
    _browser_sign_in(tab, seeded.key)
    target = f"{server.url}/dashboard/campaigns/{seeded.campaign_id}"
    tab.goto_url(f"data:text/html,<a id=go href='{target}'>report</a>")
    tab.click("#go")  # a cross-site navigation: the Strict cookie is held back at first
    wait_for(lambda: tab.path() == f"/dashboard/campaigns/{seeded.campaign_id}"
             and tab.evaluate("document.readyState") == "complete", 10,
             message="the campaign page after the same-site hop")
    assert tab.evaluate("document.querySelector('h1').textContent") == CAMPAIGN_NAME


@pytest.mark.slow
def test_browser_campaign_page_fits_a_phone(browser: Browser, server: Server,
                                            seeded: Seeded) -> None:
    tab = Tab(browser, server.url, width=390, height=844, mobile=True)
    try:
        _browser_sign_in(tab, seeded.key)
        tab.goto(f"/dashboard/campaigns/{seeded.campaign_id}")
        assert tab.evaluate("document.documentElement.dataset.chartsDrawn") == "9"
        # Nothing wider than the screen; wide tables scroll inside their own box.
        assert tab.evaluate("document.documentElement.scrollWidth") <= 390
        widths = tab.evaluate("[...document.querySelectorAll('canvas')]"
                              ".map(c => c.getBoundingClientRect().width)")
        assert widths and all(200 < w <= 390 for w in widths), widths
        tab.screenshot(PHONE_SCREENSHOT)
        assert tab.problems() == [] and tab.violations() == []
    finally:
        tab.close()


# --- the message list: filters, search, export, pages ----------------------------------------

def _listed(tab: Tab) -> list[str]:
    return list(tab.evaluate("[...document.querySelectorAll('#messages-table tbody tr')]"
                             ".map(r => r.dataset.messageId)"))


def _api_list(api: httpx.Client, campaign_id: str, **params: str) -> list[dict[str, Any]]:
    response = api.get(f"/api/campaigns/{campaign_id}/messages", params=params)
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()["messages"]
    return rows


@pytest.mark.slow
def test_browser_message_list_filters_searches_and_exports_as_the_api_does(
        tab: Tab, server: Server, seeded: Seeded) -> None:
    """Signed in with a read-only key (the page says so): the list's rows and counts are the
    API's, for every status, a clicked link, a country and a search; its export button
    downloads the API's CSV of the same filter; a bad filter says what is wrong."""
    with server.client(seeded.key) as api:
        reader = api.post("/api/keys", json={"name": "dashboard", "scope": "read"}).json()
        everything = _api_list(api, seeded.campaign_id)
        links = [link["url"] for link in _report(api, seeded.campaign_id)["links"]]
        blog = "https://example.com/blog/spring"  # the second message's reader clicked it
        assert blog in links
        expected = {status: [m["id"] for m in _api_list(api, seeded.campaign_id,
                                                        status=status)]
                    for status in ("opened", "clicked", "not_opened", "machine_only")}
        by_link = [m["id"] for m in _api_list(api, seeded.campaign_id, link=blog)]
        in_germany = [m["id"] for m in _api_list(api, seeded.campaign_id, country="DE")]
        csv_not_opened = api.get(f"/api/campaigns/{seeded.campaign_id}/messages",
                                 params={"status": "not_opened", "format": "csv"}).text
    first, second, third, fourth = seeded.message_ids
    # What the seeded hits make of the four messages (MPP's prefetch is no open).
    assert expected == {"opened": [first, second, third], "clicked": [first, second],
                        "not_opened": [fourth], "machine_only": [fourth]}
    assert (by_link, in_germany) == ([second], [first])

    _browser_sign_in(tab, reader["api_key"])
    assert tab.evaluate("document.getElementById('key-scope').textContent") == "read-only key"
    tab.goto(f"/dashboard/campaigns/{seeded.campaign_id}/messages")
    assert _listed(tab) == [m["id"] for m in everything]
    cells = tab.evaluate("[...document.querySelectorAll('#messages-table tbody tr')].map(r => "
                         "[r.querySelector('a').textContent, ...[...r.querySelectorAll('td.num')]"
                         ".map(td => Number(td.textContent))])")
    assert cells == [[m["recipient"], m["opens"], m["clicks"], m["machine"]] for m in everything]

    form = "#message-filters"
    for status, ids in expected.items():
        tab.submit(form, {"status": status})
        assert _listed(tab) == ids, status
        assert f"status={status}" in tab.path()
    tab.submit(form, {"status": "", "link": blog})
    assert _listed(tab) == by_link
    tab.submit(form, {"link": "", "country": "DE"})
    assert _listed(tab) == in_germany
    tab.submit(form, {"country": "", "search": "READER2@example.com"})
    assert _listed(tab) == [third]
    tab.submit(form, {"search": "reader"})  # a part of the address
    assert _listed(tab) == seeded.message_ids

    tab.submit(form, {"search": "", "status": "not_opened"})
    tab.screenshot(MESSAGES_SCREENSHOT)
    href = tab.evaluate("document.getElementById('export-csv').getAttribute('href')")
    downloaded = tab.evaluate(f"fetch({href!r}).then(async r => [r.status, "
                              "r.headers.get('content-type'), "
                              "r.headers.get('content-disposition'), await r.text()])")
    assert downloaded[:3] == [200, "text/csv; charset=utf-8",
                              f'attachment; filename="campaign-{seeded.campaign_id}-messages.csv"']
    assert downloaded[3] == csv_not_opened
    assert downloaded[3].count("\r\n") == 2  # the header and the one message

    tab.submit(form, {"status": "", "country": "D1"})
    assert tab.evaluate("document.getElementById('filter-error').textContent") == (
        "country: an ISO 3166-1 alpha-2 code, such as DE")
    assert _listed(tab) == []
    tab.click("#clear-filters")
    assert _listed(tab) == seeded.message_ids
    assert tab.problems() == [] and tab.violations() == []


@pytest.mark.slow
def test_browser_message_list_pages_and_a_full_key_says_so(
        tab: Tab, server: Server, seeded: Seeded) -> None:
    count = dashboard.MESSAGES_PER_PAGE + 5
    with server.client(seeded.key) as api:
        cid = campaign(api, name="many")
        made = api.post(f"/api/campaigns/{cid}/messages/batch", json={"messages": [
            {"recipient": f"many{i}@example.com", "tags": ["spring" if i % 2 else "autumn"]}
            for i in range(count)]})
        assert made.status_code == 201, made.text
        ids = [m["id"] for m in made.json()["messages"]]
    _browser_sign_in(tab, seeded.key)
    assert tab.evaluate("document.getElementById('key-scope').textContent") == "full key"
    tab.goto(f"/dashboard/campaigns/{cid}/messages")
    assert _listed(tab) == ids[:dashboard.MESSAGES_PER_PAGE]
    tab.click("#next-page")
    assert _listed(tab) == ids[dashboard.MESSAGES_PER_PAGE:]
    assert tab.evaluate("document.getElementById('next-page')") is None
    # A filter carries over to the next page; the tag's half of the messages.
    tab.goto(f"/dashboard/campaigns/{cid}/messages")
    tab.submit("#message-filters", {"tag": "spring", "status": "not_opened"})
    assert _listed(tab) == ids[1::2]
    assert tab.evaluate("document.getElementById('next-page')") is None
    assert tab.problems() == [] and tab.violations() == []
