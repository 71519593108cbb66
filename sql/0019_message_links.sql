-- tracker schema, version 19: a registered message's links in its own row, and narrower
-- message indexes.
--
-- A link was a row of `links` (account_id, message_id, position, url_id) with a primary key
-- of its own: ~101 bytes a link, for a message with five links two and a half times the
-- message's own bytes. Nothing finds a link but by its message: the click token carries the url id and
-- the position, so the hot path never reads links; the recipient's export and the erasure's
-- count read one message's links; a destination merged into its redacted form
-- (privacy/data_subjects.py) is replaced in its campaign's messages. So a message keeps its
-- links as `url_ids`, the url id of the link at position p in url_ids[p + 1], null where
-- the link at that position is not tracked, the whole column null when none is: ~8 bytes a
-- link and 24 for the array.
--
-- A recipient's messages (erasure, opt-out, export) are found by messages_recipient_key,
-- keyed by the recipient key alone (not account_id first): a key is made with the account's own secret, so it
-- names one account's messages already, and every query names the account as well, which
-- the scan checks on the row (the index is not unique: Citus's rule that keys include the
-- distribution column does not apply). B-tree deduplication keeps a recipient with many
-- messages once. The messages registered before recipient keys existed, which the same
-- queries find by their address, have an index of their own (messages_unkeyed), empty in a
-- database that never had them. messages_campaign_id keeps account_id: without it the
-- planner, taking account and campaign for independent, would read the account's part of
-- the primary key beside a campaign's messages.
--
-- Every existing message is rewritten once with its links, and the indexes built again
-- after it; the old row versions' space is reused by new messages once (auto)vacuum has
-- seen it, or returned by VACUUM FULL. Meanwhile `messages` is locked: registration and
-- what reads messages wait, the tracking path and the writer (which never read it) do not;
-- a million messages with five links each took 20 s on two busy cores.

alter table messages add column url_ids bigint[];
drop index messages_recipient_key;

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
reindex table messages;

create index messages_recipient_key on messages (recipient_key);
create index messages_unkeyed on messages (account_id) where recipient_key is null;
