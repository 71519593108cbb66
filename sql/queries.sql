-- Named queries, loaded once at start-up by tracker/queries.py. A name the code
-- expects but this file lacks (or the other way round) is a start-up error.

-- name: create-account
insert into accounts (name) values ($1) returning id, name, created_at;

-- name: create-api-key
insert into api_keys (account_id, key_id, secret_hash) values ($1, $2, $3);

-- name: api-key-hash
select k.secret_hash
from api_keys k join accounts a on a.id = k.account_id
where k.account_id = $1 and k.key_id = $2 and k.revoked_at is null and a.deleted_at is null;

-- name: create-campaign
insert into campaigns (account_id, name, policy_location, policy_device, policy_ip, retention_days)
values ($1, $2, $3, $4, $5, $6)
returning *;

-- name: list-campaigns
select * from campaigns where account_id = $1 and deleted_at is null order by id;

-- name: get-campaign
select * from campaigns where account_id = $1 and id = $2 and deleted_at is null;

-- name: update-campaign
update campaigns
set name = $3, policy_location = $4, policy_device = $5, policy_ip = $6, retention_days = $7,
    updated_at = now()
where account_id = $1 and id = $2 and deleted_at is null
returning *;

-- name: delete-campaign
update campaigns set deleted_at = now(), updated_at = now()
where account_id = $1 and id = $2 and deleted_at is null
returning *;

-- name: campaign-policies-since
-- The overlap re-reads a few rows so a transaction that committed late is not missed.
select account_id, id, policy_location, policy_device, policy_ip, retention_days,
       updated_at, deleted_at
from campaigns
where updated_at > $1::timestamptz - interval '5 seconds';

-- name: reserve-message-ids
select nextval('messages_id_seq') as id from generate_series(1, $1);

-- name: upsert-urls
with wanted as (select distinct unnest($3::text[]) as url),
inserted as (
    insert into urls (account_id, campaign_id, url)
    select $1, $2, url from wanted
    on conflict (account_id, campaign_id, url) do nothing
    returning id, url
)
select id, url from inserted
union all
select u.id, u.url from urls u join wanted w on w.url = u.url
where u.account_id = $1 and u.campaign_id = $2;

-- name: get-message
select id, campaign_id, recipient, subject, sent_at
from messages m
where m.account_id = $1 and m.id = $2
  and exists (select 1 from campaigns c
              where c.account_id = m.account_id and c.id = m.campaign_id and c.deleted_at is null);

-- name: message-events
select e.type, e.occurred_at, u.url, e.country, e.region, e.city, e.browser, e.os, e.device,
       e.machine, e.reason
from events e
left join urls u on u.account_id = e.account_id and u.id = e.url_id
where e.account_id = $1 and e.message_id = $2
order by e.occurred_at, e.id;

-- name: report-totals
select
    (select count(*) from messages where account_id = $1 and campaign_id = $2) as messages,
    count(*) filter (where type = 'open' and not machine) as opens,
    count(*) filter (where type = 'open' and machine) as machine_opens,
    count(*) filter (where type = 'click' and not machine) as clicks,
    count(*) filter (where type = 'click' and machine) as machine_clicks,
    count(distinct message_id) filter (where not machine) as unique_opens,
    count(distinct message_id) filter (where type = 'click' and not machine) as unique_clicks
from events
where account_id = $1 and campaign_id = $2;

-- name: report-links
select u.url,
       count(e.id) as clicks,
       count(distinct e.message_id) as unique_clicks
from urls u
left join events e
       on e.account_id = u.account_id and e.campaign_id = u.campaign_id and e.url_id = u.id
      and e.type = 'click' and not e.machine
where u.account_id = $1 and u.campaign_id = $2
group by u.url
order by clicks desc, u.url;

-- name: report-timeline
-- $3 is an IANA zone name: hours are that zone's hours.
select date_trunc('hour', occurred_at, $3) as hour,
       count(*) filter (where type = 'open') as opens,
       count(*) filter (where type = 'click') as clicks
from events
where account_id = $1 and campaign_id = $2 and not machine
group by 1
order by 1;

-- name: report-breakdown
select type,
       case when grouping(country) = 0 then 'country'
            when grouping(region) = 0 then 'region'
            when grouping(browser) = 0 then 'browser'
            when grouping(os) = 0 then 'os'
            else 'device' end as dimension,
       coalesce(country, region, browser, os, device, 'unknown') as key,
       count(*) as n
from events
where account_id = $1 and campaign_id = $2 and not machine
group by grouping sets ((type, country), (type, region), (type, browser), (type, os), (type, device))
order by type, dimension, n desc, key;
