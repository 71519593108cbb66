-- Named queries of operations: the read replica (tracker/store/replica.py), how far a
-- streaming replica has replayed the primary's write-ahead log (positions are byte offsets
-- in the WAL); and backup and restore (tracker/store/backup.py).

-- name: wal-position
-- On the primary: where its WAL ends now, including what is not yet written out (with
-- synchronous_commit off a commit returns before its WAL is written).
select pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint;

-- name: replayed-position
-- On the replica: how much of the primary's WAL it has replayed. A server that is not a
-- standby (TRACKER_READ_DATABASE_URL naming the primary itself) has replayed all of its own.
select pg_wal_lsn_diff(case when pg_is_in_recovery() then pg_last_wal_replay_lsn()
                            else pg_current_wal_lsn() end, '0/0')::bigint;

-- name: tables-in-database
-- Before a restore: a database to restore into holds no tables of its own yet.
select count(*) from pg_catalog.pg_tables
where schemaname not in ('pg_catalog', 'information_schema');
