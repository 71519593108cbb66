"""Storage benchmark: bytes per event and per registered message, PostgreSQL CPU per event.

    python -m benchmarks storage [--events 1000000] [--messages 20000] [--baseline REV]
                                 [--no-baseline] [--registration-only] [--json]

The events are the ingest benchmark's (`benchmarks/ingest.py`: its defaults and seed, made
through the server's own pipeline), so the figures are those of the same data. Each schema
is measured by a child process of its own, with its tree first on the path: this checkout,
and the baseline commit's `tracker/` and `sql/` (`git archive`; `--baseline`, by default
the commit before sql/0020_event_order.sql), in the same run, on the same machine. In each:

1. a fresh embedded PostgreSQL (the settings `tracker serve` gives it), migrated;
2. a `BatchWriter` with the server's settings takes every event, as fast as it takes them,
   until `flush()` returns: PostgreSQL's CPU per event (the postmaster and its children,
   from /proc), rollups and re-labels included, and per writer statement the CPU of the
   backend that ran it (/proc/PID/schedstat), to show where it goes;
3. bytes per event: every partition of `events` (heap with its TOAST and maps, and each
   index, the stream's included), the outbox `event_log` (what webhooks and the pull stream
   read beside `events`), their sum, then the rollups and the re-label windows beside it;
4. registration: `--messages` messages, each with the five links of
   `tests/corpus/receipt.html`, through the registration code itself (`Registrar`); the
   bytes of `messages` and `links` (where the schema has it) with their indexes, per
   message, and PostgreSQL's CPU for the registration. `--registration-only` measures this
   step alone (seconds, not minutes).

PostgreSQL's CPU is a ratio of work done to events on a shared machine: the `queued` column
says how much of the time it waited for a core (other work), which inflates CPU a little
through cache misses. With `--json` the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks.ingest import BATCH, INTERVAL_MS, MAX_BUFFERED, Clock, feed, make_events
from tracker.store.database import connect
from tracker.store.embedded_db import EmbeddedPostgres, Running
from tracker.store.migrations import migrate
from tracker.store.queries import QUERIES
from tracker.store.rollups import relabel_windows
from tracker.store.writer import DEFAULT_CONNECTIONS, BatchWriter

ROOT = Path(__file__).resolve().parent.parent
# The last commit before sql/0020_event_order.sql: what "before" means.
BASELINE = "73b9258"
GOALS = {"event_bytes": 150.0, "message_bytes": 400.0, "postgres_us": 15.0}
DOCUMENT = ROOT / "tests" / "corpus" / "receipt.html"


# -- one schema, in a child process -------------------------------------------------------

def _on_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


_STEP_NAMES = {text: name for name, text in vars(QUERIES).items()}


class _StepTimed(asyncpg.Connection):  # type: ignore[misc]
    """A connection that adds the CPU its backend spends on each named statement to `STEPS`."""

    steps: dict[str, float] = {}  # noqa: RUF012 -- one tally for the process, on purpose

    async def execute(self, query: str, *args: Any,
                      timeout: float | None = None) -> str:  # noqa: ASYNC109 -- asyncpg's own
        pid = self.get_server_pid()
        started = _on_cpu_s(pid)
        try:
            return str(await super().execute(query, *args, timeout=timeout))
        finally:
            name = _STEP_NAMES.get(query, query.split()[0].lower())
            self.steps[name] = self.steps.get(name, 0.0) + _on_cpu_s(pid) - started

    async def _copy_in(self, *args: Any, **kwargs: Any) -> str:
        pid = self.get_server_pid()
        started = _on_cpu_s(pid)
        try:
            return str(await super()._copy_in(*args, **kwargs))
        finally:
            self.steps["copy"] = self.steps.get("copy", 0.0) + _on_cpu_s(pid) - started


async def _fresh(running: Running, name: str) -> str:
    admin = await asyncpg.connect(running.dsn("postgres"))
    try:
        await admin.execute(f"drop database if exists {name}")
        await admin.execute(f"create database {name}")
    finally:
        await admin.close()
    conn = await connect(running.dsn(name))
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return running.dsn(name)


async def _relation_bytes(conn: asyncpg.Connection, tables: Sequence[str]) -> dict[str, int]:
    """Bytes of each table (every partition of a partitioned one): `heap` with TOAST and
    the free-space and visibility maps, and each index by its name on the parent."""
    rows = await conn.fetch("""
        with parts as (
            select t.relname as parent, coalesce(i.inhrelid, t.oid) as rel
            from pg_class t left join pg_inherits i on i.inhparent = t.oid
            where t.relname = any($1::text[]) and t.relnamespace = 'public'::regnamespace)
        select parent || ' heap' as what, sum(pg_table_size(rel))::bigint as bytes
        from parts group by parent
        union all
        select p.parent || ' ' || coalesce(pi.relname, ic.relname),
               sum(pg_relation_size(x.indexrelid))::bigint
        from parts p join pg_index x on x.indrelid = p.rel
        join pg_class ic on ic.oid = x.indexrelid
        left join pg_inherits ii on ii.inhrelid = x.indexrelid
        left join pg_class pi on pi.oid = ii.inhparent
        group by 1 order by 1""", list(tables))
    return {r["what"]: r["bytes"] for r in rows}


async def _row_writes(conn: asyncpg.Connection, events: int) -> dict[str, int]:
    """Rows inserted or updated per table (a partition's under its parent): what each event
    costs in row operations. A backend reports its counts as it exits, so they are polled
    for until the events' are all in, for a few seconds at most."""
    deadline = time.monotonic() + 5
    while True:
        rows = {r["relname"]: r["n"] for r in await conn.fetch("""
            select coalesce(i.inhparent::regclass::text, s.relname) as relname,
                   sum(s.n_tup_ins + s.n_tup_upd)::bigint as n
            from pg_stat_user_tables s left join pg_inherits i on i.inhrelid = s.relid
            group by 1 having sum(s.n_tup_ins + s.n_tup_upd) > 0""")}
        if rows.get("events", 0) >= events or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.1)


async def _register(dsn: str, messages: int, clock: Clock) -> dict[str, int]:
    """Messages with the receipt's five links through the registration code, 1,000 at a time
    (PostgreSQL's CPU for it on `clock`)."""
    from tracker.ingest.tokens import Signer
    from tracker.mail.registration import Registrar, parse_message
    from tracker.store import accounts, campaigns
    conn = await connect(dsn)
    try:
        account = (await accounts.create_account(conn, "storage")).id
        campaign = (await campaigns.create(conn, account, "storage"))["id"]
        registrar = Registrar(Signer(["storage-benchmark-key-" + "x" * 32]), "http://t.example")
        html = DOCUMENT.read_text()
        sent = datetime.now(UTC).isoformat()
        batches = [[parse_message({"recipient": f"reader{n}@mail.example.com",
                                   "subject": "Your receipt", "sent_at": sent, "html": html})
                    for n in range(first, min(messages, first + 1000))]
                   for first in range(0, messages, 1000)]
        with clock:
            for batch in batches:
                await registrar.register(conn, account, campaign, batch)
        return await _relation_bytes(conn, ("messages", "links", "urls", "campaign_messages"))
    finally:
        await conn.close()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="tracker-storage-bench-"))
    pg = EmbeddedPostgres(workdir / "pg")
    running, _ = pg.start()
    try:
        postmaster = int((pg.pgdata / "postmaster.pid").read_text().split()[0])

        async def run() -> dict[str, Any]:
            registering = Clock(postmaster)
            registered = await _register(await _fresh(running, "storage_messages"),
                                         args.messages, registering)
            if args.registration_only:
                return {"messages": args.messages, "registered": registered,
                        "registration_cpu_s": registering.pg}
            records, _ = make_events(args.events, args.seed, 6.0, 5, 8, 50_000, 100_000)
            dsn = await _fresh(running, "storage_events")
            writer = BatchWriter(
                lambda: asyncpg.connect(dsn, connection_class=_StepTimed),
                batch_size=BATCH, interval_s=INTERVAL_MS / 1000, max_buffered=MAX_BUFFERED,
                relabel_windows=relabel_windows(), connections=DEFAULT_CONNECTIONS)
            clock = Clock(postmaster)
            written = await feed(writer, records, BATCH, clock)
            conn = await connect(dsn)
            try:
                landed = await conn.fetchval("select count(*) from events")
                rows = await _row_writes(conn, landed)
                await conn.execute("vacuum analyze")  # the maps a table has once vacuum ran
                stored = await _relation_bytes(conn, (
                    "events", "rollup_campaign", "rollup_link", "rollup_dimension",
                    "rollup_message", "rollup_message_link", "relabel_triggers", "event_log"))
            finally:
                await conn.close()
            return {"events": len(records), "written": written, "landed": landed,
                    "postgres_cpu_s": clock.pg, "python_cpu_s": clock.py, "wall_s": clock.wall,
                    "queued": clock.queued, "steps": dict(_StepTimed.steps), "rows": rows,
                    "stored": stored, "messages": args.messages, "registered": registered,
                    "registration_cpu_s": registering.pg}

        return asyncio.run(run())
    finally:
        pg.stop("immediate")
        shutil.rmtree(workdir, ignore_errors=True)


# -- both schemas, side by side -------------------------------------------------------------

def _tree(revision: str, into: Path) -> Path:
    """The revision's tracker/ and sql/ (and this program) in a directory of their own."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "tracker", "sql",
                              "benchmarks", "tests/corpus"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    shutil.copy(Path(__file__), into / "benchmarks" / "storage.py")
    return into


def _child(tree: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    subprocess.run([sys.executable, "-m", "benchmarks.storage", "--measure", str(out),
                    "--events", str(args.events), "--messages", str(args.messages),
                    "--seed", str(args.seed)]
                   + (["--registration-only"] if args.registration_only else []),
                   cwd=tree, check=True, env={**os.environ, "PYTHONPATH": str(tree)})
    found: dict[str, Any] = json.loads(out.read_text())
    return found


def figures(run: dict[str, Any]) -> dict[str, float]:
    registered = run["registered"]
    per_message = sum(v for k, v in registered.items()
                      if k.startswith(("messages ", "links ")))
    if "landed" not in run:  # --registration-only
        return {"message_bytes": per_message / run["messages"]}
    events, stored = run["landed"], run["stored"]
    in_events = sum(v for k, v in stored.items() if k.startswith("events "))
    in_log = sum(v for k, v in stored.items() if k.startswith("event_log "))
    beside = sum(v for k, v in stored.items() if not k.startswith("events "))
    return {"event_bytes": in_events / events, "log_bytes": in_log / events,
            "total_bytes": (in_events + in_log) / events, "beside_bytes": beside / events,
            "message_bytes": per_message / run["messages"],
            "postgres_us": run["postgres_cpu_s"] / events * 1e6,
            "python_us": run["python_cpu_s"] / events * 1e6, "queued": run["queued"]}


def _table(runs: dict[str, dict[str, Any]]) -> None:
    names = list(runs)
    print(f"{'':<44}" + "".join(f"{n:>14}" for n in names))

    def row(label: str, values: list[float], fmt: str = "{:,.1f}") -> None:
        print(f"{label:<44}" + "".join(f"{fmt.format(v):>14}" for v in values))

    each = {n: figures(r) for n, r in runs.items()}
    row("messages, links: bytes per message (5 links)", [each[n]["message_bytes"] for n in names])
    for key in sorted({k for r in runs.values() for k in r["registered"]}):
        row(f"  {key}", [runs[n]["registered"].get(key, 0) / runs[n]["messages"] for n in names])
    row("PostgreSQL CPU µs per registered message",
        [runs[n]["registration_cpu_s"] / runs[n]["messages"] * 1e6 for n in names], "{:.1f}")
    if any("landed" not in r for r in runs.values()):
        return
    row("events: bytes per event, with indexes", [each[n]["event_bytes"] for n in names])
    row("event_log (outbox): bytes per event", [each[n]["log_bytes"] for n in names])
    row("events + event_log: bytes per event", [each[n]["total_bytes"] for n in names])
    keys = sorted({k for r in runs.values() for k in r["stored"]})
    for key in keys:
        row(f"  {key}", [runs[n]["stored"].get(key, 0) / runs[n]["landed"] for n in names])
    row("PostgreSQL CPU µs per event, rollups in", [each[n]["postgres_us"] for n in names],
        "{:.2f}")
    for step in sorted({s for r in runs.values() for s in r["steps"]},
                       key=lambda s: -max(r["steps"].get(s, 0) for r in runs.values())):
        row(f"  {step}", [runs[n]["steps"].get(step, 0) / runs[n]["landed"] * 1e6
                          for n in names], "{:.2f}")
    print("rows written (inserted or updated) per event:")
    for table in sorted({t for r in runs.values() for t in r.get("rows", {})}):
        row(f"  {table}", [runs[n].get("rows", {}).get(table, 0) / runs[n]["landed"]
                           for n in names], "{:.2f}")
    row("writer's Python CPU µs per event", [each[n]["python_us"] for n in names], "{:.2f}")
    row("queued (waited for a core)", [each[n]["queued"] * 100 for n in names], "{:.0f} %")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks storage",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--messages", type=int, default=20_000,
                        help="messages registered, five links each")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--baseline", default=BASELINE, help="the commit measured as before")
    parser.add_argument("--no-baseline", action="store_true", help="this checkout alone")
    parser.add_argument("--registration-only", action="store_true",
                        help="measure the registered messages alone, no events")
    parser.add_argument("--json", action="store_true",
                        help="print the figures as one JSON object on the last line")
    parser.add_argument("--measure", metavar="FILE", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # the child: one schema, figures into FILE
        args.measure.write_text(json.dumps(measure(args)))
        return 0

    started = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tracker-storage-trees-") as scratch:
        if not args.no_baseline:
            print(f"before: {args.baseline} ...", flush=True)
            base = Path(scratch) / "before"
            base.mkdir()
            runs[f"before {args.baseline}"] = _child(_tree(args.baseline, base),
                                                     Path(scratch) / "before.json", args)
        print("after: this checkout ...", flush=True)
        runs["after"] = _child(ROOT, Path(scratch) / "after.json", args)
    events = "no events" if args.registration_only else (
        f"{args.events:,} events (the ingest benchmark's)")
    print(f"\n{events}, {args.messages:,} messages with five links; "
          f"{time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f}\n")
    _table(runs)
    now = figures(runs["after"])
    print()
    for key, goal in GOALS.items():
        if key not in now:
            continue
        verdict = "met" if now[key] <= goal else "not met"
        print(f"goal {key} <= {goal:g}: {verdict} ({now[key]:.1f})")
    exact = all(r.get("landed") == r.get("events") == r.get("written") for r in runs.values())
    if not args.registration_only:
        print(f"every event landed once: {'yes' if exact else 'NO'}")
    if args.json:
        print(json.dumps({name: figures(run) for name, run in runs.items()}))
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
