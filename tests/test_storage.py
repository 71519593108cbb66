"""The storage migrations (sql/0017_storage.sql, sql/0018_event_terms.sql,
sql/0019_message_links.sql, sql/0020_event_order.sql) on a real PostgreSQL: a database
holding events, messages and links from the schema before each is upgraded in place with
every report figure, every stored field, every message's links and the event stream
unchanged, and the queries that find a campaign's or a message's events, a recipient's
messages, a message's links and an account's next events in commit order still go through
an index, not a read of the table.
"""

from __future__ import annotations

import random
import shutil
import uuid
from datetime import timedelta
from pathlib import Path

import asyncpg

from tests.test_reports import (
    T0,
    ZONES,
    Campaign,
    assert_report_is_recomputation,
    deliveries,
    event,
    make_campaign,
    micros,
    workload,
    write,
)
from tracker.ingest.pipeline import CLICK, OPEN
from tracker.privacy import retention
from tracker.store import outbox, reports
from tracker.store.database import connect
from tracker.store.migrations import migrate
from tracker.store.queries import MIGRATION_FILE, QUERIES, for_table, sql_dir
from tracker.store.writer import BatchWriter

STORAGE = 17
TERMS = 18
CODED = ("reason", "region", "browser", "os", "device", "client")
MESSAGE_LINKS = 19
EVENT_ORDER = 20


def _migrations_before(version: int, into: Path) -> Path:
    into.mkdir()
    for path in sql_dir().glob("*.sql"):
        match = MIGRATION_FILE.match(path.name)
        if match and int(match[1]) < version:
            shutil.copy(path, into / path.name)
    return into


async def _index_keys(conn: asyncpg.Connection, table: str, index: str) -> list[str]:
    return [r["attname"] for r in await conn.fetch("""
        select a.attname from pg_index x
        join pg_class i on i.oid = x.indexrelid
        join lateral unnest(x.indkey) with ordinality k (attnum, n) on true
        join pg_attribute a on a.attrelid = x.indrelid and a.attnum = k.attnum
        where i.relname = $2 and x.indrelid = $1::regclass order by k.n""", table, index)]


# The schema before sql/0017_storage.sql and sql/0018_event_terms.sql, from a database
# migrated to the end: each statement the inverse of one of theirs. The writer of today
# needs the schema of today, so the workload is written first and the database then taken
# back to what the writer before them left (the same rows, texts, rollups and triggers).
_BEFORE_STORAGE = """
    drop view events_decoded;
    drop function tracker_events_after(bigint, timestamptz, uuid, timestamptz, integer);
    drop index events_occurred;
    alter table events drop constraint events_pkey;
    create function pg_temp.term(c smallint) returns text language sql stable
    return (select term from event_terms where code = c);
    alter table events
        alter column reason type text using pg_temp.term(reason),
        alter column region type text using pg_temp.term(region),
        alter column browser type text using pg_temp.term(browser),
        alter column os type text using pg_temp.term(os),
        alter column device type text using pg_temp.term(device),
        alter column client type text using pg_temp.term(client);
    drop function pg_temp.term(smallint);
    drop function tracker_term_code(text);
    drop function tracker_new_term(text);
    drop table event_terms;
    alter table events add primary key (account_id, occurred_at, id);
    create index events_message on events (account_id, message_id);
    drop index events_campaign;
    create index events_campaign on events (account_id, campaign_id, occurred_at);
    create index messages_recipient on messages (account_id, recipient);
    delete from schema_migrations where version >= 17;
"""


async def test_an_old_database_with_events_upgrades_in_place_with_the_same_reports(
        empty_dsn: str, tmp_path: Path) -> None:
    dsn = empty_dsn
    conn = await connect(dsn)
    writer = BatchWriter(lambda: connect(dsn), batch_size=500, interval_s=3600,
                         max_buffered=100_000)
    # Up to sql/0018_event_terms.sql, which _BEFORE_STORAGE takes back with sql/0017.
    migrations = _migrations_before(MESSAGE_LINKS, tmp_path / "sql")
    try:
        await migrate(conn, migrations)
        rng = random.Random(17)
        mixed = [await make_campaign(conn, messages=rng.randint(5, 20), urls=3)
                 for _ in range(3)]
        for c in mixed:  # readers, machines, honeypot hits, bursts, re-labels, replays
            for batch in deliveries(workload(c, rng), rng):
                await write(writer, batch)
        await writer.close(1.0)
        await conn.execute(_BEFORE_STORAGE)
        assert await conn.fetchval("select max(version) from schema_migrations") < STORAGE
        assert await _index_keys(conn, "events", "events_campaign") == [
            "account_id", "campaign_id", "occurred_at"]
        assert await _index_keys(conn, "events", "events_pkey") == [
            "account_id", "occurred_at", "id"]
        assert await conn.fetchval(
            "select count(*) from events where browser is not null and reason is not null"
            " and browser !~ '^[0-9]+$'") > 0  # texts, as the writer before stored them
        before = {c.campaign_id: await reports.campaign_report(conn, c.account_id,
                                                               c.campaign_id, "UTC")
                  for c in mixed}
        stored = await conn.fetchval("select md5(string_agg(e::text, ',' order by e.id)) "
                                     "from events e")
        writer = BatchWriter(lambda: connect(dsn), batch_size=500, interval_s=3600,
                             max_buffered=100_000)

        applied = [m.version for m in await migrate(conn, migrations)]
        assert applied == [STORAGE, TERMS]
        assert await _index_keys(conn, "events", "events_pkey") == [
            "account_id", "message_id", "occurred_at", "id"]
        assert await conn.fetchval("select to_regclass('events_message')") is None
        # The short texts are two-byte codes (sql/0018_event_terms.sql).
        assert {r["data_type"] for r in await conn.fetch(
            "select data_type from information_schema.columns where table_name = 'events' "
            "and column_name = any($1::text[])", list(CODED))} == {"smallint"}

        assert await _index_keys(conn, "events", "events_campaign") == [
            "account_id", "campaign_id"]
        assert await conn.fetchval("select to_regclass('messages_recipient')") is None
        assert await conn.fetchval("select md5(string_agg(e::text, ',' order by e.id)) "
                                   "from events_decoded e") == stored
        for c in mixed:
            after = await assert_report_is_recomputation(conn, c, ZONES)
            assert await reports.campaign_report(conn, c.account_id, c.campaign_id,
                                                 "UTC") == before[c.campaign_id]
            assert after  # the last zone's; UTC is compared just above
        # And the upgraded database goes on counting: more of the same, through the writer.
        c = mixed[0]
        more = [event(c, m, OPEN, e.at_us + 3_600_000_000, rng=rng)
                for m, e in zip(c.messages, workload(c, rng), strict=False)]
        await write(writer, more)
        await assert_report_is_recomputation(conn, c, ZONES)
    finally:
        await writer.close(1.0)
        await conn.close()


async def test_the_queries_that_find_a_campaigns_or_a_messages_events_use_an_index(
        dsn: str) -> None:
    """EXPLAIN, on a table of some size with statistics: the campaign export, retention's
    (account, campaign) pairs of a partition and its batched delete read events_campaign;
    a message's events and their erasure read the primary key; the stream reads
    events_stream."""
    conn = await connect(dsn)
    try:
        day = (await conn.fetchval("select current_date - 1"))
        await conn.execute("select tracker_ensure_event_partition($1)", day)
        await conn.execute("""
            insert into events (account_id, occurred_at, id, campaign_id, message_id, type,
                                machine)
            select 1 + n % 7, $1::date + (n % 86400) * interval '1 second', gen_random_uuid(),
                   100 + n % 60, n % 5000, 'open', false
            from generate_series(1, 60000) n""", day)
        await conn.execute("analyze events")
        partition = (await retention.partitions(conn))[0]
        plans = {
            "export-campaign-events": await conn.fetch(
                "explain " + QUERIES.export_campaign_events, 3, 103),
            "partition-campaigns": await conn.fetch(
                "explain " + for_table(QUERIES.partition_campaigns, partition.name)),
            "delete-partition-batch": await conn.fetch(
                "explain " + for_table(QUERIES.delete_partition_batch, partition.name),
                3, 103, None, 1000),
        }
        for name, rows in plans.items():
            plan = "\n".join(r[0] for r in rows)
            assert "account_id_campaign_id_idx" in plan, (name, plan)
            assert "Seq Scan on events_" not in plan, (name, plan)
        # One message's events by the primary key, which leads with the message
        # (sql/0018_event_terms.sql): the API's, erasure's.
        for name, rows in {
            "message-events": await conn.fetch("explain " + QUERIES.message_events, 3, 4003),
            "erase-events": await conn.fetch("explain " + QUERIES.erase_events, 3, [4003]),
        }.items():
            plan = "\n".join(r[0] for r in rows)
            assert "_pkey" in plan, (name, plan)
            assert "Seq Scan on events_" not in plan, (name, plan)
        # An account's next events in commit order (the pull stream, a webhook queue) by
        # events_stream, merged with its re-labels (sql/0020_event_order.sql).
        plan = "\n".join(r[0] for r in await conn.fetch(
            "explain " + QUERIES.stream_events, 3, 0, uuid.UUID(int=0), 100, 1, 0,
            ["open", "click", "relabel"], None, False))
        assert "account_id_xid_idx" in plan and "event_log_pkey" in plan, plan
        assert "Seq Scan on events_" not in plan, plan
        pairs = await retention.campaigns_in(conn, partition)
        assert len(pairs) == 7 * 60
        assert partition.end - partition.start == timedelta(days=1)
    finally:
        await conn.close()


async def test_an_accounts_events_are_read_in_time_order_across_gaps(dsn: str) -> None:
    """A webhook replay's pages (replay-events, by the BRIN index an hour at a time: sql/
    0018_event_terms.sql): every event of the account in [from, to) once, in (time, id)
    order, across hours and days without events and events that share a time."""
    conn = await connect(dsn)
    try:
        start = await conn.fetchval("select date_trunc('day', now()) - interval '3 days'")
        for day in range(4):
            await conn.execute("select tracker_ensure_event_partition($1)",
                               (start + timedelta(days=day)).date())
        offsets = [timedelta(seconds=s) for s in (0, 1, 1, 1, 7200, 7201)] + [
            timedelta(days=1, hours=5), timedelta(days=2, hours=23, minutes=59),
            timedelta(days=3, hours=1)]
        await conn.execute("""
            insert into events (account_id, occurred_at, id, campaign_id, message_id, type,
                                machine)
            select a, $1::timestamptz + o, gen_random_uuid(), 5, 10 + n, 'open', false
            from unnest($2::interval[]) with ordinality t (o, n), (values (1), (2)) x (a)""",
                           start, offsets)
        until = start + timedelta(days=3)  # the last event is past it
        expected = [r["id"] for r in await conn.fetch(
            "select id from events where account_id = 1 and occurred_at < $1"
            " order by occurred_at, id", until)]
        assert len(expected) == len(offsets) - 1
        seen, after = [], (start - timedelta(microseconds=1), uuid.UUID(int=0))
        while True:
            page = await conn.fetch(QUERIES.replay_events, 1, *after, 2, until, ["open"], None,
                                    True)
            if not page:
                break
            assert len(page) <= 2
            seen += [r["id"] for r in page]
            after = (page[-1]["occurred_at"], page[-1]["id"])
        assert seen == expected
    finally:
        await conn.close()


# The recipient's export of links before sql/0019_message_links.sql, when links had a table.
_LINKS_BEFORE = """
    select l.message_id, l.position, u.url, r.clicks as human_clicks, r.clicked_in
    from links l join urls u on u.account_id = l.account_id and u.id = l.url_id
    left join rollup_message_link r
        on r.account_id = l.account_id and r.message_id = l.message_id and r.url_id = l.url_id
    where l.account_id = $1 and l.message_id = any($2::bigint[])
    order by l.message_id, l.position"""


async def _add_links(conn: asyncpg.Connection, c: Campaign, rng: random.Random) -> None:
    """Links as a database before messages.url_ids holds them: some messages without any,
    others with untracked positions between and before tracked ones (no row there)."""
    rows = [(c.account_id, m, position, rng.choice(list(c.urls)))
            for m in c.messages for position in range(rng.choice((0, 1, 3, 5, 8)))
            if rng.random() < 0.7]
    await conn.copy_records_to_table(
        "links", columns=("account_id", "message_id", "position", "url_id"), records=rows)


async def _recipients(conn: asyncpg.Connection, c: Campaign) -> list[list[int]]:
    """Each message's recipient's messages as erasure finds them (by the address, as for
    messages registered before recipient keys), and one by a recipient key."""
    found = []
    for address in await conn.fetch("select recipient from messages where campaign_id = $1 "
                                    "order by id", c.campaign_id):
        found.append([r["id"] for r in await conn.fetch(
            QUERIES.recipient_messages, c.account_id, None, address[0], 2**62)])
    await conn.execute("update messages set recipient_key = id % 3 where campaign_id = $1",
                       c.campaign_id)
    found.append([r["id"] for r in await conn.fetch(
        QUERIES.recipient_messages, c.account_id, 1, "nobody@example.com", 2**62)])
    return found


# The writer before sql/0020_event_order.sql added an outbox row for every event it stored,
# in the statement that stored it; the writer of today needs the schema of today, so a
# trigger adds those rows to what it writes into a database from before (its re-labels
# the writer logs itself, as before).
_OLD_OUTBOX = """
    create function pg_temp.log_event() returns trigger language plpgsql as $$
    begin
        insert into event_log (account_id, id, occurred_at, message_id, campaign_id, type,
                               machine)
        values (new.account_id, new.id, new.occurred_at, new.message_id, new.campaign_id,
                new.type, new.machine);
        return null;
    end;
    $$;
    create trigger old_outbox after insert on events
    for each row execute function pg_temp.log_event();
"""

# The stream's query before sql/0020_event_order.sql (sql/webhooks.sql, stream-events), when
# every event had its row in event_log.
_STREAM_BEFORE = """
    with scanned as (
        select * from event_log l
        where l.account_id = $1 and (l.xid, l.id) > ($2::xid8, $3::uuid)
          and l.xid < pg_snapshot_xmin(pg_current_snapshot())
        order by l.xid, l.id
        limit $4
    )
    select s.xid, s.id, s.type, s.occurred_at, s.message_id, s.campaign_id, s.relabelled,
           coalesce(e.machine, s.machine) as machine, coalesce(e.reason, s.reason) as reason,
           u.url, e.country, e.region, e.city, e.browser, e.os, e.device, e.client,
           (s.message_id % $5 = $6 and s.type = any($7::text[])
            and ($8::bigint is null or s.campaign_id = $8)
            and ($9 or not s.machine or s.type = 'relabel')
            and m.id is not null and not coalesce(r.opted_out, false)
            and not (s.type = 'open' and c.opens is false)
            and not (s.type = 'click' and c.clicks is false)
            and (s.type = 'relabel' or e.id is not null)) as send
    from scanned s
    left join events_decoded e on s.type <> 'relabel' and e.account_id = s.account_id
                              and e.message_id = s.message_id and e.occurred_at = s.occurred_at
                              and e.id = s.id
    left join urls u on u.account_id = e.account_id and u.id = e.url_id
    left join messages m on m.account_id = s.account_id and m.id = s.message_id
    left join recipient_suppressions r on r.account_id = m.account_id
                                      and r.recipient_key = m.recipient_key
    left join recipient_consents c on c.account_id = m.account_id
                                  and c.recipient_key = m.recipient_key
    order by s.xid, s.id;
"""


async def _stream(conn: asyncpg.Connection, account_id: int, wanted: outbox.Filter,
                  after: outbox.Position = outbox.START, page: int = 7, *,
                  before: bool = False) -> tuple[list[dict[str, object]], outbox.Position]:
    """Every event the account's stream gives after `after`, a page of `page` rows at a
    time, with the cursor the last page left (as `GET /api/events` and a webhook queue
    move it); `before`: by the query before sql/0020_event_order.sql."""
    sent: list[dict[str, object]] = []
    while True:
        if before:
            rows = await conn.fetch(_STREAM_BEFORE, account_id, after.xid, after.id, page,
                                    wanted.lanes, wanted.lane, wanted.types,
                                    wanted.campaign_id, wanted.machine)
            sent += [outbox.event_json(r) for r in rows if r["send"]]
            last = rows[-1] if rows else None
        else:
            got = await outbox.stream(conn, account_id, after, page, wanted)
            sent += got.events
            last = got.last
        if last is None:
            return sent, after
        after = outbox.Position(int(last["xid"]), last["id"])


async def test_an_old_database_keeps_each_messages_links_and_clicks_through_the_upgrade(
        empty_dsn: str, tmp_path: Path) -> None:
    """sql/0019_message_links.sql and sql/0020_event_order.sql on a database with a mixed
    workload: every message's links (positions, gaps, destinations, per-link clicks) and
    every report are the same after, the erasure's queries find the same messages, the
    event stream gives the same events in the same order under the same cursors (of every
    filter, human only too: a click a re-label made machine was stored human), and clicks
    on the links go on counting and streaming."""
    dsn = empty_dsn
    conn = await connect(dsn)
    writer = BatchWriter(lambda: connect(dsn), batch_size=500, interval_s=3600,
                         max_buffered=100_000)
    try:
        await migrate(conn, _migrations_before(MESSAGE_LINKS, tmp_path / "sql"))
        await conn.execute(_OLD_OUTBOX)
        rng = random.Random(19)
        mixed = [await make_campaign(conn, messages=rng.randint(5, 20), urls=3)
                 for _ in range(3)]
        for c in mixed:
            await _add_links(conn, c, rng)
            for batch in deliveries(workload(c, rng), rng):
                await write(writer, batch)
        links = {c.campaign_id: [tuple(r) for r in await conn.fetch(
            _LINKS_BEFORE, c.account_id, c.messages)] for c in mixed}
        positions = {c.campaign_id: [(r["message_id"], r["position"], r["url_id"])
                                     for r in await conn.fetch(
            "select * from links where account_id = $1 order by message_id, position",
            c.account_id)] for c in mixed}
        before = {c.campaign_id: await reports.campaign_report(conn, c.account_id,
                                                               c.campaign_id, "UTC")
                  for c in mixed}
        found = {c.campaign_id: await _recipients(conn, c) for c in mixed[:1]}
        await conn.execute("update messages set recipient_key = null")
        await conn.execute("drop trigger old_outbox on events")
        # An event stored before the outbox existed (sql/0011_webhooks.sql) never was in
        # the stream: one such event per campaign.
        unlogged = [await conn.fetchval(
            "delete from event_log where id = (select min(id::text)::uuid from event_log"
            " where campaign_id = $1 and type = 'open') returning id", c.campaign_id)
            for c in mixed]
        assert all(unlogged)
        filters = [outbox.EVERYTHING, outbox.Filter(["click", "relabel"], machine=False),
                   outbox.Filter(["open"], mixed[0].campaign_id, lanes=2, lane=1)]
        streams = {(c.account_id, n): await _stream(conn, c.account_id, f, before=True)
                   for c in mixed for n, f in enumerate(filters)}
        assert all(streams[c.account_id, 0][0] for c in mixed)
        relabels = [e for c in mixed for e in streams[c.account_id, 0][0]
                    if e["type"] == "relabel"]
        assert relabels  # the workload re-labels clicks
        assert await conn.fetchval(
            "select count(*) from event_log where type <> 'relabel'") > 0

        applied = [m.version for m in await migrate(conn)]
        assert MESSAGE_LINKS in applied and EVENT_ORDER in applied

        # The outbox keeps only the re-labels; each event carries its outbox row's xid,
        # and the one stored before the outbox none.
        assert await conn.fetchval(
            "select count(*) from event_log where type <> 'relabel'") == 0
        assert await conn.fetchval(
            "select array_agg(id order by id) from events where xid is null") == sorted(
                unlogged)
        assert await _index_keys(conn, "events", "events_stream") == ["account_id", "xid"]
        for (account_id, n), (sent, last) in streams.items():
            assert await _stream(conn, account_id, filters[n]) == (sent, last)
            assert await _stream(conn, account_id, filters[n], page=1000) == (sent, last)
            assert not {e["id"] for e in sent} & {str(i) for i in unlogged}

        assert await conn.fetchval("select to_regclass('links')") is None
        assert await _index_keys(conn, "messages", "messages_recipient_key") == [
            "recipient_key"]
        for c in mixed:
            assert positions[c.campaign_id]
            assert [tuple(r) for r in await conn.fetch(
                QUERIES.export_recipient_links, c.account_id, c.messages)] == links[
                    c.campaign_id]
            assert [(r["id"], n, u) for r in await conn.fetch(
                "select id, url_ids from messages where campaign_id = $1 order by id",
                c.campaign_id) for n, u in enumerate(r["url_ids"] or ()) if u is not None
            ] == positions[c.campaign_id]
            assert await conn.fetchval(QUERIES.count_links, c.account_id, c.messages) == len(
                positions[c.campaign_id])
            assert await reports.campaign_report(conn, c.account_id, c.campaign_id,
                                                 "UTC") == before[c.campaign_id]
        assert {c.campaign_id: await _recipients(conn, c) for c in mixed[:1]} == found
        # A click carries its link's position and url id (the token): the links' clicks
        # are counted under their destinations as a recomputation from the events says.
        c = mixed[1]
        at = micros(T0) + 6 * 3600 * 1_000_000
        clicks = [event(c, m, CLICK, at + n * 1_000_000, url=url, position=p, rng=rng)
                  for n, (m, p, url) in enumerate(positions[c.campaign_id])]
        await write(writer, clicks)
        await assert_report_is_recomputation(conn, c, ZONES)
        # The stream goes on from where it stood: the new clicks, after every older event.
        new, _ = await _stream(conn, c.account_id, outbox.EVERYTHING,
                               streams[c.account_id, 0][1])
        assert {e["id"] for e in new if e["type"] == "click"} == {
            str(uuid.UUID(int=e.id)) for e in clicks}
        exported = await conn.fetch(QUERIES.export_recipient_links, c.account_id, c.messages)
        assert [(r["message_id"], r["position"]) for r in exported] == [
            (m, p) for m, p, _ in positions[c.campaign_id]]
        assert all(r["human_clicks"] >= 1 for r in exported)
    finally:
        await writer.close(1.0)
        await conn.close()


async def test_the_queries_that_read_messages_and_their_links_use_an_index(dsn: str) -> None:
    """EXPLAIN, on 60,000 messages of 20 accounts with statistics: a recipient's messages by
    the recipient key (or, registered before keys, by the index of those without one), a
    message's links by its primary key, a campaign's messages (lists, a destination's merge)
    by messages_campaign_id; never a read of the whole table."""
    conn = await connect(dsn)
    try:
        await conn.execute("""
            insert into accounts (id, name) select n, 'a' || n from generate_series(1, 20) n;
            insert into campaigns (account_id, id, name)
            select 1 + n % 20, n, 'c' || n from generate_series(1, 200) n;
            insert into messages (account_id, id, campaign_id, recipient, recipient_key,
                                  url_ids)
            select 1 + (1 + n % 200) % 20, n, 1 + n % 200, 'r' || n || '@example.com',
                   (random() * 1e18)::bigint, array[n % 200, null, n % 200 + 1]
            from generate_series(1, 60000) n;
            update messages set recipient_key = null where id % 1000 = 0;
            analyze messages""")
        key, account = await conn.fetchrow("select recipient_key, account_id from messages "
                                           "where id = 4321 and campaign_id = 122")
        assert account == 3
        plans = {
            "recipient-messages": (QUERIES.recipient_messages, 3, key, "r4321@example.com",
                                   2**62),
            "export-recipient-messages": (QUERIES.export_recipient_messages, 3, key,
                                          "r4321@example.com"),
            "export-recipient-links": (QUERIES.export_recipient_links, 3, [4321, 4341]),
            "count-links": (QUERIES.count_links, 3, [4321, 4341]),
            "campaign-messages": (QUERIES.campaign_messages, 3, 122, None, 50),
            "merge-destination": (QUERIES.merge_destination, 3, 121, 122, 122),
        }
        expected = {"recipient-messages": ("messages_recipient_key", "messages_unkeyed"),
                    "export-recipient-messages": ("messages_recipient_key",
                                                  "messages_unkeyed"),
                    "export-recipient-links": ("messages_pkey",),
                    "count-links": ("messages_pkey",),
                    "campaign-messages": ("messages_campaign_id",),
                    "merge-destination": ("messages_campaign_id",)}
        for name, (query, *args) in plans.items():
            plan = "\n".join(r[0] for r in await conn.fetch("explain " + query, *args))
            for index in expected[name]:
                assert f" {index} " in plan + " ", (name, plan)
            assert "Seq Scan on messages" not in plan, (name, plan)
    finally:
        await conn.close()
