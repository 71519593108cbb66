-- What sets a database up for tracker: the migrator's bookkeeping (tracker/store/migrations.py,
-- which runs the numbered migrations beside this file, each once, under the advisory lock of
-- sql/queries.sql) and the embedded server's check for its database.

-- name: create-schema-migrations
create table if not exists schema_migrations (
    version     integer primary key,
    name        text not null,
    checksum    text not null,
    applied_at  timestamptz not null default now()
);

-- name: applied-migrations
select version, checksum from schema_migrations;

-- name: record-migration
insert into schema_migrations (version, name, checksum) values ($1, $2, $3);

-- name: database-exists
-- Run by psql (tracker/store/embedded_db.py) before the database exists, so with psql's
-- variable :'database' (quoted by psql as a literal), not a parameter: 1 if it exists.
select 1 from pg_database where datname = :'database';
