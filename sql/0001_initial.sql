-- tracker schema, version 1.
--
-- Every table carries account_id and every primary, unique and foreign key
-- includes it, so the schema can be distributed by account on Citus as is.
-- Message bodies are never stored: there is no column for them.

create sequence accounts_id_seq;
create sequence campaigns_id_seq;
create sequence messages_id_seq;
create sequence urls_id_seq;

create table accounts (
    id          bigint primary key default nextval('accounts_id_seq'),
    name        text not null check (length(name) between 1 and 200),
    created_at  timestamptz not null default now(),
    deleted_at  timestamptz
);

-- An API key is "tk_<account>_<key id>_<secret>"; only SHA-256 of the secret is kept.
create table api_keys (
    account_id   bigint not null references accounts (id) on delete cascade,
    key_id       text not null,
    secret_hash  bytea not null,
    created_at   timestamptz not null default now(),
    revoked_at   timestamptz,
    primary key (account_id, key_id)
);

create table campaigns (
    account_id       bigint not null references accounts (id) on delete cascade,
    id               bigint not null default nextval('campaigns_id_seq'),
    name             text not null check (length(name) between 1 and 200),
    policy_location  text not null default 'region'
                     check (policy_location in ('none', 'country', 'region', 'city')),
    policy_device    boolean not null default true,
    policy_ip        text not null default 'none'
                     check (policy_ip in ('none', 'truncated', 'full')),
    retention_days   integer check (retention_days > 0),
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    deleted_at       timestamptz,
    primary key (account_id, id)
);
create index campaigns_updated on campaigns (updated_at);

create table messages (
    account_id   bigint not null,
    id           bigint not null default nextval('messages_id_seq'),
    campaign_id  bigint not null,
    recipient    text not null,
    subject      text,
    sent_at      timestamptz not null default now(),
    created_at   timestamptz not null default now(),
    primary key (account_id, id),
    foreign key (account_id, campaign_id) references campaigns (account_id, id) on delete cascade
);
create index messages_campaign on messages (account_id, campaign_id);
create index messages_recipient on messages (account_id, recipient);

-- Distinct destinations of a campaign: the report groups clicks by URL, and a
-- click token carries the url id so no click ever needs a join to find its URL.
create table urls (
    account_id   bigint not null,
    campaign_id  bigint not null,
    id           bigint not null default nextval('urls_id_seq'),
    url          text not null,
    primary key (account_id, id),
    unique (account_id, campaign_id, url),
    foreign key (account_id, campaign_id) references campaigns (account_id, id) on delete cascade
);

-- Each occurrence of a link in a message is a link of its own (position in the message).
create table links (
    account_id   bigint not null,
    message_id   bigint not null,
    position     integer not null check (position between 0 and 65535),
    url_id       bigint not null,
    primary key (account_id, message_id, position),
    foreign key (account_id, message_id) references messages (account_id, id) on delete cascade,
    foreign key (account_id, url_id) references urls (account_id, id)
);

-- Opens and clicks. The id is made when the hit is captured, so a batch written
-- twice (a retry after a lost commit, a journal replay) lands once. Partitioned
-- by day so retention drops whole partitions; partitions are made on demand by
-- tracker_ensure_event_partition. Only fields the campaign's policy allows are
-- ever filled; the raw user agent has no column at all.
create table events (
    account_id     bigint not null,
    occurred_at    timestamptz not null,
    id             uuid not null,
    campaign_id    bigint not null,
    message_id     bigint not null,
    type           text not null check (type in ('open', 'click')),
    link_position  integer,
    url_id         bigint,
    machine        boolean not null,
    reason         text,
    country        text,
    region         text,
    city           text,
    browser        text,
    os             text,
    device         text,
    ip             inet,
    primary key (account_id, occurred_at, id)
) partition by range (occurred_at);
create index events_message on events (account_id, message_id);
create index events_campaign on events (account_id, campaign_id, occurred_at);

create function tracker_ensure_event_partition(day date) returns void
language plpgsql as $$
declare
    name text := format('events_%s', to_char(day, 'YYYYMMDD'));
begin
    if to_regclass(name) is not null then
        return;
    end if;
    -- Several writers may meet the same new day at once.
    perform pg_advisory_xact_lock(hashtext('tracker_ensure_event_partition'));
    if to_regclass(name) is null then
        execute format(
            'create table %I partition of events for values from (%L) to (%L)',
            name, (day::timestamp at time zone 'UTC'), ((day + 1)::timestamp at time zone 'UTC'));
    end if;
end;
$$;
