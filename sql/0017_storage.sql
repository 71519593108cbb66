-- tracker schema, version 17: fewer bytes per event and per registered message, in indexes.
--
-- Reports read only rollups; what reads `events` is one message's events (the API, erasure,
-- a recipient's export, the re-label of clicks near a trigger: events_message), one
-- campaign's (the campaign export, retention per campaign, a destination's redaction:
-- events_campaign), and an account's in time order (the primary key, which also makes a
-- replayed event land once). tests/test_storage.py EXPLAINs the campaign's queries.
--
-- - events_campaign keyed (account_id, campaign_id) without the time: a campaign has
--   thousands to millions of events, so B-tree deduplication keeps each key once with a
--   list of row pointers, ~7 bytes an event instead of ~65 (the time made every entry
--   unique). The campaign export sorts its rows by time instead of reading them in order,
--   and retention's skip scan of the (account, campaign) pairs reads the same index.
-- - messages_recipient (account_id, recipient) goes: no query finds messages by the stored
--   address as it is (a recipient's messages are found by recipient_key, or by
--   lower(recipient) for messages registered before keys existed, which this index never
--   served), and it was an eighth of a registered message's bytes.
--
-- Each index is built again over the events already stored, partition by partition.

drop index events_campaign;
create index events_campaign on events (account_id, campaign_id)
    with (deduplicate_items = on);

drop index messages_recipient;
