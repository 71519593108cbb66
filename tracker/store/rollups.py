"""Rollups: what the writer runs, in its transaction, to keep the report tables exact.

The tables are in sql/0002_rollups.sql; store/reports.py reads nothing else. A batch
arrives in the writer's staging table and `move_staged` then runs, in the writer's
transaction, one statement per step, in this order:

1. move: `insert into events ... on conflict do nothing returning`, and what that
   insert returned goes into a session-local delta table (signed rows, n = +1), so
   only rows new to the database are counted: a retried batch or a journal replay adds
   nothing. The batch's triggers (below) go into `relabel_triggers`;
2. messages: the per-message rollups (`rollup_message`, then `rollup_message_link`)
   from the delta; each upsert returns the new counts, from which the statement sees
   whether a message just became, or just stopped being, opened or clicked, and notes
   that in a session-local marks table;
3. re-label: the same message's human clicks within the window around a trigger (a
   honeypot hit, a burst click; `relabel_windows`, from the classification rules'
   timing) become machine with its reason (`update ... returning`); each re-labelled
   row adds two rows to the delta (-1 human, +1 machine), and step 2 runs again on them;
4. campaign rollups: `rollup_campaign`, `rollup_link` and `rollup_dimension` from the
   whole delta and the marks, in one statement.

Unique counts are kept as per-message human counts (`rollup_message`,
`rollup_message_link`): a message is opened while it has a human open or click.
Re-labelling works from stored rows: a click before the trigger is found whichever
worker stored it, and so is one after it; a replay or a restart loses nothing. The
window is symmetric, and covers the signal's (a honeypot: `honeypot_seconds` before the
hit; a burst: its clicks, all within `burst_seconds`). The triggers: a hit on the
honeypot link itself, and every click labelled burst (so a burst that goes on extends
its window, as ingest/classify.py's rule does).

Nothing here reads raw events back except the re-label's look at one message's clicks
within seconds of a trigger, so retention can drop old event partitions and every total
stays. (A journal replay of events older than the retention period would count them
again: their ids are gone with the partition.)

Concurrency. Several transactions run these steps at once (the workers' writers, and
each writer's concurrent flushes), and they must neither miss a re-label nor deadlock.

- Re-labelling is exact because the `rollup_message` row of a message is the point where
  two transactions that could re-label each other's rows meet. A victim click and its
  trigger may be written at the same moment, each transaction unable to see the other's
  row; but both upsert the message's row in step 2 (a human click counts there; a
  trigger is upserted with +0 for this reason alone), so the second waits there until
  the first has committed, and its step 3, a new statement with a new snapshot, sees the
  first one's row. (Before, a per-campaign advisory lock taken at the start of the
  transaction did this, and it made every transaction of a campaign wait for the whole
  of the one before: writers could not overlap at all.)
- No deadlock: every transaction takes its row locks in the same order, table by table
  as the steps go, and in key order within a table (`order by` before each insert: two
  transactions inserting the same events, a replay beside the original, would otherwise
  each wait for the other's rows). Step
  3 only re-labels messages with a click in the batch, whose `rollup_message` rows it
  already holds; and whoever holds a message's `rollup_message_link` row took the
  message's `rollup_message` row first. The campaign rollups' rows are the ones every
  transaction of a campaign shares; they come last, in one statement, so a transaction
  holds them only for that statement and its commit, and the steps before it (the bulk
  of the work) overlap freely.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

import asyncpg

from tracker.ingest.pipeline import EVENT_COLUMNS
from tracker.ingest.rules import Timing, load_rules


def relabel_windows(timing: Timing | None = None) -> dict[str, timedelta]:
    """The clicks whose reason makes the same message's human clicks around them machine,
    and how far either side: a honeypot hit is a scanner, and so is whatever else was
    clicked in that message around it (`timing.honeypot_seconds`); so is everything in a
    burst (`timing.burst_seconds`). The packaged rules' timing unless given."""
    timing = timing or load_rules().timing
    return {"honeypot": timedelta(seconds=timing.honeypot_seconds),
            "burst": timedelta(seconds=timing.burst_seconds)}


# The honeypot link has no url row: its hits carry url id 0 (mail/registration.py). Only such a
# hit is a honeypot trigger; the clicks ingest/classify.py labels `honeypot` because they came
# soon after one are not (their window would extend the honeypot's).
HONEYPOT_URL_ID = 0

_EVENT_FIELDS = ", ".join(("occurred_at" if c == "at_us" else c) for c in EVENT_COLUMNS)
_DELTA_FIELDS = ("account_id, campaign_id, message_id, occurred_at, type, url_id, "
                 "country, region, browser, os, device, client, reason")
_MOVED_FIELDS = ", ".join("e." + name for name in _DELTA_FIELDS.split(", "))
# A re-label's -1 row takes back the human click as it was: without a reason.
_UNLABELLED_FIELDS = _DELTA_FIELDS.replace("reason", "null::text")

# Session-local, emptied at every commit. `n` is +1 or -1 (a re-label takes a human row
# back and adds a machine one); `relabel` marks the rows step 3 added; `is_trigger` the
# batch's triggers. Marks: a message that became opened (`opened`) or clicked, or stopped
# being, in the rollup_campaign bucket `at` (url_id null), or a (message, url) that became
# clicked, or stopped, in the rollup_link hour `at`.
_TABLES = """
    create temp table if not exists {delta} (
        account_id bigint, campaign_id bigint, message_id bigint, occurred_at timestamptz,
        type text, url_id bigint, country text, region text, browser text, os text,
        device text, client text, reason text, machine boolean, n integer, is_trigger boolean,
        relabel boolean
    ) on commit delete rows;
    create temp table if not exists {marks} (
        account_id bigint, campaign_id bigint, url_id bigint, at timestamptz,
        opened integer, clicked integer, mpp integer, mpp_opened integer
    ) on commit delete rows"""

# $1, $2: the trigger reasons and their windows; $3: the honeypot link's url id.
_MOVE = f"""
with new as (
    insert into events ({_EVENT_FIELDS})
    select {{staged_fields}} from {{staging}}
    order by account_id, at_us, id  -- key order: see Concurrency above
    on conflict do nothing
    returning {_DELTA_FIELDS}, id, machine,
              type = 'click' and reason = any($1::text[])
              and (reason <> 'honeypot' or url_id = $3) as is_trigger
),
triggers as (
    insert into relabel_triggers (account_id, message_id, occurred_at, id, reason, since, until)
    select n.account_id, n.message_id, n.occurred_at, n.id, n.reason,
           n.occurred_at - w.span, n.occurred_at + w.span
    from new n join unnest($1::text[], $2::interval[]) w (reason, span) on w.reason = n.reason
    where n.is_trigger
    on conflict do nothing
)
insert into {{delta}} ({_DELTA_FIELDS}, machine, n, is_trigger, relabel)
select {_DELTA_FIELDS}, machine, 1, is_trigger, false from new"""

# $1: the delta rows of step 1 (false) or of step 3 (true). Trigger messages are upserted
# with +0: that row lock is what orders re-labels (see Concurrency above).
_MESSAGES = """
with md as (
    select account_id, message_id, min(campaign_id) as campaign_id,
           coalesce(sum(n) filter (where type = 'open' and not machine), 0) as opens,
           coalesce(sum(n) filter (where type = 'click' and not machine), 0) as clicks,
           tracker_quarter(min(occurred_at) filter (where not machine)) as opened_in,
           tracker_quarter(min(occurred_at) filter (where type = 'click' and not machine))
               as clicked_in,
           coalesce(sum(n) filter (where type = 'open' and reason = 'apple_mpp'), 0) as mpp,
           tracker_quarter(min(occurred_at) filter (where reason = 'apple_mpp')) as mpp_in
    from {delta} where relabel = $1 and (not machine or is_trigger or reason = 'apple_mpp')
    group by account_id, message_id
),
m as (
    insert into rollup_message as r (account_id, message_id, campaign_id, opens, clicks,
                                     opened_in, clicked_in, mpp)
    select account_id, message_id, campaign_id, opens, clicks, opened_in, clicked_in, mpp
    from md order by account_id, message_id
    on conflict (account_id, message_id) do update set
        opens = r.opens + excluded.opens,
        clicks = r.clicks + excluded.clicks,
        opened_in = case when r.opens + r.clicks > 0 then r.opened_in else excluded.opened_in end,
        clicked_in = case when r.clicks > 0 then r.clicked_in else excluded.clicked_in end,
        mpp = r.mpp + excluded.mpp
    returning account_id, message_id, campaign_id, opens, clicks, opened_in, clicked_in, mpp
),
-- +1 where a message became opened (clicked, MPP-prefetched, both prefetched and opened),
-- -1 where it stopped: new counts against the counts before this statement (new minus
-- delta). An MPP prefetch is never taken back, so `mpp` only goes up.
mt as (
    select m.account_id, m.campaign_id, m.opened_in, m.clicked_in, md.mpp_in,
           (m.opens + m.clicks > 0)::int
             - (m.opens - md.opens + m.clicks - md.clicks > 0)::int as opened,
           (m.clicks > 0)::int - (m.clicks - md.clicks > 0)::int as clicked,
           (m.mpp > 0)::int - (m.mpp - md.mpp > 0)::int as mpp,
           (m.mpp > 0 and m.opens + m.clicks > 0)::int
             - (m.mpp - md.mpp > 0 and m.opens - md.opens + m.clicks - md.clicks > 0)::int
             as mpp_opened
    from m join md on md.account_id = m.account_id and md.message_id = m.message_id
)
insert into {marks} (account_id, campaign_id, url_id, at, opened, clicked, mpp, mpp_opened)
select account_id, campaign_id, null::bigint, opened_in, opened, 0, 0, mpp_opened
from mt where opened <> 0 or mpp_opened <> 0
union all
select account_id, campaign_id, null::bigint, clicked_in, 0, clicked, 0, 0
from mt where clicked <> 0
union all
select account_id, campaign_id, null::bigint, mpp_in, 0, 0, mpp, 0 from mt where mpp <> 0"""

# After _MESSAGES, never in the same statement: see Concurrency above.
_MESSAGE_LINKS = """
with ld as (
    select account_id, message_id, url_id, min(campaign_id) as campaign_id, sum(n) as clicks,
           tracker_hour(min(occurred_at)) as clicked_in
    from {delta}
    where relabel = $1 and not machine and type = 'click' and url_id is not null
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
)
insert into {marks} (account_id, campaign_id, url_id, at, opened, clicked, mpp, mpp_opened)
select l.account_id, l.campaign_id, l.url_id, l.clicked_in, 0,
       (l.clicks > 0)::int - (l.clicks - ld.clicks > 0)::int, 0, 0
from l join ld on ld.account_id = l.account_id and ld.message_id = l.message_id
              and ld.url_id = l.url_id
where (l.clicks > 0) <> (l.clicks - ld.clicks > 0)"""

# The triggers that matter are those with one of the batch's new clicks in their window
# that is a victim (human) or the trigger itself. Older ones were settled when written.
# The earliest trigger around a click names its reason.
_RELABEL = f"""
with clicks as (
    select distinct account_id, message_id, occurred_at from {{delta}}
    where not relabel and type = 'click' and (not machine or is_trigger)
),
near as (
    select distinct on (e.account_id, e.occurred_at, e.id)
           e.account_id, e.occurred_at, e.id, t.reason
    from relabel_triggers t
    join events e on e.account_id = t.account_id and e.message_id = t.message_id
                 and e.occurred_at between t.since and t.until
    where exists (select 1 from clicks s
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
)
insert into {{delta}} ({_DELTA_FIELDS}, machine, n, is_trigger, relabel)
select {_UNLABELLED_FIELDS}, false, -1, false, true from moved
union all
select {_DELTA_FIELDS}, true, 1, false, true from moved"""

# The rows every transaction of a campaign shares: last, in one statement.
_CAMPAIGNS = """
with rc as (
    insert into rollup_campaign as r (account_id, campaign_id, bucket, opens, clicks,
                                      machine_opens, machine_clicks, opened, clicked, mpp,
                                      mpp_opened)
    select account_id, campaign_id, bucket, sum(opens), sum(clicks), sum(machine_opens),
           sum(machine_clicks), sum(opened), sum(clicked), sum(mpp), sum(mpp_opened)
    from (
        select account_id, campaign_id, tracker_quarter(occurred_at) as bucket,
               case when type = 'open' and not machine then n else 0 end as opens,
               case when type = 'click' and not machine then n else 0 end as clicks,
               case when type = 'open' and machine then n else 0 end as machine_opens,
               case when type = 'click' and machine then n else 0 end as machine_clicks,
               0 as opened, 0 as clicked, 0 as mpp, 0 as mpp_opened
        from {delta}
        union all
        select account_id, campaign_id, at, 0, 0, 0, 0, opened, clicked, mpp, mpp_opened
        from {marks} where url_id is null
    ) x
    group by account_id, campaign_id, bucket
    order by account_id, campaign_id, bucket
    on conflict (account_id, campaign_id, bucket) do update set
        opens = r.opens + excluded.opens,
        clicks = r.clicks + excluded.clicks,
        machine_opens = r.machine_opens + excluded.machine_opens,
        machine_clicks = r.machine_clicks + excluded.machine_clicks,
        opened = r.opened + excluded.opened,
        clicked = r.clicked + excluded.clicked,
        mpp = r.mpp + excluded.mpp,
        mpp_opened = r.mpp_opened + excluded.mpp_opened
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
        from {delta} where type = 'click' and url_id is not null
        union all
        select account_id, campaign_id, url_id, at, 0, 0, clicked
        from {marks} where url_id is not null
    ) x
    group by account_id, campaign_id, url_id, hour
    order by account_id, campaign_id, url_id, hour
    on conflict (account_id, campaign_id, url_id, hour) do update set
        clicks = r.clicks + excluded.clicks,
        machine_clicks = r.machine_clicks + excluded.machine_clicks,
        clicked = r.clicked + excluded.clicked
)
insert into rollup_dimension as r (account_id, campaign_id, type, dimension, value, humans,
                                   machines)
-- One pass with a grouping set per dimension (a missing value is the key 'unknown'); in
-- the set of a dimension the others are null, so the first value not null is its own.
-- A third cheaper than making a row per dimension of each event to group (lateral values).
select account_id, campaign_id, type,
       case when grouping(country) = 0 then 'country' when grouping(region) = 0 then 'region'
            when grouping(browser) = 0 then 'browser' when grouping(os) = 0 then 'os'
            when grouping(device) = 0 then 'device' when grouping(client) = 0 then 'client'
            else 'reason' end as dimension,
       coalesce(country, region, browser, os, device, client, reason) as value,
       coalesce(sum(n) filter (where not machine), 0),
       coalesce(sum(n) filter (where machine), 0)
from (select account_id, campaign_id, type, machine, n,
             coalesce(country, 'unknown') as country, coalesce(region, 'unknown') as region,
             coalesce(browser, 'unknown') as browser, coalesce(os, 'unknown') as os,
             coalesce(device, 'unknown') as device, coalesce(client, 'unknown') as client,
             coalesce(reason, 'unknown') as reason
      from {delta}) e
group by account_id, campaign_id, type,
         grouping sets (country, region, browser, os, device, client, reason)
order by 1, 2, 3, 4, 5
on conflict (account_id, campaign_id, type, dimension, value) do update set
    humans = r.humans + excluded.humans,
    machines = r.machines + excluded.machines"""


class Mover:
    """The statements for one staging table, built once. `tables` creates the
    session-local tables they use; run it once per connection."""

    def __init__(self, staging: str, windows: Mapping[str, timedelta] | None = None) -> None:
        staged_fields = ", ".join(
            ("timestamptz 'epoch' + at_us * interval '1 microsecond'" if c == "at_us" else c)
            for c in EVENT_COLUMNS)
        names = {"staging": staging, "delta": f"{staging}_delta", "marks": f"{staging}_marks"}
        self.tables = _TABLES.format(**names)
        self._move = _MOVE.format(staged_fields=staged_fields, **names)
        self._messages = _MESSAGES.format(**names)
        self._message_links = _MESSAGE_LINKS.format(**names)
        self._relabel = _RELABEL.format(**names)
        self._campaigns = _CAMPAIGNS.format(**names)
        windows = relabel_windows() if windows is None else windows
        self._reasons = list(windows)
        self._spans = [windows[reason] for reason in self._reasons]

    async def move_staged(self, conn: asyncpg.Connection) -> tuple[int, int]:
        """Move the staged batch into `events` and the rollups; call inside a transaction.
        Returns (rows new to the database, rows re-labelled machine)."""
        inserted = _rows(await conn.execute(self._move, self._reasons, self._spans,
                                            HONEYPOT_URL_ID))
        if not inserted:
            return 0, 0
        await conn.execute(self._messages, False)
        await conn.execute(self._message_links, False)
        relabelled = _rows(await conn.execute(self._relabel)) // 2
        if relabelled:
            await conn.execute(self._messages, True)
            await conn.execute(self._message_links, True)
        await conn.execute(self._campaigns)
        return inserted, relabelled


def _rows(status: str) -> int:
    """Rows an INSERT affected, from its command tag ("INSERT 0 42")."""
    return int(status.rsplit(" ", 1)[1])
