-- tracker schema, version 5: the mail client, machine counts by reason, and what the
-- MPP-adjusted open rate needs.
--
-- events.client: the mail client the hit's agent names ('Apple Mail', 'Gmail', 'Outlook',
-- 'Yahoo Mail', 'Thunderbird', 'webmail', 'other'); null where the policy keeps no device
-- data, as browser, os and device.
alter table events add column client text;

-- Two more breakdown dimensions: the mail client, and the reason a rule gave (the report's
-- machine_by_reason reads the machines of the `reason` rows).
alter table rollup_dimension drop constraint rollup_dimension_dimension_check;
alter table rollup_dimension add constraint rollup_dimension_dimension_check
    check (dimension in ('country', 'region', 'browser', 'os', 'device', 'client', 'reason'));

-- Per message: Apple MPP prefetches (machine opens with reason apple_mpp). A message with
-- one has its opens hidden behind Apple's proxy.
alter table rollup_message add column mpp bigint not null default 0;

-- Per campaign bucket, as `opened`: messages that became MPP-prefetched (`mpp`), and
-- messages that are both MPP-prefetched and opened by a reader (a click proves it;
-- `mpp_opened`). Their sums are what the MPP-adjusted open rate needs.
alter table rollup_campaign add column mpp bigint not null default 0,
                            add column mpp_opened bigint not null default 0;

-- Every event counted so far has no mail client: the `client` breakdown starts with them
-- all as "unknown" (every event is in exactly one `device` row, so those sum them).
insert into rollup_dimension (account_id, campaign_id, type, dimension, value, humans, machines)
select account_id, campaign_id, type, 'client', 'unknown', sum(humans), sum(machines)
from rollup_dimension
where dimension = 'device'
group by account_id, campaign_id, type;

-- What the events still stored say of the other new columns. Counts whose events retention has
-- already dropped stay without a reason (the report shows them as "unknown").
insert into rollup_dimension as r (account_id, campaign_id, type, dimension, value, humans,
                                   machines)
select account_id, campaign_id, type, 'reason', coalesce(reason, 'unknown'),
       count(*) filter (where not machine), count(*) filter (where machine)
from events
group by account_id, campaign_id, type, coalesce(reason, 'unknown')
on conflict (account_id, campaign_id, type, dimension, value) do update set
    humans = r.humans + excluded.humans, machines = r.machines + excluded.machines;

with prefetched as (
    select account_id, message_id, min(campaign_id) as campaign_id, count(*) as mpp,
           tracker_quarter(min(occurred_at)) as first_at
    from events
    where type = 'open' and machine and reason = 'apple_mpp'
    group by account_id, message_id
),
counted as (
    insert into rollup_message as r (account_id, message_id, campaign_id, mpp)
    select account_id, message_id, campaign_id, mpp from prefetched
    on conflict (account_id, message_id) do update set mpp = excluded.mpp
    returning account_id, message_id, campaign_id, opens + clicks > 0 as opened, opened_in
)
insert into rollup_campaign as r (account_id, campaign_id, bucket, mpp, mpp_opened)
select c.account_id, c.campaign_id, coalesce(c.opened_in, p.first_at), count(*),
       count(*) filter (where c.opened)
from counted c
join prefetched p on p.account_id = c.account_id and p.message_id = c.message_id
group by 1, 2, 3
on conflict (account_id, campaign_id, bucket) do update set
    mpp = r.mpp + excluded.mpp, mpp_opened = r.mpp_opened + excluded.mpp_opened;
