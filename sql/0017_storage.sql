-- tracker schema, version 17: fewer bytes per event in `events`' secondary indexes.
--
-- Reports read only rollups; what reads `events` is one message's events (the API, erasure,
-- a recipient's export, the re-label of clicks near a trigger: by message id), one
-- campaign's (the campaign export, retention per campaign, a destination's redaction: by
-- account and campaign), and an account's in time order (the primary key). Every such
-- query is named in benchmarks/storage.py, which EXPLAINs it against these indexes.
--
-- - events_campaign keyed (account_id, campaign_id) without the time: a campaign has
--   thousands to millions of events, so B-tree deduplication keeps each key once with a
--   list of row pointers, ~7 bytes an event instead of ~65 (the time made every entry
--   unique). The campaign export sorts its rows by time instead of reading them in order,
--   and retention's skip scan of the (account, campaign) pairs reads the same index.
-- - events_message keyed by message_id alone: message ids come from one sequence, so the
--   account adds nothing to finding a message's events (every query still filters on
--   account_id, checked on the row); ~27 bytes an event instead of ~37.
--
-- Each index is built again over the events already stored, partition by partition.

drop index events_campaign;
create index events_campaign on events (account_id, campaign_id)
    with (deduplicate_items = on);

drop index events_message;
create index events_message on events (message_id) with (deduplicate_items = on);
