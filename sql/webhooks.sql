-- Named queries of events out: webhook endpoints, their delivery queues and log, and the
-- pull stream (sql/0011_webhooks.sql; tracker/store/webhooks.py, tracker/store/outbox.py).

-- name: create-webhook
-- With its live queues, one per lane, starting at the events stored from now on: every
-- row of a transaction older than the oldest one still running is already stored.
with w as (
    insert into webhook_endpoints (account_id, url, events, campaign_id, machine, concurrency,
                                   secret)
    values ($1, $2, $3::text[], $4, $5, $6, $7)
    returning *
),
q as (
    insert into webhook_queues (account_id, endpoint_id, lane, after_xid)
    select w.account_id, w.id, lane, pg_snapshot_xmin(pg_current_snapshot())
    from w, generate_series(0, w.concurrency - 1) lane
)
select * from w;

-- name: list-webhooks
select * from webhook_endpoints where account_id = $1 and deleted_at is null order by id;

-- name: get-webhook
select * from webhook_endpoints where account_id = $1 and id = $2 and deleted_at is null;

-- name: update-webhook
-- Enabling an endpoint clears its disabled reason and retries its queues at once, from
-- where they stopped: what was stored meanwhile is delivered.
with w as (
    update webhook_endpoints set url = $3, events = $4::text[], campaign_id = $5, machine = $6,
        enabled = $7,
        disabled_reason = case when $7 then null else disabled_reason end,
        disabled_at = case when $7 then null else coalesce(disabled_at, now()) end,
        updated_at = now()
    where account_id = $1 and id = $2 and deleted_at is null
    returning *, (select not enabled from webhook_endpoints o
                  where o.account_id = $1 and o.id = $2) as was_disabled
),
q as (
    update webhook_queues q set attempts = 0, next_attempt_at = now(), failing_since = null
    from w where w.enabled and w.was_disabled
      and q.account_id = w.account_id and q.endpoint_id = w.id
)
select * from w;

-- name: rotate-webhook-secret
-- The old secret keeps signing beside the new one until $4.
update webhook_endpoints
set previous_secret = secret, previous_until = $4, secret = $3, updated_at = now()
where account_id = $1 and id = $2 and deleted_at is null
returning *;

-- name: delete-webhook
-- Its queues and its delivery log go with it (on delete cascade).
delete from webhook_endpoints where account_id = $1 and id = $2 returning id;

-- name: replay-webhook
-- A replay queue: the endpoint's events stored for times in [$3, $4), in time order.
insert into webhook_queues (account_id, endpoint_id, lane, replay, after_at, since, until)
select account_id, id, 0, true, $3::timestamptz - interval '1 microsecond', $3, $4
from webhook_endpoints where account_id = $1 and id = $2 and deleted_at is null
returning id, since, until;

-- name: webhook-stats
-- Per endpoint ($1: of one account, or null for all): events delivered, attempts failed,
-- queues retrying, how long the oldest queue has had events waiting, the last error.
select w.account_id, w.id, w.url, w.enabled, w.disabled_reason, w.delivered, w.failed,
       count(q.id) filter (where q.attempts > 0) as retrying,
       count(q.id) filter (where q.replay) as replays,
       coalesce(extract(epoch from now() - min(q.pending_since)), 0)::float8 as oldest_pending_s,
       (array_agg(q.last_error order by q.failing_since desc)
            filter (where q.last_error is not null))[1] as last_error
from webhook_endpoints w
left join webhook_queues q on q.account_id = w.account_id and q.endpoint_id = w.id
where w.deleted_at is null and ($1::bigint is null or w.account_id = $1)
group by w.account_id, w.id
order by w.account_id, w.id;

-- name: webhook-attempts
select at, webhook_id, events, status, duration_ms, error
from webhook_attempts where account_id = $1 and endpoint_id = $2
order by at desc limit $3;

-- name: lease-webhook-queues
-- Up to $1 queues that are due, for $2 seconds: another worker or node skips them (and
-- takes them over once the lease has run out, should this one die).
with due as (
    select q.account_id, q.endpoint_id, q.id
    from webhook_queues q
    join webhook_endpoints w on w.account_id = q.account_id and w.id = q.endpoint_id
    join accounts a on a.id = q.account_id
    where q.next_attempt_at <= now() and (q.leased_until is null or q.leased_until < now())
      and w.enabled and w.deleted_at is null and a.deleted_at is null
    order by q.next_attempt_at
    limit $1
    for update of q skip locked
)
update webhook_queues q
set leased_until = now() + $2 * interval '1 second', lease = q.lease + 1
from due, webhook_endpoints w
where q.account_id = due.account_id and q.endpoint_id = due.endpoint_id and q.id = due.id
  and w.account_id = q.account_id and w.id = q.endpoint_id
returning q.account_id, q.endpoint_id, q.id, q.lane, q.replay, q.after_xid, q.after_at,
          q.after_id, q.until, q.attempts, q.failing_since, q.lease, w.url, w.events,
          w.campaign_id, w.machine, w.concurrency, w.secret,
          case when w.previous_until > now() then w.previous_secret end as previous_secret;

-- name: stream-events
-- The next $4 rows of an account's log after (xid $2, id $3), in commit order, with each
-- event's stored fields: its events (their `xid`) and its re-labels (event_log), merged
-- (sql/0020_event_order.sql). `send`: the row is in the lane ($6 of $5 lanes: by message)
-- and passes the filter (types $7, campaign $8 or any, machine events $9, as each event
-- was stored: a click a re-label made machine later was stored human; a re-label goes to
-- endpoints of human events too: it takes back what they were sent), and its message is
-- still there, its recipient not opted out and not refusing consent to that kind of
-- event (a refusal holds for mail already sent). What erasure or retention removed is
-- not read at all. Rows not sent still move the cursor.
with scanned as (
    select * from (
        (select e.xid, e.id, e.type, e.occurred_at, e.message_id, e.campaign_id,
                null::uuid[] as relabelled, e.machine, e.reason as reason_code,
                null::text as relabel_reason, e.url_id, e.country, e.region, e.city,
                e.browser, e.os, e.device, e.client
         from events e
         where e.account_id = $1 and e.xid >= $2::xid8 and (e.xid, e.id) > ($2::xid8, $3::uuid)
           and e.xid < pg_snapshot_xmin(pg_current_snapshot())
           -- events_stream is keyed (account, xid) alone: the page's events are those of
           -- the transactions up to the one of the $4-th next event, in xid order.
           and e.xid <= (select max(n.xid) from (
                   select x.xid from events x
                   where x.account_id = $1 and x.xid >= $2::xid8
                     and (x.xid, x.id) > ($2::xid8, $3::uuid)
                     and x.xid < pg_snapshot_xmin(pg_current_snapshot())
                   order by x.xid
                   limit $4) n)
         order by e.xid, e.id
         limit $4)
        union all
        (select l.xid, l.id, l.type, l.occurred_at, l.message_id, l.campaign_id, l.relabelled,
                true, null::smallint, l.reason, null::bigint, null::text, null::smallint,
                null::text, null::smallint, null::smallint, null::smallint, null::smallint
         from event_log l
         where l.account_id = $1 and (l.xid, l.id) > ($2::xid8, $3::uuid)
           and l.xid < pg_snapshot_xmin(pg_current_snapshot())
         order by l.xid, l.id
         limit $4)
    ) u
    order by xid, id
    limit $4
)
select s.xid, s.id, s.type, s.occurred_at, s.message_id, s.campaign_id, s.relabelled,
       s.machine, coalesce(reason.term, s.relabel_reason) as reason,
       u.url, s.country, region.term as region, s.city, browser.term as browser,
       os.term as os, device.term as device, client.term as client,
       (s.message_id % $5 = $6 and s.type = any($7::text[])
        and ($8::bigint is null or s.campaign_id = $8)
        and ($9 or s.type = 'relabel' or not s.machine
             or exists (select 1 from event_log r
                        where r.account_id = $1 and r.message_id = s.message_id
                          and r.type = 'relabel' and s.id = any(r.relabelled)))
        and m.id is not null and not coalesce(r.opted_out, false)
        and not (s.type = 'open' and c.opens is false)
        and not (s.type = 'click' and c.clicks is false)) as send
from scanned s
-- The codes' texts (sql/0018_event_terms.sql).
left join event_terms reason on reason.code = s.reason_code
left join event_terms region on region.code = s.region
left join event_terms browser on browser.code = s.browser
left join event_terms os on os.code = s.os
left join event_terms device on device.code = s.device
left join event_terms client on client.code = s.client
left join urls u on u.account_id = $1 and u.id = s.url_id
left join messages m on m.account_id = $1 and m.id = s.message_id
left join recipient_suppressions r on r.account_id = m.account_id
                                  and r.recipient_key = m.recipient_key
left join recipient_consents c on c.account_id = m.account_id
                              and c.recipient_key = m.recipient_key
order by s.xid, s.id;

-- name: replay-events
-- The next $4 events of an account stored for times in [.., $5) after (time $2, id $3),
-- in time order, as stream-events gives them (filter: types $6, campaign $7, machine $8).
with scanned as (
    select * from tracker_events_after($1, $2, $3, $5, $4)  -- sql/0018_event_terms.sql
)
select null::xid8 as xid, s.id, s.type, s.occurred_at, s.message_id, s.campaign_id,
       null::uuid[] as relabelled, s.machine, reason.term as reason, u.url, s.country,
       region.term as region, s.city, browser.term as browser, os.term as os,
       device.term as device, client.term as client,
       (s.type = any($6::text[]) and ($7::bigint is null or s.campaign_id = $7)
        and ($8 or not s.machine) and m.id is not null
        and not coalesce(r.opted_out, false)
        and not (s.type = 'open' and c.opens is false)
        and not (s.type = 'click' and c.clicks is false)) as send
from scanned s
-- The codes' texts (sql/0018_event_terms.sql).
left join event_terms reason on reason.code = s.reason
left join event_terms region on region.code = s.region
left join event_terms browser on browser.code = s.browser
left join event_terms os on os.code = s.os
left join event_terms device on device.code = s.device
left join event_terms client on client.code = s.client
left join urls u on u.account_id = s.account_id and u.id = s.url_id
left join messages m on m.account_id = s.account_id and m.id = s.message_id
left join recipient_suppressions r on r.account_id = m.account_id
                                  and r.recipient_key = m.recipient_key
left join recipient_consents c on c.account_id = m.account_id
                              and c.recipient_key = m.recipient_key
order by s.occurred_at, s.id;

-- name: advance-webhook-queue
-- A delivery succeeded (or there was nothing to send): the cursor moves on, the errors are
-- forgotten. $8: keep the lease (more to send at once) or let it go until $9 seconds
-- from now; $10: events delivered; $11: whether events are left waiting. Nothing happens
-- unless the lease ($4) is still this worker's.
with q as (
    update webhook_queues
    set after_xid = coalesce($5, after_xid), after_at = coalesce($6, after_at), after_id = $7,
        attempts = 0, failing_since = null, last_error = null,
        leased_until = case when $8 then leased_until else null end,
        next_attempt_at = now() + $9 * interval '1 second',
        pending_since = case when $11 then coalesce(pending_since, now()) end
    where account_id = $1 and endpoint_id = $2 and id = $3 and lease = $4
    returning 1
),
w as (
    update webhook_endpoints set delivered = delivered + $10
    where account_id = $1 and id = $2 and $10 > 0 and exists (select 1 from q)
)
select count(*) from q;

-- name: fail-webhook-queue
-- A delivery failed: the cursor stays, the next attempt is $5 seconds from now.
with q as (
    update webhook_queues
    set attempts = attempts + 1, next_attempt_at = now() + $5 * interval '1 second',
        failing_since = coalesce(failing_since, now()), last_error = $6, leased_until = null,
        pending_since = coalesce(pending_since, now())
    where account_id = $1 and endpoint_id = $2 and id = $3 and lease = $4
    returning failing_since, attempts
),
w as (
    update webhook_endpoints set failed = failed + 1
    where account_id = $1 and id = $2 and exists (select 1 from q)
)
select failing_since, attempts from q;

-- name: release-webhook-queue
-- Given back (the worker stops): due again at once, for whichever worker is running.
update webhook_queues set leased_until = null
where account_id = $1 and endpoint_id = $2 and id = $3 and lease = $4;

-- name: finish-webhook-replay
delete from webhook_queues where account_id = $1 and endpoint_id = $2 and id = $3 and lease = $4;

-- name: disable-webhook
update webhook_endpoints set enabled = false, disabled_reason = $3, disabled_at = now(),
    updated_at = now()
where account_id = $1 and id = $2 and enabled;

-- name: record-webhook-attempt
insert into webhook_attempts (account_id, endpoint_id, webhook_id, events, status, duration_ms,
                              error)
values ($1, $2, $3, $4, $5, $6, $7);

-- name: forget-old-webhook-attempts
delete from webhook_attempts where at < $1;

-- name: erase-event-log
-- Erasure: the re-labels of the erased messages (their events went with erase-events).
delete from event_log where account_id = $1 and message_id = any($2::bigint[]);

-- name: forget-event-log
-- Retention removed events from $1 on (a partition dropped, or a campaign's rows deleted
-- in one): the re-labels that name none of the events left go too. A re-label is made at
-- or after the times of the clicks it names (when a click arrives), so only re-labels made
-- from $1 on can name a removed event. (An open's or a click's own log row is the event:
-- it goes with it.)
delete from event_log l
where l.type = 'relabel' and l.occurred_at >= $1
  and not exists (select 1 from events e
                  where e.account_id = l.account_id and e.message_id = l.message_id
                    and e.id = any(l.relabelled));
