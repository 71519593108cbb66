"""Recipient results, tags, metadata, time ranges and link options against a real server and
PostgreSQL: who opened, who clicked, who did not (Apple's prefetches are no opens), a clicked
link, a mail client, a country, a search; cursor pages; CSV and JSON Lines with the JSON's
rows; counts that survive retention; tags and metadata within bounds, reports and lists over
a tag or a sending time; unknown parameters refused; UTM parameters, URL-text links and the
pixel's place; the Python client and `tracker messages`."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

from tests.geodb import build_test_city_db
from tracker.mail.client import Client
from tracker.store.results import COLUMNS

from .support import Server, campaign, db_value, new_account, register, wait_for
from .test_privacy import _maintain

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")
THUNDERBIRD = ("Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.3.0")
MPP = "Mozilla/5.0"  # Apple Mail Privacy Protection's prefetch
FRANKFURT, BOXFORD = "81.2.69.142", "2.125.160.216"
LINKS = ["https://example.com/sale", "https://example.com/blog"]
SALE = LINKS[0]


@pytest.fixture(scope="module")
def server(module_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("results-server")
    geo_db = build_test_city_db(tmp / "city.mmdb")
    srv = Server(module_dsn, tmp, env={"TRACKER_GEOIP_DB": str(geo_db),
                                       "TRACKER_FLUSH_INTERVAL_MS": "50"}).start()
    yield srv
    srv.stop()


def _hit(url: str, agent: str = CHROME, ip: str = BOXFORD) -> None:
    response = httpx.get(url, headers={"user-agent": agent, "x-forwarded-for": ip}, timeout=10,
                         follow_redirects=False)
    assert response.status_code in (200, 302), response.status_code


def _list(api: httpx.Client, cid: str, **params: Any) -> dict[str, Any]:
    response = api.get(f"/api/campaigns/{cid}/messages", params=params)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


def _ids(api: httpx.Client, cid: str, **params: Any) -> list[str]:
    return [m["id"] for m in _list(api, cid, **params)["messages"]]


def _settled(api: httpx.Client, cid: str, hits: int) -> None:
    def done() -> bool:
        report = api.get(f"/api/campaigns/{cid}/report").json()
        return int(sum(report[k][n] for k in ("opens", "clicks")
                       for n in ("total", "machine"))) >= hits
    wait_for(done, message=f"{hits} hits in the report")


@pytest.fixture(scope="module")
def readers(server: Server, module_dsn: str) -> tuple[str, str, list[dict[str, Any]]]:
    """Five messages: opened and clicked (Frankfurt), opened in Thunderbird, prefetched by
    MPP and then opened, only prefetched by MPP, and untouched."""
    key = new_account(module_dsn, "readers")
    with server.client(key) as api:
        cid = campaign(api, {"location": "country"}, name="readers")
        made = [register(api, cid, LINKS, recipient=f"r{i}@example.com", subject=f"News {i}")
                for i in range(5)]
        clicked, thunderbird, both, prefetched, _ = made
        _hit(clicked["pixel_url"], CHROME, FRANKFURT)
        _hit(clicked["links"][1]["tracked_url"], CHROME, FRANKFURT)
        _hit(thunderbird["pixel_url"], THUNDERBIRD)
        _hit(both["pixel_url"], MPP)
        _hit(both["pixel_url"], CHROME)
        _hit(prefetched["pixel_url"], MPP)
        _settled(api, cid, 6)
    return key, cid, made


def test_who_opened_who_clicked_and_who_did_not(server: Server,
                                                readers: tuple[str, str, list[Any]]) -> None:
    key, cid, made = readers
    clicked, thunderbird, both, prefetched, untouched = (m["id"] for m in made)
    with server.client(key) as api:
        rows = {m["id"]: m for m in _list(api, cid)["messages"]}
        assert list(rows) == [m["id"] for m in made]  # in the order they were registered
        assert set(rows[clicked]) == {"id", "recipient", "subject", "sent_at", "opens", "clicks",
                                      "machine"}
        assert [(rows[i]["opens"], rows[i]["clicks"], rows[i]["machine"]) for i in rows] == [
            (1, 1, 0), (1, 0, 0), (1, 0, 1), (0, 0, 1), (0, 0, 0)]
        assert rows[clicked]["recipient"] == "r0@example.com"
        assert _ids(api, cid, status="opened") == [clicked, thunderbird, both]
        assert _ids(api, cid, status="clicked") == [clicked]
        # MPP's prefetch is no open: the prefetched message is not opened, and machine-only.
        assert _ids(api, cid, status="not_opened") == [prefetched, untouched]
        assert _ids(api, cid, status="machine_only") == [prefetched]
        assert _ids(api, cid, status="untracked") == []
        assert _ids(api, cid, link=LINKS[1]) == [clicked]
        assert _ids(api, cid, link=LINKS[0]) == []
        assert _ids(api, cid, client="Thunderbird") == [thunderbird]
        assert _ids(api, cid, country="de") == [clicked]
        assert _ids(api, cid, search="R3@EXAMPLE.COM") == [prefetched]
        assert _ids(api, cid, search="r3@") == [prefetched]
        assert _ids(api, cid, status="not_opened", search="r4") == [untouched]


def test_pages_follow_a_cursor_made_for_their_filter(server: Server, module_dsn: str) -> None:
    with server.client(new_account(module_dsn, "pages")) as api:
        cid = campaign(api, name="pages")
        made = api.post(f"/api/campaigns/{cid}/messages/batch", json={"messages": [
            {"recipient": f"p{i}@example.com"} for i in range(25)]}).json()["messages"]
        seen, cursor, pages = [], None, 0
        while True:
            page = _list(api, cid, limit=10, **({"cursor": cursor} if cursor else {}))
            seen += [m["id"] for m in page["messages"]]
            pages += 1
            cursor = page["next"]
            if cursor is None:
                break
            # A message registered meanwhile comes at the end, never shifts a page.
            if pages == 1:
                made.append(register(api, cid, [], recipient="late@example.com"))
        assert seen == [m["id"] for m in made] and pages == 3
        first = _list(api, cid, limit=10)
        other = api.get(f"/api/campaigns/{cid}/messages",
                        params={"cursor": first["next"], "status": "opened"})
        assert other.status_code == 422 and "other filters" in other.json()["error"]
        for bad in ({"cursor": "nonsense"}, {"limit": "0"}, {"limit": "1001"},
                    {"limit": "ten"}, {"status": "read"}, {"format": "xml"},
                    {"from": "tomorrow"}, {"country": "Germany"},
                    {"from": "2026-02-01", "to": "2026-01-01"},
                    {"link": "https://example.com/never-registered"}):
            response = api.get(f"/api/campaigns/{cid}/messages", params=bad)
            assert response.status_code == 422, (bad, response.text)
            assert next(iter(bad)) in response.json()["error"], (bad, response.text)


def test_csv_and_json_lines_hold_the_rows_of_the_json(server: Server,
                                                      readers: tuple[str, str, list[Any]]) -> None:
    key, cid, _ = readers
    with server.client(key) as api:
        rows = _list(api, cid, status="not_opened")["messages"]
        as_csv = api.get(f"/api/campaigns/{cid}/messages",
                         params={"status": "not_opened", "format": "csv"})
        assert as_csv.status_code == 200
        assert as_csv.headers["content-type"] == "text/csv; charset=utf-8"
        assert as_csv.headers["content-disposition"] == (
            f'attachment; filename="campaign-{cid}-messages.csv"')
        table = list(csv.reader(io.StringIO(as_csv.text)))
        assert tuple(table[0]) == COLUMNS
        assert [dict(zip(COLUMNS, r, strict=True)) for r in table[1:]] == [
            {k: str(v) if v is not None else "" for k, v in row.items()} for row in rows]
        as_jsonl = api.get(f"/api/campaigns/{cid}/messages",
                           params={"status": "not_opened", "format": "jsonl"})
        assert as_jsonl.headers["content-type"] == "application/jsonl"
        assert [orjson.loads(line) for line in as_jsonl.text.splitlines()] == rows
        capped = api.get(f"/api/campaigns/{cid}/messages", params={"format": "jsonl",
                                                                    "limit": "2"})
        assert len(capped.text.splitlines()) == 2


@pytest.mark.slow
def test_counts_and_statuses_survive_retention(server: Server, module_dsn: str) -> None:
    with server.client(new_account(module_dsn, "retained")) as api:
        cid = campaign(api, {"retention_days": 7}, name="short-lived events")
        opened, prefetched = (register(api, cid, LINKS, recipient=f"k{i}@example.com")
                              for i in range(2))
        _hit(opened["pixel_url"])
        _hit(opened["links"][0]["tracked_url"])
        _hit(prefetched["pixel_url"], MPP)
        _settled(api, cid, 3)
        before = _list(api, cid)["messages"]
        report = api.get(f"/api/campaigns/{cid}/report").json()
        _maintain(module_dsn, datetime.now(UTC) + timedelta(days=8))
        assert db_value(module_dsn, "select count(*) from events where campaign_id = $1",
                        int(cid)) == 0
        assert _list(api, cid)["messages"] == before
        assert [(m["opens"], m["clicks"], m["machine"]) for m in before] == [(1, 1, 0),
                                                                             (0, 0, 1)]
        assert _ids(api, cid, status="not_opened") == [prefetched["id"]]
        assert _ids(api, cid, link=LINKS[0]) == [opened["id"]]
        assert api.get(f"/api/campaigns/{cid}/report").json()["opens"] == report["opens"]


@pytest.mark.slow
def test_tags_metadata_and_time_ranges(server: Server, module_dsn: str) -> None:
    with server.client(new_account(module_dsn, "labels")) as api:
        made = api.post("/api/campaigns", json={"name": "tagged", "tags": ["spring", "de"],
                                                "metadata": {"team": "growth", "wave": 2}})
        assert made.status_code == 201, made.text
        cid = made.json()["id"]
        assert (made.json()["tags"], made.json()["metadata"]) == (
            ["spring", "de"], {"team": "growth", "wave": 2})
        untagged = campaign(api, name="untagged")
        assert [c["id"] for c in api.get("/api/campaigns", params={"tag": "spring"}).json()] == [
            cid]
        assert untagged not in [c["id"] for c in api.get("/api/campaigns",
                                                         params={"tag": "spring"}).json()]

        now = datetime.now(UTC)
        old = register(api, cid, [], recipient="old@example.com", tags=["a"],
                       metadata={"order": "A-1"}, sent_at=(now - timedelta(days=3)).isoformat())
        new = register(api, cid, [], recipient="new@example.com", tags=["b"],
                       sent_at=(now - timedelta(hours=1)).isoformat())
        shown = api.get(f"/api/messages/{old['id']}").json()
        assert (shown["tags"], shown["metadata"]) == (["a"], {"order": "A-1"})
        _hit(old["pixel_url"])
        _settled(api, cid, 1)
        assert _ids(api, cid, tag="a") == [old["id"]]
        since = (now - timedelta(days=1)).isoformat()
        assert _ids(api, cid, **{"from": since}) == [new["id"]]
        assert _ids(api, cid, to=since) == [old["id"]]
        for params, messages, opened in (({"tag": "a"}, 1, 1), ({"tag": "b"}, 1, 0),
                                         ({"from": since}, 1, 0), ({}, 2, 1)):
            report = api.get(f"/api/campaigns/{cid}/report", params=params).json()
            assert (report["messages"], report["opens"]["unique"]) == (messages, opened), params

        too_big = {f"k{i}": "x" * 60 for i in range(40)}
        for body, field in (({"tags": [f"t{i}" for i in range(21)]}, "tags"),
                            ({"tags": ["x" * 65]}, "tags"), ({"tags": ["a\nb"]}, "tags"),
                            ({"tags": "spring"}, "tags"),
                            ({"metadata": {"nested": {"a": 1}}}, "metadata"),
                            ({"metadata": too_big}, "metadata"),
                            ({"metadata": [1]}, "metadata"),
                            ({"metadata": {"": 1}}, "metadata")):
            for path, payload in (("/api/campaigns", {"name": "x", **body}),
                                  (f"/api/campaigns/{cid}/messages",
                                   {"recipient": "x@example.com", **body})):
                response = api.post(path, json=payload)
                assert response.status_code == 422, (path, payload, response.text)
                assert field in response.json()["error"]


@pytest.mark.parametrize("path", ["/api/campaigns", "/api/campaigns/{id}/report",
                                  "/api/campaigns/{id}/messages", "/api/campaigns/{id}",
                                  "/api/keys", "/api/campaigns/{id}/export"])
def test_unknown_query_parameters_are_refused(server: Server,
                                              readers: tuple[str, str, list[Any]],
                                              path: str) -> None:
    key, cid, _ = readers
    with server.client(key) as api:
        response = api.get(path.replace("{id}", cid), params={"stauts": "opened"})
        assert response.status_code == 422, response.text
        assert "stauts" in response.json()["error"]
        twice = api.get(f"/api/campaigns/{cid}/messages", params=[("status", "opened"),
                                                                   ("status", "clicked")])
        assert twice.status_code == 422


def test_a_pseudonymous_campaign_lists_pseudonyms_and_finds_them_by_address(
        server: Server, module_dsn: str) -> None:
    with server.client(new_account(module_dsn, "pseudonyms")) as api:
        cid = campaign(api, {"recipient": "pseudonym"}, name="pseudonymous")
        made = register(api, cid, [], recipient="Zoe <zoe@example.com>")
        (row,) = _list(api, cid)["messages"]
        assert "zoe" not in row["recipient"].lower() and row["recipient"]
        assert _ids(api, cid, search="ZOE@example.com") == [made["id"]]
        assert "zoe" not in api.get(f"/api/campaigns/{cid}/messages",
                                    params={"format": "csv"}).text.lower()


def test_link_options_utm_url_text_and_the_pixel_on_top(server: Server,
                                                        module_dsn: str) -> None:
    html = ('<html><body><p>Hi</p><a href="https://shop.example/sale?utm_source=mine">Sale</a>'
            '<a href="https://shop.example/blog">https://shop.example/blog</a></body></html>')
    with server.client(new_account(module_dsn, "links")) as api:
        plain = campaign(api, name="defaults")
        default = register(api, plain, [], html=html)
        # A link whose text is a URL is left as it is; the pixel goes at the end.
        assert [link["tracked_url"] is not None for link in default["links"]] == [True, False]
        assert '<a href="https://shop.example/blog">' in default["html"]
        assert default["html"].index("<img") > default["html"].index("Hi")

        made = api.post("/api/campaigns", json={"name": "utm", "options": {
            "utm": {"source": "newsletter", "medium": "email"}, "track_url_text": True,
            "pixel": "top"}})
        assert made.status_code == 201, made.text
        cid = made.json()["id"]
        message = register(api, cid, [], html=html)
        sale, blog = message["links"]
        # utm_source was there: kept, never replaced; the missing one added.
        assert sale["destination"] == "https://shop.example/sale?utm_source=mine&utm_medium=email"
        assert blog["destination"] == (
            "https://shop.example/blog?utm_source=newsletter&utm_medium=email")
        assert blog["tracked_url"] is not None  # tracked on request
        assert message["html"].index("<img") < message["html"].index("Hi")  # pixel on top
        redirect = httpx.get(sale["tracked_url"], headers={"user-agent": CHROME}, timeout=10)
        assert redirect.headers["location"] == sale["destination"]
        # The list's link filter takes the destination as registered, or with its UTM.
        _hit(sale["tracked_url"])
        _settled(api, cid, 1)
        assert _ids(api, cid, link="https://shop.example/sale?utm_source=mine") == [
            message["id"]]
        for bad in ({"utm": {"campaign_name": "x"}}, {"pixel": "middle"},
                    {"track_url_text": "yes"}, {"colour": 1}):
            response = api.post("/api/campaigns", json={"name": "bad", "options": bad})
            assert response.status_code == 422, (bad, response.text)


@pytest.mark.slow
def test_recipient_results_through_the_client_and_the_cli(
        server: Server, readers: tuple[str, str, list[Any]]) -> None:
    key, cid, made = readers
    with Client(server.url, key) as client:
        not_opened = [m.id for m in client.iter_messages(cid, status="not_opened")]
        assert not_opened == [made[3]["id"], made[4]["id"]]
        page = client.list_messages(cid, limit=2)
        assert len(page.messages) == 2 and page.next is not None
        assert [m.id for m in client.iter_messages(cid)] == [m["id"] for m in made]
        exported = client.export_messages(cid, "csv", status="not_opened")
        assert exported.decode().count("\r\n") == 3
    result = subprocess.run(
        [sys.executable, "-m", "tracker", "messages", "--campaign", cid, "--status",
         "not_opened", "--format", "csv", "--api-url", server.url],
        env={**os.environ, "TRACKER_API_KEY": key}, capture_output=True, timeout=60,
        check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == exported
    table = subprocess.run(
        [sys.executable, "-m", "tracker", "messages", "--campaign", cid, "--status", "opened",
         "--api-url", server.url], env={**os.environ, "TRACKER_API_KEY": key},
        capture_output=True, text=True, timeout=60, check=False)
    assert table.returncode == 0, table.stderr
    assert "r0@example.com" in table.stdout and "r3@example.com" not in table.stdout


def test_tags_options_and_untracked_links_through_the_client(server: Server,
                                                             module_dsn: str) -> None:
    with Client(server.url, new_account(module_dsn, "client labels")) as client:
        made = client.create_campaign("labelled", {"consent": {"opens": True, "clicks": False}},
                                      tags=["q4"], metadata={"team": "growth"},
                                      options={"utm": {"source": "mail"}, "pixel": "top"})
        assert (made.tags, made.metadata) == (("q4",), {"team": "growth"})
        assert made.options is not None and made.options["pixel"] == "top"
        assert [c.id for c in client.list_campaigns(tag="q4")] == [made.id]
        message = client.register_message(made.id, "ida@example.com", links=[SALE],
                                          tags=["vip"], metadata={"order": 7})
        assert message.pixel_url is None  # no consent to opens on record
        (link,) = message.links
        assert link.tracked_url is not None and link.destination == SALE + "?utm_source=mail"
        assert [m.id for m in client.iter_messages(made.id, tag="vip")] == [message.id]
        assert [m.id for m in client.iter_messages(made.id, status="untracked")] == [message.id]
