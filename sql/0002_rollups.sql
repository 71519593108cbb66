-- tracker schema, version 2: rollups, so reports never read raw events.
--
-- A report reads only these tables: its cost grows with the number of time buckets
-- and distinct values, not with events, and dropping old event partitions
-- (retention) leaves every total intact. The writer maintains them in the
-- transaction that moves a batch into `events`, from the rows that insert actually
-- added (`insert ... on conflict do nothing returning`), so a retried batch or a
-- replay never counts twice. Re-labelling (clicks near a honeypot or burst click
-- become machine) moves the counts of the re-labelled rows in the same transaction.
-- See tracker/store/rollups.py for the statements and the reasoning.
--
-- Counts are of human events unless the column says machine. Every primary key
-- starts with account_id, so the tables distribute by account on Citus as events do.
-- There are no foreign keys to campaigns (events have none either: a hit may come in
-- for a campaign this database has not heard of yet); whatever purges a campaign's
-- events purges these rows too.

-- The buckets. 15 minutes because every time zone in use today is offset from UTC by
-- a multiple of 15 minutes (Asia/Kolkata +05:30, Asia/Kathmandu +05:45, Australia/Eucla
-- +08:45), so an hour in any of them is an exact sum of whole buckets.
create function tracker_quarter(at timestamptz) returns timestamptz
language sql immutable parallel safe
return date_bin('15 minutes', at, timestamptz '2000-01-01 00:00:00+00');

create function tracker_hour(at timestamptz) returns timestamptz
language sql immutable parallel safe
return date_bin('1 hour', at, timestamptz '2000-01-01 00:00:00+00');

-- The small, hot tables leave room on each page so that updating a counter stays on its
-- page (a HOT update, no index entry), which keeps them compact under constant updates.

-- Per campaign and 15-minute bucket: the totals and the timeline.
-- `opened` / `clicked`: messages that became opened (a human open or a human click:
-- a click proves the open) / clicked while a row of this bucket was written. Their
-- sums over all buckets are the report's unique counts.
create table rollup_campaign (
    account_id      bigint not null,
    campaign_id     bigint not null,
    bucket          timestamptz not null,
    opens           bigint not null default 0,
    clicks          bigint not null default 0,
    machine_opens   bigint not null default 0,
    machine_clicks  bigint not null default 0,
    opened          bigint not null default 0,
    clicked         bigint not null default 0,
    primary key (account_id, campaign_id, bucket)
) with (fillfactor = 70);

-- Per destination (url id) and UTC hour: the link table. `clicked` as above, per
-- (message, url). The honeypot link has url id 0 and no row in `urls` (mail/registration.py),
-- so the report, which lists the campaign's urls, never shows it.
create table rollup_link (
    account_id      bigint not null,
    campaign_id     bigint not null,
    url_id          bigint not null,
    hour            timestamptz not null,
    clicks          bigint not null default 0,
    machine_clicks  bigint not null default 0,
    clicked         bigint not null default 0,
    primary key (account_id, campaign_id, url_id, hour)
) with (fillfactor = 70);

-- Per event type, dimension and stored value (a missing value is 'unknown', the report's
-- key for it): the breakdowns. No time column: a report wants totals, and thousands of
-- regions times days or hours would be what a report then has to add up.
create table rollup_dimension (
    account_id   bigint not null,
    campaign_id  bigint not null,
    type         text not null check (type in ('open', 'click')),
    dimension    text not null check (dimension in ('country', 'region', 'browser', 'os',
                                                    'device')),
    value        text not null,
    humans       bigint not null default 0,
    machines     bigint not null default 0,
    primary key (account_id, campaign_id, type, dimension, value)
) with (fillfactor = 70);

-- Per message: how many human opens and human clicks it has. These are the unique
-- markers: a message is opened while opens + clicks > 0 and clicked while clicks > 0.
-- Counts rather than first-event flags, so a re-label that takes a message's last
-- human click away is seen without reading raw events (which retention may have
-- dropped). `opened_in` / `clicked_in` name the rollup_campaign bucket that counted
-- the message, so taking it back subtracts from the same bucket.
create table rollup_message (
    account_id   bigint not null,
    message_id   bigint not null,
    campaign_id  bigint not null,
    opens        bigint not null default 0,
    clicks       bigint not null default 0,
    opened_in    timestamptz,
    clicked_in   timestamptz,
    primary key (account_id, message_id)
);

-- Per (message, url): human clicks; clicked while clicks > 0. `clicked_in` is the
-- rollup_link hour that counted it.
create table rollup_message_link (
    account_id   bigint not null,
    message_id   bigint not null,
    url_id       bigint not null,
    campaign_id  bigint not null,
    clicks       bigint not null default 0,
    clicked_in   timestamptz,
    primary key (account_id, message_id, url_id)
);

-- Messages per campaign, kept by a statement trigger on `messages` so a report does
-- not count a million rows. Sharded by backend so concurrent registrations into one
-- campaign do not queue on one row; a report sums the shards.
create table campaign_messages (
    account_id   bigint not null,
    campaign_id  bigint not null,
    shard        smallint not null,
    messages     bigint not null default 0,
    primary key (account_id, campaign_id, shard),
    foreign key (account_id, campaign_id) references campaigns (account_id, id) on delete cascade
);

create function tracker_count_messages() returns trigger
language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        insert into campaign_messages as c (account_id, campaign_id, shard, messages)
        select account_id, campaign_id, pg_backend_pid() % 16, count(*)
        from added group by account_id, campaign_id order by account_id, campaign_id
        on conflict (account_id, campaign_id, shard)
        do update set messages = c.messages + excluded.messages;
    else
        -- A campaign deleted outright takes its counts with it (cascade): nothing to subtract.
        insert into campaign_messages as c (account_id, campaign_id, shard, messages)
        select r.account_id, r.campaign_id, pg_backend_pid() % 16, -count(*)
        from removed r
        where exists (select 1 from campaigns k
                      where k.account_id = r.account_id and k.id = r.campaign_id)
        group by r.account_id, r.campaign_id order by r.account_id, r.campaign_id
        on conflict (account_id, campaign_id, shard)
        do update set messages = c.messages + excluded.messages;
    end if;
    return null;
end;
$$;

create trigger messages_counted_on_insert after insert on messages
    referencing new table as added for each statement execute function tracker_count_messages();
create trigger messages_counted_on_delete after delete on messages
    referencing old table as removed for each statement execute function tracker_count_messages();

-- Clicks that re-label the same message's human clicks from `since` to `until` as
-- machine (a hit on the honeypot link, url id 0; a click labelled burst), with the window
-- their rule gave them when they were stored. Small (one row per such hit), and it lets the writer find, for each
-- click it stores, whether one is near without probing every partition of `events`.
create table relabel_triggers (
    account_id   bigint not null,
    message_id   bigint not null,
    occurred_at  timestamptz not null,
    id           uuid not null,
    reason       text not null,
    since        timestamptz not null,
    until        timestamptz not null,
    primary key (account_id, message_id, occurred_at, id)
);

-- Whatever was written before this migration, rolled up by the same definitions.
insert into campaign_messages (account_id, campaign_id, shard, messages)
select account_id, campaign_id, 0, count(*) from messages group by account_id, campaign_id;

insert into rollup_message (account_id, message_id, campaign_id, opens, clicks, opened_in,
                            clicked_in)
select account_id, message_id, min(campaign_id),
       count(*) filter (where type = 'open'), count(*) filter (where type = 'click'),
       tracker_quarter(min(occurred_at)),
       tracker_quarter(min(occurred_at) filter (where type = 'click'))
from events where not machine
group by account_id, message_id;

insert into rollup_message_link (account_id, message_id, url_id, campaign_id, clicks, clicked_in)
select account_id, message_id, url_id, min(campaign_id), count(*), tracker_hour(min(occurred_at))
from events where not machine and type = 'click' and url_id is not null
group by account_id, message_id, url_id;

insert into rollup_campaign (account_id, campaign_id, bucket, opens, clicks, machine_opens,
                             machine_clicks, opened, clicked)
select account_id, campaign_id, bucket, sum(opens), sum(clicks), sum(machine_opens),
       sum(machine_clicks), sum(opened), sum(clicked)
from (
    select account_id, campaign_id, tracker_quarter(occurred_at) as bucket,
           (type = 'open' and not machine)::int as opens,
           (type = 'click' and not machine)::int as clicks,
           (type = 'open' and machine)::int as machine_opens,
           (type = 'click' and machine)::int as machine_clicks,
           0 as opened, 0 as clicked
    from events
    union all
    select account_id, campaign_id, opened_in, 0, 0, 0, 0, 1, 0 from rollup_message
    union all
    select account_id, campaign_id, clicked_in, 0, 0, 0, 0, 0, 1
    from rollup_message where clicks > 0
) x
group by account_id, campaign_id, bucket;

insert into rollup_link (account_id, campaign_id, url_id, hour, clicks, machine_clicks, clicked)
select account_id, campaign_id, url_id, hour, sum(clicks), sum(machine_clicks), sum(clicked)
from (
    select account_id, campaign_id, url_id, tracker_hour(occurred_at) as hour,
           (not machine)::int as clicks, machine::int as machine_clicks, 0 as clicked
    from events where type = 'click' and url_id is not null
    union all
    select account_id, campaign_id, url_id, clicked_in, 0, 0, 1 from rollup_message_link
) x
group by account_id, campaign_id, url_id, hour;

insert into rollup_dimension (account_id, campaign_id, type, dimension, value, humans,
                              machines)
select e.account_id, e.campaign_id, e.type, d.dimension, coalesce(d.value, 'unknown'),
       count(*) filter (where not e.machine), count(*) filter (where e.machine)
from events e
cross join lateral (values ('country', e.country), ('region', e.region),
                           ('browser', e.browser), ('os', e.os),
                           ('device', e.device)) d (dimension, value)
group by 1, 2, 3, 4, 5;

-- The packaged rules' windows (tracker/rules/default.toml): honeypot 30 s, burst 2 s.
insert into relabel_triggers (account_id, message_id, occurred_at, id, reason, since, until)
select e.account_id, e.message_id, e.occurred_at, e.id, e.reason,
       e.occurred_at - w.span, e.occurred_at + w.span
from events e
join (values ('honeypot', interval '30 seconds'), ('burst', interval '2 seconds')) w (reason, span)
  on w.reason = e.reason
where e.type = 'click' and (e.reason <> 'honeypot' or e.url_id = 0);
