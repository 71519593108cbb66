-- Two writers meeting a new day at once: both can pass the to_regclass check before
-- either holds the advisory lock's transaction long enough, and the loser's CREATE
-- failed with duplicate_table (its batch was retried, but it was an error every UTC
-- midnight with several workers). Now that case is simply "already there".
create or replace function tracker_ensure_event_partition(day date) returns void
language plpgsql as $$
declare
    name text := format('events_%s', to_char(day, 'YYYYMMDD'));
begin
    if to_regclass(name) is not null then
        return;
    end if;
    perform pg_advisory_xact_lock(hashtext('tracker_ensure_event_partition'));
    if to_regclass(name) is null then
        execute format(
            'create table %I partition of events for values from (%L) to (%L)',
            name, (day::timestamp at time zone 'UTC'), ((day + 1)::timestamp at time zone 'UTC'));
    end if;
exception
    when duplicate_table then
        null;
end;
$$;
