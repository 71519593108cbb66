-- Named queries of accounts and their API keys (tracker/store/accounts.py), loaded once at
-- start-up by the one loader (tracker/store/queries.py). Keys are "tk_<account>_<key id>_<secret>"; only SHA-256
-- of the secret is stored (sql/0001_initial.sql, sql/0007_api_keys.sql).

-- name: create-key
insert into api_keys (account_id, key_id, secret_hash, name, scope)
values ($1, $2, $3, $4, $5)
returning key_id, name, scope, created_at, last_used_at;

-- name: key-to-check
-- The live key named by an API key, with what a request needs to know of it; `stale`: its
-- last-used time is older than a minute (or unset), so this use should be written.
select k.secret_hash, k.name, k.scope,
       k.last_used_at is null or k.last_used_at < now() - interval '1 minute' as stale
from api_keys k join accounts a on a.id = k.account_id
where k.account_id = $1 and k.key_id = $2 and k.revoked_at is null and a.deleted_at is null;

-- name: note-key-use
-- At most one write a minute per key, whichever worker and node uses it.
update api_keys set last_used_at = now()
where account_id = $1 and key_id = $2
  and (last_used_at is null or last_used_at < now() - interval '1 minute');

-- name: list-keys
select key_id, name, scope, created_at, last_used_at
from api_keys where account_id = $1 and revoked_at is null
order by created_at, key_id;

-- name: get-key
select key_id, name, scope, created_at, last_used_at
from api_keys where account_id = $1 and key_id = $2 and revoked_at is null;

-- name: revoke-key
update api_keys set revoked_at = now()
where account_id = $1 and key_id = $2 and revoked_at is null
returning key_id, name, scope, created_at, last_used_at;

-- name: other-full-keys
-- The account's live full keys other than $2: the last one is not revoked through the API.
select count(*) from api_keys
where account_id = $1 and key_id <> $2 and scope = 'full' and revoked_at is null;

-- name: lock-account-keys
-- Revocations and rotations of one account's keys, one at a time (the check for its last
-- full key must see the others').
select id from accounts where id = $1 for update;

-- name: session-key
-- The account and key of a dashboard session, if the session still holds: its API key is
-- not revoked, its account not deleted, and it was not signed out.
select a.name as account_name, k.name as key_name, k.scope
from api_keys k join accounts a on a.id = k.account_id
where k.account_id = $1 and k.key_id = $2 and k.revoked_at is null and a.deleted_at is null
  and not exists (select 1 from dashboard_signed_out s where s.account_id = $1 and s.nonce = $3);

-- name: list-accounts
-- For the operator (`tracker accounts list`): every account, deleted ones with their
-- state, and how much each holds.
select a.id, a.name, a.created_at, a.deleted_at, a.purged_at, a.purge_finished_at,
       (select count(*) from api_keys k
        where k.account_id = a.id and k.revoked_at is null) as keys,
       (select max(k.last_used_at) from api_keys k where k.account_id = a.id) as last_used_at,
       (select count(*) from campaigns c
        where c.account_id = a.id and c.deleted_at is null) as campaigns
from accounts a
order by a.id;
