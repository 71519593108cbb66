-- Distributes tracker's schema over a Citus cluster, by account.
--
-- Run on the coordinator, as the database owner, after `tracker migrate` has created
-- the schema there (and after the Citus extension is created and the workers added):
--
--   psql "$TRACKER_DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/citus/distribute.sql
--
-- Safe to run again: a table already distributed is left alone, so after a release
-- that adds a migration, run `tracker migrate` on the coordinator and then this file.
-- tests/test_citus_rules.py checks that it names every table the migrations create and
-- that the schema keeps Citus's rules (every primary, unique and foreign key includes
-- the distribution column). A table with data in it is copied to its shards; then run
-- truncate_local_data_after_distributing_table() on it to free the coordinator's copy.
--
-- The layout:
--   * every table with account_id is hash-distributed by it, and `accounts` by id, all
--     in one co-location group: one account's rows of every table live on the same
--     worker, so each query a request makes (they all filter on account_id) and every
--     foreign key stays on one node;
--   * global tables are reference tables (a copy on every node);
--   * sequences need nothing: Citus propagates a sequence used as a column default, the
--     coordinator hands out values as before, and a worker that runs an insert itself
--     takes them from a range of its own (the node id in the high bits), so ids stay
--     unique across the cluster. Event ids are UUIDv7s made by tracker.

do $$
begin
    if to_regproc('create_distributed_table') is null then
        raise exception 'not a Citus coordinator: create extension citus and add the workers first';
    end if;
end;
$$;

-- Fixed when the first table is distributed (changing it later rewrites every table).
-- Several shards per worker let the rebalancer spread accounts as workers are added:
-- 32 suits up to about 8 workers; raise it before the first run if you plan for more.
set citus.shard_count = 32;

-- `messages` carries statement triggers (sql/0002_rollups.sql keeps campaign_messages
-- with them). Citus distributes a table with triggers only with this set; the triggers
-- then fire on each shard, and their insert into the co-located campaign_messages
-- stays on the same worker.
set citus.enable_unsafe_triggers = on;

create or replace function pg_temp.distribute(tbl regclass, distribution_column text,
                                   colocate_with text) returns void
language plpgsql as $$
begin
    if not exists (select 1 from pg_dist_partition where logicalrelid = tbl) then
        perform create_distributed_table(tbl, distribution_column,
                                         colocate_with => colocate_with);
    end if;
end;
$$;

create or replace function pg_temp.reference(tbl regclass) returns void
language plpgsql as $$
begin
    if not exists (select 1 from pg_dist_partition where logicalrelid = tbl) then
        perform create_reference_table(tbl);
    end if;
end;
$$;

-- The anchor of the co-location group. Referenced tables come before the tables whose
-- foreign keys point at them: Citus refuses a foreign key to a table not yet distributed.
select pg_temp.distribute('accounts', 'id', 'none');
select pg_temp.distribute('api_keys', 'account_id', 'accounts');
select pg_temp.distribute('campaigns', 'account_id', 'accounts');
select pg_temp.distribute('messages', 'account_id', 'accounts');
select pg_temp.distribute('urls', 'account_id', 'accounts');
select pg_temp.distribute('campaign_messages', 'account_id', 'accounts');

-- Events are range-partitioned by day and distributed like the rest: Citus distributes
-- the partitioned table and every partition with it, and a partition created later
-- (tracker_ensure_event_partition, on the coordinator) is distributed as it is
-- created. Retention still drops whole partitions.
select pg_temp.distribute('events', 'account_id', 'accounts');
-- The dictionary of the events' short texts (sql/0018_event_terms.sql): small, read with
-- every account's events and written rarely, so a copy on every node.
select pg_temp.reference('event_terms');
select pg_temp.distribute('relabel_triggers', 'account_id', 'accounts');

-- Rollups (sql/0002_rollups.sql): the writer updates them in the transaction that
-- inserts the events they count, so they live beside those events.
select pg_temp.distribute('rollup_campaign', 'account_id', 'accounts');
select pg_temp.distribute('rollup_link', 'account_id', 'accounts');
select pg_temp.distribute('rollup_dimension', 'account_id', 'accounts');
select pg_temp.distribute('rollup_message', 'account_id', 'accounts');
select pg_temp.distribute('rollup_message_link', 'account_id', 'accounts');

-- Privacy (sql/0003_privacy.sql): suppressed recipients and recent erasures, per account.
select pg_temp.distribute('recipient_suppressions', 'account_id', 'accounts');
select pg_temp.distribute('erasures', 'account_id', 'accounts');
select pg_temp.distribute('dashboard_signed_out', 'account_id', 'accounts');

-- Consent (sql/0008_consent.sql): the wordings before the records that point at them.
select pg_temp.distribute('consent_wordings', 'account_id', 'accounts');
select pg_temp.distribute('recipient_consents', 'account_id', 'accounts');
select pg_temp.distribute('consent_history', 'account_id', 'accounts');
-- Events out (sql/0011_webhooks.sql, sql/0020_event_order.sql): the re-labels the writer
-- logs beside the events it stores, and each account's webhook endpoints, their delivery
-- queues and log. A reader of the stream orders events and re-labels by the writing
-- transaction's id, which is the id on the worker that holds the account: every query on
-- them names one account, so it runs there.
select pg_temp.distribute('event_log', 'account_id', 'accounts');
select pg_temp.distribute('webhook_endpoints', 'account_id', 'accounts');
select pg_temp.distribute('webhook_queues', 'account_id', 'accounts');
select pg_temp.distribute('webhook_attempts', 'account_id', 'accounts');

-- Global: which migrations ran. A copy on every node, so `tracker serve` (which applies
-- pending migrations first) finds the schema current whichever node it connects to.
-- New migrations are still applied on the coordinator only: DDL runs there.
select pg_temp.reference('schema_migrations');

-- Partitions ahead of time. tracker creates a day's partition when the first event of
-- that day arrives; that is DDL, which Citus runs only on the coordinator. If tracking
-- nodes write through workers, create them ahead instead, daily on the coordinator
-- (pg_cron: select cron.schedule('tracker-partitions', '17 3 * * *', $cron$ ... $cron$)
-- with the statement below):
select tracker_ensure_event_partition(day::date)
from generate_series(current_date - 1, current_date + 14, interval '1 day') as day;
