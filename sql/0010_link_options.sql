-- tracker schema, version 10: a campaign's link options (mail/options.py).
--
-- utm: the UTM parameters added to every tracked destination that lacks them (null: none);
-- track_url_text: whether a link whose visible text is itself a URL is tracked (mail
-- filters flag a visible URL that differs from the link's target, so by default it is left
-- as it is); pixel: where the open pixel goes, "bottom" (before </body>) or "top" (just
-- after <body>, which Gmail's clipping of long messages never cuts off).
alter table campaigns add column options jsonb not null
    default '{"utm": null, "track_url_text": false, "pixel": "bottom"}';
