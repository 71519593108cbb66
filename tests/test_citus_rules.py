"""The schema keeps Citus's rules, so it distributes by account as it is.

The checker reads a real, migrated PostgreSQL through its catalogs and holds every
table to the plan in sql/citus/distribute.sql: each table is named there; each
distributed table has its distribution column (account_id, `id` for accounts), NOT NULL
and of one type, in every primary key, unique constraint, unique index and exclusion
constraint; each foreign key pairs the distribution columns of both sides (so no row
can point into another account) and points at a co-located or reference table. It is
run against small schemas with one mistake each, to show it catches them, and
distribute.sql itself is executed against stand-ins for Citus's functions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from .support import connected

DISTRIBUTE_SQL = Path(__file__).resolve().parent.parent / "sql" / "citus" / "distribute.sql"
TENANT = "account_id"


@dataclass(frozen=True)
class Plan:
    distributed: dict[str, tuple[str, str]]  # table -> (distribution column, colocate_with)
    reference: frozenset[str] = frozenset()


def read_plan(sql: str) -> Plan:
    distributed = {m[0]: (m[1], m[2]) for m in re.findall(
        r"^select pg_temp\.distribute\('(\w+)', '(\w+)', '(\w+)'\);", sql, re.M)}
    reference = frozenset(re.findall(r"^select pg_temp\.reference\('(\w+)'\);", sql, re.M))
    return Plan(distributed, reference)


@dataclass
class Key:
    kind: str  # "primary key", "unique constraint", "exclusion constraint", "unique index"
    name: str
    columns: list[str | None]  # None: an expression


@dataclass
class ForeignKey:
    name: str
    columns: list[str]
    target: str
    target_columns: list[str]


@dataclass
class Table:
    name: str
    columns: dict[str, tuple[str, bool]] = field(default_factory=dict)  # name -> (type, not null)
    keys: list[Key] = field(default_factory=list)
    foreign_keys: list[ForeignKey] = field(default_factory=list)


_KINDS = {"p": "primary key", "u": "unique constraint", "x": "exclusion constraint"}


async def read_schema(conn: asyncpg.Connection, schema: str = "public") -> dict[str, Table]:
    """Tables (partitions are their parent's business), columns, keys and foreign keys."""
    names = {r["oid"]: r["relname"] for r in await conn.fetch("""
        select c.oid, c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = $1 and c.relkind in ('r', 'p') and not c.relispartition""", schema)}
    oids = list(names)
    constraints = await conn.fetch("""
        select conrelid, conname, contype::text, conkey, confrelid, confkey from pg_constraint
        where conrelid = any($1::oid[]) and contype in ('p', 'u', 'x', 'f')""", oids)
    targets = {r["confrelid"] for r in constraints if r["contype"] == "f"}
    attributes = await conn.fetch("""
        select a.attrelid, c.relname, a.attnum, a.attname,
               format_type(a.atttypid, a.atttypmod) as type, a.attnotnull
        from pg_attribute a join pg_class c on c.oid = a.attrelid
        where a.attrelid = any($1::oid[]) and a.attnum > 0 and not a.attisdropped""",
                                  oids + list(targets))
    attnames = {(r["attrelid"], r["attnum"]): r["attname"] for r in attributes}
    relnames = {r["attrelid"]: r["relname"] for r in attributes}
    tables = {name: Table(name) for name in names.values()}
    for r in attributes:
        if r["attrelid"] in names:
            tables[r["relname"]].columns[r["attname"]] = (r["type"], r["attnotnull"])
    for r in constraints:
        table = tables[names[r["conrelid"]]]
        columns = [attnames[(r["conrelid"], n)] for n in r["conkey"]]
        if r["contype"] == "f":
            table.foreign_keys.append(ForeignKey(
                r["conname"], columns, relnames[r["confrelid"]],
                [attnames[(r["confrelid"], n)] for n in r["confkey"]]))
        else:
            table.keys.append(Key(_KINDS[r["contype"]], r["conname"], list(columns)))
    for r in await conn.fetch("""
            select i.indrelid, ic.relname, i.indkey::int2[] as keys, i.indnkeyatts
            from pg_index i join pg_class ic on ic.oid = i.indexrelid
            where i.indrelid = any($1::oid[]) and i.indisunique
            and not exists (select 1 from pg_constraint k where k.conindid = i.indexrelid
                            and k.conrelid = i.indrelid and k.contype in ('p', 'u', 'x'))""",
                              oids):
        # Key columns only (INCLUDE columns do not make a row unique); 0 is an expression.
        columns = [attnames[(r["indrelid"], n)] if n else None
                   for n in r["keys"][: r["indnkeyatts"]]]
        tables[names[r["indrelid"]]].keys.append(Key("unique index", r["relname"], columns))
    return tables


def violations(tables: dict[str, Table], plan: Plan) -> list[str]:
    """Every way the schema breaks Citus's rules or the plan; empty when it distributes."""
    found: list[str] = []
    anchors = [t for t, (_, colocate) in plan.distributed.items() if colocate == "none"]
    if len(anchors) != 1:
        return [f"distribute.sql must anchor one co-location group, found {anchors}"]
    anchor = anchors[0]
    anchor_column = plan.distributed[anchor][0]
    anchor_type = tables[anchor].columns[anchor_column][0] if anchor in tables else None

    for name in sorted(set(plan.distributed) | plan.reference):
        if name not in tables:
            found.append(f"{name}: named in sql/citus/distribute.sql but no migration creates it")
    for name, table in sorted(tables.items()):
        if name in plan.reference:
            if TENANT in table.columns:
                found.append(f"{name}: a reference table with {TENANT}: account data belongs "
                             "in a distributed table")
            for fk in table.foreign_keys:
                if fk.target in plan.distributed:
                    found.append(f"{name}: foreign key {fk.name} from a reference table to "
                                 f"distributed {fk.target}")
            continue
        if name not in plan.distributed:
            found.append(f"{name}: not in sql/citus/distribute.sql (distribute it by "
                         f"{TENANT}, or make it a reference table if it is global)")
            continue
        column, colocate = plan.distributed[name]
        if name != anchor:
            if column != TENANT:
                found.append(f"{name}: distributed by {column}, not {TENANT}")
            if colocate != anchor:
                found.append(f"{name}: co-located with {colocate}, not with {anchor}")
        if column not in table.columns:
            found.append(f"{name}: no {column} column: every table but {anchor} carries "
                         f"{TENANT}")
            continue
        kind, not_null = table.columns[column]
        if not not_null:
            found.append(f"{name}: {column} may be null")
        if kind != anchor_type:
            found.append(f"{name}: {column} is {kind}, not {anchor_type} like "
                         f"{anchor}.{anchor_column}")
        for key in table.keys:
            if column not in key.columns:
                shown = ", ".join(c or "(expression)" for c in key.columns)
                found.append(f"{name}: {key.kind} {key.name} ({shown}) does not include {column}")
        for fk in table.foreign_keys:
            if fk.target in plan.reference:
                continue
            if fk.target not in plan.distributed:
                found.append(f"{name}: foreign key {fk.name} to {fk.target}, which is "
                             "neither distributed nor a reference table")
                continue
            target_column = plan.distributed[fk.target][0]
            if (column, target_column) not in zip(fk.columns, fk.target_columns, strict=True):
                found.append(f"{name}: foreign key {fk.name} does not pair {name}.{column} "
                             f"with {fk.target}.{target_column}")
    return found


def _report(problems: Iterable[str]) -> str:
    return "\n".join(problems)


# -- tracker's schema ---------------------------------------------------------------------


async def test_trackers_schema_keeps_citus_rules(dsn: str) -> None:
    async with connected(dsn) as conn:
        tables = await read_schema(conn)
    problems = violations(tables, read_plan(DISTRIBUTE_SQL.read_text()))
    assert not problems, _report(problems)


def test_distribute_sql_puts_every_account_table_in_one_group_anchored_on_accounts() -> None:
    plan = read_plan(DISTRIBUTE_SQL.read_text())
    assert plan.distributed["accounts"] == ("id", "none")
    others = {t: d for t, d in plan.distributed.items() if t != "accounts"}
    assert others and set(others.values()) == {(TENANT, "accounts")}
    assert plan.reference == {"schema_migrations", "event_terms"}


_CITUS_STAND_INS = """
    create schema citus_stand_in;
    create table citus_stand_in.pg_dist_partition (
        logicalrelid regclass primary key, partmethod "char", colocation text,
        distributed_by text, position serial);

    -- Refuses what Citus refuses: a co-location target not yet distributed, and a foreign
    -- key to a table not yet distributed.
    create function citus_stand_in.create_distributed_table(
        table_name regclass, distribution_column text, colocate_with text default 'default')
    returns void language plpgsql as $$
    begin
        if colocate_with not in ('none', 'default') and not exists (
                select 1 from citus_stand_in.pg_dist_partition
                where logicalrelid = colocate_with::regclass) then
            raise exception 'cannot colocate % with %: not distributed', table_name,
                colocate_with;
        end if;
        if exists (select 1 from pg_constraint c where c.conrelid = table_name and c.contype = 'f'
                   and c.confrelid <> table_name and not exists (
                       select 1 from citus_stand_in.pg_dist_partition p
                       where p.logicalrelid = c.confrelid)) then
            raise exception '% references a table that is not distributed yet', table_name;
        end if;
        insert into citus_stand_in.pg_dist_partition
            (logicalrelid, partmethod, colocation, distributed_by)
        values (table_name, 'h', colocate_with, distribution_column);
    end;
    $$;

    create function citus_stand_in.create_reference_table(table_name regclass)
    returns void language sql as $$
        insert into citus_stand_in.pg_dist_partition (logicalrelid, partmethod)
        values (table_name, 'n');
    $$;
"""


async def test_distribute_sql_runs_in_order_and_again_without_effect(dsn: str) -> None:
    """distribute.sql against stand-ins for Citus's functions (found first on the
    search_path): it calls them as planned, referenced tables first, and a second run
    changes nothing."""
    sql = DISTRIBUTE_SQL.read_text()
    async with connected(dsn) as conn:
        await conn.execute(_CITUS_STAND_INS)
        await conn.execute("set search_path = citus_stand_in, pg_catalog, public")
        await conn.execute(sql)
        done = await conn.fetch("""
            select logicalrelid::text as name, partmethod::text, colocation, distributed_by
            from citus_stand_in.pg_dist_partition order by position""")
        await conn.execute(sql)
        again = await conn.fetchval("select count(*) from citus_stand_in.pg_dist_partition")
        partitions = await conn.fetch(
            "select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid "
            "where i.inhparent = 'public.events'::regclass")
    plan = read_plan(sql)
    assert {r["name"]: (r["distributed_by"], r["colocation"]) for r in done
            if r["partmethod"] == "h"} == plan.distributed
    assert {r["name"] for r in done if r["partmethod"] == "n"} == plan.reference
    assert again == len(done)
    today = datetime.now(UTC).date()
    assert {f"events_{today + timedelta(days=d):%Y%m%d}" for d in range(15)} <= {
        r["relname"] for r in partitions}


# -- the checker catches each mistake -----------------------------------------------------

_CLEAN = """
    create table accounts (id bigint primary key);
    create table campaigns (
        account_id bigint not null references accounts (id), id bigint not null,
        primary key (account_id, id));
    create table messages (
        account_id bigint not null, id bigint not null, campaign_id bigint not null,
        primary key (account_id, id),
        foreign key (account_id, campaign_id) references campaigns (account_id, id));
    create table settings (name text primary key, value text);
"""
_CLEAN_PLAN = Plan({"accounts": ("id", "none"), "campaigns": (TENANT, "accounts"),
                    "messages": (TENANT, "accounts")}, frozenset({"settings"}))


def _with(**tables: tuple[str, str]) -> Plan:
    return Plan({**_CLEAN_PLAN.distributed, **tables}, _CLEAN_PLAN.reference)


MISTAKES = {
    "a new table left out of distribute.sql": (
        "create table notes (account_id bigint not null references accounts (id), "
        "id bigint not null, primary key (account_id, id))",
        _CLEAN_PLAN,
        ["notes: not in sql/citus/distribute.sql (distribute it by account_id, or make it a "
         "reference table if it is global)"]),
    "a table without account_id": (
        "create table audit (id bigint primary key, what text)",
        _with(audit=(TENANT, "accounts")),
        ["audit: no account_id column: every table but accounts carries account_id"]),
    "a primary key without account_id": (
        "create table links (account_id bigint not null, id bigint primary key)",
        _with(links=(TENANT, "accounts")),
        ["links: primary key links_pkey (id) does not include account_id"]),
    "a unique constraint without account_id": (
        "alter table campaigns add column slug text, add constraint campaigns_slug unique (slug)",
        _CLEAN_PLAN,
        ["campaigns: unique constraint campaigns_slug (slug) does not include account_id"]),
    "a unique index without account_id": (
        "create unique index messages_doubled_id on messages ((id * 2), campaign_id)",
        _CLEAN_PLAN,
        ["messages: unique index messages_doubled_id ((expression), campaign_id) does not "
         "include account_id"]),
    "a foreign key into another account": (
        "create table clicks (account_id bigint not null, id bigint not null, "
        "campaign_id bigint not null, primary key (account_id, id), constraint clicks_campaign "
        "foreign key (account_id, campaign_id) references campaigns (id, account_id))",
        _with(clicks=(TENANT, "accounts")),
        ["clicks: foreign key clicks_campaign does not pair clicks.account_id with "
         "campaigns.account_id"]),
    "account data in a reference table": (
        "alter table settings add column account_id bigint, add constraint settings_account "
        "foreign key (account_id) references accounts (id)",
        _CLEAN_PLAN,
        ["settings: a reference table with account_id: account data belongs in a distributed "
         "table",
         "settings: foreign key settings_account from a reference table to distributed "
         "accounts"]),
    "a nullable account_id": (
        "create table tags (account_id bigint, name text, unique (account_id, name))",
        _with(tags=(TENANT, "accounts")),
        ["tags: account_id may be null"]),
    "an account_id of another type": (
        "create table counters (account_id integer not null primary key)",
        _with(counters=(TENANT, "accounts")),
        ["counters: account_id is integer, not bigint like accounts.id"]),
    "a second co-location group": (
        "",
        _with(messages=(TENANT, "none")),
        ["distribute.sql must anchor one co-location group, found ['accounts', 'messages']"]),
    "a table distribute.sql names but no migration creates": (
        "",
        _with(ghosts=(TENANT, "accounts")),
        ["ghosts: named in sql/citus/distribute.sql but no migration creates it"]),
}


async def _violations_in(dsn: str, sql: str, plan: Plan) -> list[str]:
    async with connected(dsn) as conn:
        await conn.execute("create schema scratch; set search_path = scratch")
        await conn.execute(_CLEAN + sql)
        return violations(await read_schema(conn, "scratch"), plan)


async def test_checker_passes_a_clean_schema(dsn: str) -> None:
    assert await _violations_in(dsn, "", _CLEAN_PLAN) == []


@pytest.mark.parametrize("mistake", list(MISTAKES))
async def test_checker_catches(mistake: str, dsn: str) -> None:
    sql, plan, expected = MISTAKES[mistake]
    assert await _violations_in(dsn, sql, plan) == expected
