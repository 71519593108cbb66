"""Rollups: what the writer runs, in its transaction, to keep the report tables exact.

The tables are in sql/0002_rollups.sql; reports.py reads nothing else. A batch
arrives in the writer's staging table and `move_staged` then, in the writer's
transaction:

1. takes an advisory lock per campaign that has clicks in the batch (see `_LOCK`);
2. moves the batch into `events` with `insert ... on conflict do nothing returning`
   in a CTE and aggregates every rollup from what that insert returned, so only rows
   new to the database are counted: a retried batch or a journal replay adds nothing;
3. if the batch brought a trigger (a honeypot hit, a burst click) or a human click
   inside a stored trigger's window, re-labels: the same message's human clicks within
   the window around the trigger (`relabel_windows`, from the classification rules'
   timing) become machine with its reason (`update ... returning` in a CTE), and the
   same rollup statements run on the difference (each re-labelled row: -1 human,
   +1 machine).

Re-labelling works from stored rows, not from classify.py's in-memory `Relabel`
signals: a click before the trigger is found whichever worker stored it, and so is one
after it (which classify.py labels only when the same worker sees both); a replay or a
restart loses nothing. The window is symmetric, and covers the signal's (a honeypot:
`honeypot_seconds` before the hit; a burst: its clicks, all within `burst_seconds`).
The triggers: a hit on the honeypot link itself, and every click labelled burst (so a
burst that goes on extends its window, as classify.py's rule does).

Both statements feed one generic set of upserts (`_ROLLUPS`) from a relation
`delta` of signed rows, so an insert and a re-label can never disagree on what a
count means. Unique counts are kept as per-message human counts (`rollup_message`,
`rollup_message_link`): a message is opened while it has a human open or click, and
each upsert returns the new counts, from which the statement sees whether the message
just became, or just stopped being, opened or clicked.

Nothing here reads raw events back except the re-label's look at one message's clicks
within seconds of a trigger, so retention can drop old event partitions and every total
stays. (A journal replay of events older than the retention period would count them
again: their ids are gone with the partition.)

Exactness of re-labelling under concurrency: a victim click and its trigger may be
written by two workers at the same moment, each transaction unable to see the other's
row. The per-campaign lock, taken before anything else in the transaction, orders
them: the second one's re-label statement runs after the first committed, so it sees
both rows. Rows of the hot rollup bucket serialise writers of one campaign anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

import asyncpg

from tracker.hits import EVENT_COLUMNS
from tracker.rules import Timing, load_rules


def relabel_windows(timing: Timing | None = None) -> dict[str, timedelta]:
    """The clicks whose reason makes the same message's human clicks around them machine,
    and how far either side: a honeypot hit is a scanner, and so is whatever else was
    clicked in that message around it (`timing.honeypot_seconds`); so is everything in a
    burst (`timing.burst_seconds`). The packaged rules' timing unless given."""
    timing = timing or load_rules().timing
    return {"honeypot": timedelta(seconds=timing.honeypot_seconds),
            "burst": timedelta(seconds=timing.burst_seconds)}


# The honeypot link has no url row: its hits carry url id 0 (registration.py). Only such a
# hit is a honeypot trigger; the clicks classify.py labels `honeypot` because they came
# soon after one are not (their window would extend the honeypot's).
HONEYPOT_URL_ID = 0

# Any two int4s will do: the pair must not be used for anything else.
_LOCK_SPACE = 0x726C6162  # "rlab"
_LOCK_BUCKETS = 255  # bounds the locks one transaction takes (the lock table is shared)

_EVENT_FIELDS = ", ".join(("occurred_at" if c == "at_us" else c) for c in EVENT_COLUMNS)
_DELTA_FIELDS = ("account_id, campaign_id, message_id, occurred_at, type, url_id, "
                 "country, region, browser, os, device")

_MOVED_FIELDS = ", ".join("e." + name for name in _DELTA_FIELDS.split(", "))

_LOCK = f"""
select pg_advisory_xact_lock(
    {_LOCK_SPACE}, hashtext(account_id::text || '/' || campaign_id::text) & {_LOCK_BUCKETS})
from (select distinct account_id, campaign_id from {{staging}} where type = 'click'
      order by 1, 2) c"""

# Every rollup, from `delta` (signed rows: n is +1 or -1, machine the side counted).
_ROLLUPS = """
md as (
    select account_id, message_id, min(campaign_id) as campaign_id,
           coalesce(sum(n) filter (where type = 'open'), 0) as opens,
           coalesce(sum(n) filter (where type = 'click'), 0) as clicks,
           tracker_quarter(min(occurred_at)) as opened_in,
           tracker_quarter(min(occurred_at) filter (where type = 'click')) as clicked_in
    from delta where not machine
    group by account_id, message_id
),
m as (
    insert into rollup_message as r (account_id, message_id, campaign_id, opens, clicks,
                                     opened_in, clicked_in)
    select account_id, message_id, campaign_id, opens, clicks, opened_in, clicked_in
    from md order by account_id, message_id
    on conflict (account_id, message_id) do update set
        opens = r.opens + excluded.opens,
        clicks = r.clicks + excluded.clicks,
        opened_in = case when r.opens + r.clicks > 0 then r.opened_in else excluded.opened_in end,
        clicked_in = case when r.clicks > 0 then r.clicked_in else excluded.clicked_in end
    returning account_id, message_id, campaign_id, opens, clicks, opened_in, clicked_in
),
-- +1 where a message became opened (clicked), -1 where it stopped: new counts against
-- the counts before this statement (new minus delta).
mt as (
    select m.account_id, m.campaign_id, m.opened_in, m.clicked_in,
           (m.opens + m.clicks > 0)::int
             - (m.opens - md.opens + m.clicks - md.clicks > 0)::int as opened,
           (m.clicks > 0)::int - (m.clicks - md.clicks > 0)::int as clicked
    from m join md on md.account_id = m.account_id and md.message_id = m.message_id
),
ld as (
    select account_id, message_id, url_id, min(campaign_id) as campaign_id, sum(n) as clicks,
           tracker_hour(min(occurred_at)) as clicked_in
    from delta where not machine and type = 'click' and url_id is not null
    group by account_id, message_id, url_id
),
l as (
    insert into rollup_message_link as r (account_id, message_id, url_id, campaign_id, clicks,
                                          clicked_in)
    select account_id, message_id, url_id, campaign_id, clicks, clicked_in
    from ld order by account_id, message_id, url_id
    on conflict (account_id, message_id, url_id) do update set
        clicks = r.clicks + excluded.clicks,
        clicked_in = case when r.clicks > 0 then r.clicked_in else excluded.clicked_in end
    returning account_id, message_id, url_id, campaign_id, clicks, clicked_in
),
lt as (
    select l.account_id, l.campaign_id, l.url_id, l.clicked_in,
           (l.clicks > 0)::int - (l.clicks - ld.clicks > 0)::int as clicked
    from l join ld on ld.account_id = l.account_id and ld.message_id = l.message_id
                  and ld.url_id = l.url_id
),
rc as (
    insert into rollup_campaign as r (account_id, campaign_id, bucket, opens, clicks,
                                      machine_opens, machine_clicks, opened, clicked)
    select account_id, campaign_id, bucket, sum(opens), sum(clicks), sum(machine_opens),
           sum(machine_clicks), sum(opened), sum(clicked)
    from (
        select account_id, campaign_id, tracker_quarter(occurred_at) as bucket,
               case when type = 'open' and not machine then n else 0 end as opens,
               case when type = 'click' and not machine then n else 0 end as clicks,
               case when type = 'open' and machine then n else 0 end as machine_opens,
               case when type = 'click' and machine then n else 0 end as machine_clicks,
               0 as opened, 0 as clicked
        from delta
        union all
        select account_id, campaign_id, opened_in, 0, 0, 0, 0, opened, 0
        from mt where opened <> 0
        union all
        select account_id, campaign_id, clicked_in, 0, 0, 0, 0, 0, clicked
        from mt where clicked <> 0
    ) x
    group by account_id, campaign_id, bucket
    order by account_id, campaign_id, bucket
    on conflict (account_id, campaign_id, bucket) do update set
        opens = r.opens + excluded.opens,
        clicks = r.clicks + excluded.clicks,
        machine_opens = r.machine_opens + excluded.machine_opens,
        machine_clicks = r.machine_clicks + excluded.machine_clicks,
        opened = r.opened + excluded.opened,
        clicked = r.clicked + excluded.clicked
),
rl as (
    insert into rollup_link as r (account_id, campaign_id, url_id, hour, clicks, machine_clicks,
                                  clicked)
    select account_id, campaign_id, url_id, hour, sum(clicks), sum(machine_clicks), sum(clicked)
    from (
        select account_id, campaign_id, url_id, tracker_hour(occurred_at) as hour,
               case when not machine then n else 0 end as clicks,
               case when machine then n else 0 end as machine_clicks,
               0 as clicked
        from delta where type = 'click' and url_id is not null
        union all
        select account_id, campaign_id, url_id, clicked_in, 0, 0, clicked
        from lt where clicked <> 0
    ) x
    group by account_id, campaign_id, url_id, hour
    order by account_id, campaign_id, url_id, hour
    on conflict (account_id, campaign_id, url_id, hour) do update set
        clicks = r.clicks + excluded.clicks,
        machine_clicks = r.machine_clicks + excluded.machine_clicks,
        clicked = r.clicked + excluded.clicked
),
rd as (
    insert into rollup_dimension as r (account_id, campaign_id, type, dimension, value, humans,
                                       machines)
    select e.account_id, e.campaign_id, e.type, d.dimension, coalesce(d.value, 'unknown'),
           coalesce(sum(e.n) filter (where not e.machine), 0),
           coalesce(sum(e.n) filter (where e.machine), 0)
    from delta e
    cross join lateral (values ('country', e.country), ('region', e.region),
                               ('browser', e.browser), ('os', e.os),
                               ('device', e.device)) d (dimension, value)
    group by 1, 2, 3, 4, 5
    order by 1, 2, 3, 4, 5
    on conflict (account_id, campaign_id, type, dimension, value) do update set
        humans = r.humans + excluded.humans,
        machines = r.machines + excluded.machines
)"""

# $1, $2: the trigger reasons and their windows; $3: the honeypot link's url id. Returns the
# rows inserted and whether a re-label may be due.
_MOVE = f"""
with new as (
    insert into events ({_EVENT_FIELDS})
    select {{staged_fields}} from {{staging}}
    on conflict do nothing
    returning {_DELTA_FIELDS}, id, machine, reason
),
delta as (
    select {_DELTA_FIELDS}, machine, 1 as n from new
),
triggers as (
    insert into relabel_triggers (account_id, message_id, occurred_at, id, reason, since, until)
    select n.account_id, n.message_id, n.occurred_at, n.id, n.reason,
           n.occurred_at - w.span, n.occurred_at + w.span
    from new n join unnest($1::text[], $2::interval[]) w (reason, span) on w.reason = n.reason
    where n.type = 'click' and (n.reason <> 'honeypot' or n.url_id = $3)
    on conflict do nothing
),
{_ROLLUPS}
select (select count(*) from new) as inserted,
       exists (select 1 from new where type = 'click' and reason = any($1::text[])
                                 and (reason <> 'honeypot' or url_id = $3))
       or exists (select 1 from new n
                  join relabel_triggers t on t.account_id = n.account_id
                                         and t.message_id = n.message_id
                                         and n.occurred_at between t.since and t.until
                  where n.type = 'click' and not n.machine) as relabel"""

# Returns the rows re-labelled. The earliest trigger around a click names its reason.
# The triggers that matter are those with a staged click in their window: that click is a
# victim, or the trigger itself (new in this batch). Older ones were settled when written.
_RELABEL = f"""
with staged as (
    select distinct account_id, message_id,
           timestamptz 'epoch' + at_us * interval '1 microsecond' as occurred_at
    from {{staging}} where type = 'click'
),
near as (
    select distinct on (e.account_id, e.occurred_at, e.id)
           e.account_id, e.occurred_at, e.id, t.reason
    from relabel_triggers t
    join events e on e.account_id = t.account_id and e.message_id = t.message_id
                 and e.occurred_at between t.since and t.until
    where exists (select 1 from staged s
                  where s.account_id = t.account_id and s.message_id = t.message_id
                    and s.occurred_at between t.since and t.until)
      and e.type = 'click' and not e.machine
    order by e.account_id, e.occurred_at, e.id, t.occurred_at
),
moved as (
    update events e set machine = true, reason = near.reason
    from near
    where e.account_id = near.account_id and e.occurred_at = near.occurred_at
      and e.id = near.id and not e.machine
    returning {_MOVED_FIELDS}
),
delta as (
    select {_DELTA_FIELDS}, false as machine, -1 as n from moved
    union all
    select {_DELTA_FIELDS}, true as machine, 1 as n from moved
),
{_ROLLUPS}
select count(*) from moved"""


class Mover:
    """The statements for one staging table, built once."""

    def __init__(self, staging: str, windows: Mapping[str, timedelta] | None = None) -> None:
        staged_fields = ", ".join(
            ("timestamptz 'epoch' + at_us * interval '1 microsecond'" if c == "at_us" else c)
            for c in EVENT_COLUMNS)
        self._lock = _LOCK.format(staging=staging)
        self._move = _MOVE.format(staging=staging, staged_fields=staged_fields)
        self._relabel = _RELABEL.format(staging=staging)
        windows = relabel_windows() if windows is None else windows
        self._reasons = list(windows)
        self._spans = [windows[reason] for reason in self._reasons]

    async def move_staged(self, conn: asyncpg.Connection) -> tuple[int, int]:
        """Move the staged batch into `events` and the rollups; call inside a transaction.
        Returns (rows new to the database, rows re-labelled machine)."""
        await conn.execute(self._lock)
        row = await conn.fetchrow(self._move, self._reasons, self._spans, HONEYPOT_URL_ID)
        relabelled = 0
        if row["relabel"]:
            relabelled = int(await conn.fetchval(self._relabel))
        return int(row["inserted"]), relabelled
