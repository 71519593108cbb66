"""A tracking request becomes an event or a counted drop: the wire protocol, the tracking
endpoints, tokens, the hit pipeline (user agents, classification rules and address lists,
location, what the campaign's policy lets through). No SQL: nothing here waits on the
database."""
