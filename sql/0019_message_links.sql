-- tracker schema, version 19: a registered message's links in its own row, and narrower
-- message indexes.
--
-- A link was a row of `links` (account_id, message_id, position, url_id) with a primary key
-- of its own: ~101 bytes a link, five times the message's own bytes for a message with five
-- links. Nothing finds a link but by its message: the click token carries the url id and
-- the position, so the hot path never reads links; the recipient's export and the erasure's
-- count read one message's links; a destination merged into its redacted form
-- (privacy/data_subjects.py) is replaced in its campaign's messages. So a message keeps its
-- links as `url_ids`, the url id of the link at position p in url_ids[p + 1], null where
-- the link at that position is not tracked, the whole column null when none is: ~8 bytes a
-- link and 24 for the array.
--
-- The message indexes are keyed without account_id where the other key is unique across
-- accounts already (campaign ids and message ids come from one sequence each, a recipient
-- key is made with the account's own secret): every query names the account as well, which
-- the index scan checks on the row. They are not unique, so Citus's rule that keys include
-- the distribution column does not apply.
-- - messages_campaign_id (campaign_id, id): a campaign's messages in id order (the lists'
--   cursor), retention and purge.
-- - messages_recipient_key (recipient_key): a recipient's messages (erasure, opt-out,
--   export); B-tree deduplication keeps a recipient with many messages once.
-- - messages_unkeyed (account_id) where recipient_key is null: the messages registered
--   before recipient keys existed, which the same queries find by their address.
--
-- Every existing message is rewritten once with its links; the old row versions' space is
-- reused by new messages once (auto)vacuum has seen it, or returned by VACUUM FULL.

alter table messages add column url_ids bigint[];

with by_message as (
    select account_id, message_id, max(position) as last,
           array_agg(position) as positions, array_agg(url_id) as url_ids
    from links group by account_id, message_id
)
update messages m set url_ids = (
    select array_agg(l.url_id order by p)
    from generate_series(0, b.last) p
    left join unnest(b.positions, b.url_ids) as l (position, url_id) on l.position = p)
from by_message b
where m.account_id = b.account_id and m.id = b.message_id;

drop table links;

drop index messages_campaign_id;
create index messages_campaign_id on messages (campaign_id, id);
drop index messages_recipient_key;
create index messages_recipient_key on messages (recipient_key);
create index messages_unkeyed on messages (account_id) where recipient_key is null;
