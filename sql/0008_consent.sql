-- tracker schema, version 8: consent for tracking (docs/privacy.md, "Consent").
--
-- A campaign's policy says whether consent is required for opens and for clicks
-- (policy_consent_*: false is tracker's behaviour without consent records). The account's
-- consent_* columns are the default a new campaign takes when its policy does not say.
alter table campaigns
    add column policy_consent_opens boolean not null default false,
    add column policy_consent_clicks boolean not null default false;
alter table accounts
    add column consent_opens boolean not null default false,
    add column consent_clicks boolean not null default false;

-- The texts shown to recipients when they gave or refused consent, stored once per account
-- however many recipients saw them (a wording is the sender's text, not personal data).
create table consent_wordings (
    account_id  bigint not null references accounts (id) on delete cascade,
    digest      bytea not null,  -- SHA-256 of the text
    wording     text not null,
    primary key (account_id, digest)
);

-- Each recipient's consent as it stands, by recipient key (privacy/recipients.py): no
-- address. `given_at` is when the recipient gave or refused it (the caller may say, as
-- for an import), `recorded_at` when tracker stored it. One row per recipient.
create table recipient_consents (
    account_id      bigint not null references accounts (id) on delete cascade,
    recipient_key   bigint not null,
    opens           boolean not null,
    clicks          boolean not null,
    method          text not null check (length(method) between 1 and 100),
    wording_digest  bytea,
    given_at        timestamptz not null,
    recorded_at     timestamptz not null default now(),
    primary key (account_id, recipient_key),
    foreign key (account_id, wording_digest) references consent_wordings (account_id, digest)
);

-- Every change, for proof of what the recipient agreed to and when (the current row is
-- the last one). Removed with the recipient by erasure.
create sequence consent_history_id_seq;
create table consent_history (
    account_id      bigint not null references accounts (id) on delete cascade,
    id              bigint not null default nextval('consent_history_id_seq'),
    recipient_key   bigint not null,
    opens           boolean not null,
    clicks          boolean not null,
    method          text not null,
    wording_digest  bytea,
    given_at        timestamptz not null,
    recorded_at     timestamptz not null default now(),
    primary key (account_id, id),
    foreign key (account_id, wording_digest) references consent_wordings (account_id, digest)
);
create index consent_history_recipient on consent_history (account_id, recipient_key, id);

-- What the hit path screens (ingest/suppression.py): a recipient who refused or withdrew
-- consent for opens or clicks records none of them, in any campaign, whatever the policy
-- requires. Kept with the other reasons a recipient is not recorded, so every worker
-- reads it with them, in the order the rows changed.
alter table recipient_suppressions
    add column consent_refused_opens boolean not null default false,
    add column consent_refused_clicks boolean not null default false;

-- Whether a message was registered with its pixel and with tracked links: not when its
-- recipient's consent was required and absent, refused, or the recipient opted out. A
-- message without a pixel is neither opened nor "not opened" to anyone: it is untracked.
alter table messages
    add column opens_tracked boolean not null default true,
    add column clicks_tracked boolean not null default true;
