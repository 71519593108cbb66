"""The benchmark suite: tracker's figures beside its goals, in one command.

    python -m benchmarks suite                      # local: starts everything it measures
    python -m benchmarks suite --quick              # the same in about a minute (CI)
    python -m benchmarks suite --url https://track.example --api-key KEY   # your deployment

Local mode starts the embedded PostgreSQL, nginx serving a static 43-byte GIF (the
reference, in the same run) and `tracker serve`, pinned to core 0; wrk and PostgreSQL
get core 1, wrk at real-time priority where permitted and PostgreSQL at idle priority.
Remote mode uses your deployment through its API only: it creates a campaign and
messages with your key, loads the tracking URLs they were given, and checks the result
through the report (no database access; the campaign is deleted at the end unless
--keep-campaign).

Stages:
1. load: wrk (benchmarks/plan.lua) sends a mix (--mix) to the pixel and to the redirect,
   over many distinct tokens: `realistic` (the default) has Gmail's and Yahoo's image
   proxies, Apple Mail, Outlook, webmail and mobile browsers, Apple Mail Privacy
   Protection from Apple's addresses (local only: through X-Forwarded-For), security
   scanners, bots, requests without a user agent, HEAD link checks and a few percent
   tampered tokens; `readers` has people only. Each endpoint runs at full speed (wrk alone,
   as a user's plain wrk run: its CPU per request is the headline figure), then paced at
   half that rate with a probe beside it that times every answer. Requests/s per time
   window, latency percentiles (paced), wrk's own CPU, the server's and PostgreSQL's CPU
   (local), and nginx with the same plan as the reference.
2. correctness: the campaign's report must count exactly what the plan sent, human and
   machine apart (wrk sends a finite plan and stops with nothing in flight; see plan.lua);
   locally, every request that records an event is one row in PostgreSQL, once.
3. memory: VmRSS and VmHWM of each server worker after the load (local; remote: the
   largest worker's, from /metrics).
4. registration, report latency (1M and 10M events) and ingest: those programs as they
   are (`python -m benchmarks registration`, ...), their figures read from --json.

Prints tables and a goals table, and writes throughput.png, latency.png and summary.json
into --out (default benchmarks/out/). Exit status 1 if a correctness check or a stage
failed, 2 if the suite could not run (the line says why).

The parts: traffic.py (the mixes and what they must record), phases.py (the deployment
over HTTP and the load phases), wrk.py and plan.lua (wrk over a finite plan), common.py
(processes, /proc), figures.py (tables, charts, goals); this file runs the stages.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks.common import (
    LOAD_CORE,
    ROOT,
    BenchError,
    Database,
    command_line,
    descendants,
    free_port,
    last_json_line,
    memory_kib,
    require,
    start_nginx,
    start_tracker,
    stop,
)
from benchmarks.figures import charts, events_label, goals, print_goals, print_load
from benchmarks.phases import Check, Deployment, Load, LoadSettings, Phase, Target, correctness
from benchmarks.traffic import CAMPAIGNS, LINKS, LOCAL_SERVER_ENV, MIXES, Mix, Tally

DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def server_memory(pid: int) -> list[dict[str, Any]]:
    """VmRSS and VmHWM (peak) of each worker process of a `tracker serve`, in MB."""
    workers = [p for p in descendants(pid) if "resource_tracker" not in command_line(p)] or [pid]
    out = []
    for worker in sorted(workers):
        kib = memory_kib(worker)
        if kib:
            out.append({"pid": worker, "rss_mb": kib.get("VmRSS", 0) / 1024,
                        "peak_mb": kib.get("VmHWM", 0) / 1024})
    return out


# --- stages --------------------------------------------------------------------------------


@dataclass
class LoadResult:
    phases: list[Phase]
    checks: list[Check]
    problems: list[str]  # runs not answered as planned
    memory: list[dict[str, Any]]
    messages: int
    registration_s: float
    report_ms: list[float]
    events: int

    @property
    def correct(self) -> bool:
        return not self.problems and all(c.ok for c in self.checks)

    def find(self, name: str) -> Phase | None:
        return next((p for p in self.phases if p.name == name), None)


def load_stage(args: argparse.Namespace) -> LoadResult:
    workdir = Path(tempfile.mkdtemp(prefix="tracker-suite-"))
    db: Database | None = None
    nginx: subprocess.Popen[bytes] | None = None
    tracker: subprocess.Popen[bytes] | None = None
    deployment: Deployment | None = None
    try:
        if args.url:
            require("wrk", hint="apt-get install wrk")
            deployment = Deployment(args.url, args.api_key)
            deployment.check()
        else:
            require("wrk", "nginx", "taskset")
            print("starting PostgreSQL, nginx and tracker ...", flush=True)
            db = Database(workdir / "pg")
            db.yield_to_load(LOAD_CORE)
            key = db.account("benchmark-suite")
            nginx_port = free_port()
            nginx = start_nginx(workdir / "nginx", nginx_port, any_path=True)
            extra = {**LOCAL_SERVER_ENV, "TRACKER_WORKERS": str(args.workers)}
            args.geoip_used = geo_database(args.geoip_db, args.out, fetch=not args.quick)
            if args.geoip_used is not None:
                extra["TRACKER_GEOIP_DB"] = str(args.geoip_used)
            args.server_used = "uvicorn"
            tracker, url = start_tracker(db.dsn, workdir, **extra)
            print(f"tracker serve ({args.workers} worker(s)) pinned to core "
                  f"0; wrk and PostgreSQL on core {LOAD_CORE}", flush=True)
            deployment = Deployment(url, key)
        deployment.create_campaign(f"benchmark suite {datetime.now(UTC):%Y-%m-%d %H:%M:%S}")
        messages, registration_s, origin = deployment.register(args.messages, args.links)
        print(f"registered {len(messages):,} messages with {args.links} links each in "
              f"{registration_s:.1f} s; tracking URLs at {origin}", flush=True)
        mix = Mix(messages, remote=bool(args.url), seed=args.seed, name=args.mix)
        problems = mix.check_rules()
        if problems:
            raise BenchError("the traffic mix expects other verdicts than tracker's rules "
                             "give; update benchmarks/traffic.py:\n  " + "\n  ".join(problems))
        target = Target(origin, [tracker.pid] if tracker else [], db)
        load = Load(load_settings(args), deployment, mix, workdir)
        phases = []
        print(f"load: {args.connections} connections, about {args.seconds:g} s per phase",
              flush=True)
        if nginx is not None:
            phases.append(load.phase("nginx static GIF", "pixel", Target(
                f"http://127.0.0.1:{nginx_port}", [nginx.pid]), reference=True))
        pixel = load.phase("tracker pixel", "pixel", target)
        click = load.phase("tracker click", "click", target)
        phases += [pixel, click]
        memory = server_memory(tracker.pid) if tracker else deployment.worker_memory()
        phases.append(load.phase("tracker pixel, half rate", "pixel", target,
                                 paced=pixel.rate / 2))
        phases.append(load.phase("tracker click, half rate", "click", target,
                                 paced=click.rate / 2))
        checks = correctness(load, 60 if args.quick else 300)
        if db is not None:
            checks.append(events_landed(db, deployment.campaign, load.tally))
        report_ms = [t * 1000 for t in deployment.report_latency(10 if args.quick else 30)]
        events = sum(load.tally.counters().values())
        return LoadResult(phases, checks, load.problems, memory, len(messages), registration_s,
                          report_ms, events)
    finally:
        if args.url and deployment is not None and not args.keep_campaign:
            try:
                deployment.delete_campaign()
            except BenchError as exc:
                print(f"could not delete the benchmark campaign: {exc}", file=sys.stderr)
        stop(tracker)
        stop(nginx, signal.SIGQUIT, 10)
        if db is not None:
            db.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def geo_database(wanted: Path | None, out: Path, fetch: bool = True) -> Path | None:
    """The geo database the local server locates readers with, as a default install does
    (`tracker serve` fetches DB-IP City Lite): --geoip-db (`none`: none), else
    TRACKER_GEOIP_DB, else the default data dir's (./tracker-data/geoip), else one fetched
    into --out once (not with --quick). Without one every lookup is skipped and a hit costs
    less than it does for a user."""
    from tracker.ingest.geo import DBIP_CITY_LITE_FILENAME, GEOIP_SUBDIR
    from tracker.ingest.geoip_fetch import GeoFetchError, fetch_dbip_city_lite

    if wanted is not None:
        if str(wanted) == "none":
            return None
        if not wanted.is_file():
            raise BenchError(f"--geoip-db: {wanted} is not a file")
        return wanted
    configured = os.environ.get("TRACKER_GEOIP_DB")
    if configured:
        return Path(configured)
    for directory in (Path("tracker-data") / GEOIP_SUBDIR, out / GEOIP_SUBDIR):
        if (directory / DBIP_CITY_LITE_FILENAME).is_file():
            return directory / DBIP_CITY_LITE_FILENAME
    if not fetch:
        return None
    print(f"fetching DB-IP City Lite into {out / GEOIP_SUBDIR} (once; ~100 MB) ...",
          flush=True)
    try:
        return fetch_dbip_city_lite(out / GEOIP_SUBDIR)
    except GeoFetchError as exc:
        print(f"no geo database ({exc}): the server locates nothing, and its figures "
              "flatter it (--geoip-db PATH)", flush=True)
        return None


def load_settings(args: argparse.Namespace) -> LoadSettings:
    return LoadSettings(seconds=args.seconds, connections=args.connections, threads=args.threads,
                        probe_rate=args.probe_rate, probe_connections=args.probe_connections,
                        probe_full_speed=False, window=args.window, warmup=args.warmup,
                        settle_s=60 if args.quick else 180, local=not args.url)


def events_landed(db: Database, campaign: str, tally: Tally) -> Check:
    """Every request that records an event is one row in PostgreSQL, and no row twice:
    the rows and their distinct ids, against what the plans sent."""
    counted = db.value("select array[count(*), count(distinct id)] from events "
                       "where campaign_id = $1", int(campaign))
    recorded = sum(tally.counters().values())
    return Check("events in PostgreSQL (rows, ids)", [recorded, recorded], list(counted))


@dataclass
class Program:
    title: str
    figures: dict[str, Any] | None
    ok: bool


def program_stage(title: str, name: str, arguments: Sequence[str]) -> Program:
    """One of the other benchmark programs, its output shown indented, its figures read
    from the JSON object it prints last with --json."""
    print(f"\n{title}: python -m benchmarks {name} {' '.join(arguments)}", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks", name, *arguments, "--json"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if not line.startswith("{"):
            print("    " + line.rstrip(), flush=True)
    code = proc.wait()
    try:
        figures: dict[str, Any] | None = last_json_line("".join(lines))
    except ValueError:
        figures = None
    if code != 0 or figures is None:
        print(f"  {name} failed (exit {code})", flush=True)
    return Program(title, figures, code == 0 and figures is not None)


def other_stages(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    out: dict[str, Any] = {}
    if "registration" in args.stages:
        out["registration"] = program_stage(
            "registration", "registration",
            ["--duration", "2", "--batch", "200", "--connections", "2"] if quick else [])
    if "reports" in args.stages:
        out["reports"] = []
        for events in args.report_events:
            days = ["--days", "2", "--reports", "5", "--fresh", "2"] if quick else []
            out["reports"].append((events, program_stage(
                f"report latency, {events_label(events)} events", "reports",
                ["--events", str(events), "--messages", str(max(1000, events // 10)), *days])))
    if "ingest" in args.stages:
        out["ingest"] = program_stage(
            "ingest", "ingest",
            ["--events", "30000", "--accounts", "1", "--campaigns", "2", "--messages", "2000",
             "--readers", "5000"] if quick else [])
    return out


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks suite", description=__doc__, epilog="See benchmarks/README.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a deployment to measure (remote mode); default: start "
                        "everything locally")
    parser.add_argument("--api-key", default=os.environ.get("TRACKER_API_KEY"),
                        help="an API key of the deployment [TRACKER_API_KEY]")
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds per stage and small sizes (CI)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="where the charts and summary.json go (default: %(default)s)")
    parser.add_argument("--stages", default="load,registration,reports,ingest",
                        help="comma-separated: load, registration, reports, ingest")
    parser.add_argument("--seconds", type=float, help="per load phase (default 15; quick 2)")
    parser.add_argument("--window", type=float, help="seconds per time window (default 1; "
                        "quick 0.25)")
    parser.add_argument("--connections", type=int, default=64,
                        help="of the load's wrk (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="of the load's wrk (default %(default)s: one core's worth)")
    parser.add_argument("--probe-rate", type=float, default=1000,
                        help="requests/s of the probe that times answers (default %(default)s)")
    parser.add_argument("--probe-connections", type=int, default=16)
    parser.add_argument("--messages", type=int, help="messages in the load's campaign "
                        "(default: readers 300, realistic 20000, quick 1000)")
    parser.add_argument("--links", type=int, choices=range(1, len(LINKS) + 1),
                        metavar=f"1-{len(LINKS)}", help="links in each message (default: "
                        "readers 3, realistic 5)")
    parser.add_argument("--mix", choices=sorted(MIXES), default="readers",
                        help="what the load sends (default %(default)s: five common agents, "
                        "people only; realistic: machines, MPP, scanners, tampered tokens too)")
    parser.add_argument("--workers", type=int, default=1, help="server workers (local mode)")
    parser.add_argument("--geoip-db", type=Path, help="local mode: the server's geo database "
                        "(default: TRACKER_GEOIP_DB, ./tracker-data/geoip, or DB-IP City Lite "
                        "fetched into --out once, not with --quick; none: no database)")
    parser.add_argument("--report-events", help="comma-separated campaign sizes for the report "
                        "stage (default 1000000,10000000; quick 20000)")
    parser.add_argument("--keep-campaign", action="store_true",
                        help="remote mode: keep the benchmark's campaign")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    args.stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    unknown = args.stages - {"load", "registration", "reports", "ingest"}
    if unknown:
        parser.error(f"--stages: unknown {', '.join(sorted(unknown))}")
    if args.url:
        if not args.api_key:
            parser.error("--url needs --api-key (or TRACKER_API_KEY)")
        if urlsplit(args.url).scheme not in ("http", "https"):
            parser.error("--url: must start with http:// or https://")
    if min(args.connections, args.threads, args.probe_connections) < 1 or \
            args.connections % args.threads:
        parser.error("--connections, --threads, --probe-connections: at least 1, and the "
                     "connections a multiple of the threads")
    if args.probe_rate <= 0:
        parser.error("--probe-rate: above 0")
    args.seconds = args.seconds or (2.0 if args.quick else 15.0)
    args.window = args.window or (0.25 if args.quick else 1.0)
    messages, links, quick_messages = CAMPAIGNS[args.mix]
    args.messages = args.messages or (quick_messages if args.quick else messages)
    args.links = args.links or links
    args.warmup = 10 if args.quick else 40
    sizes = args.report_events or ("20000" if args.quick else "1000000,10000000")
    try:
        args.report_events = [int(float(n)) for n in sizes.split(",") if n.strip()]
    except ValueError:
        parser.error("--report-events: comma-separated numbers")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"error: cannot write to {args.out}: {exc}") from None
    started = time.monotonic()
    load_before = os.getloadavg()
    args.server_used = None
    args.geoip_used = None
    load: LoadResult | None = None
    others: dict[str, Any] = {}
    try:
        if "load" in args.stages:
            load = load_stage(args)
        others = other_stages(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    written: list[Path] = []
    if load is not None:
        print_load(load, args)
        written = charts(load, args.out)
    rows = goals(load, others)
    print_goals(rows)
    failed = [p.title for p in _programs(others) if not p.ok]
    summary = {
        "mode": "remote" if args.url else "local", "url": args.url, "quick": args.quick,
        "finished_at": datetime.now(UTC).isoformat(), "seconds": time.monotonic() - started,
        # Other work on the machine shows here: the figures of a busy machine are lower.
        "load_average": {"start": load_before, "end": os.getloadavg(),
                         "cores": os.cpu_count()},
        "settings": {k: v for k, v in vars(args).items()
                     if k not in ("api_key", "out", "stages")},
        "load": None if load is None else {
            "correct": load.correct, "problems": load.problems,
            "messages": load.messages, "registration_s": load.registration_s,
            "report_ms": load.report_ms, "memory": load.memory,
            "phases": [p.as_json() for p in load.phases],
            "checks": [{"name": c.name, "expected": c.expected, "got": c.got, "ok": c.ok}
                       for c in load.checks]},
        "programs": {p.title: {"ok": p.ok, "figures": p.figures}
                     for p in _programs(others)},
        "goals": [{**r.__dict__, "verdict": r.verdict} for r in rows],
        "charts": [str(p) for p in written],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nload average (1 min) {load_before[0]:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores: other work on the "
          "machine lowers the figures")
    print(f"\n{', '.join(p.name for p in written) + ' and ' if written else ''}summary.json "
          f"in {args.out}; {time.monotonic() - started:.0f} s in all")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    if load is not None and not load.correct:
        print("correctness: FAIL", file=sys.stderr)
    return 1 if failed or (load is not None and not load.correct) else 0


def _programs(others: dict[str, Any]) -> list[Program]:
    found = [others[k] for k in ("registration", "ingest") if k in others]
    return found + [program for _, program in others.get("reports", [])]
