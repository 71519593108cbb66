-- Named queries of accounts, campaigns, registration, reports and exports, loaded once at
-- start-up with every other query file in sql/ by tracker/store/queries.py. A name the code
-- expects but no file defines, a name the code does not know, or one defined twice, is a
-- start-up error.

-- name: create-account
insert into accounts (name) values ($1) returning id, name, created_at;

-- name: create-campaign
insert into campaigns (account_id, name, policy_location, policy_device, policy_ip, retention_days,
                       policy_recipient, policy_consent_opens, policy_consent_clicks, tags,
                       metadata, options)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12::jsonb)
returning *;

-- name: list-campaigns
-- $2: a tag the campaign must have; $3, $4: created at or after / before (each null: any).
select * from campaigns
where account_id = $1 and deleted_at is null
  and ($2::text is null or tags @> array[$2::text])
  and ($3::timestamptz is null or created_at >= $3) and ($4::timestamptz is null or created_at < $4)
order by id;

-- name: get-campaign
select * from campaigns where account_id = $1 and id = $2 and deleted_at is null;

-- name: update-campaign
update campaigns
set name = $3, policy_location = $4, policy_device = $5, policy_ip = $6, retention_days = $7,
    policy_recipient = $8, policy_consent_opens = $9, policy_consent_clicks = $10, tags = $11,
    metadata = $12::jsonb, options = $13::jsonb, updated_at = now()
where account_id = $1 and id = $2 and deleted_at is null
returning *;

-- name: delete-campaign
update campaigns set deleted_at = now(), updated_at = now()
where account_id = $1 and id = $2 and deleted_at is null
returning *;

-- name: campaign-policies-since
-- The overlap re-reads a few rows so a transaction that committed late is not missed.
select account_id, id, policy_location, policy_device, policy_ip, retention_days,
       policy_recipient, policy_consent_opens, policy_consent_clicks, updated_at, deleted_at
from campaigns
where updated_at > $1::timestamptz - interval '5 seconds';

-- name: reserve-message-ids
select nextval('messages_id_seq') as id from generate_series(1, $1);

-- name: add-urls
-- Returns only the rows it inserted. A URL another transaction inserted concurrently is
-- skipped here and not visible to this statement's snapshot: find-urls, a statement of
-- its own, reads it once that transaction has committed.
insert into urls (account_id, campaign_id, url)
select $1, $2, url from unnest($3::text[]) as url
on conflict (account_id, campaign_id, url) do nothing
returning id, url;

-- name: find-urls
select id, url from urls where account_id = $1 and campaign_id = $2 and url = any($3::text[]);

-- name: get-message
select id, campaign_id, recipient, subject, sent_at, tags, metadata
from messages m
where m.account_id = $1 and m.id = $2
  and exists (select 1 from campaigns c
              where c.account_id = m.account_id and c.id = m.campaign_id and c.deleted_at is null);

-- name: message-events
select e.type, e.occurred_at, u.url, e.country, e.region, e.city, e.browser, e.os, e.device,
       e.client, e.machine, e.reason
from events_decoded e
left join urls u on u.account_id = e.account_id and u.id = e.url_id
where e.account_id = $1 and e.message_id = $2
order by e.occurred_at, e.id;

-- name: report-totals
-- Reports read only the rollups (sql/0002_rollups.sql), never `events`.
select
    (select coalesce(sum(messages), 0)::bigint from campaign_messages
     where account_id = $1 and campaign_id = $2) as messages,
    coalesce(sum(opens), 0)::bigint as opens,
    coalesce(sum(machine_opens), 0)::bigint as machine_opens,
    coalesce(sum(clicks), 0)::bigint as clicks,
    coalesce(sum(machine_clicks), 0)::bigint as machine_clicks,
    coalesce(sum(opened), 0)::bigint as unique_opens,
    coalesce(sum(clicked), 0)::bigint as unique_clicks,
    coalesce(sum(mpp), 0)::bigint as mpp,
    coalesce(sum(mpp_opened), 0)::bigint as mpp_opened
from rollup_campaign
where account_id = $1 and campaign_id = $2;

-- name: report-links
-- Every destination of the campaign, clicked or not. The honeypot link is none of them:
-- it has url id 0 and no row here (mail/registration.py), so it never appears. The rollup is
-- summed once, first (materialized): a plan that rescans it per url costs 25x as much.
with l as materialized (
    select url_id, sum(clicks) as clicks, sum(clicked) as unique_clicks
    from rollup_link
    where account_id = $1 and campaign_id = $2
    group by url_id
)
select u.url,
       coalesce(l.clicks, 0)::bigint as clicks,
       coalesce(l.unique_clicks, 0)::bigint as unique_clicks
from urls u
left join l on l.url_id = u.id
where u.account_id = $1 and u.campaign_id = $2
order by clicks desc, u.url;

-- name: report-timeline
-- $3 is an IANA zone name: hours are that zone's hours. Buckets are 15 minutes wide,
-- so this is exact in every zone whose offset is a multiple of 15 minutes.
select date_trunc('hour', bucket, $3) as hour,
       sum(opens)::bigint as opens,
       sum(clicks)::bigint as clicks
from rollup_campaign
where account_id = $1 and campaign_id = $2
group by 1
having sum(opens) + sum(clicks) > 0
order by 1;

-- name: report-breakdown
-- Human events by dimension value; for the `reason` dimension, machine events by reason.
select type, dimension, value as key,
       case when dimension = 'reason' then machines else humans end as n
from rollup_dimension
where account_id = $1 and campaign_id = $2
  and case when dimension = 'reason' then machines else humans end > 0
order by type, dimension, n desc, key;

-- name: export-campaign-events
-- Streamed through a cursor in the order stored; only what is stored (there is no
-- user-agent column to leak). The address keeps its prefix when it was truncated.
select e.id, e.type, e.occurred_at, e.message_id, m.recipient, e.link_position, u.url,
       e.machine, e.reason, e.country, e.region, e.city, e.browser, e.os, e.device, e.client,
       abbrev(e.ip) as ip
from events_decoded e
left join messages m on m.account_id = e.account_id and m.id = e.message_id
left join urls u on u.account_id = e.account_id and u.id = e.url_id
where e.account_id = $1 and e.campaign_id = $2
order by e.occurred_at, e.id;

-- name: campaign-messages
-- The campaign page's latest messages, newest first, with each one's human opens and clicks
-- and machine hits from the per-message rollup (kept after retention); $3: only ids below
-- it, $4: how many.
select m.id, m.recipient, m.subject, m.sent_at,
       coalesce(r.opens, 0) as opens, coalesce(r.clicks, 0) as clicks,
       coalesce(r.machine_opens + r.machine_clicks, 0) as machine
from messages m
left join rollup_message r on r.account_id = m.account_id and r.message_id = m.id
where m.account_id = $1 and m.campaign_id = $2 and ($3::bigint is null or m.id < $3)
order by m.id desc
limit $4;

-- name: ping
-- Readiness (web/health.py): PostgreSQL answers.
select 1;

-- Advisory locks, session-level: $1 is a constant of the code that takes it (migrations,
-- privacy maintenance), the same in every tracker process.

-- name: advisory-lock
select pg_advisory_lock($1);

-- name: try-advisory-lock
select pg_try_advisory_lock($1);

-- name: advisory-unlock
select pg_advisory_unlock($1);
