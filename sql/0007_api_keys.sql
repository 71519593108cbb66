-- tracker schema, version 7: named API keys with scopes (README: API keys).
--
-- name: how the account's people tell their keys apart; unique among the live keys.
-- scope: what the key may do. `read`: every GET (reports, lists, exports); `register`:
-- that and registering messages; `full`: everything, managing keys included.
-- last_used_at: when the key last authenticated, to the minute: a worker writes it at
-- most once a minute per key (web/http.py), never on every request.
-- Keys made before this version are full keys named "default" (further ones
-- "default-<key id>", so the names stay unique).
alter table api_keys
    add column name text,
    add column scope text not null default 'full'
        check (scope in ('read', 'register', 'full')),
    add column last_used_at timestamptz;

update api_keys k set name = case when n.rank = 1 then 'default' else 'default-' || k.key_id end
from (select account_id, key_id,
             row_number() over (partition by account_id order by created_at, key_id) as rank
      from api_keys) n
where n.account_id = k.account_id and n.key_id = k.key_id;

alter table api_keys
    alter column name set not null,
    add constraint api_keys_name_check check (length(name) between 1 and 100);

create unique index api_keys_live_name on api_keys (account_id, name) where revoked_at is null;
