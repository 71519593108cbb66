-- The writer's statements (tracker/store/lanes.py, tracker/store/rollups.py): a batch is
-- COPYed into events_staging and moved into `events` and the report rollups in one
-- transaction, one statement per step. Why the steps run in this order, and why they
-- neither miss a re-label nor deadlock, is told in tracker/store/rollups.py.
--
-- Three session-local tables, emptied at every commit:
-- - events_staging: the batch, one row per COPY line, columns as
--   tracker.ingest.pipeline.EVENT_COLUMNS (`at_us`: Unix time in microseconds);
-- - events_staging_delta: what the rollups must add, as signed rows, with the short texts
--   as their event_terms codes (sql/0018_event_terms.sql): `n` is +1 or -1 (a
--   re-label takes a human row back and adds a machine one); `relabel` marks the rows the
--   re-label step added; `is_trigger` the batch's triggers;
-- - events_staging_marks: a message that became opened (`opened`) or clicked, or stopped
--   being, in the rollup_campaign bucket `at` (url_id null), or a (message, url) that
--   became clicked, or stopped, in the rollup_link hour `at`.

-- name: create-writer-tables
-- Once per connection.
create temp table if not exists events_staging (
    account_id bigint, at_us bigint, id uuid, campaign_id bigint, message_id bigint,
    type text, link_position integer, url_id bigint, machine boolean, reason text,
    country text, region text, city text, browser text, os text, device text,
    client text, ip inet
) on commit delete rows;
create temp table if not exists events_staging_delta (
    account_id bigint, campaign_id bigint, message_id bigint, occurred_at timestamptz,
    type text, url_id bigint, country text, region smallint, browser smallint, os smallint,
    device smallint, client smallint, reason smallint, machine boolean, n integer,
    is_trigger boolean, relabel boolean
) on commit delete rows;
create temp table if not exists events_staging_marks (
    account_id bigint, campaign_id bigint, url_id bigint, at timestamptz,
    opened integer, clicked integer, mpp integer, mpp_opened integer
) on commit delete rows;

-- name: ensure-event-partition
-- $1: a UTC day; its `events` partition is made unless it exists (sql/0004_partition_race.sql).
select tracker_ensure_event_partition($1);

-- name: add-event-terms
-- When move-staged met a short text that event_terms does not hold yet
-- (sql/0018_event_terms.sql), in a transaction of its own before the batch is written
-- again: the batch's new texts. Committed at once, so a writer that meets the same new text
-- waits for this transaction alone, never for a whole batch; a text whose batch then fails
-- stays, unused and harmless. Sought before they are added, so an identity value goes only
-- to a text that is new.
-- (A union of the six columns costs half what unnesting each row's six does.)
insert into event_terms (term)
select t
from (select reason as t from events_staging union select region from events_staging
      union select browser from events_staging union select os from events_staging
      union select device from events_staging union select client from events_staging) x
where t is not null and not exists (select 1 from event_terms where term = x.t)
order by t
on conflict (term) do nothing;

-- name: move-staged
-- Step 1. Only rows new to the database go into the delta: a retried batch or a journal
-- replay adds nothing. Each new event takes this transaction's id as its `xid` (the
-- column's default), which places it in the pull stream and the webhook queues
-- (sql/0020_event_order.sql); a replayed one keeps its own. $1, $2: the trigger reasons and their windows; $3: the honeypot
-- link's url id. The short texts are stored as their event_terms codes, which the delta
-- keeps: only the dimension rollup needs the texts, per value rather than per event. A
-- text with no code yet stops the statement (tracker_new_term; store/lanes.py then adds
-- it with add-event-terms and writes the batch again).
with new as (
    insert into events (account_id, occurred_at, id, campaign_id, message_id, type,
                        link_position, url_id, machine, reason, country, region, city,
                        browser, os, device, client, ip)
    select s.account_id, timestamptz 'epoch' + s.at_us * interval '1 microsecond', s.id,
           s.campaign_id, s.message_id, s.type, s.link_position, s.url_id, s.machine,
           coalesce(reason.code, tracker_new_term(s.reason)), s.country,
           coalesce(region.code, tracker_new_term(s.region)), s.city,
           coalesce(browser.code, tracker_new_term(s.browser)),
           coalesce(os.code, tracker_new_term(s.os)),
           coalesce(device.code, tracker_new_term(s.device)),
           coalesce(client.code, tracker_new_term(s.client)), s.ip
    from events_staging s
    left join event_terms reason on reason.term = s.reason
    left join event_terms region on region.term = s.region
    left join event_terms browser on browser.term = s.browser
    left join event_terms os on os.term = s.os
    left join event_terms device on device.term = s.device
    left join event_terms client on client.term = s.client
    -- key order: see Concurrency in store/rollups.py
    order by s.account_id, s.message_id, s.at_us, s.id
    on conflict do nothing
    returning account_id, campaign_id, message_id, occurred_at, type, url_id, country, region,
              browser, os, device, client, reason, id, machine,
              type = 'click'
              and reason = any(array(select code from event_terms where term = any($1::text[])))
              and (reason is distinct from (select code from event_terms where term = 'honeypot')
                   or url_id = $3) as is_trigger
),
triggers as (
    insert into relabel_triggers (account_id, message_id, occurred_at, id, reason, since, until)
    select n.account_id, n.message_id, n.occurred_at, n.id, t.term,
           n.occurred_at - w.span, n.occurred_at + w.span
    from new n
    join event_terms t on t.code = n.reason
    join unnest($1::text[], $2::interval[]) w (reason, span) on w.reason = t.term
    where n.is_trigger
    on conflict do nothing
)
insert into events_staging_delta (account_id, campaign_id, message_id, occurred_at, type,
                                  url_id, country, region, browser, os, device, client, reason,
                                  machine, n, is_trigger, relabel)
select account_id, campaign_id, message_id, occurred_at, type, url_id, country, region,
       browser, os, device, client, reason, machine, 1, is_trigger, false
from new;

-- name: roll-up-messages
-- Step 2 (and again after step 3). $1: the delta rows of step 1 (false) or of step 3
-- (true). Every message of the batch is upserted, a machine's hit too (its machine
-- counts): so is a trigger's message, and that row lock is what orders re-labels (see
-- Concurrency in store/rollups.py).
with md as (
    select account_id, message_id, min(campaign_id) as campaign_id,
           coalesce(sum(n) filter (where type = 'open' and not machine), 0) as opens,
           coalesce(sum(n) filter (where type = 'click' and not machine), 0) as clicks,
           tracker_quarter(min(occurred_at) filter (where not machine)) as opened_in,
           tracker_quarter(min(occurred_at) filter (where type = 'click' and not machine))
               as clicked_in,
           coalesce(sum(n) filter (where type = 'open' and reason = mpp.code), 0) as mpp,
           tracker_quarter(min(occurred_at) filter (where reason = mpp.code)) as mpp_in,
           coalesce(sum(n) filter (where type = 'open' and machine), 0) as machine_opens,
           coalesce(sum(n) filter (where type = 'click' and machine), 0) as machine_clicks
    from events_staging_delta
    -- The code of an Apple MPP prefetch's reason (none yet: no row has it).
    left join (select code from event_terms where term = 'apple_mpp') mpp on true
    where relabel = $1
    group by account_id, message_id
),
m as (
    insert into rollup_message as r (account_id, message_id, campaign_id, opens, clicks,
                                     opened_in, clicked_in, mpp, machine_opens,
                                     machine_clicks)
    select account_id, message_id, campaign_id, opens, clicks, opened_in, clicked_in, mpp,
           machine_opens, machine_clicks
    from md order by account_id, message_id
    on conflict (account_id, message_id) do update set
        opens = r.opens + excluded.opens,
        clicks = r.clicks + excluded.clicks,
        opened_in = case when r.opens + r.clicks > 0 then r.opened_in else excluded.opened_in end,
        clicked_in = case when r.clicks > 0 then r.clicked_in else excluded.clicked_in end,
        mpp = r.mpp + excluded.mpp,
        machine_opens = r.machine_opens + excluded.machine_opens,
        machine_clicks = r.machine_clicks + excluded.machine_clicks
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
insert into events_staging_marks (account_id, campaign_id, url_id, at, opened, clicked, mpp,
                                  mpp_opened)
select account_id, campaign_id, null::bigint, opened_in, opened, 0, 0, mpp_opened
from mt where opened <> 0 or mpp_opened <> 0
union all
select account_id, campaign_id, null::bigint, clicked_in, 0, clicked, 0, 0
from mt where clicked <> 0
union all
select account_id, campaign_id, null::bigint, mpp_in, 0, 0, mpp, 0 from mt where mpp <> 0;

-- name: roll-up-message-links
-- Step 2, after roll-up-messages, never in the same statement (see Concurrency in
-- store/rollups.py). $1 as there.
with ld as (
    select account_id, message_id, url_id, min(campaign_id) as campaign_id, sum(n) as clicks,
           tracker_hour(min(occurred_at)) as clicked_in
    from events_staging_delta
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
insert into events_staging_marks (account_id, campaign_id, url_id, at, opened, clicked, mpp,
                                  mpp_opened)
select l.account_id, l.campaign_id, l.url_id, l.clicked_in, 0,
       (l.clicks > 0)::int - (l.clicks - ld.clicks > 0)::int, 0, 0
from l join ld on ld.account_id = l.account_id and ld.message_id = l.message_id
              and ld.url_id = l.url_id
where (l.clicks > 0) <> (l.clicks - ld.clicks > 0);

-- name: relabel-near-triggers
-- Step 3. The triggers that matter are those with one of the batch's new clicks in their
-- window that is a victim (human) or the trigger itself. Older ones were settled when
-- written. The earliest trigger around a click names its reason. Each re-labelled click
-- adds two delta rows: -1 for the human click as it was (without a reason), +1 machine.
with clicks as (
    select distinct account_id, message_id, occurred_at from events_staging_delta
    where not relabel and type = 'click' and (not machine or is_trigger)
),
near as (
    select distinct on (e.account_id, e.message_id, e.occurred_at, e.id)
           e.account_id, e.message_id, e.occurred_at, e.id, t.reason
    from relabel_triggers t
    join events e on e.account_id = t.account_id and e.message_id = t.message_id
                 and e.occurred_at between t.since and t.until
    where exists (select 1 from clicks s
                  where s.account_id = t.account_id and s.message_id = t.message_id
                    and s.occurred_at between t.since and t.until)
      and e.type = 'click' and not e.machine
    order by e.account_id, e.message_id, e.occurred_at, e.id, t.occurred_at
),
moved as (
    update events e set machine = true, reason = tracker_term_code(near.reason)
    from near
    where e.account_id = near.account_id and e.message_id = near.message_id
      and e.occurred_at = near.occurred_at and e.id = near.id and not e.machine
    returning e.account_id, e.campaign_id, e.message_id, e.occurred_at, e.type, e.url_id,
              e.country, e.region, e.browser, e.os, e.device, e.client, e.reason, e.id,
              near.reason as reason_text
),
-- The outbox (sql/0011_webhooks.sql, sql/0020_event_order.sql): one re-label event per
-- message and reason, naming the events it changed.
logged as (
    insert into event_log (account_id, id, occurred_at, message_id, campaign_id, type, machine,
                           relabelled, reason)
    select account_id, gen_random_uuid(), now(), message_id, min(campaign_id), 'relabel', true,
           array_agg(id order by occurred_at, id), reason_text
    from moved group by account_id, message_id, reason_text
)
insert into events_staging_delta (account_id, campaign_id, message_id, occurred_at, type,
                                  url_id, country, region, browser, os, device, client, reason,
                                  machine, n, is_trigger, relabel)
select account_id, campaign_id, message_id, occurred_at, type, url_id, country, region,
       browser, os, device, client, null::smallint, false, -1, false, true
from moved
union all
select account_id, campaign_id, message_id, occurred_at, type, url_id, country, region,
       browser, os, device, client, reason, true, 1, false, true
from moved;

-- name: roll-up-campaigns
-- Step 4: the rows every transaction of a campaign shares, last, in one statement.
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
        from events_staging_delta
        union all
        select account_id, campaign_id, at, 0, 0, 0, 0, opened, clicked, mpp, mpp_opened
        from events_staging_marks where url_id is null
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
        from events_staging_delta where type = 'click' and url_id is not null
        union all
        select account_id, campaign_id, url_id, at, 0, 0, clicked
        from events_staging_marks where url_id is not null
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
-- One pass with a grouping set per dimension over the codes; in the set of a dimension the
-- others are null, so the first code not null is its own. A third cheaper than making a
-- row per dimension of each event to group (lateral values). Then each value's text (a
-- missing value is the key 'unknown'), and the groups again: a null and a stored
-- 'unknown' are one key.
select account_id, campaign_id, type, dimension,
       coalesce(case when dimension = 'country' then g.country else t.term end, 'unknown'),
       sum(humans), sum(machines)
from (select account_id, campaign_id, type,
             case when grouping(country) = 0 then 'country' when grouping(region) = 0
                  then 'region' when grouping(browser) = 0 then 'browser'
                  when grouping(os) = 0 then 'os' when grouping(device) = 0 then 'device'
                  when grouping(client) = 0 then 'client' else 'reason' end as dimension,
             country, coalesce(region, browser, os, device, client, reason) as code,
             coalesce(sum(n) filter (where not machine), 0) as humans,
             coalesce(sum(n) filter (where machine), 0) as machines
      from events_staging_delta
      group by account_id, campaign_id, type,
               grouping sets (country, region, browser, os, device, client, reason)) g
left join event_terms t on t.code = g.code
group by 1, 2, 3, 4, 5
order by 1, 2, 3, 4, 5
on conflict (account_id, campaign_id, type, dimension, value) do update set
    humans = r.humans + excluded.humans,
    machines = r.machines + excluded.machines;
