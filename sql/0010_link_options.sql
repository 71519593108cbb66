-- tracker schema, version 10: a campaign's link options (mail/options.py).
--
-- options: {"utm": {"source": ..., ...} | null, "track_url_text": bool, "pixel": "bottom" |
-- "top"}; '{}' means every default: no UTM parameters, links whose visible text is a URL
-- left untracked, the pixel at the end of the body.
alter table campaigns add column options jsonb not null default '{}';
