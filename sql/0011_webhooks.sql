-- tracker schema, version 11: events out (webhooks and the pull stream).
--
-- event_log is the outbox: the writer adds a row for every event it stores, and one for
-- every re-label it makes, in the transaction that stores them (sql/writer.sql), so an
-- event is delivered if and only if it was stored. Its order is the order of commit:
-- `xid` is the writing transaction's id, and a reader takes only rows whose transaction
-- is older than every transaction still running (pg_snapshot_xmin), so a cursor
-- (xid, id) never passes a row that commits later. The rows are pointers with what
-- delivery filters on; an event's fields are read from `events` when it is sent, so what
-- retention or erasure removed is never sent, and the pointers of an erased message go
-- with it (privacy/data_subjects.py).
create table event_log (
    account_id   bigint not null,
    xid          xid8 not null default pg_current_xact_id(),
    id           uuid not null,
    occurred_at  timestamptz not null,
    message_id   bigint not null,
    campaign_id  bigint not null,
    type         text not null check (type in ('open', 'click', 'relabel')),
    machine      boolean not null,
    -- A re-label: the events it made machine, and the reason it gave them.
    relabelled   uuid[],
    reason       text,
    primary key (account_id, xid, id)
);
create index event_log_occurred on event_log (occurred_at);

create sequence webhook_endpoints_id_seq;

-- An account's webhook endpoints. `secret` signs deliveries (Standard Webhooks, whsec_...);
-- after a rotation `previous_secret` signs too until `previous_until`, so a receiver can
-- switch over without refusing a delivery. `machine`: whether events a rule judged machine
-- are sent. `delivered` / `failed`: events delivered, attempts failed (metrics).
create table webhook_endpoints (
    account_id       bigint not null references accounts (id) on delete cascade,
    id               bigint not null default nextval('webhook_endpoints_id_seq'),
    url              text not null check (length(url) between 1 and 2000),
    events           text[] not null,
    campaign_id      bigint,
    machine          boolean not null default true,
    concurrency      smallint not null default 1 check (concurrency between 1 and 16),
    secret           text not null,
    previous_secret  text,
    previous_until   timestamptz,
    enabled          boolean not null default true,
    disabled_reason  text,
    disabled_at      timestamptz,
    delivered        bigint not null default 0,
    failed           bigint not null default 0,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    deleted_at       timestamptz,
    primary key (account_id, id)
);

-- What is to be delivered to an endpoint, as queues that delivery workers lease one at a
-- time (select ... for update skip locked, then `leased_until`): a live queue per lane
-- (an endpoint's concurrency; a message's events always go through the same lane, in
-- order) reads event_log after its cursor (after_xid, after_id); a replay queue reads
-- `events` from `since` to `until` after its cursor (after_at, after_id). A failed
-- delivery leaves the cursor where it was and sets the next attempt.
create sequence webhook_queues_id_seq;
create table webhook_queues (
    account_id       bigint not null,
    endpoint_id      bigint not null,
    id               bigint not null default nextval('webhook_queues_id_seq'),
    lane             smallint not null,
    replay           boolean not null default false,
    after_xid        xid8,
    after_at         timestamptz,
    after_id         uuid not null default '00000000-0000-0000-0000-000000000000',
    since            timestamptz,
    until            timestamptz,
    attempts         integer not null default 0,
    next_attempt_at  timestamptz not null default now(),
    failing_since    timestamptz,
    last_error       text,
    pending_since    timestamptz,
    leased_until     timestamptz,
    lease            bigint not null default 0,
    primary key (account_id, endpoint_id, id),
    foreign key (account_id, endpoint_id) references webhook_endpoints (account_id, id)
        on delete cascade
);
create index webhook_queues_due on webhook_queues (next_attempt_at);

-- The delivery log: one row per attempt, with its status and timing; never a payload.
-- Kept for a bounded time (delivery/loop.py).
create table webhook_attempts (
    account_id   bigint not null,
    endpoint_id  bigint not null,
    at           timestamptz not null default now(),
    webhook_id   text not null,
    events       integer not null,
    status       integer,
    duration_ms  integer not null,
    error        text,
    foreign key (account_id, endpoint_id) references webhook_endpoints (account_id, id)
        on delete cascade
);
create index webhook_attempts_endpoint on webhook_attempts (account_id, endpoint_id, at);
create index webhook_attempts_at on webhook_attempts (at);
