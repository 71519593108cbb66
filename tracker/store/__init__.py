"""Events and records into PostgreSQL, and read back: the batch writer, its backlog and
journal, rollups, migrations and the named-query loader, the embedded database. Knows
nothing of HTTP."""
