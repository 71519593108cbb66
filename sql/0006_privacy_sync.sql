-- tracker schema, version 6: privacy changes that hold at once, in every worker.
--
-- Dashboard sessions that were signed out. A session cookie is a signed token
-- (tracker/web/sessions.py) that would otherwise be good until it expires; every dashboard
-- page already reads the session's API key from the database, and now also looks here,
-- so a cookie copied before signing out gets nowhere afterwards, in every worker and
-- node. A row is kept until the session would have expired anyway (the maintenance
-- job deletes it then). `nonce`: the session's 16 random bytes, which are no secret on
-- their own (a token also needs its MAC).
create table dashboard_signed_out (
    account_id  bigint not null references accounts (id) on delete cascade,
    nonce       bytea not null,
    expires_at  timestamptz not null,
    primary key (account_id, nonce)
);
create index dashboard_signed_out_expires on dashboard_signed_out (expires_at);
