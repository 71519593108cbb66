-- tracker schema, version 9: tags and metadata, and the per-message counts that list who
-- opened, who clicked and who did not (GET /api/campaigns/{id}/messages).
--
-- Tags and metadata: a few labels and a small flat object of the sender's own (an order
-- number, a template name, an A/B variant), checked by the API (web/filters.py): bounded
-- in size, so no message body fits.
alter table campaigns
    add column tags text[] not null default '{}',
    add column metadata jsonb not null default '{}';
alter table messages
    add column tags text[] not null default '{}',
    add column metadata jsonb not null default '{}';

-- Messages listed by campaign in id order (the cursor), without sorting the campaign.
create index messages_campaign_id on messages (account_id, campaign_id, id);
drop index messages_campaign;
create index campaigns_created on campaigns (account_id, created_at);

-- Machine opens and clicks per message, as the human ones are kept: a list of messages
-- shows them, and "machine only" (machine activity, no reader's) finds them, after
-- retention has dropped the events. The writer keeps them (store/rollups.py).
alter table rollup_message
    add column machine_opens bigint not null default 0,
    add column machine_clicks bigint not null default 0;

-- What the stored events say; where retention has dropped them, at least the MPP prefetches
-- counted so far (every one is a machine open).
with counted as (
    select account_id, message_id, min(campaign_id) as campaign_id,
           count(*) filter (where type = 'open') as machine_opens,
           count(*) filter (where type = 'click') as machine_clicks
    from events where machine
    group by account_id, message_id
)
insert into rollup_message as r (account_id, message_id, campaign_id, machine_opens,
                                 machine_clicks)
select account_id, message_id, campaign_id, machine_opens, machine_clicks from counted
on conflict (account_id, message_id) do update set
    machine_opens = excluded.machine_opens, machine_clicks = excluded.machine_clicks;
update rollup_message set machine_opens = mpp where machine_opens < mpp;

-- The messages of a campaign a filtered report covers (store/results.py): with the tag
-- (null: any), sent in [since, until) (null: open). Plain SQL, so the planner inlines it.
create function tracker_selected_messages(account bigint, campaign bigint, tag text,
                                          since timestamptz, until timestamptz)
returns table (id bigint)
language sql stable as $$
    select m.id from messages m
    where m.account_id = account and m.campaign_id = campaign
      and (tag is null or m.tags @> array[tag])
      and (since is null or m.sent_at >= since)
      and (until is null or m.sent_at < until)
$$;
