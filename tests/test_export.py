"""GET /api/campaigns/{id}/export against a real server: every row equals the stored event.

Events reach the database two ways: real hits on the tracking endpoints, and a bulk
of events with awkward values (tabs, quotes, commas, newlines, non-ASCII, every kind of
stored address) written through the real batch writer into the server's database.
"""

from __future__ import annotations

import asyncio
import csv
import io
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

from tracker.ingest.pipeline import CLICK, OPEN, Event, event_id
from tracker.store.database import connect
from tracker.store.writer import BatchWriter
from tracker.web import export

from .support import Server, campaign, db_fetch, db_value, new_account, register, wait_for

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")
AWKWARD = ("Hesse", 'say "hi", then\tgo', "line\nbreak\r\nand back", "Île-de-France, 北京",
           "=1+2", "", None)
ADDRESSES = (None, "198.51.100.7", "203.0.113.0/24", "2001:db8::1", "2001:db8:1::/48")
BULK = 2 * export.CHUNK_ROWS + 17  # more than one cursor fetch, and a partial last one


@pytest.fixture(scope="module")
def api(server: Server, module_dsn: str) -> Iterator[httpx.Client]:
    with server.client(new_account(module_dsn, "exporter")) as client:
        yield client


@pytest.fixture(scope="module")
def exported(api: httpx.Client, server: Server, module_dsn: str) -> dict[str, Any]:
    """A campaign that keeps everything (city, full address) with real hits and a bulk."""
    cid = campaign(api, {"location": "city", "ip": "full"}, name="export")
    sent_at = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    messages = [register(api, cid, ["https://example.com/a", "https://example.com/b?x=1,2"],
                         recipient=f"reader{i}@example.com", sent_at=sent_at)
                for i in range(3)]
    with httpx.Client(base_url=server.url, timeout=10) as public:
        for message in messages:
            path = message["pixel_url"].removeprefix(server.url)
            assert public.get(path, headers={"user-agent": CHROME}).status_code == 200
            for link in message["links"]:
                tracked = link["tracked_url"].removeprefix(server.url)
                assert public.get(tracked, headers={"user-agent": CHROME}).status_code == 302
    hits = 3 * len(messages)
    wait_for(lambda: db_value(module_dsn, "select count(*) from events where campaign_id = $1",
                              int(cid)) == hits, message="the real hits to be stored")
    account_id = db_value(module_dsn, "select account_id from campaigns where id = $1", int(cid))
    url_ids = [r["id"] for r in db_fetch(module_dsn, "select id from urls where campaign_id = $1",
                                         int(cid))]
    rng = random.Random(5)
    start = (datetime.now(UTC) - timedelta(hours=3)).timestamp()
    bulk = []
    for n in range(BULK):
        at_us = int((start + n * 0.5) * 1_000_000)
        kind = rng.choice((OPEN, CLICK))
        machine = rng.random() < 0.3
        bulk.append(Event(
            account_id=account_id, at_us=at_us, id=event_id(at_us), campaign_id=int(cid),
            message_id=int(rng.choice(messages)["id"]), type=kind,
            link_position=rng.randrange(2) if kind == CLICK else None,
            url_id=rng.choice(url_ids) if kind == CLICK else None, machine=machine,
            reason=rng.choice(("bot_ua", "head")) if machine else None,
            country=rng.choice(("DE", None)), region=rng.choice(AWKWARD),
            city=rng.choice(AWKWARD), browser=rng.choice(("Chrome", None)),
            os=rng.choice(("Windows", None)), device=rng.choice(("desktop", None)),
            client=rng.choice(("Apple Mail", "webmail", None)), ip=rng.choice(ADDRESSES)))

    async def write() -> None:
        writer = BatchWriter(lambda: connect(module_dsn), batch_size=1000, interval_s=3600,
                             max_buffered=BULK)
        for e in bulk:
            writer.add(e.record())
        await writer.flush()
        await writer.close(1.0)

    asyncio.run(write())
    return {"campaign": cid, "events": hits + BULK, "bulk": bulk}


def stored(module_dsn: str, cid: str) -> list[dict[str, Any]]:
    """The events as the database has them, in the export's columns, with the message's
    recipient and the url; an address without its prefix where it is a single one."""
    return [{"id": r["id"], "type": r["type"], "at": r["occurred_at"].isoformat(),
             "message_id": str(r["message_id"]), "recipient": r["recipient"], "url": r["url"],
             "link_position": r["link_position"], "machine": r["machine"],
             "reason": r["reason"], "country": r["country"], "region": r["region"],
             "city": r["city"], "browser": r["browser"], "os": r["os"], "device": r["device"],
             "ip": r["ip"], "client": r["client"]}
            for r in db_fetch(module_dsn, """
        select e.id::text as id, e.type, e.occurred_at, e.message_id, m.recipient,
               u.url, e.link_position, e.machine, e.reason, e.country, e.region, e.city,
               e.browser, e.os, e.device, e.client,
               case when masklen(e.ip) = case family(e.ip) when 4 then 32 else 128 end
                    then host(e.ip) else host(e.ip) || '/' || masklen(e.ip) end as ip
        from events_decoded e join messages m on m.account_id = e.account_id
                                        and m.id = e.message_id
        left join urls u on u.account_id = e.account_id and u.id = e.url_id
        where e.campaign_id = $1 order by e.occurred_at, e.id""", int(cid))]


def test_jsonl_export_has_every_stored_event_exactly(
        api: httpx.Client, module_dsn: str, exported: dict[str, Any]) -> None:
    response = api.get(f"/api/campaigns/{exported['campaign']}/export",
                       params={"format": "jsonl"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/jsonl")
    assert response.content.endswith(b"\n")
    rows = [orjson.loads(line) for line in response.content.splitlines()]
    assert len(rows) == exported["events"]
    assert all(list(row) == list(export.COLUMNS) for row in rows)
    assert rows == stored(module_dsn, exported["campaign"])
    # Spot checks that do not go through the same conversion as above.
    by_id = {row["id"]: row for row in rows}
    for e in exported["bulk"]:
        row = by_id[str(uuid.UUID(int=e.id))]
        assert (row["type"], row["region"], row["city"], row["machine"], row["reason"],
                row["ip"]) == (e.type, e.region, e.city, e.machine, e.reason, e.ip)
        assert row["at"] == (datetime(1970, 1, 1, tzinfo=UTC)
                             + timedelta(microseconds=e.at_us)).isoformat()


def test_csv_export_has_a_header_and_every_stored_event_exactly(
        api: httpx.Client, module_dsn: str, exported: dict[str, Any]) -> None:
    response = api.get(f"/api/campaigns/{exported['campaign']}/export",
                       params={"format": "csv"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    reader = csv.reader(io.StringIO(response.text, newline=""))
    header, *rows = list(reader)
    assert header == list(export.COLUMNS)
    assert len(rows) == exported["events"]

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    assert rows == [[cell(v) for v in r.values()]
                    for r in stored(module_dsn, exported["campaign"])]


def test_export_is_a_streamed_attachment(api: httpx.Client, exported: dict[str, Any]) -> None:
    cid = exported["campaign"]
    with api.stream("GET", f"/api/campaigns/{cid}/export") as response:
        assert response.status_code == 200
        assert response.headers["content-disposition"] == (
            f'attachment; filename="campaign-{cid}-events.csv"')
        assert response.headers["cache-control"] == "no-store"
        # No length up front: the body is written as the cursor yields rows.
        assert "content-length" not in response.headers
        assert response.headers.get("transfer-encoding") == "chunked"
        chunks = sum(1 for _ in response.iter_raw())
    assert chunks > 1
    head = api.head(f"/api/campaigns/{cid}/export", params={"format": "jsonl"})
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-disposition"].endswith('.jsonl"')


def test_export_of_a_campaign_without_events_is_the_header_alone(api: httpx.Client) -> None:
    cid = campaign(api, name="silent")
    register(api, cid, ["https://example.com/"])
    csv_body = api.get(f"/api/campaigns/{cid}/export").content
    assert csv_body == (",".join(export.COLUMNS) + "\r\n").encode()
    assert api.get(f"/api/campaigns/{cid}/export", params={"format": "jsonl"}).content == b""


@pytest.mark.parametrize("fmt", ["xml", "CSV", "", "json"])
def test_an_unknown_format_is_422(api: httpx.Client, exported: dict[str, Any],
                                  fmt: str) -> None:
    response = api.get(f"/api/campaigns/{exported['campaign']}/export", params={"format": fmt})
    assert response.status_code == 422
    assert "format" in response.json()["error"]


def test_another_accounts_campaign_is_404_like_one_that_never_existed_whatever_the_format(
        server: Server, module_dsn: str, exported: dict[str, Any]) -> None:
    with server.client(new_account(module_dsn, "intruder")) as intruder:
        for fmt in ("csv", "jsonl", "xml", ""):
            theirs = intruder.get(f"/api/campaigns/{exported['campaign']}/export",
                                  params={"format": fmt})
            never = intruder.get("/api/campaigns/999999999/export", params={"format": fmt})
            assert theirs.status_code == never.status_code == 404
            assert theirs.json() == never.json()
            assert "content-disposition" not in theirs.headers


def test_export_needs_a_key_and_a_live_campaign(
        server: Server, api: httpx.Client) -> None:
    cid = campaign(api, name="to delete")
    with httpx.Client(base_url=server.url, timeout=10) as anonymous:
        assert anonymous.get(f"/api/campaigns/{cid}/export").status_code == 401
    assert api.delete(f"/api/campaigns/{cid}").status_code == 204
    assert api.get(f"/api/campaigns/{cid}/export").status_code == 404
    assert api.get("/api/campaigns/abc/export").status_code == 404


@pytest.mark.slow
def test_a_client_that_leaves_mid_export_gives_the_connection_back(
        server: Server, api: httpx.Client, module_dsn: str, exported: dict[str, Any]) -> None:
    in_export = ("select count(*) from pg_stat_activity where application_name = 'tracker' "
                 "and state like 'idle in transaction%'")
    # A campaign of its own with an export far larger than the kernel's socket buffers on
    # loopback (several MB), so the server is certainly still streaming when we leave.
    big = campaign(api, name="big export")
    db_value(module_dsn, "select tracker_ensure_event_partition((now() at time zone 'UTC')::date)")
    db_value(module_dsn, "insert into event_terms (term) values ('Hesse'), ('Chrome'), "
                         "('Windows'), ('desktop') on conflict do nothing")
    db_value(module_dsn, """
        insert into events (account_id, occurred_at, id, campaign_id, message_id, type,
                            machine, country, region, city, browser, os, device)
        select c.account_id, now() - n * interval '1 microsecond',
               gen_random_uuid(), c.id, 1, 'open', false, 'DE', tracker_term_code('Hesse'),
               'Frankfurt am Main', tracker_term_code('Chrome'), tracker_term_code('Windows'),
               tracker_term_code('desktop')
        from campaigns c, generate_series(1, 60000) as n where c.id = $1""", int(big))
    with httpx.Client(base_url=server.url, headers=api.headers, timeout=10) as leaving, \
            leaving.stream("GET", f"/api/campaigns/{big}/export") as response:
        assert response.status_code == 200
        next(response.iter_raw(1024))
        # Still streaming: the body is larger than the socket buffers take at once. Polled:
        # while the server fetches its next chunk the backend is 'active', not idle.
        wait_for(lambda: db_value(module_dsn, in_export) == 1,
                 message="the export's transaction to wait on the client")
    wait_for(lambda: db_value(module_dsn, in_export) == 0,
             message="the export's transaction to end")
    assert api.get(f"/api/campaigns/{exported['campaign']}/report").status_code == 200


@pytest.mark.slow
def test_an_export_ends_its_transaction_itself_and_logs_nothing(
        server: Server, api: httpx.Client, module_dsn: str, exported: dict[str, Any]) -> None:
    # The pool resets a connection handed back inside a transaction, and says so in the
    # log each time: an export must end its read-only transaction before it lets go.
    in_transaction = ("select count(*) from pg_stat_activity where application_name = "
                      "'tracker' and state like 'idle in transaction%'")
    logged = len(server.log())
    for fmt in ("jsonl", "csv"):
        response = api.get(f"/api/campaigns/{exported['campaign']}/export?format={fmt}")
        assert response.status_code == 200
    assert api.head(f"/api/campaigns/{exported['campaign']}/export").status_code == 200
    wait_for(lambda: db_value(module_dsn, in_transaction) == 0,
             message="the exports' transactions to end")
    assert "Resetting connection" not in server.log()[logged:], server.log()[logged:]
