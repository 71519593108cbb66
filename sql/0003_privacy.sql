-- tracker schema, version 3: the privacy lifecycle (docs/privacy.md).
--
-- Retention, erasure, opt-out, pseudonymous recipients and deletion with a grace
-- period. Nothing here stores an address: recipients are found, refused and
-- pseudonymised through a keyed hash under a random key of their account.

-- recipient_secret: the account's key for recipient keys and pseudonyms (privacy/recipients.py).
-- 2 x 122 random bits from gen_random_uuid (pg_strong_random), with no extension needed;
-- the volatile default gives every existing account a key of its own.
-- retention_days: the default for campaigns whose policy has none (null: keep).
-- honour_privacy_signals: Sec-GPC: 1 / DNT: 1 on a hit records nothing (the default).
-- purged_at / purge_finished_at: the grace period is over; the purge has claimed the
-- account (no restore from then on) / has removed all its data. The row stays as a
-- tombstone, so its old links keep redirecting and keep recording nothing.
alter table accounts
    add column recipient_secret bytea not null
        default (uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid())),
    add column retention_days integer check (retention_days between 1 and 36500),
    add column honour_privacy_signals boolean not null default true,
    add column purged_at timestamptz,
    add column purge_finished_at timestamptz;

alter table campaigns
    add column policy_recipient text not null default 'address'
        check (policy_recipient in ('address', 'pseudonym')),
    add column purged_at timestamptz,
    add column purge_finished_at timestamptz;
create index campaigns_deleted on campaigns (deleted_at) where deleted_at is not null;

-- The recipient key that the message's tokens carry (null: registered before version 3,
-- whose tokens carry none). Erasure, opt-out and export find messages by it, so they
-- work from the plain address for pseudonymous campaigns too.
alter table messages add column recipient_key bigint;
create index messages_recipient_key on messages (account_id, recipient_key);

-- Recipients whose hits record nothing: opted out (every message, also future ones), or
-- erased (messages with ids up to erased_through: the links of the erased messages; mail
-- registered after an erasure is tracked again). Every worker holds this table in memory
-- (ingest/suppression.py) and re-reads the rows changed since its last read every second.
create table recipient_suppressions (
    account_id      bigint not null references accounts (id) on delete cascade,
    recipient_key   bigint not null,
    opted_out       boolean not null default false,
    opted_out_at    timestamptz,
    erased_through  bigint,
    erased_at       timestamptz,
    changed_at      timestamptz not null default now(),
    primary key (account_id, recipient_key)
);
create index recipient_suppressions_changed on recipient_suppressions (changed_at);

-- Erasures of the last days, so events that were on their way when the erasure ran
-- (another worker's buffer, a journal replayed after an outage) are swept too. Only ids:
-- the messages themselves are gone.
create sequence erasures_id_seq;
create table erasures (
    account_id      bigint not null references accounts (id) on delete cascade,
    id              bigint not null default nextval('erasures_id_seq'),
    recipient_key   bigint not null,
    erased_through  bigint not null,
    message_ids     bigint[] not null,
    erased_at       timestamptz not null default now(),
    swept_at        timestamptz,  -- the last sweep that looked for late arrivals
    primary key (account_id, id)
);
create index erasures_erased_at on erasures (erased_at);
