-- tracker schema, version 18: an event's short texts stored as two-byte codes.
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
-- Every partition is written again, in this migration's transaction.

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
