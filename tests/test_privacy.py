"""The privacy lifecycle against a real PostgreSQL: retention, erasure, opt-out, GPC/DNT,
pseudonymous recipients, export, deletion with a grace period, the privacy notice.

Retention and purge take the time they run at (`now`), so the tests set the clock
instead of waiting. "Nothing was recorded" is shown the way test_policy_storage does
it: one worker writes its buffer in order, so once a later control hit is in the table,
the refused hits would be there too, had they been recorded; the drop counters of
/metrics say why they were not.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote

import asyncpg
import httpx
import orjson
import pytest

from tracker.ingest.capture import client_headers
from tracker.ingest.pipeline import CLICK, OPEN, Event, event_id
from tracker.ingest.policy import Policy
from tracker.ingest.suppression import SuppressionBook
from tracker.ingest.tokens import ClickToken, OpenToken, Signer
from tracker.mail.registration import MessageInput, Registrar
from tracker.privacy import jobs
from tracker.privacy.link_redaction import Redactor
from tracker.privacy.notice import describe
from tracker.privacy.recipients import identify, normalize
from tracker.privacy.retention import GRACE, enforce_retention
from tracker.store import accounts, campaigns, reports
from tracker.store.database import connect, create_pool
from tracker.store.queries import QUERIES
from tracker.store.writer import BatchWriter

from .support import (
    SECRET,
    Server,
    campaign,
    connected,
    db_call,
    db_fetch,
    db_value,
    new_account,
    register,
    wait_for,
    wait_for_async,
)

LINK = "https://example.com/offer?utm_source=mail"
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")


# --- recipient keys, the suppression screen, the notice: no database ---------------------------


def test_one_recipient_whatever_the_spelling_of_the_address() -> None:
    secret = b"k" * 32
    ada = identify(secret, "ada@example.com")
    for spelling in ("Ada@Example.COM", "  ada@example.com ", "Ada Lovelace <ADA@example.com>"):
        assert normalize(spelling) == "ada@example.com"
        assert identify(secret, spelling) == ada
    assert identify(secret, "bob@example.com").key != ada.key
    # Under another account's key the same address is another recipient.
    assert identify(b"j" * 32, "ada@example.com").key != ada.key
    assert re.fullmatch(r"psn_[0-9a-f]{32}", ada.pseudonym)
    assert "ada" not in ada.pseudonym and ada.key != 0


def _open(account: int = 1, message: int = 10, key: int = 5) -> OpenToken:
    return OpenToken(account, 1, message, 0, key)


def test_screen_refuses_opted_out_erased_signalled_and_disabled_hits() -> None:
    book = SuppressionBook()
    assert book.screen(_open(), False) is None
    book.put_recipient(1, 5, opted_out=True, erased_through=None)
    assert book.screen(_open(message=10**12), False) == "opted_out"  # future messages too
    assert book.screen(_open(account=2), False) is None  # another account's recipient
    book.put_recipient(1, 5, opted_out=False, erased_through=10)
    assert book.screen(_open(message=10), False) == "erased"
    assert book.screen(_open(message=11), False) is None  # mail registered after the erasure
    book.put_recipient(1, 5, opted_out=False, erased_through=None)
    assert book.screen(_open(), False) is None
    # A version 1 token carries no key (0): it matches no recipient.
    book.put_recipient(1, 0, opted_out=True, erased_through=None)
    assert book.screen(_open(key=0), False) == "opted_out"
    book.put_recipient(1, 0, opted_out=False, erased_through=None)

    assert book.screen(_open(), True) == "privacy_signal"
    for header in ((b"sec-gpc", b"1"), (b"dnt", b"1")):
        assert client_headers([(b"user-agent", b"x"), header, (b"host", b"y")])[2] is True
    for header in ((b"sec-gpc", b"0"), (b"dnt", b"0"), (b"dnt", b"yes"), (b"x-gpc", b"1")):
        assert client_headers([header])[2] is False
    book.put_account(1, disabled=False, honours_signals=False)
    assert book.screen(_open(), True) is None
    book.put_account(1, disabled=True, honours_signals=False)
    assert book.screen(_open(), False) == "account_disabled"
    click = ClickToken(1, 1, 10, 0, 0, 0, 1, b"https://example.com/", 5)
    assert book.screen(click, False) == "account_disabled"


def test_notice_says_what_the_policy_collects_and_nothing_else() -> None:
    strict = describe(Policy(location="none", device=False, ip="none", recipient="pseudonym"),
                      7, True)
    assert "do not record where you are" in strict
    assert "do not record your browser" in strict
    assert "do not store your IP address" in strict
    assert "keyed pseudonym" in strict and "store your email address" not in strict
    assert "We store the subject of each email" in strict
    assert "after 7 days" in strict
    assert "Global Privacy Control" in strict
    assert "no cookies" in strict and "never store the content" in strict

    full = describe(Policy(location="city", device=True, ip="full"), None, False)
    assert "country, region and city" in full
    assert "browser or email program, the operating system" in full
    assert "full IP address" in full
    assert "store your email address" in full
    assert "kept until you ask us to delete them" in full
    assert "Global Privacy Control" not in full

    assert "shortened to its network" in describe(Policy(ip="truncated"), 1, True)
    assert "after 1 day." in describe(Policy(), 1, True)
    assert "the country and region" in describe(Policy(location="region"), None, True)


# --- retention, with a clock the test sets ----------------------------------------------------

NOW = datetime(2024, 6, 30, 12, tzinfo=UTC)


def _at(month: int, day: int, hour: int) -> datetime:
    return datetime(2024, month, day, hour, tzinfo=UTC)


async def _partition_names(db: asyncpg.Connection) -> set[str]:
    return {r["name"] for r in await db.fetch(QUERIES.event_partitions)}


async def _counts(db: asyncpg.Connection) -> dict[tuple[str, int], int]:
    """(partition, campaign) -> events."""
    rows = await db.fetch("select tableoid::regclass::text as p, campaign_id, count(*) as n "
                          "from events group by 1, 2")
    return {(r["p"], r["campaign_id"]): r["n"] for r in rows}


async def _relabel(db: asyncpg.Connection, message: tuple[int, int, int, int],
                   events: list[tuple[str, datetime]]) -> uuid.UUID:
    """A re-label in the outbox naming the message's events at those times."""
    account_id, campaign_id, message_id, _ = message
    found: uuid.UUID = await db.fetchval("""
        insert into event_log (account_id, id, occurred_at, message_id, campaign_id, type,
                               machine, relabelled, reason)
        select $1, gen_random_uuid(), now(), $2, $3, 'relabel', true, array_agg(id),
               'honeypot'
        from events where account_id = $1 and message_id = $2 and occurred_at = any($4)
        returning id""", account_id, message_id, campaign_id, [at for _, at in events])
    return found


@pytest.mark.slow
async def test_retention_drops_expired_days_trims_shared_ones_and_reports_keep_totals(
        db: asyncpg.Connection, dsn: str) -> None:
    one = await accounts.create_account(db, "retention")
    other = await accounts.create_account(db, "retention by default")
    await db.execute("update accounts set retention_days = 10 where id = $1", other.id)
    made = {
        "short": (one.id, await campaigns.create(db, one.id, "short", Policy(retention_days=3))),
        "long": (one.id, await campaigns.create(db, one.id, "long", Policy(retention_days=20))),
        "keep": (one.id, await campaigns.create(db, one.id, "keep", Policy())),
        # No retention of its own: its account's default of 10 days applies.
        "inherit": (other.id, await campaigns.create(db, other.id, "inherit", Policy())),
    }
    registrar = Registrar(Signer([SECRET]), "http://tracker.test")
    ids: dict[str, tuple[int, int, int, int]] = {}  # account, campaign, message, url id
    for name, (account_id, row) in made.items():
        (message,) = await registrar.register(db, account_id, row["id"], [MessageInput(
            f"{name}@example.com", None, _at(5, 1, 0), (LINK,))])
        url_id = await db.fetchval("select url_ids[1] from messages where id = $1", message.id)
        ids[name] = (account_id, row["id"], message.id, url_id)

    def event(name: str, at: datetime, kind: str = OPEN) -> Event:
        account_id, campaign_id, message_id, url_id = ids[name]
        at_us = (at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
        click = kind == CLICK
        return Event(account_id, at_us, event_id(at_us), campaign_id, message_id, kind,
                     0 if click else None, url_id if click else None, country="DE",
                     browser="Chrome", os="Windows", device="desktop")

    plan = [
        # May 21: both campaigns expired whole (3 and 20 days): the day is dropped.
        event("short", _at(5, 21, 10)), event("short", _at(5, 21, 10), CLICK),
        event("long", _at(5, 21, 11)), event("long", _at(5, 21, 11), CLICK),
        # June 15: only `short` has expired; `long` (20 days) and `keep` stay.
        event("short", _at(6, 15, 10)), event("long", _at(6, 15, 10)),
        event("keep", _at(6, 15, 10)),
        # June 18: only `inherit`, expired by its account's 10 days: dropped.
        event("inherit", _at(6, 18, 10)),
        # June 25: `short` expired, `inherit` not yet.
        event("short", _at(6, 25, 10)), event("inherit", _at(6, 25, 10)),
        # June 27: `short` expires at 12:00 (three days before NOW): half the day goes.
        event("short", _at(6, 27, 6)), event("short", _at(6, 27, 18)),
        # Today: nothing has expired.
        *(event(name, _at(6, 30, 9)) for name in ids),
    ]
    writer = BatchWriter(lambda: connect(dsn), batch_size=100, interval_s=3600,
                         max_buffered=1000)
    try:
        for item in plan:
            assert writer.add(item.record()) is None
        assert await writer.flush() == len(plan)
        before = {name: await reports.campaign_report(db, a, c) for name, (a, c, _, _)
                  in ids.items()}
        assert before["short"]["opens"]["total"] == 6 and before["short"]["clicks"]["total"] == 1
        # Re-labels in the outbox (sql/0020_event_order.sql) go once none of the events they
        # name is left: of a dropped day, of rows deleted; not while one event stays.
        relabels = {what: await _relabel(db, ids[name], [(name, at) for at in times])
                    for what, name, times in (
                        ("dropped", "short", [_at(5, 21, 10)]),
                        ("deleted", "short", [_at(6, 15, 10), _at(6, 25, 10)]),
                        ("kept", "long", [_at(6, 15, 10)]),
                        ("half", "short", [_at(6, 27, 6), _at(6, 27, 18)]))}

        result = await enforce_retention(db, NOW)

        assert sorted(result.partitions_dropped) == ["events_20240521", "events_20240618"]
        assert not {"events_20240521", "events_20240618"} & await _partition_names(db)
        c = {name: ids[name][1] for name in ids}
        assert await _counts(db) == {
            ("events_20240615", c["long"]): 1, ("events_20240615", c["keep"]): 1,
            ("events_20240625", c["inherit"]): 1,
            ("events_20240627", c["short"]): 1,
            **{("events_20240630", c[name]): 1 for name in ids}}
        assert await db.fetchval("select count(*) from events_20240627 where occurred_at = $1",
                                 _at(6, 27, 18)) == 1
        assert result.rows_deleted == 3  # June 15, 25 and 27 (06:00) of `short`
        assert {r["id"] for r in await db.fetch("select id from event_log")} == {
            relabels["kept"], relabels["half"]}
        for name, (a, cid, _, _) in ids.items():
            assert await reports.campaign_report(db, a, cid) == before[name], name

        again = await enforce_retention(db, NOW)
        assert (again.partitions_dropped, again.rows_deleted) == ([], 0)

        # A late event for a dropped day (a journal replayed after an outage) is written
        # all the same: the writer notices the partition is gone and makes it again.
        late = event("short", _at(5, 21, 12))
        writer.add(late.record())
        with pytest.raises(asyncpg.PostgresError):
            await writer.flush()  # the day's partition was known, and is gone
        assert await writer.flush() == 1
        assert (await enforce_retention(db, NOW)).partitions_dropped == ["events_20240521"]
    finally:
        await writer.close(1)


async def test_no_retention_anywhere_touches_nothing(db: asyncpg.Connection) -> None:
    result = await enforce_retention(db, NOW + timedelta(days=10_000))
    assert (result.partitions_dropped, result.rows_deleted) == ([], 0)


async def test_maintenance_runs_in_one_process_at_a_time(dsn: str) -> None:
    pool = await create_pool(dsn)
    try:
        async with connected(dsn) as holder:
            runner = jobs.Jobs(pool, first_run_s=0)
            await holder.execute("select pg_advisory_lock($1)", jobs._MAINTENANCE_LOCK)
            assert await runner.run_once() is None  # another process is at it: skip the round
            await holder.execute("select pg_advisory_unlock($1)", jobs._MAINTENANCE_LOCK)
            assert await runner.run_once() is not None

            runner.start()  # the loop's first run comes `first_run_s` after start
            await wait_for_async(lambda: runner.runs >= 2, 10,
                                 message="the maintenance loop's first run")
            await runner.stop()
    finally:
        await pool.close()


async def test_purge_and_erasure_cover_every_table_that_names_a_campaign_or_message(
        db: asyncpg.Connection) -> None:
    """A table added later with a campaign_id or message_id column must be purged and
    erased too (or go with its message by cascade): this fails until it is."""
    rows = await db.fetch("""
        select c.relname as table_name, a.attname as column_name
        from pg_attribute a join pg_class c on c.oid = a.attrelid
        join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = 'public' and c.relkind in ('r', 'p') and not c.relispartition
          and a.attname in ('campaign_id', 'message_id') and not a.attisdropped""")
    cascading = {r["t"] for r in await db.fetch("""
        select conrelid::regclass::text as t from pg_constraint
        where contype = 'f' and confrelid = 'messages'::regclass and confdeltype = 'c'""")}
    purge = QUERIES.purge_campaign_data
    erase = " ".join((QUERIES.erase_events, QUERIES.erase_message_rollups,
                      QUERIES.erase_message_link_rollups,
                      QUERIES.erase_relabel_triggers, QUERIES.erase_event_log,
                      QUERIES.erase_messages))
    for row in rows:
        table = row["table_name"]
        if table in ("campaigns", "events") or table in cascading:
            # The tombstone itself; events go partition by partition (privacy/retention.py).
            continue
        assert re.search(rf"\bdelete from {table}\b", purge), f"purge misses {table}"
        if row["column_name"] == "message_id":
            assert re.search(rf"\bdelete from {table}\b", erase), f"erasure misses {table}"


# --- the API, through a real server -------------------------------------------------------------


def _hit(url: str, **headers: str) -> httpx.Response:
    response = httpx.get(url, headers={"user-agent": CHROME, **headers}, timeout=10,
                         follow_redirects=False)
    assert response.status_code in (200, 302), response.status_code
    return response


def _events(dsn: str, *message_ids: int) -> int:
    return int(db_value(dsn, "select count(*) from events where message_id = any($1::bigint[])",
                        list(message_ids)))


def _recorded(dsn: str, message: dict[str, Any], count: int) -> None:
    """Wait until the message has `count` events, never more."""
    def done() -> bool:
        found = _events(dsn, int(message["id"]))
        assert found <= count, (found, count)
        return found == count
    wait_for(done, message=f"{count} events of message {message['id']}")


def _control(api: httpx.Client, dsn: str) -> None:
    """A hit that is recorded; once it is in the table, every earlier hit would be too."""
    control = register(api, campaign(api, name="control"), [LINK],
                       recipient="control@example.com")
    _hit(control["pixel_url"])
    _recorded(dsn, control, 1)


def _drops(server: Server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^tracker_drops_total\{reason="(\w+)"\} (\S+)$', text, re.M)}


def _report(api: httpx.Client, campaign_id: str) -> dict[str, Any]:
    response = api.get(f"/api/campaigns/{campaign_id}/report")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


@pytest.mark.slow
def test_erasure_removes_messages_and_events_keeps_totals_and_stops_recording(
        server: Server, module_dsn: str) -> None:
    with server.client(new_account(module_dsn, "erasure")) as api:
        plain = campaign(api, name="plain")
        hidden = campaign(api, {"recipient": "pseudonym"}, name="pseudonymous")
        ada = [register(api, plain, [LINK], recipient="Ada Lovelace <ada@example.com>"),
               register(api, hidden, [LINK], recipient="ada@example.com")]
        bob = register(api, plain, [LINK], recipient="bob@example.com")
        for message in (*ada, bob):
            _hit(message["pixel_url"])
            _hit(message["links"][0]["tracked_url"])
        for message in (*ada, bob):
            _recorded(module_dsn, message, 2)
        ada_ids = [int(m["id"]) for m in ada]
        assert db_value(module_dsn, "select count(*) from rollup_message where "
                                    "message_id = any($1::bigint[])", ada_ids) == 2
        before = {c: _report(api, c) for c in (plain, hidden)}
        drops = _drops(server).get("erased", 0)

        response = api.delete("/api/recipients/" + quote("ADA@example.com"))
        assert response.status_code == 200, response.text
        assert response.json() == {"messages": 2, "events": 4, "links": 2}

        assert db_value(module_dsn, "select count(*) from messages where id = any($1::bigint[])",
                        ada_ids) == 0
        assert _events(module_dsn, *ada_ids) == 0
        for table in ("rollup_message", "rollup_message_link", "relabel_triggers"):
            assert db_value(module_dsn, f"select count(*) from {table} "
                                        "where message_id = any($1::bigint[])", ada_ids) == 0
        # The campaigns' totals are anonymous counts: they stay, message count included.
        assert {c: _report(api, c) for c in (plain, hidden)} == before
        assert api.get(f"/api/messages/{ada[0]['id']}").status_code == 404
        assert api.get(f"/api/messages/{bob['id']}").status_code == 200

        # Old links still work and record nothing.
        for message in ada:
            link = _hit(message["links"][0]["tracked_url"])
            assert link.status_code == 302 and link.headers["location"] == LINK
            assert _hit(message["pixel_url"]).headers["content-type"] == "image/gif"
        _control(api, module_dsn)
        assert _events(module_dsn, *ada_ids) == 0
        assert _drops(server)["erased"] - drops == 4

        # Mail registered for the address after its erasure is tracked again.
        later = register(api, plain, [LINK], recipient="ada@example.com")
        _hit(later["pixel_url"])
        _recorded(module_dsn, later, 1)
        exported = api.get("/api/recipients/ada@example.com/export").json()
        assert [m["id"] for m in exported["messages"]] == [later["id"]]
        assert exported["tracking"]["erased_at"] is not None

        # Nobody else's data was touched; erasing an unknown address erases nothing.
        assert _events(module_dsn, int(bob["id"])) == 2
        assert api.delete("/api/recipients/nobody@example.com").json() == {
            "messages": 0, "events": 0, "links": 0}


@pytest.mark.slow
def test_erasure_racing_with_incoming_hits_leaves_nothing_behind(
        server: Server, module_dsn: str) -> None:
    with server.client(new_account(module_dsn, "race")) as api:
        cid = campaign(api, name="race")
        racer = [register(api, cid, [LINK], recipient="racer@example.com") for _ in range(3)]
        ids = [int(m["id"]) for m in racer]
        sent, stop = [0], threading.Event()
        threads = [threading.Thread(target=_hammer, args=(racer, sent, stop)) for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: _events(module_dsn, *ids) >= 10, message="hits being recorded")
            response = api.delete("/api/recipients/racer@example.com")
            after = sent[0]
            wait_for(lambda: sent[0] >= after + 60, message="hits after the erasure")
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert response.status_code == 200, response.text
        erased = response.json()
        assert erased["messages"] == 3 and erased["events"] >= 10
        _control(api, module_dsn)
        assert _events(module_dsn, *ids) == 0
        assert db_value(module_dsn, "select count(*) from messages where id = any($1::bigint[])",
                        ids) == 0


def _hammer(messages: list[dict[str, Any]], sent: list[int], stop: threading.Event) -> None:
    with httpx.Client(timeout=10, headers={"user-agent": CHROME}) as client:
        while not stop.is_set():
            for message in messages:
                client.get(message["pixel_url"])
                client.get(message["links"][0]["tracked_url"])
                sent[0] += 2


@pytest.mark.slow
def test_erasure_with_two_workers_sweeps_what_the_other_one_recorded_meanwhile(
        dsn: str, tmp_path: Any) -> None:
    """The worker that erases stops recording at once; the other learns of it within a
    second, and what it recorded in that second is swept a few seconds later."""
    server = Server(dsn, tmp_path, env={"TRACKER_WORKERS": "2"}).start()
    try:
        with server.client(new_account(dsn, "two workers")) as api:
            cid = campaign(api, name="race")
            racer = [register(api, cid, [LINK], recipient="racer@example.com")
                     for _ in range(3)]
            ids = [int(m["id"]) for m in racer]
            sent, stop = [0], threading.Event()
            threads = [threading.Thread(target=_hammer, args=(racer, sent, stop))
                       for _ in range(3)]
            for thread in threads:
                thread.start()
            try:
                wait_for(lambda: _events(dsn, *ids) >= 10, message="hits being recorded")
                response = api.delete("/api/recipients/racer@example.com")
                after = sent[0]
                wait_for(lambda: sent[0] >= after + 100, message="hits after the erasure")
            finally:
                stop.set()
                for thread in threads:
                    thread.join()
            assert response.status_code == 200, response.text
            wait_for(lambda: db_value(dsn, "select swept_at from erasures"), timeout=30,
                     message="the erasure's follow-up sweep")
            assert _events(dsn, *ids) == 0
            # Every worker refuses the recipient now: hits are counted as erased, not stored.
            refused = _drops(server).get("erased", 0)
            for message in racer:
                _hit(message["pixel_url"])
            wait_for(lambda: _drops(server).get("erased", 0) >= refused + 3, timeout=15,
                     message="the hits to be refused")
            assert _events(dsn, *ids) == 0
    finally:
        server.stop()


@pytest.mark.slow
def test_opt_out_records_nothing_in_any_campaign_until_withdrawn(
        server: Server, module_dsn: str) -> None:
    with server.client(new_account(module_dsn, "opt-out")) as api:
        first = register(api, campaign(api, name="first"), [LINK], recipient="carol@example.com")
        path = "/api/recipients/carol@example.com/opt-out"
        assert api.get(path).json()["opted_out"] is False
        response = api.post(path)
        assert response.status_code == 200, response.text
        assert response.json()["opted_out"] is True and response.json()["opted_out_at"]
        # A message registered after the opt-out, in another campaign, goes out with no
        # pixel and its links as they are.
        second = register(api, campaign(api, name="second"), [LINK],
                          recipient="Carol <CAROL@example.com>")
        assert second["pixel_url"] is None
        assert second["links"] == [{"url": LINK, "destination": LINK, "tracked_url": None}]
        assert _hit(first["links"][0]["tracked_url"]).headers["location"] == LINK
        _hit(first["pixel_url"])
        _control(api, module_dsn)
        assert _events(module_dsn, int(first["id"]), int(second["id"])) == 0
        assert api.get(path).json()["opted_out"] is True
        exported = api.get("/api/recipients/carol@example.com/export").json()
        assert exported["tracking"]["opted_out"] is True
        assert len(exported["messages"]) == 2  # an opt-out deletes nothing

        assert api.delete(path).json()["opted_out"] is False
        _hit(first["pixel_url"])
        _recorded(module_dsn, first, 1)


@pytest.mark.slow
def test_gpc_and_dnt_are_honoured_unless_the_account_turns_that_off(
        server: Server, module_dsn: str) -> None:
    with server.client(new_account(module_dsn, "signals")) as api:
        assert api.get("/api/account").json()["honour_privacy_signals"] is True
        message = register(api, campaign(api, name="signals"), [LINK])
        drops = _drops(server).get("privacy_signal", 0)
        _hit(message["pixel_url"], **{"sec-gpc": "1"})
        assert _hit(message["links"][0]["tracked_url"], dnt="1").headers["location"] == LINK
        _hit(message["pixel_url"], dnt="0")  # no preference expressed: recorded
        _recorded(module_dsn, message, 1)
        assert _drops(server)["privacy_signal"] - drops == 2

        response = api.patch("/api/account", json={"honour_privacy_signals": False})
        assert response.status_code == 200, response.text
        assert response.json()["honour_privacy_signals"] is False
        _hit(message["pixel_url"], **{"sec-gpc": "1"})
        _recorded(module_dsn, message, 2)
        for bad in ({"honour_privacy_signals": "no"}, {"retention_days": 0},
                    {"retention_days": True}, {"colour": 1}, [1]):
            assert api.patch("/api/account", json=bad).status_code == 422, bad


def test_pseudonymous_campaign_stores_only_the_keyed_hash(server: Server,
                                                          module_dsn: str) -> None:
    with server.client(new_account(module_dsn, "pseudonyms")) as api:
        cid = campaign(api, {"recipient": "pseudonym", "location": "none"}, name="hidden")
        message = register(api, cid, [LINK], recipient="Dora.Doe@Example.com", subject="Hi")
        shown = api.get(f"/api/messages/{message['id']}").json()
        assert re.fullmatch(r"psn_[0-9a-f]{32}", shown["recipient"])
        stored = db_fetch(module_dsn, "select * from messages where id = $1", int(message["id"]))
        assert "dora" not in repr(dict(stored[0])).lower()
        # The same person in another campaign of the account has the same pseudonym.
        again = register(api, campaign(api, {"recipient": "pseudonym"}, name="again"), [],
                         recipient="dora.doe@example.com")
        assert api.get(f"/api/messages/{again['id']}").json()["recipient"] == shown["recipient"]

        _hit(message["pixel_url"])
        _recorded(module_dsn, message, 1)
        csv = api.get(f"/api/campaigns/{cid}/export").text
        assert shown["recipient"] in csv and "dora" not in csv.lower()

        exported = api.get("/api/recipients/dora.doe@example.com/export").json()
        assert {m["id"] for m in exported["messages"]} == {message["id"], again["id"]}
        first = next(m for m in exported["messages"] if m["id"] == message["id"])
        assert first["recipient"] == shown["recipient"]
        assert first["recipient_stored_as"] == "pseudonym"
        assert first["links"] == [{"position": 0, "url": LINK, "human_clicks": 0,
                                   "first_clicked_in": None}]
        assert [e["type"] for e in first["events"]] == ["open"]


_PERSONAL = {  # destination -> what is stored for jane.doe+news@example.com
    "https://shop.example/unsubscribe?email=jane.doe+news@example.com":
        "https://shop.example/unsubscribe?email={recipient}",
    "https://shop.example/unsubscribe?email=Jane.Doe%2BNews%40Example.com":
        "https://shop.example/unsubscribe?email={recipient}",
    "https://shop.example/u/jane.doe%2bnews%40example.com/prefs?x=1":
        "https://shop.example/u/{recipient}/prefs?x=1",
    "https://track.example/r?to=https%3A%2F%2Fshop.example%2F%3Fe%3Djane.doe%252Bnews%2540example.com":
        "https://track.example/r?to=https%3A%2F%2Fshop.example%2F%3Fe%3D{recipient}",
    "https://shop.example/sale?utm_source=mail": "https://shop.example/sale?utm_source=mail",
}


@pytest.mark.parametrize(("url", "stored"), [
    ("https://x.example/?e=jane.doe%2Bnews@example.com", "https://x.example/?e={recipient}"),
    ("https://x.example/?e=%6Aane.doe%2bnews%40EXAMPLE.com", "https://x.example/?e={recipient}"),
    ("https://x.example/?e=jane.doe+news%40example.com&again=JANE.DOE%2BNEWS%2540example.com",
     "https://x.example/?e={recipient}&again={recipient}"),
    ("https://x.example/café?e=jane.doe+news@example.com", "https://x.example/café?e={recipient}"),
    ("https://x.example/?e=jane.doe%252Bnews%25%34%30example.com", "https://x.example/{recipient}"),
    ("https://x.example/?e=jane.doe@example.com", "https://x.example/?e=jane.doe@example.com"),
])
def test_a_destination_is_stored_without_its_recipients_address(url: str, stored: str) -> None:
    assert Redactor("Jane Doe <Jane.Doe+news@Example.com>").redact(url) == stored


def _stored_urls(dsn: str, account_key: str) -> list[str]:
    return [r["url"] for r in db_fetch(dsn, "select url from urls where account_id = $1 "
                                            "order by url", int(account_key.split("_")[1]))]


def _names_jane(text: str) -> bool:
    decoded = unquote(unquote(text)).lower()
    return "jane" in decoded


@pytest.mark.parametrize("mode", ["pseudonym", "address"])
@pytest.mark.slow
def test_destinations_that_name_the_recipient_are_stored_without_the_address(
        server: Server, module_dsn: str, mode: str) -> None:
    key = new_account(module_dsn, "personal links")
    with server.client(key) as api:
        cid = campaign(api, {"recipient": mode}, name="personal")
        # A message per link: clicks on several links of one message within seconds would
        # be a burst, a machine's.
        jane = [register(api, cid, [link], recipient="Jane Doe <Jane.Doe+news@example.com>")
                for link in _PERSONAL]
        bob = register(api, cid, ["https://shop.example/unsubscribe?email=bob@example.com"],
                       recipient="bob@example.com")
        stored = _stored_urls(module_dsn, key)
        assert not any(_names_jane(url) for url in stored), stored
        assert set(stored) == set(_PERSONAL.values())
        # The redirect still sends each reader to the destination as registered.
        for message in (*jane, bob):
            link = message["links"][0]
            assert _hit(link["tracked_url"]).headers["location"] == link["url"]
            _recorded(module_dsn, message, 1)
        # The report's links: every recipient's unsubscribe link is one destination.
        report = {row["url"]: row["clicks"] for row in _report(api, cid)["links"]}
        assert report["https://shop.example/unsubscribe?email={recipient}"] == 3
        assert not any(_names_jane(url) for url in report)
        exported = api.get("/api/recipients/jane.doe+news@example.com/export").json()
        assert len(exported["messages"]) == len(_PERSONAL)
        assert not any(_names_jane(link["url"]) for m in exported["messages"]
                       for link in m["links"])


@pytest.mark.slow
def test_erasure_redacts_stored_destinations_that_still_name_the_address(
        server: Server, module_dsn: str) -> None:
    """Destinations stored in clear (before registration redacted them, or another
    recipient's link naming the address) are redacted by the erasure, merged into the
    redacted destination where the campaign has it, their clicks kept."""
    key = new_account(module_dsn, "legacy links")
    account_id = int(key.split("_")[1])
    redacted = "https://shop.example/unsubscribe?email={recipient}"
    with server.client(key) as api:
        cid = campaign(api, {"recipient": "pseudonym"}, name="legacy")
        jane = register(api, cid, ["https://shop.example/unsubscribe?email=jane@example.com"],
                        recipient="jane@example.com")
        other = register(api, cid, ["https://shop.example/unsubscribe?email=x@example.com"],
                         recipient="x@example.com")
        for message in (jane, other):
            _hit(message["links"][0]["tracked_url"])
            _recorded(module_dsn, message, 1)
        assert {r["url"]: r["clicks"] for r in _report(api, cid)["links"]} == {redacted: 2}
        # As a database written before registration redacted holds it: jane's link (her
        # link row, click and rollups) on a destination with her address in clear; and a
        # referral link of someone else's naming her.
        legacy = db_value(module_dsn, "insert into urls (account_id, campaign_id, url) "
                          "values ($1, $2, $3) returning id", account_id, int(cid),
                          "https://shop.example/unsubscribe?email=Jane%40Example.com")
        jane_id = int(jane["id"])
        db_fetch(module_dsn, "update messages set url_ids = array[$2::bigint] where id = $1",
                 jane_id, legacy)
        for table in ("events", "rollup_message_link"):
            db_fetch(module_dsn, f"update {table} set url_id = $2 where message_id = $1",
                     jane_id, legacy)
        db_fetch(module_dsn, """
            with moved as (
                update rollup_link r set clicks = clicks - 1, clicked = clicked - 1
                from events e
                where e.message_id = $1 and r.account_id = e.account_id
                  and r.campaign_id = e.campaign_id and r.hour = tracker_hour(e.occurred_at)
                  and r.url_id <> $2
                returning r.account_id, r.campaign_id, r.hour)
            insert into rollup_link (account_id, campaign_id, url_id, hour, clicks, clicked)
            select account_id, campaign_id, $2, hour, 1, 1 from moved""", jane_id, legacy)
        db_fetch(module_dsn, "insert into urls (account_id, campaign_id, url) "
                             "values ($1, $2, $3)", account_id, int(cid),
                 "https://shop.example/refer?friend=jane@example.com")
        assert {r["url"]: r["clicks"] for r in _report(api, cid)["links"]} == {
            redacted: 1, "https://shop.example/unsubscribe?email=Jane%40Example.com": 1,
            "https://shop.example/refer?friend=jane@example.com": 0}

        assert api.delete("/api/recipients/jane@example.com").status_code == 200
        stored = _stored_urls(module_dsn, key)
        assert not any(_names_jane(url) for url in stored), stored
        assert sorted(stored) == ["https://shop.example/refer?friend={recipient}", redacted]
        after = {r["url"]: (r["clicks"], r["unique_clicks"]) for r in _report(api, cid)["links"]}
        assert after == {redacted: (2, 2), "https://shop.example/refer?friend={recipient}": (0, 0)}
        # The other recipient's link still redirects and is counted.
        assert _hit(other["links"][0]["tracked_url"]).status_code == 302
        _recorded(module_dsn, other, 2)


def test_export_holds_every_stored_field(server: Server, module_dsn: str) -> None:
    with server.client(new_account(module_dsn, "export")) as api:
        cid = campaign(api, {"ip": "truncated", "location": "none"}, name="exported")
        message = register(api, cid, [LINK], recipient="erin@example.com", subject="News")
        _hit(message["pixel_url"], **{"x-forwarded-for": "198.51.100.77"})
        _hit(message["links"][0]["tracked_url"], **{"x-forwarded-for": "198.51.100.77"})
        _recorded(module_dsn, message, 2)
        exported = api.get("/api/recipients/erin%40example.com/export").json()
        assert exported["address"] == "erin@example.com"
        assert exported["tracking"] == {"opted_out": False, "opted_out_at": None,
                                        "erased_at": None,
                                        "consent_refused": {"opens": False, "clicks": False}}
        assert exported["consent"] is None
        (item,) = exported["messages"]
        assert (item["id"], item["subject"], item["recipient"]) == (
            message["id"], "News", "erin@example.com")
        assert item["campaign"]["id"] == cid and item["campaign"]["name"] == "exported"
        assert sorted(e["type"] for e in item["events"]) == ["click", "open"]
        assert {e["ip"] for e in item["events"]} == {"198.51.100.0/24"}
        assert {e["browser"] for e in item["events"]} == {"Chrome"}
        click = next(e for e in item["events"] if e["type"] == "click")
        assert (click["url"], click["link_position"]) == (LINK, 0)
        assert item["human_clicks"] + item["human_opens"] >= 1
        # Control characters at the end (which str.strip() takes for white space) and a
        # long run of them after a short address are refused, as the OpenAPI says.
        for bad in ("%20", "x" * 400, "a%00b", "erin%40example.com%1F",
                    "6p" + "%1F" * 400, "erin%40example.com%0A"):
            assert api.get(f"/api/recipients/{bad}/export").status_code == 422, bad
            assert api.delete(f"/api/recipients/{bad}").status_code == 422, bad


# What a message keeps after retention, column by column, and how the export names it and
# the privacy notice says it. A column not listed here fails the test below: whatever is
# stored about a recipient must be in the export and in the notice.
_KEPT_AFTER_RETENTION: dict[tuple[str, str], tuple[str, str]] = {
    ("messages", "recipient"): ("recipient", "email address"),
    ("messages", "subject"): ("subject", "its subject"),
    ("messages", "sent_at"): ("sent_at", "when we sent it"),
    ("messages", "created_at"): ("registered_at", "when we sent it"),
    ("messages", "tags"): ("tags", "the labels and reference data we attached to it"),
    ("messages", "metadata"): ("metadata", "the labels and reference data we attached to it"),
    ("messages", "opens_tracked"): ("opens_tracked", "whether it carried a tracking image"),
    ("messages", "clicks_tracked"): ("clicks_tracked", "and tracked links"),
    ("rollup_message", "machine_opens"): ("machine_opens", "machines (such as link scanners) "
                                                           "opened or clicked it"),
    ("rollup_message", "machine_clicks"): ("machine_clicks", "machines (such as link "
                                                             "scanners) opened or clicked it"),
    ("rollup_message", "opens"): ("human_opens", "how many times it was opened"),
    ("rollup_message", "clicks"): ("human_clicks", "each of its links clicked"),
    ("rollup_message", "mpp"): ("mpp_prefetches",
                                "how many times Apple Mail Privacy Protection fetched"),
    ("rollup_message", "opened_in"): ("first_opened_in", "the quarter-hour of its first open"),
    ("rollup_message", "clicked_in"): ("first_clicked_in", "and of its first click"),
    ("rollup_message_link", "clicks"): ("links.human_clicks", "each of its links clicked"),
    ("rollup_message_link", "url_id"): ("links.url", "which links it had"),
    ("rollup_message_link", "clicked_in"): ("links.first_clicked_in",
                                            "the hour of the first click on each link"),
    ("messages", "url_ids"): ("links.url", "which links it had"),
}
# Keys and the tables' own bookkeeping, which say nothing about the recipient.
_NOT_ABOUT_THE_RECIPIENT = {"account_id", "id", "campaign_id", "message_id", "recipient_key"}


@pytest.mark.parametrize("mode", ["address", "pseudonym"])
@pytest.mark.slow
def test_what_a_message_keeps_after_retention_is_in_the_export_and_the_notice(
        server: Server, module_dsn: str, mode: str) -> None:
    with server.client(new_account(module_dsn, f"kept {mode}")) as api:
        cid = campaign(api, {"retention_days": 7, "recipient": mode}, name="kept")
        address = f"kept-{mode}@example.com"
        message = register(api, cid, [LINK], recipient=address, subject="Your invoice")
        _hit(message["pixel_url"])
        _hit(message["links"][0]["tracked_url"])
        _recorded(module_dsn, message, 2)
        _maintain(module_dsn, datetime.now(UTC) + timedelta(days=8))
        assert _events(module_dsn, int(message["id"])) == 0  # retention took the events

        kept: dict[tuple[str, str], Any] = {}
        for table in ("messages", "rollup_message", "rollup_message_link"):
            column = "id" if table == "messages" else "message_id"
            for row in db_fetch(module_dsn, f"select * from {table} where {column} = $1",
                                int(message["id"])):
                kept.update({(table, name): value for name, value in dict(row).items()
                             if value is not None and name not in _NOT_ABOUT_THE_RECIPIENT})
        assert set(kept) <= set(_KEPT_AFTER_RETENTION), set(kept) - set(_KEPT_AFTER_RETENTION)

        exported = api.get(f"/api/recipients/{address}/export").json()
        (item,) = exported["messages"]
        notice = api.get(f"/api/campaigns/{cid}/privacy").json()["text"]
        for stored, value in kept.items():
            key, phrase = _KEPT_AFTER_RETENTION[stored]
            shown = item["links"][0][key[6:]] if key.startswith("links.") else item[key]
            assert shown is not None, (stored, value)
            if isinstance(value, datetime):
                assert datetime.fromisoformat(shown) == value, (stored, shown, value)
            assert phrase in notice, (stored, phrase, notice)
        assert "only counts" not in notice
        assert item["first_opened_in"] is not None and item["first_clicked_in"] is not None
        assert item["links"][0]["first_clicked_in"] is not None


def _maintain(dsn: str, now: datetime) -> jobs.Maintenance:
    """One maintenance run at `now` (waiting out the server's own, should it be running)."""
    result = wait_for(lambda: db_call(dsn, lambda conn: jobs.maintain(conn, now)),
                      message="the lock")
    assert result is not None
    return result


def _deleted_at(dsn: str, campaign_id: str) -> datetime:
    value: datetime = db_value(dsn, "select deleted_at from campaigns where id = $1",
                               int(campaign_id))
    return value


@pytest.mark.slow
def test_deleted_campaign_is_restored_within_its_grace_period_and_purged_after(
        server: Server, module_dsn: str) -> None:
    with server.client(new_account(module_dsn, "grace")) as api:
        cid = campaign(api, name="grace")
        message = register(api, cid, [LINK])
        _hit(message["pixel_url"])
        _recorded(module_dsn, message, 1)

        assert api.delete(f"/api/campaigns/{cid}").status_code == 204
        _hit(message["pixel_url"])
        _control(api, module_dsn)
        assert _events(module_dsn, int(message["id"])) == 1
        restored = api.post(f"/api/campaigns/{cid}/restore")
        assert restored.status_code == 200, restored.text
        assert restored.json()["id"] == cid and api.get(f"/api/campaigns/{cid}").status_code == 200
        _hit(message["pixel_url"])
        _recorded(module_dsn, message, 2)

        # Deleted again; a day before the grace period ends nothing is purged.
        assert api.delete(f"/api/campaigns/{cid}").status_code == 204
        deleted_at = _deleted_at(module_dsn, cid)
        result = _maintain(module_dsn, deleted_at + GRACE - timedelta(days=1))
        assert int(cid) not in [c for _, c in result.purge.campaigns]
        assert api.post(f"/api/campaigns/{cid}/restore").status_code == 200
        assert _events(module_dsn, int(message["id"])) == 2

        assert api.delete(f"/api/campaigns/{cid}").status_code == 204
        result = _maintain(module_dsn, _deleted_at(module_dsn, cid) + GRACE + timedelta(hours=1))
        assert int(cid) in [c for _, c in result.purge.campaigns]
        for table in ("messages", "urls", "events", "rollup_campaign", "rollup_link",
                      "rollup_dimension", "rollup_message", "campaign_messages"):
            assert db_value(module_dsn, f"select count(*) from {table} where campaign_id = $1",
                            int(cid)) == 0, table
        tombstone = db_fetch(module_dsn, "select name, deleted_at, purge_finished_at "
                                         "from campaigns where id = $1", int(cid))[0]
        assert tombstone["name"] == "purged campaign" and tombstone["purge_finished_at"]
        assert api.post(f"/api/campaigns/{cid}/restore").status_code == 404
        assert api.get(f"/api/campaigns/{cid}").status_code == 404
        # Its links still redirect, and record nothing.
        assert _hit(message["links"][0]["tracked_url"]).headers["location"] == LINK
        _hit(message["pixel_url"])
        _control(api, module_dsn)
        assert _events(module_dsn, int(message["id"])) == 0


def _cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracker", *args, "--database-url", dsn],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.slow
def test_deleted_account_stops_recording_at_once_and_is_purged_after_the_grace_period(
        server: Server, module_dsn: str) -> None:
    key = new_account(module_dsn, "leaving")
    account_id = key.split("_")[1]
    with server.client(key) as api:
        message = register(api, campaign(api, name="leaving"), [LINK])
        _hit(message["pixel_url"])
        _recorded(module_dsn, message, 1)

    done = _cli(module_dsn, "accounts", "delete", account_id)
    assert done.returncode == 0, done.stderr
    assert "purged after" in done.stdout
    with server.client(key) as api:
        assert api.get("/api/campaigns").status_code == 401
    # The server learns of it within a second (the suppression book's refresh).
    drops = _drops(server).get("account_disabled", 0)

    def refused() -> bool:
        _hit(message["pixel_url"])
        return _drops(server).get("account_disabled", 0) > drops

    wait_for(refused, message="recording to stop")
    assert _hit(message["links"][0]["tracked_url"]).headers["location"] == LINK

    done = _cli(module_dsn, "accounts", "restore", account_id)
    assert done.returncode == 0, done.stderr
    with server.client(key) as api:
        assert api.get("/api/campaigns").status_code == 200

    def recorded() -> bool:
        _hit(message["pixel_url"])
        return _events(module_dsn, int(message["id"])) > 1

    wait_for(recorded, message="recording to resume")

    assert _cli(module_dsn, "accounts", "delete", account_id).returncode == 0
    deleted_at: datetime = db_value(module_dsn, "select deleted_at from accounts where id = $1",
                                    int(account_id))
    secret = db_value(module_dsn, "select recipient_secret from accounts where id = $1",
                      int(account_id))
    # A --now past the grace period does not purge, unasked, what can still be restored.
    later = (deleted_at + GRACE + timedelta(minutes=1)).isoformat()
    done = _cli(module_dsn, "retention", "run", "--json", "--now", later)
    assert done.returncode == 0, done.stderr
    assert "grace period" in done.stderr and f"account {account_id} ('leaving'" in done.stderr
    summary = orjson.loads(done.stdout)
    assert summary["accounts_purged"] == []
    assert [(s["account_id"], s["campaign_id"]) for s in summary["skipped_in_grace"]] == [
        (account_id, None)]
    assert db_value(module_dsn, "select purged_at from accounts where id = $1",
                    int(account_id)) is None
    assert db_value(module_dsn, "select count(*) from api_keys where account_id = $1",
                    int(account_id)) == 1
    done = _cli(module_dsn, "retention", "run", "--json", "--now", later, "--purge-within-grace")
    assert done.returncode == 0, done.stderr
    assert "purging within the grace period" in done.stderr
    assert f"account {account_id} ('leaving'" in done.stderr
    assert orjson.loads(done.stdout)["accounts_purged"] == [account_id]
    for table in ("api_keys", "messages", "events", "urls", "rollup_campaign"):
        assert db_value(module_dsn, f"select count(*) from {table} where account_id = $1",
                        int(account_id)) == 0, table
    tombstone = db_fetch(module_dsn, "select * from accounts where id = $1", int(account_id))[0]
    assert tombstone["name"] == "purged account" and tombstone["purge_finished_at"]
    assert tombstone["recipient_secret"] != secret
    restore = _cli(module_dsn, "accounts", "restore", account_id)
    assert restore.returncode == 1 and "purged" in restore.stderr


@pytest.mark.slow
def test_privacy_notice_of_a_campaign_in_the_api_and_the_cli(
        server: Server, module_dsn: str) -> None:
    with server.client(new_account(module_dsn, "notice")) as api:
        assert api.patch("/api/account", json={"retention_days": 45}).status_code == 200
        cid = campaign(api, {"location": "country", "device": False, "ip": "truncated"})
        response = api.get(f"/api/campaigns/{cid}/privacy")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["retention_days"] == 45  # the account's default
        assert body["policy"]["ip"] == "truncated"
        text = body["text"]
        assert "the country from your IP" in text and "after 45 days" in text
        assert "do not record your browser" in text
        described = _cli(module_dsn, "policy", "describe", "--campaign", cid)
        assert described.returncode == 0, described.stderr
        assert described.stdout.strip() == text
        assert api.get("/api/campaigns/999999999/privacy").status_code == 404
        missing = _cli(module_dsn, "policy", "describe", "--campaign", "999999999")
        # stderr: which database the command used, then the error.
        assert missing.returncode == 1
        assert missing.stderr.splitlines()[-1].startswith("tracker: error:"), missing.stderr


# Addresses a sender might register. Whatever registration accepts, erasure, export and
# opt-out accept too (and name the same recipient); whatever it refuses, they refuse.
_ADDRESS_CASES = ("plain@example.com", "Ada Lovelace <lovelace@example.com>",
                  "  spaced@example.com  ", "tab\there@example.com", "tab@example.com\t",
                  "unit\x1fsep@example.com", "nul\x00@example.com", "line\nbreak@example.com",
                  "del\x7f@example.com", "c1\x85@example.com", "x" * 321, "slash/ed@example.com",
                  "Name <>", "   ")


@pytest.mark.parametrize("address", _ADDRESS_CASES)
def test_a_recipient_registration_accepts_can_be_exported_opted_out_and_erased(
        server: Server, module_dsn: str, address: str) -> None:
    with server.client(new_account(module_dsn, "addresses")) as api:
        cid = campaign(api, name="addresses")
        registered = api.post(f"/api/campaigns/{cid}/messages",
                              json={"recipient": address, "links": [LINK]})
        path = "/api/recipients/" + quote(address, safe="")
        if registered.status_code != 201:
            assert registered.status_code == 422, registered.text
            assert "recipient" in registered.json()["error"]
            for method, suffix in (("GET", "/export"), ("POST", "/opt-out"), ("DELETE", "")):
                refused = api.request(method, path + suffix)
                assert refused.status_code in (404, 422), (method, refused.text)
            return
        message = registered.json()
        exported = api.get(path + "/export")
        assert exported.status_code == 200, exported.text
        assert [m["id"] for m in exported.json()["messages"]] == [message["id"]]
        opted = api.post(path + "/opt-out")
        assert opted.status_code == 200 and opted.json()["opted_out"] is True, opted.text
        erased = api.delete(path)
        assert erased.status_code == 200, erased.text
        assert erased.json()["messages"] == 1
        assert db_value(module_dsn, "select count(*) from messages where id = $1",
                        int(message["id"])) == 0
