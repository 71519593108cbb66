-- Named queries of the privacy lifecycle (docs/privacy.md), loaded once at start-up with
-- every other query file in sql/ by tracker/store/queries.py. A block that works on one
-- event partition names it `{table}`: an identifier cannot be a parameter, so
-- tracker.store.queries.for_table puts the partition's quoted name there.

-- name: registration-context
-- What registration needs beside the messages: the account's key for recipient keys and
-- pseudonyms, whether the campaign stores the address or the pseudonym, whether it requires
-- consent, and its link options.
select a.recipient_secret, c.policy_recipient, c.policy_consent_opens, c.policy_consent_clicks,
       c.options
from campaigns c join accounts a on a.id = c.account_id
where c.account_id = $1 and c.id = $2;

-- name: account-secret
select recipient_secret from accounts where id = $1;

-- name: account-settings
select id, name, created_at, retention_days, honour_privacy_signals
from accounts where id = $1 and deleted_at is null;

-- name: update-account-settings
update accounts set retention_days = $2, honour_privacy_signals = $3
where id = $1 and deleted_at is null
returning id, name, created_at, retention_days, honour_privacy_signals;

-- name: delete-account
update accounts set deleted_at = coalesce(deleted_at, now())
where id = $1 and purged_at is null
returning id, deleted_at, honour_privacy_signals;

-- name: restore-account
update accounts set deleted_at = null
where id = $1 and deleted_at is not null and purged_at is null
returning id, honour_privacy_signals;

-- name: restore-campaign
-- Within the grace period only: once the purge has claimed a campaign it cannot come back.
update campaigns set deleted_at = null, updated_at = now()
where account_id = $1 and id = $2 and deleted_at is not null and purged_at is null
returning *;

-- name: campaign-privacy
-- $1: the account, or null for any (the CLI, run by the operator).
select c.account_id, c.id, c.name, c.policy_location, c.policy_device, c.policy_ip,
       c.retention_days, c.policy_recipient, c.policy_consent_opens, c.policy_consent_clicks,
       a.retention_days as account_retention_days,
       a.honour_privacy_signals
from campaigns c join accounts a on a.id = c.account_id
where ($1::bigint is null or c.account_id = $1) and c.id = $2 and c.deleted_at is null;

-- name: account-exceptions
-- The accounts the privacy screen treats differently from the default: deleted ones
-- (including purged tombstones), and those that ignore Sec-GPC / DNT. Few rows.
select id, deleted_at is not null as disabled, honour_privacy_signals
from accounts
where deleted_at is not null or not honour_privacy_signals;

-- name: suppressions-since
-- The overlap re-reads a few rows so a transaction that committed late is not missed.
select account_id, recipient_key, opted_out, erased_through, consent_refused_opens,
       consent_refused_clicks, changed_at
from recipient_suppressions
where $1::timestamptz is null or changed_at > $1::timestamptz - interval '5 seconds';

-- name: opt-out
insert into recipient_suppressions as s (account_id, recipient_key, opted_out, opted_out_at)
values ($1, $2, true, now())
on conflict (account_id, recipient_key) do update set
    opted_out = true,
    opted_out_at = case when s.opted_out then s.opted_out_at else now() end,
    changed_at = now()
returning opted_out, opted_out_at, erased_through, erased_at;

-- name: opt-in
update recipient_suppressions set opted_out = false, opted_out_at = null, changed_at = now()
where account_id = $1 and recipient_key = $2
returning opted_out, opted_out_at, erased_through, erased_at;

-- name: mark-erased
-- erased_through: the highest message id handed out so far (last_value of the sequence),
-- so every message of the recipient registered before the erasure is covered, including
-- one whose registration has not committed yet.
insert into recipient_suppressions as s (account_id, recipient_key, erased_through, erased_at)
select $1, $2, last_value, now() from messages_id_seq
on conflict (account_id, recipient_key) do update set
    erased_through = greatest(s.erased_through, excluded.erased_through),
    erased_at = now(),
    changed_at = now()
returning opted_out, opted_out_at, erased_through, erased_at;

-- name: suppression-state
select opted_out, opted_out_at, erased_through, erased_at
from recipient_suppressions where account_id = $1 and recipient_key = $2;

-- name: recipient-messages
-- Candidates: by recipient key, or for messages registered before keys existed by the
-- address itself ($3, normalized). privacy.is_recipient rules out key collisions.
select id, campaign_id, recipient
from messages
where account_id = $1 and id <= $4
  and (recipient_key = $2 or (recipient_key is null and lower(recipient) = $3))
order by id;

-- name: erase-events
-- By the primary key of each partition (it leads with the message): no partition is
-- scanned whole.
delete from events where account_id = $1 and message_id = any($2::bigint[]);

-- name: erase-message-rollups
-- The per-message markers name the message; the campaign's totals and unique counts
-- (rollup_campaign, rollup_link, rollup_dimension) stay as they are: they are anonymous.
delete from rollup_message where account_id = $1 and message_id = any($2::bigint[]);

-- name: erase-message-link-rollups
delete from rollup_message_link where account_id = $1 and message_id = any($2::bigint[]);

-- name: erase-relabel-triggers
delete from relabel_triggers where account_id = $1 and message_id = any($2::bigint[]);

-- name: destinations-like
-- The account's destinations that may name an address ($2: an ILIKE pattern of a part of
-- it that no encoding changes); privacy_destinations.Redactor decides which do.
select id, campaign_id, url from urls where account_id = $1 and url ilike $2 order by id;

-- name: redact-destination
-- A destination that named an erased address gets its redacted text, unless its campaign
-- has that destination already (then it is merged into it: merge-destination).
update urls set url = $3
where account_id = $1 and id = $2
  and not exists (select 1 from urls o where o.account_id = $1 and o.campaign_id = $4
                  and o.url = $3)
returning id;

-- name: merge-destination
-- Everything that names destination $2 names $3 instead (the same campaign's redacted
-- form of it); the rollups' counts are added to its rows. Then delete-destination.
-- A destination is one campaign's ($4), so only that campaign's messages can link to it.
with links_moved as (
    update messages set url_ids = array_replace(url_ids, $2, $3)
    where account_id = $1 and campaign_id = $4 and url_ids @> array[$2::bigint]
),
events_moved as (
    update events set url_id = $3 where account_id = $1 and campaign_id = $4 and url_id = $2
),
link_rollups as (
    insert into rollup_link as r (account_id, campaign_id, url_id, hour, clicks,
                                  machine_clicks, clicked)
    select account_id, campaign_id, $3, hour, clicks, machine_clicks, clicked
    from rollup_link where account_id = $1 and campaign_id = $4 and url_id = $2
    order by hour
    on conflict (account_id, campaign_id, url_id, hour) do update set
        clicks = r.clicks + excluded.clicks,
        machine_clicks = r.machine_clicks + excluded.machine_clicks,
        clicked = r.clicked + excluded.clicked
),
message_link_rollups as (
    insert into rollup_message_link as r (account_id, message_id, url_id, campaign_id,
                                          clicks, clicked_in)
    select account_id, message_id, $3, campaign_id, clicks, clicked_in
    from rollup_message_link where account_id = $1 and url_id = $2
    order by message_id
    on conflict (account_id, message_id, url_id) do update set
        clicks = r.clicks + excluded.clicks,
        clicked_in = least(r.clicked_in, excluded.clicked_in)
)
select 1;

-- name: delete-destination
delete from rollup_link where account_id = $1 and url_id = $2;
delete from rollup_message_link where account_id = $1 and url_id = $2;
delete from urls where account_id = $1 and id = $2;

-- name: count-links
-- A message's tracked links: the url ids of messages.url_ids (null where not tracked).
select count(l.url_id)
from messages m cross join unnest(m.url_ids) as l (url_id)
where m.account_id = $1 and m.id = any($2::bigint[]);

-- name: erase-messages
-- Their links are in their rows (messages.url_ids).
delete from messages where account_id = $1 and id = any($2::bigint[]) returning campaign_id;

-- name: keep-message-counts
-- The delete trigger (sql/0002_rollups.sql) subtracts erased messages from the campaign's
-- message count; an erased recipient is still one the campaign was sent to, so the count
-- (and with it every rate) stays. $2: the campaign of each erased message.
insert into campaign_messages as c (account_id, campaign_id, shard, messages)
select $1, campaign_id, pg_backend_pid() % 16, count(*)
from unnest($2::bigint[]) as campaign_id
group by campaign_id order by campaign_id
on conflict (account_id, campaign_id, shard) do update set messages = c.messages + excluded.messages;

-- name: record-erasure
insert into erasures (account_id, recipient_key, erased_through, message_ids)
values ($1, $2, $3, $4::bigint[]);

-- name: mark-swept
update erasures set swept_at = now()
where account_id = $1 and recipient_key = $2 and erased_through = $3;

-- name: recent-erasures
select account_id, recipient_key, erased_through, message_ids
from erasures where erased_at > $1 order by account_id, id;

-- name: forget-old-erasures
delete from erasures where erased_at <= $1;

-- name: export-recipient-messages
select m.id, m.campaign_id, c.name as campaign_name, c.deleted_at as campaign_deleted_at,
       c.policy_recipient, m.recipient, m.subject, m.tags, m.metadata, m.sent_at, m.created_at,
       m.opens_tracked, m.clicks_tracked,
       r.opens as human_opens, r.clicks as human_clicks, r.opened_in, r.clicked_in,
       r.mpp as mpp_prefetches, r.machine_opens, r.machine_clicks
from messages m
join campaigns c on c.account_id = m.account_id and c.id = m.campaign_id
left join rollup_message r on r.account_id = m.account_id and r.message_id = m.id
where m.account_id = $1
  and (m.recipient_key = $2 or (m.recipient_key is null and lower(m.recipient) = $3))
order by m.id;

-- name: export-recipient-links
-- Each link with the per-(message, destination) rollup, which outlives the events.
-- The link at position p is messages.url_ids[p + 1]; an untracked position (null) has no url.
select m.id as message_id, (l.n - 1)::integer as position, u.url, r.clicks as human_clicks,
       r.clicked_in
from messages m
cross join unnest(m.url_ids) with ordinality as l (url_id, n)
join urls u on u.account_id = m.account_id and u.id = l.url_id
left join rollup_message_link r
    on r.account_id = m.account_id and r.message_id = m.id and r.url_id = l.url_id
where m.account_id = $1 and m.id = any($2::bigint[])
order by m.id, l.n;

-- name: export-recipient-events
-- Every stored field; the address with its prefix when the policy truncated it.
select e.id, e.message_id, e.type, e.occurred_at, e.link_position, u.url, e.machine, e.reason,
       e.country, e.region, e.city, e.browser, e.os, e.device, e.client, abbrev(e.ip) as ip
from events_decoded e
left join urls u on u.account_id = e.account_id and u.id = e.url_id
where e.account_id = $1 and e.message_id = any($2::bigint[])
order by e.occurred_at, e.id;

-- name: campaign-retention
-- Each campaign's retention in days: its policy's, else its account's default (null: keep).
select c.account_id, c.id, coalesce(c.retention_days, a.retention_days) as days
from campaigns c join accounts a on a.id = c.account_id;

-- name: event-partitions
select c.relname as name
from pg_inherits i join pg_class c on c.oid = i.inhrelid
where i.inhparent = 'events'::regclass
order by c.relname;

-- name: partition-campaigns
-- The (account, campaign) pairs with events in one partition: a skip scan of its
-- (account_id, campaign_id) index, one probe per pair, not a read of the partition.
with recursive pairs as (
    (select account_id, campaign_id from {table}
     order by account_id, campaign_id limit 1)
    union all
    select next.account_id, next.campaign_id
    from pairs, lateral (
        select account_id, campaign_id from {table} e
        where (e.account_id, e.campaign_id) > (pairs.account_id, pairs.campaign_id)
        order by e.account_id, e.campaign_id limit 1) next
)
select account_id, campaign_id from pairs;

-- name: delete-partition-batch
-- At most $4 of an account's rows (of campaign $2 if not null, older than $3 if not null)
-- from one partition: a batch of its own transaction, never an unbounded delete.
delete from {table} where ctid = any(array(
    select ctid from {table}
    where account_id = $1 and ($2::bigint is null or campaign_id = $2)
      and ($3::timestamptz is null or occurred_at < $3)
    limit $4));

-- name: drop-event-partition
-- Dropping a partition takes a brief exclusive lock on `events`, queued behind the
-- writers' open transactions; waiting longer than 5 s would stall the writers queued
-- behind it, so the lock is given up instead (and the rows deleted in batches). Run in a
-- transaction, with forget-partition-relabel-triggers.
set local lock_timeout = '5s';
drop table {table};

-- name: forget-partition-relabel-triggers
-- The re-label windows of a dropped day partition's clicks ($1 to $2).
delete from relabel_triggers where occurred_at >= $1 and occurred_at < $2;

-- name: expired-relabel-triggers
-- The re-label windows (store/rollups.py) of a campaign's clicks stored before $3 and on or
-- after $4: raw per-event rows like the events they came from, so they expire with them.
delete from relabel_triggers t
where t.account_id = $1 and t.occurred_at < $3 and t.occurred_at >= $4
  and t.message_id in (select id from messages where account_id = $1 and campaign_id = $2);

-- name: campaigns-to-purge
-- Deleted before $1 (the grace period ago), or claimed by a purge that did not finish.
select account_id, id from campaigns
where deleted_at is not null and purge_finished_at is null
  and (deleted_at <= $1 or purged_at is not null)
order by account_id, id;

-- name: claim-campaign-purge
-- From here on the campaign cannot be restored; a restore that got in first wins.
update campaigns set purged_at = coalesce(purged_at, now()), updated_at = now()
where account_id = $1 and id = $2 and deleted_at is not null and purge_finished_at is null
  and (deleted_at <= $3 or purged_at is not null)
returning id;

-- name: accounts-to-purge
select id from accounts
where deleted_at is not null and purge_finished_at is null
  and (deleted_at <= $1 or purged_at is not null)
order by id;

-- name: deleted-in-grace
-- What a purge as of a later time would take although it is still in its grace period:
-- deleted after $1 (the grace period before the real time) and on or before $2 (the grace
-- period before the time asked for), not claimed by a purge yet.
select 'account' as kind, id as account_id, null::bigint as campaign_id, name, deleted_at
from accounts
where deleted_at > $1 and deleted_at <= $2 and purged_at is null
union all
select 'campaign', account_id, id, name, deleted_at
from campaigns
where deleted_at > $1 and deleted_at <= $2 and purged_at is null
order by deleted_at, account_id, campaign_id nulls first;

-- name: claim-account-purge
update accounts set purged_at = coalesce(purged_at, now())
where id = $1 and deleted_at is not null and purge_finished_at is null
  and (deleted_at <= $2 or purged_at is not null)
returning id;

-- name: claim-account-campaigns
-- A purged account's campaigns go with it, whatever their own state.
update campaigns
set deleted_at = coalesce(deleted_at, now()), purged_at = coalesce(purged_at, now()),
    updated_at = now()
where account_id = $1 and purge_finished_at is null
returning id;

-- name: purge-campaign-data
-- Statements run in order, in one transaction, after the campaign's events are gone
-- (privacy/retention.py): one per table, in an order the foreign keys allow. Every table with a campaign_id
-- column is named here (tests/test_privacy.py checks it against the catalog).
delete from relabel_triggers
where account_id = $1 and message_id in (select id from messages
                                         where account_id = $1 and campaign_id = $2);
delete from messages where account_id = $1 and campaign_id = $2;
delete from urls where account_id = $1 and campaign_id = $2;
delete from rollup_campaign where account_id = $1 and campaign_id = $2;
delete from rollup_link where account_id = $1 and campaign_id = $2;
delete from rollup_dimension where account_id = $1 and campaign_id = $2;
delete from rollup_message where account_id = $1 and campaign_id = $2;
delete from rollup_message_link where account_id = $1 and campaign_id = $2;
delete from campaign_messages where account_id = $1 and campaign_id = $2;
delete from event_log where account_id = $1 and campaign_id = $2;
-- An endpoint that took this campaign's events only has nothing left to send.
delete from webhook_endpoints where account_id = $1 and campaign_id = $2;

-- name: finish-campaign-purge
-- The row stays as a tombstone with its policy and deleted_at: its links keep
-- redirecting and every worker's policy book keeps it not recording.
update campaigns set name = 'purged campaign', purge_finished_at = now(), updated_at = now()
where account_id = $1 and id = $2;

-- name: purge-account-data
delete from api_keys where account_id = $1;
delete from consent_history where account_id = $1;
delete from recipient_consents where account_id = $1;
delete from consent_wordings where account_id = $1;
delete from dashboard_signed_out where account_id = $1;
delete from recipient_suppressions where account_id = $1;
delete from erasures where account_id = $1;
delete from event_log where account_id = $1;
delete from webhook_endpoints where account_id = $1;

-- name: sign-out-session
insert into dashboard_signed_out (account_id, nonce, expires_at)
values ($1, $2, to_timestamp($3))
on conflict do nothing;

-- name: forget-expired-sign-outs
delete from dashboard_signed_out where expires_at < $1;

-- name: finish-account-purge
-- A new key: pseudonyms and recipient keys made under the old one can no longer be
-- recomputed from an address by anyone.
update accounts
set name = 'purged account', retention_days = null, purge_finished_at = now(),
    recipient_secret = uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid())
where id = $1;
