"""The management API against a real server: shapes, validation, auth, reports, tenant isolation.

Reports are checked with exact numbers after real hits on the tracking endpoints, waiting
(polling with a deadline) until the batch writer has put them in PostgreSQL.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.geodb import build_test_city_db

from .support import Server, campaign, db_fetch, db_value, new_account, register, wait_for

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
GMAIL_PROXY = ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 "
               "(via ggpht.com GoogleImageProxy)")
# Addresses in the test geo database (tests/geodb.py); 127.0.0.1 itself is in none of it.
FRANKFURT = "81.2.69.142"
BOXFORD = "2.125.160.216"
CHINA = "175.16.199.7"  # country only, no region

SHARED = "https://example.com/shared?utm_source=mail&x=%20#top"
ONLY_M1 = "https://example.com/only"
NEVER = "https://example.org/never-clicked"
EVENT_FIELDS = {"type", "at", "url", "country", "region", "city", "browser", "os", "device",
                "client", "machine", "reason"}
DIMENSIONS = {"country", "region", "browser", "os", "device", "client"}
# What a reverse proxy in front of the server would be reached at; the trailing slash is dropped.
PUBLIC_URL = "https://track.example.com/t"


@pytest.fixture(scope="module")
def server(module_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real server, with a small geo database so reports have places in them."""
    tmp = tmp_path_factory.mktemp("api-server")
    geo_db = build_test_city_db(tmp / "city.mmdb")
    srv = Server(module_dsn, tmp, env={"TRACKER_GEOIP_DB": str(geo_db),
                                       "TRACKER_PUBLIC_URL": PUBLIC_URL + "/",
                                       "TRACKER_FLUSH_INTERVAL_MS": "50"}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(server: Server, module_dsn: str) -> Iterator[httpx.Client]:
    with server.client(new_account(module_dsn, "alpha")) as client:
        yield client


@pytest.fixture(scope="module")
def public(server: Server) -> Iterator[httpx.Client]:
    """No key: the tracking endpoints, as a mail client would call them."""
    with httpx.Client(base_url=server.url, timeout=10, follow_redirects=False) as client:
        yield client


def error_of(response: httpx.Response, *statuses: int) -> str:
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str) and body["error"].strip()
    return str(body["error"])


def parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, value
    return parsed


def path_of(server: Server, url: str) -> str:
    """The path the proxy at PUBLIC_URL would forward to the server."""
    assert url.startswith(PUBLIC_URL + "/"), url
    return url.removeprefix(PUBLIC_URL)


def open_pixel(public: httpx.Client, server: Server, message: dict[str, Any],
               agent: str = CHROME, ip: str | None = None, method: str = "GET") -> None:
    headers = {"user-agent": agent, **({"x-forwarded-for": ip} if ip else {})}
    response = public.request(method, path_of(server, message["pixel_url"]), headers=headers)
    assert response.status_code == 200


def click(public: httpx.Client, server: Server, message: dict[str, Any], index: int = 0,
          agent: str = CHROME, ip: str | None = None, method: str = "GET") -> None:
    link = message["links"][index]
    headers = {"user-agent": agent, **({"x-forwarded-for": ip} if ip else {})}
    response = public.request(method, path_of(server, link["tracked_url"]), headers=headers)
    assert response.status_code == 302
    assert response.headers["location"] == link["url"]


def report(api: httpx.Client, campaign_id: str, **params: str) -> dict[str, Any]:
    response = api.get(f"/api/campaigns/{campaign_id}/report", params=params)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def events_in(result: dict[str, Any]) -> int:
    return int(sum(result[kind][n] for kind in ("opens", "clicks") for n in ("total", "machine")))


def settled_report(api: httpx.Client, campaign_id: str, expected_events: int,
                   **params: str) -> dict[str, Any]:
    """The report once the writer has flushed the expected number of events."""
    return wait_for(lambda: (r := report(api, campaign_id, **params))
                    and events_in(r) >= expected_events and r,
                    message=f"{expected_events} events in campaign {campaign_id}'s report")


def activity(api: httpx.Client, message_id: str) -> dict[str, Any]:
    response = api.get(f"/api/messages/{message_id}")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def decoded(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


# --- campaigns -------------------------------------------------------------------------------


def test_create_campaign_is_201_with_the_default_policy(api: httpx.Client) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    response = api.post("/api/campaigns", json={"name": "Spring sale"})
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "name", "policy", "created_at", "tags", "metadata", "options"}
    assert (body["tags"], body["metadata"]) == ([], {})
    assert body["options"] == {"utm": None, "track_url_text": False, "pixel": "bottom"}
    assert isinstance(body["id"], str) and body["id"]
    assert body["name"] == "Spring sale"
    assert body["policy"] == {"location": "region", "device": True, "ip": "none",
                              "retention_days": None, "recipient": "address",
                              "consent": {"opens": False, "clicks": False}}
    assert before <= parse_time(body["created_at"]) <= datetime.now(UTC) + timedelta(seconds=5)


def test_create_campaign_with_a_full_policy(api: httpx.Client) -> None:
    policy = {"location": "city", "device": False, "ip": "truncated", "retention_days": 30,
              "recipient": "pseudonym", "consent": {"opens": True, "clicks": False}}
    response = api.post("/api/campaigns", json={"name": "x", "policy": policy})
    assert response.status_code == 201
    assert response.json()["policy"] == policy


def test_create_campaign_with_a_partial_policy_fills_in_defaults(api: httpx.Client) -> None:
    response = api.post("/api/campaigns", json={"name": "x", "policy": {"ip": "full"}})
    assert response.status_code == 201
    assert response.json()["policy"] == {"location": "region", "device": True, "ip": "full",
                                         "retention_days": None, "recipient": "address",
                                         "consent": {"opens": False, "clicks": False}}


def test_create_campaign_with_null_policy_gets_defaults(api: httpx.Client) -> None:
    response = api.post("/api/campaigns", json={"name": "x", "policy": None})
    assert response.status_code == 201
    assert response.json()["policy"]["location"] == "region"


def test_get_campaign_answers_what_create_answered(api: httpx.Client) -> None:
    created = api.post("/api/campaigns", json={"name": "Get me"}).json()
    response = api.get(f"/api/campaigns/{created['id']}")
    assert response.status_code == 200
    assert response.json() == created


def test_list_shows_the_accounts_campaigns(api: httpx.Client) -> None:
    made = [api.post("/api/campaigns", json={"name": f"listed {i}"}).json() for i in range(3)]
    response = api.get("/api/campaigns")
    assert response.status_code == 200
    listed = {c["id"]: c for c in response.json()}
    for item in made:
        assert listed[item["id"]] == item
    assert all(set(c) == {"id", "name", "policy", "created_at", "tags", "metadata", "options"}
               for c in listed.values())


def test_patch_with_a_partial_policy_changes_only_those_fields(api: httpx.Client) -> None:
    policy = {"location": "city", "device": True, "ip": "full", "retention_days": 30,
              "recipient": "address", "consent": {"opens": False, "clicks": False}}
    created = api.post("/api/campaigns", json={"name": "patch me", "policy": policy}).json()
    response = api.patch(f"/api/campaigns/{created['id']}", json={"policy": {"device": False}})
    assert response.status_code == 200
    body = response.json()
    assert body["policy"] == {**policy, "device": False}
    assert (body["id"], body["name"], body["created_at"]) == (
        created["id"], "patch me", created["created_at"])
    assert api.get(f"/api/campaigns/{created['id']}").json() == body


def test_patch_name_only_keeps_the_policy(api: httpx.Client) -> None:
    policy = {"location": "country", "device": False, "ip": "truncated", "retention_days": 7,
              "recipient": "address", "consent": {"opens": False, "clicks": False}}
    created = api.post("/api/campaigns", json={"name": "old", "policy": policy}).json()
    body = api.patch(f"/api/campaigns/{created['id']}", json={"name": "new"}).json()
    assert (body["name"], body["policy"]) == ("new", policy)


def test_patch_can_set_retention_back_to_null(api: httpx.Client) -> None:
    created = api.post("/api/campaigns",
                       json={"name": "r", "policy": {"retention_days": 30}}).json()
    body = api.patch(f"/api/campaigns/{created['id']}",
                     json={"policy": {"retention_days": None}}).json()
    assert body["policy"]["retention_days"] is None


def test_patch_with_an_empty_object_changes_nothing(api: httpx.Client) -> None:
    created = api.post("/api/campaigns", json={"name": "same"}).json()
    response = api.patch(f"/api/campaigns/{created['id']}", json={})
    assert response.status_code == 200
    assert response.json() == created


def test_delete_is_204_and_then_everything_about_it_is_404(
        api: httpx.Client, server: Server, public: httpx.Client) -> None:
    cid = campaign(api, name="doomed")
    message = register(api, cid, [SHARED])
    response = api.delete(f"/api/campaigns/{cid}")
    assert response.status_code == 204
    assert response.content == b""
    error_of(api.get(f"/api/campaigns/{cid}"), 404)
    error_of(api.patch(f"/api/campaigns/{cid}", json={"name": "back"}), 404)
    error_of(api.delete(f"/api/campaigns/{cid}"), 404)
    error_of(api.post(f"/api/campaigns/{cid}/messages", json={"recipient": "a@example.com"}), 404)
    error_of(api.get(f"/api/campaigns/{cid}/report"), 404)
    error_of(api.get(f"/api/messages/{message['id']}"), 404)
    assert cid not in {c["id"] for c in api.get("/api/campaigns").json()}
    # A deleted campaign's links still take the reader where they were going.
    click(public, server, message)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{", b"nope", b"{'name': 'x'}", b'{"name": "x",}', b"\xff\xfe",
                                  b'{"name": "x"} trailing', b""])
@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_malformed_json_is_400(api: httpx.Client, method: str, body: bytes) -> None:
    target = "/api/campaigns" if method == "POST" else f"/api/campaigns/{campaign(api)}"
    response = api.request(method, target, content=body,
                           headers={"content-type": "application/json"})
    error_of(response, 400)


@pytest.mark.parametrize("body", ["[]", '["name"]', '"name"', "1", "null", "true"])
@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_a_body_that_is_not_an_object_is_refused(api: httpx.Client, method: str,
                                                   body: str) -> None:
    target = "/api/campaigns" if method == "POST" else f"/api/campaigns/{campaign(api)}"
    error_of(api.request(method, target, content=body.encode()), 400, 422)


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_unknown_campaign_fields_are_refused(api: httpx.Client, method: str) -> None:
    target = "/api/campaigns" if method == "POST" else f"/api/campaigns/{campaign(api)}"
    message = error_of(api.request(method, target, json={"name": "x", "colour": "red"}), 400, 422)
    assert "colour" in message


BAD_POLICIES = [
    {"location": "planet"}, {"location": "Region"}, {"location": ""}, {"location": None},
    {"location": 1}, {"location": ["region"]},
    {"device": "yes"}, {"device": 1}, {"device": 0}, {"device": None}, {"device": "true"},
    {"ip": "partial"}, {"ip": "Full"}, {"ip": True}, {"ip": None}, {"ip": 24},
    {"retention_days": 0}, {"retention_days": -1}, {"retention_days": 1.5},
    {"retention_days": "30"}, {"retention_days": True}, {"retention_days": 36501},
    {"retention_days": 10**15}, {"retention_days": []},
    {"recipient": "hash"}, {"recipient": "Pseudonym"}, {"recipient": None}, {"recipient": True},
    {"unknown": 1}, {"location": "city", "extra": True},
    "region", ["region"], 1, True,
]


@pytest.mark.parametrize("policy", BAD_POLICIES, ids=repr)
def test_bad_policy_values_are_refused_on_create(api: httpx.Client, policy: object) -> None:
    before = len(api.get("/api/campaigns").json())
    error_of(api.post("/api/campaigns", json={"name": "x", "policy": policy}), 400, 422)
    assert len(api.get("/api/campaigns").json()) == before


@pytest.mark.parametrize("policy", BAD_POLICIES, ids=repr)
def test_bad_policy_values_are_refused_on_patch_and_change_nothing(
        api: httpx.Client, policy: object) -> None:
    created = api.post("/api/campaigns", json={"name": "keep"}).json()
    error_of(api.patch(f"/api/campaigns/{created['id']}",
                       json={"name": "changed", "policy": policy}), 400, 422)
    assert api.get(f"/api/campaigns/{created['id']}").json() == created


@pytest.mark.parametrize("name", ["", "   ", "\t\n", None, 1, ["x"], {"x": 1}, "x" * 201,
                                  "x" * 200 + " ", "nul\x00inside"], ids=repr)
def test_bad_names_are_refused(api: httpx.Client, name: object) -> None:
    error_of(api.post("/api/campaigns", json={"name": name}), 400, 422)
    created = api.post("/api/campaigns", json={"name": "keep"}).json()
    error_of(api.patch(f"/api/campaigns/{created['id']}", json={"name": name}), 400, 422)
    assert api.get(f"/api/campaigns/{created['id']}").json() == created


def test_missing_name_is_refused(api: httpx.Client) -> None:
    error_of(api.post("/api/campaigns", json={"policy": {"ip": "none"}}), 400, 422)


def test_name_of_200_characters_is_accepted(api: httpx.Client) -> None:
    response = api.post("/api/campaigns", json={"name": "n" * 200})
    assert response.status_code == 201
    assert response.json()["name"] == "n" * 200


# --- message registration --------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(api: httpx.Client) -> str:
    """A campaign to register messages into."""
    return campaign(api, name="registration")


def test_registration_answers_201_with_signed_urls_under_the_public_url(
        api: httpx.Client, server: Server, target: str) -> None:
    links = [SHARED, ONLY_M1, SHARED]
    response = api.post(f"/api/campaigns/{target}/messages",
                        json={"recipient": "reader@example.com", "subject": "Hi",
                              "sent_at": "2024-05-01T10:00:00+02:00", "links": links})
    assert response.status_code == 201
    body = response.json()
    assert set(body) - {"html"} == {"id", "pixel_url", "links"}
    assert isinstance(body["id"], str) and body["id"]
    assert body["pixel_url"].startswith(PUBLIC_URL + "/o/")
    assert body["pixel_url"].endswith(".gif")
    assert [link["url"] for link in body["links"]] == links
    tracked = [link["tracked_url"] for link in body["links"]]
    assert all(set(link) == {"url", "destination", "tracked_url"} for link in body["links"])
    assert all(link["destination"] == link["url"] for link in body["links"])
    assert all(url.startswith(PUBLIC_URL + "/c/") for url in tracked)
    # The same destination twice is two links (two positions), each with its own URL.
    assert len(set(tracked)) == 3


def test_registration_with_no_links_has_an_empty_list(
        api: httpx.Client, target: str) -> None:
    body = register(api, target, [])
    assert body["links"] == []
    assert api.post(f"/api/campaigns/{target}/messages",
                    json={"recipient": "r@example.com"}).json()["links"] == []


def test_tracking_urls_hold_no_recipient_or_subject(
        api: httpx.Client, server: Server, target: str) -> None:
    recipient, subject = "very.unusual.person@example.net", "Confidential subject line"
    body = register(api, target, [SHARED], recipient=recipient, subject=subject)
    urls = [body["pixel_url"], *(link["tracked_url"] for link in body["links"])]
    for url in urls:
        assert recipient not in url and subject not in url
        token = url.rsplit("/", 1)[1].removesuffix(".gif")
        raw = decoded(token)
        for secret in (recipient, subject, "unusual", "Confidential"):
            assert secret.encode() not in raw


def test_registration_stores_recipient_subject_and_sent_at(
        api: httpx.Client, target: str) -> None:
    body = register(api, target, [SHARED], recipient="stored@example.com", subject="Stored",
                    sent_at="2024-05-01T10:00:00+02:00")
    got = activity(api, body["id"])
    assert got["id"] == body["id"]
    assert (got["recipient"], got["subject"]) == ("stored@example.com", "Stored")
    assert parse_time(got["sent_at"]) == datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
    assert got["events"] == []


def test_registration_without_sent_at_uses_now_and_subject_is_null(
        api: httpx.Client, target: str) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    got = activity(api, register(api, target, sent_at=None)["id"])
    assert got["subject"] is None
    assert before <= parse_time(got["sent_at"]) <= datetime.now(UTC) + timedelta(seconds=5)


BAD_DESTINATIONS = [
    "relative/path", "/absolute/path", "//example.com/scheme-relative", "example.com",
    "ftp://example.com/file", "javascript:alert(1)", "JavaScript:alert(1)",
    "data:text/html,<script>alert(1)</script>", "mailto:someone@example.com",
    "file:///etc/passwd",
    "https://exa mple.com/", " https://example.com/", "https://example.com/ ",
    "https://example.com/a b", "https://example.com/\t", "https://example.com/\u00a0",
    "https://example.com/\x00", "https://example.com/\x1b", "https://example.com/\x7f",
    "https://example.com/\r\nSet-Cookie: a=b", "https://example.com/\n", "https://example.com/\r",
    "https://example.com/\u2028", "https://example.com/\u200b", "https://example.com/\u202e",
    "https://example.com/" + "a" * 2048,
    "https:///no-host", "https://", "http://:80/", "http://user@/x",
    "https://example.com:99999/", "https://example.com:abc/", "https://example.com:-1/",
    "http://[::1/", "", 1, None, ["https://example.com/"], {"href": "https://example.com/"},
    {"url": "https://example.com/", "text": 1}, {"url": "ftp://example.com/"},
]


@pytest.mark.parametrize("url", BAD_DESTINATIONS, ids=repr)
def test_bad_destinations_are_refused_and_nothing_is_stored(
        api: httpx.Client, module_dsn: str, target: str, url: object) -> None:
    count = "select count(*) from messages where campaign_id = $1"
    before = db_value(module_dsn, count, int(target))
    error_of(api.post(f"/api/campaigns/{target}/messages",
                      json={"recipient": "r@example.com", "links": [SHARED, url]}), 400, 422)
    assert db_value(module_dsn, count, int(target)) == before


def test_destination_of_2048_bytes_is_accepted_and_2049_is_not(
        api: httpx.Client, target: str) -> None:
    base = "https://example.com/"
    exact = base + "a" * (2048 - len(base))
    assert register(api, target, [exact])["links"][0]["url"] == exact
    error_of(api.post(f"/api/campaigns/{target}/messages",
                      json={"recipient": "r@example.com", "links": [exact + "a"]}), 400, 422)
    # The bound is in bytes: this is 1035 characters but 2050 bytes.
    multibyte = base + "é" * 1015
    assert len(multibyte) < 2048 < len(multibyte.encode())
    error_of(api.post(f"/api/campaigns/{target}/messages",
                      json={"recipient": "r@example.com", "links": [multibyte]}), 400, 422)


@pytest.mark.parametrize("links", ["https://example.com/", {"a": "https://example.com/"}, 1,
                                   ["https://example.com/"] * 1001], ids=repr)
def test_links_must_be_a_bounded_list(api: httpx.Client, target: str, links: object) -> None:
    error_of(api.post(f"/api/campaigns/{target}/messages",
                      json={"recipient": "r@example.com", "links": links}), 400, 422)


@pytest.mark.parametrize("recipient", ["", "   ", None, 1, ["r@example.com"], "a\x00b",
                                       "r@example.com\r\nBcc: x@example.com", "a\x1bb",
                                       "r" * 321], ids=repr)
def test_bad_recipients_are_refused(api: httpx.Client, target: str, recipient: object) -> None:
    error_of(api.post(f"/api/campaigns/{target}/messages", json={"recipient": recipient}),
             400, 422)


def test_missing_recipient_is_refused(api: httpx.Client, target: str) -> None:
    error_of(api.post(f"/api/campaigns/{target}/messages", json={"links": [SHARED]}), 400, 422)


@pytest.mark.parametrize("sent_at", ["yesterday", "", "2024-13-01T00:00:00Z",
                                     "2024-02-30T00:00:00Z", "2024-05-01T25:00:00Z",
                                     "01/05/2024", 1714550400, 1.5, True, ["2024-05-01"],
                                     {"at": "2024-05-01"}], ids=repr)
def test_bad_sent_at_is_refused(api: httpx.Client, target: str, sent_at: object) -> None:
    error_of(api.post(f"/api/campaigns/{target}/messages",
                      json={"recipient": "r@example.com", "sent_at": sent_at}), 400, 422)


@pytest.mark.parametrize("subject", [1, ["s"], {"s": 1}, "s" * 999, "a\x00b", "line\r\nBcc: x"],
                         ids=repr)
def test_bad_subjects_are_refused(api: httpx.Client, target: str, subject: object) -> None:
    error_of(api.post(f"/api/campaigns/{target}/messages",
                      json={"recipient": "r@example.com", "subject": subject}), 400, 422)


@pytest.mark.parametrize("sent_at", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
                                     "0001-01-01T00:00:00", "9999-12-31T23:59:59+00:00"])
def test_extreme_sent_at_is_stored_or_refused_never_a_server_error(
        api: httpx.Client, target: str, sent_at: str) -> None:
    response = api.post(f"/api/campaigns/{target}/messages",
                        json={"recipient": "r@example.com", "sent_at": sent_at})
    if response.status_code != 201:
        error_of(response, 400, 422)


def test_registration_refuses_malformed_bodies(api: httpx.Client, target: str) -> None:
    path = f"/api/campaigns/{target}/messages"
    error_of(api.post(path, content=b"{", headers={"content-type": "application/json"}), 400)
    error_of(api.post(path, content=b""), 400)
    for body in ("[]", '"r@example.com"', "null", "1"):
        error_of(api.post(path, content=body.encode()), 400, 422)
    assert "bcc" in error_of(api.post(path, json={"recipient": "r@example.com", "bcc": "x"}),
                             400, 422)


# --- authentication --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def owned(api: httpx.Client) -> dict[str, str]:
    cid = campaign(api, name="owned")
    return {"campaign": cid, "message": register(api, cid, [SHARED])["id"]}


def endpoints(owned: dict[str, str]) -> list[tuple[str, str, dict[str, Any] | None]]:
    cid, mid = owned["campaign"], owned["message"]
    return [
        ("GET", "/api/campaigns", None),
        ("POST", "/api/campaigns", {"name": "sneaky"}),
        ("GET", f"/api/campaigns/{cid}", None),
        ("PATCH", f"/api/campaigns/{cid}", {"name": "sneaky"}),
        ("DELETE", f"/api/campaigns/{cid}", None),
        ("POST", f"/api/campaigns/{cid}/messages", {"recipient": "sneaky@example.com"}),
        ("GET", f"/api/campaigns/{cid}/report", None),
        ("GET", f"/api/messages/{mid}", None),
    ]


def _bad_authorization(kind: str, key: str) -> bytes | None:
    prefix, account, key_id, secret = key.split("_", 3)
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    return {
        "missing": None,
        "empty": b"",
        "scheme only": b"Bearer",
        "basic": b"Basic dXNlcjpwYXNz",
        "blank key": b"Bearer  \t wrong",
        "other scheme": f"Token {key}".encode(),
        "no scheme": key.encode(),
        "basic with the key": f"Basic {key}".encode(),
        "garbage": b"Bearer wrong",
        "three parts": b"Bearer tk_1_abcd",
        "empty parts": b"Bearer tk___",
        "letters for account": b"Bearer tk_x_y_z",
        "wrong secret": f"Bearer {prefix}_{account}_{key_id}_{flipped}".encode(),
        "empty secret": f"Bearer {prefix}_{account}_{key_id}_".encode(),
        "longer secret": f"Bearer {prefix}_{account}_{key_id}_{secret}x".encode(),
        "unknown key id": f"Bearer {prefix}_{account}_00000000_{secret}".encode(),
        "other account": f"Bearer {prefix}_{int(account) + 1000}_{key_id}_{secret}".encode(),
        "wrong prefix": f"Bearer xx_{account}_{key_id}_{secret}".encode(),
        "huge account": f"Bearer {prefix}_{'9' * 30}_{key_id}_{secret}".encode(),
        # Latin-1 characters that str.isdigit() accepts but int() refuses.
        "superscript account": f"Bearer {prefix}_\xb2_{key_id}_{secret}".encode("latin-1"),
        "superscript in account": f"Bearer {prefix}_{account}\xb9_{key_id}_{secret}".encode(
            "latin-1"),
    }[kind]


@pytest.mark.parametrize("kind", [
    "missing", "empty", "scheme only", "basic", "blank key", "other scheme", "no scheme",
    "basic with the key", "garbage", "three parts", "empty parts", "letters for account",
    "wrong secret", "empty secret", "longer secret", "unknown key id", "other account",
    "wrong prefix", "huge account", "superscript account", "superscript in account"])
def test_missing_wrong_and_malformed_keys_are_401_everywhere(
        server: Server, api: httpx.Client, owned: dict[str, str], kind: str) -> None:
    key = str(api.headers["authorization"]).removeprefix("Bearer ")
    authorization = _bad_authorization(kind, key)
    headers = {"authorization": authorization} if authorization is not None else {}
    with httpx.Client(base_url=server.url, timeout=10) as anonymous:
        for method, path, body in endpoints(owned):
            response = anonymous.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (method, path, response.text)
            assert response.json().keys() == {"error"}
            assert response.headers["www-authenticate"].lower().startswith("bearer")
    # Nothing was done on the owner's behalf.
    assert api.get(f"/api/campaigns/{owned['campaign']}").json()["name"] == "owned"
    assert "sneaky" not in {c["name"] for c in api.get("/api/campaigns").json()}


def test_the_bearer_scheme_is_case_insensitive(server: Server, api: httpx.Client) -> None:
    key = str(api.headers["authorization"]).removeprefix("Bearer ")
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/api/campaigns",
                          headers={"authorization": f"bearer {key}"}).status_code == 200


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/campaigns/"), ("POST", "/api/campaigns/"), ("GET", "/api/campaigns/{c}/"),
    ("GET", "/api/campaigns/{c}/report/"), ("GET", "/api/messages/{m}/"), ("GET", "/healthz/"),
    ("GET", "/dashboard/campaigns/"), ("GET", "/dashboard/sign-in/")])
def test_a_trailing_slash_is_404_never_a_redirect_to_the_host_header(
        api: httpx.Client, owned: dict[str, str], method: str, path: str) -> None:
    # A forged Host must not come back as a Location (Starlette's redirect_slashes built one).
    response = api.request(method, path.format(c=owned["campaign"], m=owned["message"]),
                           headers={"host": "evil.example"},
                           json={"name": "x"} if method == "POST" else None)
    assert "location" not in response.headers, response.headers
    error_of(response, 404)


# --- unknown and malformed ids ---------------------------------------------------------------


UNKNOWN_IDS = ["999999999", "9223372036854775807", "0", "00", "abc", "-1", "1.0", "1e3", "0x10",
               "%201", "1%20", "99999999999999999999", "9223372036854775808", "%C2%B2",
               "%C2%B9%C2%B2", "1;2", "1,2", "%00", "+1", "1_0"]
ID_ENDPOINTS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/api/campaigns/{}", None), ("GET", "/api/campaigns/{}/report", None),
    ("PATCH", "/api/campaigns/{}", {"name": "x"}),
    ("POST", "/api/campaigns/{}/messages", {"recipient": "r@example.com"}),
    ("DELETE", "/api/campaigns/{}", None), ("GET", "/api/messages/{}", None)]


@pytest.mark.parametrize("bad_id", UNKNOWN_IDS)
def test_unknown_and_non_numeric_ids_are_404(
        api: httpx.Client, owned: dict[str, str], bad_id: str) -> None:
    for method, template, body in ID_ENDPOINTS:
        error_of(api.request(method, template.format(bad_id), json=body), 404)
    assert api.get(f"/api/campaigns/{owned['campaign']}").status_code == 200


# Digits Python's str.isdigit() and int() accept, but no id the API hands out is spelt with.
_OTHER_DIGITS = {"fullwidth": "０１２３４５６７８９", "arabic-indic": "٠١٢٣٤٥٦٧٨٩",
                 "devanagari": "०१२३४५६७८९"}


@pytest.mark.parametrize("digits", sorted(_OTHER_DIGITS))
def test_ids_spelt_with_other_digits_do_not_name_the_object(
        api: httpx.Client, owned: dict[str, str], digits: str) -> None:
    def respell(value: str) -> str:
        return quote(value.translate(str.maketrans("0123456789", _OTHER_DIGITS[digits])))

    for method, template, body in ID_ENDPOINTS:
        real = owned["message"] if "messages/{}" in template and method == "GET" else (
            owned["campaign"])
        error_of(api.request(method, template.format(respell(real)), json=body), 404)
    assert api.get(f"/api/campaigns/{owned['campaign']}").json()["name"] == "owned"


# --- reports ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenario(api: httpx.Client, server: Server, public: httpx.Client) -> dict[str, Any]:
    """Six messages and real hits; see each step for what it should count as.

    human opens 4 (m1 x2, m5, m6), machine opens 1 (m3 bot);
    human clicks 4 (m1, m2, m6 x2), machine clicks 2 (m1 HEAD, m3 bot);
    unique opens 4 (m1, m2 by its click, m5, m6), unique clicks 3 (m1, m2, m6).
    """
    cid = campaign(api, name="report")
    m = {i: register(api, cid, links, recipient=f"m{i}@example.com", subject=f"Subject {i}")
         for i, links in {1: [SHARED, ONLY_M1], 2: [SHARED], 3: [NEVER], 4: [SHARED], 5: [],
                          6: [ONLY_M1]}.items()}
    open_pixel(public, server, m[1], ip=FRANKFURT)
    open_pixel(public, server, m[1], ip=FRANKFURT)
    click(public, server, m[1], 0, ip=FRANKFURT)
    click(public, server, m[1], 0, ip=FRANKFURT, method="HEAD")  # machine: HEAD
    click(public, server, m[2], 0, ip=BOXFORD)  # a click without an open
    open_pixel(public, server, m[3], agent=GOOGLEBOT, ip=FRANKFURT)  # machine: bot
    click(public, server, m[3], 0, agent=GOOGLEBOT, ip=FRANKFURT)  # machine: bot
    open_pixel(public, server, m[1], method="HEAD")  # records nothing at all
    open_pixel(public, server, m[5], agent=GMAIL_PROXY, ip=FRANKFURT)  # human, place unknown
    open_pixel(public, server, m[6], ip=CHINA)
    click(public, server, m[6], 0)
    click(public, server, m[6], 0)
    result = settled_report(api, cid, 11)
    return {"campaign": cid, "messages": m, "report": result}


def test_report_counts_messages_opens_and_clicks(scenario: dict[str, Any]) -> None:
    result = scenario["report"]
    assert result["campaign_id"] == scenario["campaign"]
    assert result["messages"] == 6
    assert result["opens"] == {"total": 4, "unique": 4, "machine": 1,
                              "machine_by_reason": {"bot_ua": 1}}
    assert result["clicks"] == {"total": 4, "unique": 3, "machine": 2,
                               "machine_by_reason": {"bot_ua": 1, "head": 1}}


def test_report_rates_divide_unique_counts(scenario: dict[str, Any]) -> None:
    result = scenario["report"]
    assert result["open_rate"] == pytest.approx(4 / 6, abs=1e-6)
    assert result["click_rate"] == pytest.approx(3 / 6, abs=1e-6)
    assert result["click_to_open_rate"] == pytest.approx(3 / 4, abs=1e-6)
    assert all(isinstance(result[k], float)
               for k in ("open_rate", "click_rate", "click_to_open_rate"))


def test_report_has_every_contract_key(scenario: dict[str, Any]) -> None:
    assert set(scenario["report"]) == {
        "campaign_id", "messages", "opens", "clicks", "open_rate", "click_rate",
        "click_to_open_rate", "links", "timeline", "breakdown", "estimated_open_rate",
        "estimate_method"}


def test_report_links_are_grouped_by_url(scenario: dict[str, Any]) -> None:
    links = scenario["report"]["links"]
    assert all(set(link) == {"url", "clicks", "unique_clicks"} for link in links)
    assert len(links) == len({link["url"] for link in links})
    by_url = {link["url"]: (link["clicks"], link["unique_clicks"]) for link in links}
    # SHARED is in m1, m2 and m4: one row, human clicks from m1 and m2 (m1's HEAD is a machine).
    # ONLY_M1 is in m1 and m6: m6 clicked it twice. NEVER had only a bot.
    assert by_url == {SHARED: (2, 2), ONLY_M1: (2, 1), NEVER: (0, 0)}


def test_report_timeline_counts_human_events_by_hour(
        api: httpx.Client, scenario: dict[str, Any]) -> None:
    timeline = scenario["report"]["timeline"]
    assert all(set(bucket) == {"at", "opens", "clicks"} for bucket in timeline)
    assert sum(b["opens"] for b in timeline) == 4
    assert sum(b["clicks"] for b in timeline) == 4
    assert timeline == expected_timeline(api, scenario, UTC)
    for bucket in timeline:
        at = parse_time(bucket["at"])
        assert at.utcoffset() == timedelta(0)
        assert (at.minute, at.second, at.microsecond) == (0, 0, 0)


def test_report_timeline_in_another_zone_uses_its_hours(
        api: httpx.Client, scenario: dict[str, Any]) -> None:
    timeline = report(api, scenario["campaign"], tz="Asia/Kolkata")["timeline"]
    assert timeline == expected_timeline(api, scenario, ZoneInfo("Asia/Kolkata"))
    for bucket in timeline:
        assert bucket["at"].endswith("+05:30"), bucket
        at = parse_time(bucket["at"])
        assert (at.minute, at.second, at.microsecond) == (0, 0, 0)


def expected_timeline(api: httpx.Client, scenario: dict[str, Any],
                      zone: Any) -> list[dict[str, Any]]:
    """Hour buckets computed here from the stored events' times, human events only."""
    counts: Counter[tuple[datetime, str]] = Counter()
    for message in scenario["messages"].values():
        for event in activity(api, message["id"])["events"]:
            if not event["machine"]:
                hour = parse_time(event["at"]).astimezone(zone).replace(
                    minute=0, second=0, microsecond=0)
                counts[(hour, event["type"])] += 1
    hours = sorted({hour for hour, _ in counts})
    return [{"at": hour.isoformat(), "opens": counts[(hour, "open")],
             "clicks": counts[(hour, "click")]} for hour in hours]


@pytest.mark.parametrize("tz", ["Mars/Olympus", "", "asia/kolkata ", "../etc/passwd", "+05:30",
                                "UTC; drop table events", "A" * 300, "UTC\x00"])
def test_report_with_an_unknown_time_zone_is_422(
        api: httpx.Client, scenario: dict[str, Any], tz: str) -> None:
    error_of(api.get(f"/api/campaigns/{scenario['campaign']}/report", params={"tz": tz}), 422)


@pytest.mark.parametrize("tz", ["localtime", "posixrules", "Factory", "right/UTC",
                                "posix/Asia/Kolkata", "Etc/GMT+5", "EST5EDT"])
def test_report_with_an_odd_time_zone_name_is_200_or_422_never_500(
        api: httpx.Client, scenario: dict[str, Any], tz: str) -> None:
    response = api.get(f"/api/campaigns/{scenario['campaign']}/report", params={"tz": tz})
    if response.status_code != 200:
        error_of(response, 422)


def test_report_breakdown_counts_human_events_by_stored_value(
        scenario: dict[str, Any]) -> None:
    breakdown = scenario["report"]["breakdown"]
    assert set(breakdown) == {"opens", "clicks"}
    assert set(breakdown["opens"]) == DIMENSIONS and set(breakdown["clicks"]) == DIMENSIONS
    opens, clicks = breakdown["opens"], breakdown["clicks"]
    # Opens: m1 x2 from Frankfurt, m5 through Gmail's proxy (place unknown), m6 from China
    # (no region in the database). The bot's open from Frankfurt is not counted.
    assert opens["country"] == {"DE": 2, "CN": 1, "unknown": 1}
    assert opens["region"] == {"Hesse": 2, "unknown": 2}
    # Three opens are Chrome on Windows; what the parser makes of the proxy's agent is its own.
    for dimension, value in (("browser", "Chrome"), ("os", "Windows"), ("device", "desktop")):
        assert opens[dimension].get(value, 0) >= 3, dimension
        assert sum(opens[dimension].values()) == 4, dimension
    # Clicks: m1 from Frankfurt, m2 from Boxford, m6 x2 from loopback (not in the database).
    assert clicks["country"] == {"DE": 1, "GB": 1, "unknown": 2}
    assert clicks["region"] == {"Hesse": 1, "England": 1, "unknown": 2}
    assert clicks["browser"] == {"Chrome": 4}
    assert clicks["os"] == {"Windows": 4}
    assert clicks["device"] == {"desktop": 4}


def test_message_activity_lists_each_event_with_its_fields(
        api: httpx.Client, scenario: dict[str, Any]) -> None:
    got = activity(api, scenario["messages"][1]["id"])
    assert set(got) - {"campaign_id", "tags", "metadata"} == {"id", "recipient", "subject",
                                                             "sent_at", "events"}
    assert (got["id"], got["recipient"], got["subject"]) == (
        scenario["messages"][1]["id"], "m1@example.com", "Subject 1")
    events = got["events"]
    assert all(set(e) == EVENT_FIELDS for e in events)
    times = [parse_time(e["at"]) for e in events]
    assert times == sorted(times)
    located = {"country": "DE", "region": "Hesse", "city": None,
               "browser": "Chrome", "os": "Windows", "device": "desktop"}
    strip = [{k: v for k, v in e.items() if k != "at"} for e in events]
    assert sorted(strip, key=repr) == sorted([
        # A browser opening the pixel is webmail; a click says nothing of the mail client.
        {"type": "open", "url": None, "machine": False, "reason": None, "client": "webmail",
         **located},
        {"type": "open", "url": None, "machine": False, "reason": None, "client": "webmail",
         **located},
        {"type": "click", "url": SHARED, "machine": False, "reason": None, "client": None,
         **located},
        {"type": "click", "url": SHARED, "machine": True, "reason": "head", "client": None,
         **located},
    ], key=repr)


def test_message_activity_marks_bots_machine_with_a_reason(
        api: httpx.Client, scenario: dict[str, Any]) -> None:
    events = activity(api, scenario["messages"][3]["id"])["events"]
    assert sorted((e["type"], e["url"], e["machine"], e["reason"]) for e in events) == [
        ("click", NEVER, True, "bot_ua"), ("open", None, True, "bot_ua")]


def test_image_proxy_open_is_human_with_no_location(
        api: httpx.Client, scenario: dict[str, Any]) -> None:
    (event,) = activity(api, scenario["messages"][5]["id"])["events"]
    assert (event["type"], event["machine"]) == ("open", False)
    assert (event["country"], event["region"], event["city"]) == (None, None, None)


def test_no_address_is_stored_under_the_default_policy(
        module_dsn: str, scenario: dict[str, Any]) -> None:
    rows = db_fetch(module_dsn, "select ip, city from events where campaign_id = $1",
                    int(scenario["campaign"]))
    assert len(rows) == 11
    assert {(r["ip"], r["city"]) for r in rows} == {(None, None)}


def test_a_message_with_only_a_click_counts_as_opened(
        api: httpx.Client, server: Server, public: httpx.Client) -> None:
    cid = campaign(api, name="click only")
    message = register(api, cid, [SHARED])
    register(api, cid, [SHARED])
    click(public, server, message)
    result = settled_report(api, cid, 1)
    assert result["opens"] == {"total": 0, "unique": 1, "machine": 0, "machine_by_reason": {}}
    assert result["clicks"] == {"total": 1, "unique": 1, "machine": 0, "machine_by_reason": {}}
    assert result["open_rate"] == pytest.approx(0.5)
    assert result["click_rate"] == pytest.approx(0.5)
    assert result["click_to_open_rate"] == pytest.approx(1.0)


def test_report_without_hits_is_all_zero(api: httpx.Client) -> None:
    cid = campaign(api, name="quiet")
    register(api, cid, [SHARED, ONLY_M1])
    register(api, cid, [SHARED])
    result = report(api, cid)
    assert result["messages"] == 2
    assert result["opens"] == {"total": 0, "unique": 0, "machine": 0, "machine_by_reason": {}}
    assert result["clicks"] == {"total": 0, "unique": 0, "machine": 0, "machine_by_reason": {}}
    assert (result["open_rate"], result["click_rate"], result["click_to_open_rate"]) == (
        0.0, 0.0, 0.0)
    assert sorted((x["url"], x["clicks"], x["unique_clicks"]) for x in result["links"]) == [
        (ONLY_M1, 0, 0), (SHARED, 0, 0)]
    assert result["timeline"] == []
    assert result["breakdown"] == {kind: {dim: {} for dim in DIMENSIONS}
                                   for kind in ("opens", "clicks")}


def test_report_of_a_campaign_without_messages_is_all_zero(api: httpx.Client) -> None:
    result = report(api, campaign(api, name="empty"))
    assert result["messages"] == 0
    assert (result["open_rate"], result["click_rate"], result["click_to_open_rate"]) == (
        0.0, 0.0, 0.0)
    assert result["links"] == [] and result["timeline"] == []


def test_click_to_open_rate_is_zero_when_only_machines_opened(
        api: httpx.Client, server: Server, public: httpx.Client) -> None:
    cid = campaign(api, name="machines only")
    message = register(api, cid, [SHARED])
    open_pixel(public, server, message, agent=GOOGLEBOT)
    click(public, server, message, method="HEAD")
    result = settled_report(api, cid, 2)
    assert result["opens"] == {"total": 0, "unique": 0, "machine": 1,
                              "machine_by_reason": {"bot_ua": 1}}
    assert result["clicks"] == {"total": 0, "unique": 0, "machine": 1,
                               "machine_by_reason": {"head": 1}}
    assert (result["open_rate"], result["click_rate"], result["click_to_open_rate"]) == (
        0.0, 0.0, 0.0)
    assert result["timeline"] == []
    assert result["links"] == [{"url": SHARED, "clicks": 0, "unique_clicks": 0}]


@pytest.mark.parametrize(("policy", "expected"), [
    ({"location": "city"}, {"country": "DE", "region": "Hesse", "city": "Frankfurt am Main",
                            "browser": "Chrome", "os": "Windows", "device": "desktop"}),
    ({"location": "country"}, {"country": "DE", "region": None, "city": None,
                               "browser": "Chrome", "os": "Windows", "device": "desktop"}),
    ({"location": "none", "device": False}, {"country": None, "region": None, "city": None,
                                             "browser": None, "os": None, "device": None}),
], ids=["city", "country", "nothing"])
def test_fields_the_policy_does_not_allow_are_null_and_never_stored(
        api: httpx.Client, server: Server, public: httpx.Client, module_dsn: str,
        policy: dict[str, Any], expected: dict[str, Any]) -> None:
    cid = campaign(api, policy, name="policy")
    message = register(api, cid, [SHARED])
    open_pixel(public, server, message, ip=FRANKFURT)
    click(public, server, message, ip=FRANKFURT)
    settled_report(api, cid, 2)
    events = activity(api, message["id"])["events"]
    assert len(events) == 2
    for event in events:
        assert {k: event[k] for k in expected} == expected
    rows = db_fetch(module_dsn, "select country, region, city, browser, os, device, ip "
                                "from events_decoded where campaign_id = $1", int(cid))
    assert [{k: r[k] for k in expected} for r in rows] == [expected, expected]
    assert [r["ip"] for r in rows] == [None, None]


# --- tenant isolation ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tenants(server: Server, module_dsn: str, public: httpx.Client) -> Iterator[dict[str, Any]]:
    """Accounts A and B, each with a campaign, a message and hits of their own."""
    with server.client(new_account(module_dsn, "A")) as a, \
            server.client(new_account(module_dsn, "B")) as b:
        a_campaign = a.post("/api/campaigns", json={"name": "A's"}).json()
        a_message = register(a, a_campaign["id"], [SHARED], recipient="a@example.com")
        b_campaign = b.post("/api/campaigns", json={"name": "B's"}).json()
        b_message = register(b, b_campaign["id"], [SHARED], recipient="b@example.com")
        open_pixel(public, server, a_message)
        for _ in range(3):
            open_pixel(public, server, b_message)
            click(public, server, b_message)
        settled_report(a, a_campaign["id"], 1)
        settled_report(b, b_campaign["id"], 6)
        yield {"a": a, "b": b, "a_campaign": a_campaign, "a_message": a_message,
               "b_campaign": b_campaign, "b_message": b_message}


def test_another_accounts_objects_are_404_on_every_endpoint_and_unchanged(
        module_dsn: str, tenants: dict[str, Any]) -> None:
    a, b = tenants["a"], tenants["b"]
    cid, mid = tenants["a_campaign"]["id"], tenants["a_message"]["id"]
    messages_before = db_value(module_dsn, "select count(*) from messages where campaign_id = $1",
                               int(cid))
    report_before = report(a, cid)
    attempts = [
        ("GET", "/api/campaigns/{c}", None, None),
        ("PATCH", "/api/campaigns/{c}", {"name": "taken", "policy": {"ip": "full"}}, None),
        ("PATCH", "/api/campaigns/{c}", {"policy": {"location": "mars"}}, None),
        ("PATCH", "/api/campaigns/{c}", {"bogus": 1}, None),
        ("DELETE", "/api/campaigns/{c}", None, None),
        ("POST", "/api/campaigns/{c}/messages", {"recipient": "b@example.com",
                                                 "links": [SHARED]}, None),
        ("POST", "/api/campaigns/{c}/messages", {"recipient": "", "links": ["ftp://x"]}, None),
        ("GET", "/api/campaigns/{c}/report", None, None),
        ("GET", "/api/campaigns/{c}/report", None, {"tz": "Mars/Olympus"}),
        ("GET", "/api/messages/{m}", None, None),
    ]
    for method, template, body, params in attempts:
        response = b.request(method, template.format(c=cid, m=mid), json=body, params=params)
        assert response.status_code == 404, (method, template, body, response.text)
        # The answer is the one for an id that never existed: nothing reveals A's object.
        never = b.request(method, template.format(c="999999999", m="999999998"), json=body,
                          params=params)
        assert (response.status_code, response.json()) == (never.status_code, never.json()), (
            method, template, body)
    assert a.get(f"/api/campaigns/{cid}").json() == tenants["a_campaign"]
    assert db_value(module_dsn, "select count(*) from messages where campaign_id = $1",
                    int(cid)) == messages_before
    assert report(a, cid) == report_before
    assert activity(a, mid)["recipient"] == "a@example.com"


def test_lists_show_only_the_accounts_own_campaigns(tenants: dict[str, Any]) -> None:
    a_ids = {c["id"] for c in tenants["a"].get("/api/campaigns").json()}
    b_ids = {c["id"] for c in tenants["b"].get("/api/campaigns").json()}
    assert tenants["a_campaign"]["id"] in a_ids
    assert tenants["b_campaign"]["id"] in b_ids
    assert not a_ids & b_ids


def test_reports_count_only_the_accounts_own_hits(tenants: dict[str, Any]) -> None:
    a_report = report(tenants["a"], tenants["a_campaign"]["id"])
    assert a_report["messages"] == 1
    assert a_report["opens"] == {"total": 1, "unique": 1, "machine": 0, "machine_by_reason": {}}
    assert a_report["clicks"] == {"total": 0, "unique": 0, "machine": 0,
                                 "machine_by_reason": {}}
    assert a_report["links"] == [{"url": SHARED, "clicks": 0, "unique_clicks": 0}]
    b_report = report(tenants["b"], tenants["b_campaign"]["id"])
    assert b_report["opens"]["total"] == 3 and b_report["clicks"]["total"] == 3
    assert b_report["links"] == [{"url": SHARED, "clicks": 3, "unique_clicks": 1}]


def test_message_activity_shows_only_the_accounts_own_events(tenants: dict[str, Any]) -> None:
    events = activity(tenants["a"], tenants["a_message"]["id"])["events"]
    assert [e["type"] for e in events] == ["open"]
    error_of(tenants["a"].get(f"/api/messages/{tenants['b_message']['id']}"), 404)
