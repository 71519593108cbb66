-- tracker schema, version 20: an event is its own outbox row.
--
-- The outbox (sql/0011_webhooks.sql) held a row for every stored open and click, a pointer
-- to the event with what delivery filters on, in the transaction that stored the event:
-- ~197 bytes an event, as much as the event itself. An event now carries its writing
-- transaction's id (`xid`, xid8, pg_current_xact_id() by default, so the writer's insert
-- sets it), and an index per partition, events_stream (account_id, xid), serves the pull
-- stream and the webhook queues: they read `events` and `event_log` together in (xid, id)
-- order, with the same cursor and the same rule (only transactions older than every one
-- still running: sql/webhooks.sql, stream-events). A transaction stores a batch of an
-- account's events, all with one xid, so B-tree deduplication keeps each (account, xid)
-- once with a list of row pointers: ~10 bytes an event, where (account_id, xid, id), every
-- entry unique, took ~67; a page is read a transaction at a time and sorted by id, which
-- costs the stream a second look at the index. `event_log` keeps the re-labels, a few in a
-- thousand events, and their index by message serves the stream's question "was this
-- click human when it was stored" (a re-label makes only human clicks machine) and
-- erasure.
--
-- Each event gets the xid of its outbox row: the stream after this migration is the
-- stream before it, the same rows in the same order under the same cursors. An event with
-- no outbox row was stored before sql/0011_webhooks.sql and never was in the stream; its
-- `xid` stays null, which no cursor comparison takes, so it stays out of it (the xid of
-- this migration would put every such event, however old, in front of every live webhook
-- queue and every pull reader at once).
--
-- Every event is written again (its new column), in this migration's transaction; the old
-- row versions' space is reused by new events once (auto)vacuum has seen it. Meanwhile
-- `events` is locked: the writer waits, the tracking path does not (its events wait in the
-- writer's buffer and journal).

alter table events add column xid xid8;

update events e set xid = l.xid
from event_log l
where l.account_id = e.account_id and l.message_id = e.message_id
  and l.occurred_at = e.occurred_at and l.id = e.id and l.type <> 'relabel';

alter table events alter column xid set default pg_current_xact_id();
create index events_stream on events (account_id, xid) with (deduplicate_items = on);

delete from event_log where type <> 'relabel';
alter table event_log drop constraint event_log_type_check;
alter table event_log add constraint event_log_type_check check (type = 'relabel');
create index event_log_message on event_log (account_id, message_id);
