-- Named queries of recipient results (tracker/store/results.py): which messages of a
-- campaign were opened, clicked, not opened, and reports over a selection of its messages.
-- Loaded once at start-up as sql/queries.sql is.
--
-- Per-message counts come from the rollups (rollup_message, rollup_message_link), which
-- outlive retention; the mail client and the country come from the stored events, and are
-- gone with them.
--
-- The selection, in every query here: $1 account, $2 campaign; $3 a tag the message has,
-- $4 / $5 sent at or after / before (each null: any): tracker_selected_messages
-- (sql/0009_recipient_results.sql).

-- name: list-messages
-- $6 status: opened (a human open or click: a click proves the open), clicked, not_opened
-- (a pixel was handed out and no human open or click came; MPP prefetches are no opens),
-- machine_only (machine hits and no human one), untracked (no pixel handed out); null: all.
-- $7 a url id the message's reader clicked; $8 / $9: a reader's open or click with this
-- mail client / from this country among the stored events; $10 / $11: the recipient key of
-- an address / a pattern of the stored recipient; $12 the cursor (the last id of the page
-- before); $13 how many (null: all).
select m.id, m.recipient, m.subject, m.sent_at,
       coalesce(r.opens, 0) as opens, coalesce(r.clicks, 0) as clicks,
       coalesce(r.machine_opens + r.machine_clicks, 0) as machine
from messages m
left join rollup_message r on r.account_id = m.account_id and r.message_id = m.id
where m.account_id = $1 and m.campaign_id = $2
  and ($12::bigint is null or m.id > $12)
  and ($3::text is null or m.tags @> array[$3::text])
  and ($4::timestamptz is null or m.sent_at >= $4)
  and ($5::timestamptz is null or m.sent_at < $5)
  and (case $6::text
         when 'opened' then coalesce(r.opens + r.clicks, 0) > 0
         when 'clicked' then coalesce(r.clicks, 0) > 0
         when 'not_opened' then m.opens_tracked and coalesce(r.opens + r.clicks, 0) = 0
         when 'machine_only' then coalesce(r.opens + r.clicks, 0) = 0
                                  and coalesce(r.machine_opens + r.machine_clicks, 0) > 0
         when 'untracked' then not m.opens_tracked
         else true end)
  and ($7::bigint is null or exists (
        select 1 from rollup_message_link l
        where l.account_id = m.account_id and l.message_id = m.id and l.url_id = $7
          and l.clicks > 0))
  and ($8::text is null or m.id in (
        select e.message_id from events_decoded e
        where e.account_id = $1 and e.campaign_id = $2 and not e.machine and e.client = $8))
  and ($9::text is null or m.id in (
        select e.message_id from events e
        where e.account_id = $1 and e.campaign_id = $2 and not e.machine and e.country = $9))
  and ($10::bigint is null or m.recipient_key = $10 or m.recipient ilike $11)
order by m.id
limit $13;

-- name: selection-totals
-- What the report counts of the selected messages, from the per-message rollups.
with selected as (select id from tracker_selected_messages($1, $2, $3, $4, $5))
select count(*) as messages,
       coalesce(sum(r.opens), 0)::bigint as opens,
       coalesce(sum(r.machine_opens), 0)::bigint as machine_opens,
       coalesce(sum(r.clicks), 0)::bigint as clicks,
       coalesce(sum(r.machine_clicks), 0)::bigint as machine_clicks,
       count(*) filter (where r.opens + r.clicks > 0) as unique_opens,
       count(*) filter (where r.clicks > 0) as unique_clicks,
       count(*) filter (where r.mpp > 0) as mpp,
       count(*) filter (where r.mpp > 0 and r.opens + r.clicks > 0) as mpp_opened
from selected s
left join rollup_message r on r.account_id = $1 and r.message_id = s.id;

-- name: selection-links
-- Every destination of the campaign, with the selected messages' clicks on it.
with selected as (select id from tracker_selected_messages($1, $2, $3, $4, $5)),
l as materialized (
    select r.url_id, sum(r.clicks) as clicks, count(*) filter (where r.clicks > 0) as uniques
    from rollup_message_link r join selected s on s.id = r.message_id
    where r.account_id = $1
    group by r.url_id
)
select u.url, coalesce(l.clicks, 0)::bigint as clicks,
       coalesce(l.uniques, 0)::bigint as unique_clicks
from urls u
left join l on l.url_id = u.id
where u.account_id = $1 and u.campaign_id = $2
order by clicks desc, u.url;

-- name: selection-timeline
-- Readers' opens and clicks per hour of zone $6, from the stored events.
with selected as (select id from tracker_selected_messages($1, $2, $3, $4, $5))
select date_trunc('hour', e.occurred_at, $6) as hour,
       count(*) filter (where e.type = 'open') as opens,
       count(*) filter (where e.type = 'click') as clicks
from events e join selected s on s.id = e.message_id
where e.account_id = $1 and e.campaign_id = $2 and not e.machine
group by 1
order by 1;

-- name: selection-breakdown
-- Readers' events by each dimension's value, and machines' by reason, from the stored
-- events (a missing value is 'unknown', as in rollup_dimension).
with selected as (select id from tracker_selected_messages($1, $2, $3, $4, $5)),
e as (
    select e.type, e.machine,
           coalesce(e.country, 'unknown') as country, coalesce(e.region, 'unknown') as region,
           coalesce(e.browser, 'unknown') as browser, coalesce(e.os, 'unknown') as os,
           coalesce(e.device, 'unknown') as device, coalesce(e.client, 'unknown') as client,
           coalesce(e.reason, 'unknown') as reason
    from events_decoded e join selected s on s.id = e.message_id
    where e.account_id = $1 and e.campaign_id = $2
)
select type,
       case when grouping(country) = 0 then 'country' when grouping(region) = 0 then 'region'
            when grouping(browser) = 0 then 'browser' when grouping(os) = 0 then 'os'
            when grouping(device) = 0 then 'device' when grouping(client) = 0 then 'client'
            else 'reason' end as dimension,
       coalesce(country, region, browser, os, device, client, reason) as key,
       count(*) filter (where not machine) as humans,
       count(*) filter (where machine) as machines
from e
group by type, grouping sets (country, region, browser, os, device, client, reason);
