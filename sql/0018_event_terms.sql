-- tracker schema, version 18: an event's short texts stored as two-byte codes, and one index
-- fewer.
--
-- reason, region, browser, os, device and client take a few dozen distinct values (a few
-- thousand for regions) over millions of events; stored as text they were ~31 bytes of a
-- ~137-byte row. Each is now a code into event_terms, one dictionary for all six (the
-- writer adds a batch's new values before it stores the batch: sql/writer.sql). What
-- reads events as they were reads `events_decoded`, the same columns in the same order
-- with the texts back; its joins are left joins on a unique key, so PostgreSQL leaves out
-- those a query does not read. `type` (two values, checked), `country` (two letters) and `city` (too many
-- values for a two-byte code) stay text.
--
-- The primary key leads with the message: (account_id, message_id, occurred_at, id). It
-- still makes a replayed event land once, and it serves what events_message served (one
-- message's events: the API, erasure, a recipient's export, the re-label of clicks near a
-- trigger), so that index goes (~31 bytes an event). Reading an account's events in time
-- order (a webhook replay) goes by a BRIN index on the time instead (a few bytes per
-- thousand events: the writer stores rows about in time order), an hour at a time
-- (tracker_events_after).
--
-- Every partition is written again, in this migration's transaction.

alter table events drop constraint events_pkey;
drop index events_message;

create table event_terms (
    code  smallint generated always as identity primary key,
    term  text not null unique
);

insert into event_terms (term)
select distinct t
from events, unnest(array[reason, region, browser, os, device, client]) t
where t is not null
order by 1;

-- The code of a stored text (null for null). For the few rows a statement encodes one by
-- one (a re-label's reason); a batch joins event_terms instead.
create function tracker_term_code(t text) returns smallint
language sql stable parallel safe
return (select code from event_terms where term = t);

-- What the writer's move-staged calls for a text event_terms does not hold: it stops the
-- statement (SQLSTATE TRK01), and the writer adds the batch's new texts and writes it again
-- (store/lanes.py). Strict: a null stays null.
create function tracker_new_term(t text) returns smallint
language plpgsql strict as $$
begin
    raise exception 'no event_terms code for %', t using errcode = 'TRK01';
end;
$$;

alter table events
    alter column reason type smallint using tracker_term_code(reason),
    alter column region type smallint using tracker_term_code(region),
    alter column browser type smallint using tracker_term_code(browser),
    alter column os type smallint using tracker_term_code(os),
    alter column device type smallint using tracker_term_code(device),
    alter column client type smallint using tracker_term_code(client);

alter table events add primary key (account_id, message_id, occurred_at, id);
create index events_occurred on events using brin (occurred_at);

-- An account's next `n` events after (after_at, after_id) and before `until`, in time order:
-- the rows of an hour at a time by events_occurred, an hour with none doubling the next
-- span, so a range without events is crossed in a few steps.
create function tracker_events_after(account bigint, after_at timestamptz, after_id uuid,
                                     until timestamptz, n integer)
returns setof events
language plpgsql stable as $$
declare
    start timestamptz := after_at;
    stop timestamptz;
    span interval := interval '1 hour';
    got integer := 0;
    found_now integer;
begin
    while got < n and start < until loop
        stop := least(start + span, until);
        return query
            select * from events e
            where e.account_id = account and e.occurred_at >= start and e.occurred_at < stop
              and (e.occurred_at, e.id) > (after_at, after_id)
            order by e.occurred_at, e.id
            limit n - got;
        get diagnostics found_now = row_count;
        got := got + found_now;
        span := case when found_now = 0 then span * 2 else interval '1 hour' end;
        start := stop;
    end loop;
end;
$$;

create view events_decoded as
select e.account_id, e.occurred_at, e.id, e.campaign_id, e.message_id, e.type,
       e.link_position, e.url_id, e.machine, reason.term as reason, e.country,
       region.term as region, e.city, browser.term as browser, os.term as os,
       device.term as device, e.ip, client.term as client
from events e
left join event_terms reason on reason.code = e.reason
left join event_terms region on region.code = e.region
left join event_terms browser on browser.code = e.browser
left join event_terms os on os.code = e.os
left join event_terms device on device.code = e.device
left join event_terms client on client.code = e.client;
