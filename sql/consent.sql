-- Named queries of consent (tracker/privacy/consent.py), loaded once at start-up as
-- sql/queries.sql is. Recipients are named by their recipient key (privacy/recipients.py):
-- no address is stored here.

-- name: save-wording
insert into consent_wordings (account_id, digest, wording) values ($1, $2, $3)
on conflict (account_id, digest) do nothing;

-- name: save-consent
insert into recipient_consents as c (account_id, recipient_key, opens, clicks, method,
                                     wording_digest, given_at)
values ($1, $2, $3, $4, $5, $6, $7)
on conflict (account_id, recipient_key) do update set
    opens = excluded.opens, clicks = excluded.clicks, method = excluded.method,
    wording_digest = excluded.wording_digest, given_at = excluded.given_at,
    recorded_at = now()
returning opens, clicks, method, given_at, recorded_at;

-- name: record-consent-history
insert into consent_history (account_id, recipient_key, opens, clicks, method, wording_digest,
                             given_at)
values ($1, $2, $3, $4, $5, $6, $7);

-- name: refuse-consent
-- What the hit path screens (ingest/suppression.py); $3, $4: refused for opens, for clicks.
insert into recipient_suppressions as s (account_id, recipient_key, consent_refused_opens,
                                         consent_refused_clicks)
values ($1, $2, $3, $4)
on conflict (account_id, recipient_key) do update set
    consent_refused_opens = excluded.consent_refused_opens,
    consent_refused_clicks = excluded.consent_refused_clicks,
    changed_at = now()
returning opted_out, erased_through;

-- name: clear-consent-refusal
-- Consent given for both: no row is made for a recipient who has none (every worker holds
-- the table in memory, and it is meant to hold exceptions only).
update recipient_suppressions set consent_refused_opens = false, consent_refused_clicks = false,
                                  changed_at = now()
where account_id = $1 and recipient_key = $2
  and (consent_refused_opens or consent_refused_clicks)
returning opted_out, erased_through;

-- name: consent-record
select c.opens, c.clicks, c.method, w.wording, c.given_at, c.recorded_at
from recipient_consents c
left join consent_wordings w on w.account_id = c.account_id and w.digest = c.wording_digest
where c.account_id = $1 and c.recipient_key = $2;

-- name: consent-history
-- Newest first; $3: at most this many (null: all).
select h.opens, h.clicks, h.method, w.wording, h.given_at, h.recorded_at
from consent_history h
left join consent_wordings w on w.account_id = h.account_id and w.digest = h.wording_digest
where h.account_id = $1 and h.recipient_key = $2
order by h.id desc
limit $3;

-- name: consent-refusals
select consent_refused_opens, consent_refused_clicks
from recipient_suppressions where account_id = $1 and recipient_key = $2;

-- name: registration-consents
-- For the recipients of a batch being registered: who opted out, who refused or gave
-- consent to opens and to clicks. Only recipients with something on record come back.
select k.key as recipient_key, coalesce(s.opted_out, false) as opted_out,
       coalesce(s.consent_refused_opens, false) as refused_opens,
       coalesce(s.consent_refused_clicks, false) as refused_clicks,
       coalesce(c.opens, false) as consented_opens, coalesce(c.clicks, false) as consented_clicks
from unnest($2::bigint[]) as k (key)
left join recipient_suppressions s on s.account_id = $1 and s.recipient_key = k.key
left join recipient_consents c on c.account_id = $1 and c.recipient_key = k.key
where s.recipient_key is not null or c.recipient_key is not null;

-- name: erase-consent
-- Erasure removes the record and its history; a refusal stays in force (as an opt-out
-- does: recipient_suppressions), so that mail registered later is not tracked against it.
delete from consent_history where account_id = $1 and recipient_key = $2;
delete from recipient_consents where account_id = $1 and recipient_key = $2;

-- name: account-consent-default
select consent_opens, consent_clicks from accounts where id = $1 and deleted_at is null;

-- name: set-account-consent-default
update accounts set consent_opens = $2, consent_clicks = $3
where id = $1 and deleted_at is null
returning consent_opens, consent_clicks;
