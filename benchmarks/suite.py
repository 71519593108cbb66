"""The benchmark suite: tracker's figures beside its goals, in one command.

    python benchmarks/suite.py                      # local: starts everything it measures
    python benchmarks/suite.py --quick              # the same in about a minute (CI)
    python benchmarks/suite.py --url https://track.example --api-key KEY   # your deployment

Local mode starts the embedded PostgreSQL, nginx serving a static 43-byte GIF (the
reference) and `tracker serve` (pinned to core 0; wrk and PostgreSQL get core 1). Remote
mode uses your deployment through its API only: it creates a campaign and messages with
your key, loads the tracking URLs they were given, and checks the result through the
report (no database access; the campaign is deleted at the end unless --keep-campaign).

Stages:
1. load: wrk (benchmarks/plan.lua) sends a realistic mix to the pixel and to the redirect:
   many distinct tokens; Gmail's and Yahoo's image proxies, Apple Mail, Outlook, webmail
   and mobile browsers; Apple Mail Privacy Protection from Apple's addresses (local only:
   through X-Forwarded-For), security scanners, bots, requests without a user agent, HEAD
   link checks; a few percent tampered tokens. Each endpoint runs at full speed, then
   paced at half that rate. Requests/s and latency percentiles per time window, wrk's own
   CPU, the server's CPU (local), and nginx with the same plan as the reference.
2. correctness: the campaign's report must count exactly what the plan sent, human and
   machine apart (wrk sends a finite plan and stops with nothing in flight; see plan.lua).
3. memory: VmRSS and VmHWM of each server worker after the load (local).
4. registration, report latency (1M and 10M events) and ingest: registration.py,
   reports.py and ingest.py (if present) as they are, their figures read from --json.

Prints tables and a goals table, and writes throughput.png, latency.png and summary.json
into --out (default benchmarks/out/). Exit status 1 if a correctness check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    LOAD_CORE,
    BenchError,
    Database,
    Plan,
    PlanRun,
    command_line,
    descendants,
    free_port,
    last_json_line,
    latency_ms,
    memory_kib,
    percentile,
    require,
    run_plans,
    series,
    start_nginx,
    start_tracker,
    stop,
    tree_cpu_seconds,
    write_plan,
)
from traffic import LINKS, Message, Mix, Tally, report_figures

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out"

# --- the deployment under test ----------------------------------------------------------------


class Deployment:
    """tracker's API and tracking URLs, local or remote, seen only over HTTP."""

    def __init__(self, url: str, api_key: str) -> None:
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, timeout=60,
                                   headers={"authorization": f"Bearer {api_key}"})
        self.campaign = ""

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise BenchError(f"cannot reach {self.url}: {exc}") from None
        if response.status_code == 401:
            raise BenchError(f"{self.url} refused the API key (401): check --api-key")
        if response.status_code >= 400:
            raise BenchError(f"{method} {path}: {response.status_code} {response.text[:200]}")
        return response

    def check(self) -> None:
        self.call("GET", "/api/campaigns")

    def create_campaign(self, name: str) -> None:
        self.campaign = self.call("POST", "/api/campaigns", json={"name": name}).json()["id"]

    def delete_campaign(self) -> None:
        if self.campaign:
            self.call("DELETE", f"/api/campaigns/{self.campaign}")

    def register(self, count: int, batch: int = 1000) -> tuple[list[Message], float, str]:
        """`count` messages with LINKS, sent two hours ago (a click within seconds of
        sent_at is a machine's). Returns them, the seconds it took, and the origin of their
        tracking URLs (TRACKER_PUBLIC_URL: where mail clients send the hits)."""
        sent_at = (datetime.now(UTC) - timedelta(hours=2)).isoformat()

        def one(start: int) -> list[dict[str, Any]]:
            body = {"messages": [{"recipient": f"reader{n}@bench.example", "sent_at": sent_at,
                                  "subject": "Our November news", "links": list(LINKS)}
                                 for n in range(start, min(count, start + batch))]}
            answer = self.call("POST", f"/api/campaigns/{self.campaign}/messages/batch",
                               json=body)
            return answer.json()["messages"]  # type: ignore[no-any-return]

        started = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            answers = [m for part in pool.map(one, range(0, count, batch)) for m in part]
        seconds = time.perf_counter() - started
        messages = [Message(_path(m["pixel_url"]),
                            tuple(_path(link["tracked_url"]) for link in m["links"]))
                    for m in answers]
        origin = urlsplit(answers[0]["pixel_url"])
        return messages, seconds, f"{origin.scheme}://{origin.netloc}"

    def report(self) -> dict[str, Any]:
        return self.call("GET", f"/api/campaigns/{self.campaign}/report").json()  # type: ignore[no-any-return]

    def report_latency(self, calls: int) -> list[float]:
        self.report()
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            self.report()
            times.append(time.perf_counter() - started)
        return times


def _path(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


# --- load phases ---------------------------------------------------------------------------


@dataclass
class Phase:
    """One endpoint under one kind of load: the load's wrk and the probe's, side by side."""

    name: str
    endpoint: str  # pixel | click
    reference: bool  # nginx
    paced: float  # the requests/s asked for; 0: as fast as answered
    runs: list[PlanRun]  # the load, then the probe (warm-up runs are not in the figures)
    not_found_expected: int | None  # 404s its plans must get (tampered click tokens)
    settle_s: float = 0.0
    server_cpu_s: float = 0.0  # the runs, and the writer catching up after them

    @property
    def requests(self) -> int:
        return sum(run.answered for run in self.runs)

    @property
    def seconds(self) -> float:
        working = [run for run in self.runs if run.answered]
        return (max(r.done_us for r in working) - min(r.first_us for r in working)) / 1e6 \
            if working else 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def per_cpu_second(self) -> float:
        return self.requests / self.server_cpu_s if self.server_cpu_s > 0 else 0.0

    @property
    def server_wait(self) -> float:
        """Share of the phase the server's threads spent waiting for a CPU that other work
        had: where it is large, the machine was busy and the figures are low."""
        return self.runs[0].server_wait_s / self.seconds if self.seconds else 0.0

    @property
    def wrk_cpu_s(self) -> float:
        return sum(run.wrk_cpu_s for run in self.runs)

    @property
    def wrk_share(self) -> float:
        """wrk's CPU over the phase as a share of one core (both processes)."""
        wall = max(run.wall_s for run in self.runs)
        return self.wrk_cpu_s / wall if wall else 0.0

    @property
    def late(self) -> int:
        return sum(run.late for run in self.runs)

    @property
    def late_max_ms(self) -> float:
        return max(run.late_max_ms for run in self.runs)

    @property
    def not_found(self) -> int:
        return sum(run.errors["status"] for run in self.runs)

    @property
    def socket_errors(self) -> int:
        return sum(run.socket_errors for run in self.runs)

    def latency_ms(self, q: float) -> float:
        return latency_ms(self.runs, q) or 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "endpoint": self.endpoint, "reference": self.reference,
            "paced_rate": self.paced, "requests": self.requests, "seconds": self.seconds,
            "rate": self.rate, "timed": sum(sum(map(len, r.latencies.values()))
                                            for r in self.runs),
            "runs": [{"planned": r.planned, "sent": r.sent, "answered": r.answered,
                      "complete": r.complete, "errors": r.errors, "fillers": r.fillers,
                      "late": r.late, "late_max_ms": r.late_max_ms, "wrk_cpu_s": r.wrk_cpu_s,
                      "wall_s": r.wall_s} for r in self.runs],
            "not_found_expected": self.not_found_expected,
            "latency_ms": {f"p{k}": self.latency_ms(q) for k, q in PERCENTILES},
            "wrk_cpu_s": self.wrk_cpu_s, "wrk_cpu_share": self.wrk_share,
            "server_cpu_s": self.server_cpu_s, "per_cpu_second": self.per_cpu_second,
            "server_wait_share": self.server_wait, "settle_s": self.settle_s,
            "windows": [w.__dict__ for w in series(self.runs)],
        }


PERCENTILES = (("50", 0.5), ("90", 0.9), ("99", 0.99), ("99.9", 0.999))


@dataclass
class Target:
    url: str
    pids: list[int]  # whose CPU is the server's (local); none for a remote deployment


class Load:
    """Runs the phases over one campaign, keeps the tally of what they sent, and notes every
    run whose answers were not all as planned.

    Each run is two wrk processes started together. The load: one thread, many connections
    (wrk's cheapest way to send), answers counted per window. The probe: a few connections
    of one thread each, paced, every answer timed; it stops when the load is done. Their
    requests are drawn from the same mix and both are counted in the tally. (wrk can time
    an answer only where a thread has one connection, and a thread per connection costs
    wrk about three times the CPU per request, which would make wrk the bottleneck.)"""

    def __init__(self, args: argparse.Namespace, deployment: Deployment, mix: Mix,
                 workdir: Path) -> None:
        self.args = args
        self.deployment = deployment
        self.mix = mix
        self.workdir = workdir
        self.tally = Tally(len(mix.messages))
        self.problems: list[str] = []
        self.runs = 0

    def phase(self, name: str, endpoint: str, target: Target, *, reference: bool = False,
              paced: float = 0.0) -> Phase:
        args = self.args
        kind = "open" if endpoint == "pixel" else "click"
        record = not reference
        if paced:
            runs, not_found = self._send(name, target, kind, paced * args.seconds, paced,
                                         record)
        else:
            # Short runs first: they warm the server's caches and tell how many requests
            # fill the phase's seconds. A run that ends much sooner than that was a warm-up
            # too (the pace picks up once caches are warm), and the next one is sized anew.
            runs, not_found = self._send(name, target, kind, args.connections * args.warmup,
                                         0.0, record)
            for _ in range(4):
                count = max(args.connections * 20, _rate(runs) * args.seconds * 1.1)
                runs, not_found = self._send(name, target, kind, count, 0.0, record)
                if runs[0].active_s >= 0.75 * args.seconds:
                    break
        phase = Phase(name, endpoint, reference, paced, runs, None if reference else not_found,
                      server_cpu_s=runs[0].server_cpu_s)
        if record:
            before = sum(tree_cpu_seconds(p) for p in target.pids)
            phase.settle_s = self.settle(60 if args.quick else 180)
            phase.server_cpu_s += sum(tree_cpu_seconds(p) for p in target.pids) - before
        print(f"  {name:<26} {phase.requests:>9,} requests in {phase.seconds:5.1f} s: "
              f"{phase.rate:>7,.0f}/s, p99 {phase.latency_ms(0.99):6.2f} ms, "
              f"wrk {phase.wrk_share:4.0%} of a core"
              + (f", writer caught up in {phase.settle_s:.1f} s" if record else ""), flush=True)
        return phase

    def _send(self, name: str, target: Target, kind: str, count: float, paced: float,
              record: bool) -> tuple[list[PlanRun], int]:
        """One run of about `count` requests (paced at `paced`/s in all if not 0); returns
        the load's and the probe's PlanRun and the 404s their plans must get."""
        args = self.args
        self.runs += 1
        directory = self.workdir / f"run-{self.runs}"
        probe_rate = min(args.probe_rate, paced / 4) if paced else args.probe_rate
        expected_s = count / paced if paced else args.seconds
        load_count = max(args.connections, round(count - probe_rate * expected_s))
        # The probe's plan outlasts the load's; it stops when the load is done.
        probe_count = max(args.probe_connections, round(probe_rate * expected_s * 3))
        plans = [Plan(directory / "load", args.connections, args.threads,
                      rate=paced - probe_rate if paced else 0.0,
                      finished=directory / "load-finished"),
                 Plan(directory / "probe", args.probe_connections, args.probe_connections,
                      rate=probe_rate, timed=True, stop=directory / "load-finished")]
        requests = []
        for plan, n in zip(plans, (load_count, probe_count), strict=True):
            requests.append(self.mix.requests(kind, n))
            write_plan(plan.directory, self.mix.agents, [r.line for r in requests[-1]],
                       plan.threads)
        runs = run_plans(target.url, plans, window_s=args.window, cap_s=max(30, 5 * expected_s),
                         core=None if args.url else LOAD_CORE, server_pids=target.pids)
        # What was sent: each thread's first `sent` lines.
        sent = [r for plan, run, planned in zip(plans, runs, requests, strict=True)
                for n, k in enumerate(run.thread_sent) for r in planned[n::plan.threads][:k]]
        not_found = sum(1 for r in sent if r.kind == "click" and r.machine is None)
        if record:
            self.tally.add(sent)
            problems = []
            for label, run in zip(("load", "probe"), runs, strict=True):
                if not run.complete:
                    problems.append(f"{label}: {run.sent - run.answered} requests in flight "
                                    "when wrk was stopped at its cap")
                if run.socket_errors or run.fillers:
                    problems.append(f"{label}: socket errors {run.errors}, {run.fillers} "
                                    "requests re-sent outside the plan")
            status = sum(run.errors["status"] for run in runs)
            if status != not_found:
                problems.append(f"{status} answers >= 400, {not_found} planned (tampered links)")
            self.problems += [f"{name} (run {self.runs}): {p}" for p in problems]
        return runs, not_found

    def settle(self, timeout: float) -> float:
        """Until the report counts what was sent (the writer has caught up), or `timeout`."""
        started = time.monotonic()
        want = self.tally.counters()
        while time.monotonic() - started < timeout:
            got = report_figures(self.deployment.report())
            if {k: got[k] for k in want} == want:
                break
            time.sleep(0.2)
        return time.monotonic() - started


def _rate(runs: Sequence[PlanRun]) -> float:
    working = [run for run in runs if run.answered]
    span = (max(r.done_us for r in working) - min(r.first_us for r in working)) / 1e6 \
        if working else 0.0
    return sum(r.answered for r in working) / span if span else 0.0


@dataclass
class Check:
    name: str
    expected: Any
    got: Any

    @property
    def ok(self) -> bool:
        return bool(self.expected == self.got)


def correctness(load: Load, timeout: float) -> list[Check]:
    """The report against the tally, once it counts everything or stops changing."""
    expected = load.tally.expected()
    deadline = time.monotonic() + timeout
    got: dict[str, Any] = {}
    while True:
        got = report_figures(load.deployment.report())
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    checks = [Check(name, value, got.get(name)) for name, value in expected.items()
              if name != "links"]
    for url, value in expected["links"].items():
        checks.append(Check(f"link {urlsplit(url).path or '/'} clicks, unique",
                            value, got["links"].get(url)))
    return checks


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
            db.pin(LOAD_CORE)
            key = db.account("benchmark-suite")
            nginx_port = free_port()
            nginx = start_nginx(workdir / "nginx", nginx_port, any_path=True)
            extra = {"TRACKER_TRUSTED_PROXIES": "127.0.0.1/32", "TRACKER_RULES": "",
                     "TRACKER_WORKERS": str(args.workers)}
            if args.server:
                extra["TRACKER_SERVER"] = args.server
            args.server_used = _server_name(extra)
            tracker, url = start_tracker(db.dsn, workdir, **extra)
            print(f"tracker serve ({args.server_used}, {args.workers} worker(s)) pinned to core "
                  f"0; wrk and PostgreSQL on core {LOAD_CORE}", flush=True)
            deployment = Deployment(url, key)
        deployment.create_campaign(f"benchmark suite {datetime.now(UTC):%Y-%m-%d %H:%M:%S}")
        messages, registration_s, origin = deployment.register(args.messages)
        print(f"registered {len(messages):,} messages with {len(LINKS)} links each in "
              f"{registration_s:.1f} s; tracking URLs at {origin}", flush=True)
        mix = Mix(messages, remote=bool(args.url), seed=args.seed)
        problems = mix.check_rules()
        if problems:
            raise BenchError("the traffic mix expects other verdicts than tracker's rules "
                             "give; update benchmarks/suite.py:\n  " + "\n  ".join(problems))
        target = Target(origin, [tracker.pid] if tracker else [])
        load = Load(args, deployment, mix, workdir)
        phases = []
        print(f"load: {args.connections} connections, about {args.seconds:g} s per phase",
              flush=True)
        if nginx is not None:
            phases.append(load.phase("nginx static GIF", "pixel", Target(
                f"http://127.0.0.1:{nginx_port}", [nginx.pid]), reference=True))
        pixel = load.phase("tracker pixel", "pixel", target)
        click = load.phase("tracker click", "click", target)
        phases += [pixel, click]
        memory = server_memory(tracker.pid) if tracker else []
        phases.append(load.phase("tracker pixel, half rate", "pixel", target,
                                 paced=pixel.rate / 2))
        phases.append(load.phase("tracker click, half rate", "click", target,
                                 paced=click.rate / 2))
        checks = correctness(load, 60 if args.quick else 300)
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


def _server_name(extra: dict[str, str]) -> str:
    """The HTTP server `tracker serve` will use with these variables."""
    from tracker.settings import SETTINGS

    default = next(s.default for s in SETTINGS if s.env == "TRACKER_SERVER")
    return extra.get("TRACKER_SERVER") or os.environ.get("TRACKER_SERVER") or default


@dataclass
class Program:
    title: str
    figures: dict[str, Any] | None
    ok: bool
    available: bool = True


def program_stage(title: str, script: str, arguments: Sequence[str]) -> Program:
    """One of the other benchmark programs, its output shown indented, its figures read
    from the JSON object it prints last with --json."""
    path = HERE / script
    if not path.exists():
        print(f"\n{title}: not available (no benchmarks/{script})", flush=True)
        return Program(title, None, True, available=False)
    print(f"\n{title}: python benchmarks/{script} {' '.join(arguments)}", flush=True)
    proc = subprocess.Popen([sys.executable, str(path), *arguments, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
        print(f"  {script} failed (exit {code})", flush=True)
    return Program(title, figures, code == 0 and figures is not None)


def _events_label(events: int) -> str:
    return f"{events / 1e6:g}M" if events >= 1_000_000 else f"{events / 1e3:g}k"


def other_stages(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    out: dict[str, Any] = {}
    if "registration" in args.stages:
        out["registration"] = program_stage(
            "registration", "registration.py",
            ["--duration", "2", "--batch", "200", "--connections", "2"] if quick else [])
    if "reports" in args.stages:
        out["reports"] = []
        for events in args.report_events:
            days = ["--days", "2", "--reports", "5", "--fresh", "2"] if quick else []
            out["reports"].append((events, program_stage(
                f"report latency, {_events_label(events)} events", "reports.py",
                ["--events", str(events), "--messages", str(max(1000, events // 10)), *days])))
    if "ingest" in args.stages:
        out["ingest"] = program_stage(
            "ingest", "ingest.py",
            ["--events", "30000", "--accounts", "1", "--campaigns", "2", "--messages", "2000",
             "--readers", "5000"] if quick else [])
    return out


# --- output --------------------------------------------------------------------------------


@dataclass
class Goal:
    figure: str
    value: str
    goal: str
    met: bool | None  # None: not measured here

    @property
    def verdict(self) -> str:
        return {True: "met", False: "MISSED", None: "-"}[self.met]


def goals(load: LoadResult | None, others: dict[str, Any]) -> list[Goal]:
    rows = []
    nginx = load.find("nginx static GIF") if load else None
    for endpoint, wanted in (("pixel", 0.5), ("click", 0.45)):
        phase = load.find(f"tracker {endpoint}") if load else None
        if phase is None:
            continue
        if nginx is None or not nginx.per_cpu_second:
            rows.append(Goal(f"{endpoint} ÷ nginx, requests per CPU-second", "local only",
                             f"≥ {wanted:.2f}×", None))
            continue
        ratio = phase.per_cpu_second / nginx.per_cpu_second
        rows.append(Goal(f"{endpoint} ÷ nginx, requests per CPU-second", f"{ratio:.2f}×",
                         f"≥ {wanted:.2f}×", ratio >= wanted))
    for endpoint in ("pixel", "click"):
        phase = load.find(f"tracker {endpoint}, half rate") if load else None
        if phase is None:
            continue
        p99 = phase.latency_ms(0.99)
        rows.append(Goal(f"{endpoint} p99 at half the maximum rate ({phase.rate:,.0f}/s)",
                         f"{p99:.2f} ms", "≤ 5 ms", p99 <= 5))
    ingest = others.get("ingest")
    if ingest is not None:
        rate = (ingest.figures or {}).get("events_per_s")
        rows.append(Goal("ingest, events/s through the writer (idempotent)",
                         f"{rate:,.0f}" if rate else "not available" if not ingest.available
                         else "failed", "≥ 100,000",
                         None if not rate else rate >= 100_000
                         and bool(ingest.figures.get("idempotent", True))))
    if load is not None:
        peak = max((m["peak_mb"] for m in load.memory), default=None)
        rows.append(Goal("RSS per worker under load (peak)",
                         f"{peak:.0f} MB" if peak else "local only", "≤ 150 MB",
                         None if peak is None else peak <= 150))
    registration = others.get("registration")
    if registration is not None:
        rate = (registration.figures or {}).get("messages_per_s")
        rows.append(Goal("registration, messages/s (16 KB HTML, 5 links)",
                         f"{rate:,.0f}" if rate else "failed", "≥ 5,000",
                         None if not rate else rate >= 5000))
    elif load is not None:
        rate = load.messages / load.registration_s
        rows.append(Goal("registration, messages/s (links only, the load's campaign)",
                         f"{rate:,.0f}", "≥ 5,000", rate >= 5000))
    for events, program in others.get("reports", []):
        p50 = (program.figures or {}).get("report_p50_ms")
        rows.append(Goal(f"report latency, {_events_label(events)} events (p50)",
                         f"{p50:.1f} ms" if p50 is not None else "failed", "≤ 200 ms",
                         None if p50 is None else p50 <= 200))
    if load is not None and not others.get("reports"):
        p50 = percentile(load.report_ms, 0.5)
        rows.append(Goal(f"report latency, the load's campaign ({load.events:,} events, p50)",
                         f"{p50:.1f} ms", "≤ 200 ms", p50 <= 200))
    if load is not None:
        passed = sum(c.ok for c in load.checks)
        rows.append(Goal("end-to-end correctness (report = what was sent)",
                         f"{'PASS' if load.correct else 'FAIL'} ({passed}/{len(load.checks)})",
                         "all equal", load.correct))
        busiest = max(load.phases, key=lambda p: p.wrk_share)
        rows.append(Goal(f"load generator CPU, busiest phase ({busiest.name})",
                         f"{busiest.wrk_share:.0%} of a core", "< 90 %",
                         busiest.wrk_share < 0.9))
    return rows


def print_load(load: LoadResult, args: argparse.Namespace) -> None:
    nginx = load.find("nginx static GIF")
    where = ("remote deployment" if args.url else
             f"tracker serve ({args.server_used}) pinned to core 0, wrk and PostgreSQL on core "
             f"{LOAD_CORE}")
    print(f"\nLoad: wrk with a finite plan per run, {args.connections} connections on "
          f"{args.threads} thread(s), and a probe of {args.probe_connections} paced connections "
          f"({args.probe_rate:,.0f} requests/s) that times every answer; {load.messages:,} "
          f"messages, {len(LINKS)} links each; {where}\n")
    print(f"{'phase':<26} {'requests':>9} {'req/s':>8} {'p50 ms':>7} {'p90 ms':>7} "
          f"{'p99 ms':>7} {'p99.9':>7} {'errors':>6} {'404 want/got':>12} {'wrk cpu':>7} "
          f"{'req/cpu-s':>9} {'cpu wait':>8} {'× nginx':>7} {'×/cpu':>6}")
    for p in load.phases:
        ratio = f"{p.rate / nginx.rate:.2f}" if nginx and not p.reference else ""
        cpu_ratio = (f"{p.per_cpu_second / nginx.per_cpu_second:.2f}"
                     if nginx and not p.reference and nginx.per_cpu_second else "")
        status = (f"{p.not_found_expected}/{p.not_found}"
                  if p.not_found_expected is not None else "")
        per_cpu = f"{p.per_cpu_second:,.0f}" if p.per_cpu_second else "n/a"
        wait = f"{p.server_wait:.0%}" if p.per_cpu_second else "n/a"
        print(f"{p.name:<26} {p.requests:>9,} {p.rate:>8,.0f} {p.latency_ms(0.5):>7.2f} "
              f"{p.latency_ms(0.9):>7.2f} {p.latency_ms(0.99):>7.2f} "
              f"{p.latency_ms(0.999):>7.2f} {p.socket_errors:>6} {status:>12} "
              f"{p.wrk_share:>7.0%} {per_cpu:>9} {wait:>8} {ratio:>7} {cpu_ratio:>6}")
    if not args.url:
        print("  cpu wait: the share of the phase the server's threads were ready to run but "
              "waited for core 0 (other work on the machine); errors: socket errors")
    paced = [p for p in load.phases if p.paced]
    for p in paced:
        share = p.late / p.requests if p.requests else 0
        print(f"  {p.name}: asked {p.paced:,.0f}/s, got {p.rate:,.0f}/s; {share:.1%} of the "
              f"requests left more than 1 ms after their slot (latest {p.late_max_ms:.1f} ms)")

    print(f"\nOver time, windows of {args.window:g} s: requests/s (load and probe) and the "
          "probe's latency percentiles (ms)")
    for p in load.phases:
        print(f"  {p.name}")
        print(f"  {'t s':>7} {'req/s':>8} {'p50':>7} {'p90':>7} {'p99':>7} {'timed':>6}")
        for w in series(p.runs):
            print(f"  {w.t:>7.2f} {w.rate:>8,.0f} {_ms(w.p50):>7} {_ms(w.p90):>7} "
                  f"{_ms(w.p99):>7} {w.timed:>6}")

    print("\nCorrectness: the campaign's report against what the plan sent")
    print(f"  {'figure':<34} {'sent (expected)':>18} {'report':>18}")
    for c in load.checks:
        print(f"  {c.name:<34} {_show(c.expected):>18} {_show(c.got):>18}  "
              f"{'PASS' if c.ok else 'FAIL'}")
    for p in load.phases:
        if p.not_found_expected is not None:
            print(f"  {p.name + ': 404 answers':<34} {p.not_found_expected:>18} "
                  f"{p.not_found:>18}  {'PASS' if p.not_found == p.not_found_expected else 'FAIL'}")
    for problem in load.problems:
        print(f"  FAIL: {problem}")
    if load.memory:
        print("\nMemory of the server's workers after the full-speed phases")
        for m in load.memory:
            print(f"  pid {m['pid']}: VmRSS {m['rss_mb']:.0f} MB, VmHWM (peak) "
                  f"{m['peak_mb']:.0f} MB")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(_show(v) for v in value)
    return str(value)


def print_goals(rows: list[Goal]) -> None:
    width = max(len(r.figure) for r in rows)
    print(f"\nGoals\n  {'figure':<{width}} {'measured':>20} {'goal':>11}  verdict")
    for r in rows:
        print(f"  {r.figure:<{width}} {r.value:>20} {r.goal:>11}  {r.verdict}")


def charts(load: LoadResult, out: Path) -> list[Path]:
    """throughput.png and latency.png; none if matplotlib is missing (said so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\ncharts skipped: matplotlib is not installed (pip install 'tracker[bench]')")
        return []
    written = []
    figure, axes = plt.subplots(figsize=(10, 5))
    for p in load.phases:
        windows = series(p.runs)
        axes.plot([w.t for w in windows], [w.rate for w in windows], marker="o",
                  markersize=3, label=p.name)
    axes.set(title="Throughput over time", xlabel="seconds into the phase",
             ylabel="requests/s")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    written.append(out / "throughput.png")
    figure.savefig(written[-1], dpi=100)
    plt.close(figure)

    figure, grid = plt.subplots(len(load.phases), 1, figsize=(10, 2.6 * len(load.phases)),
                                sharex=True, squeeze=False)
    for axes, p in zip(grid[:, 0], load.phases, strict=True):
        windows = series(p.runs)
        for name in ("p50", "p90", "p99"):
            values = [getattr(w, name) for w in windows]
            axes.plot([w.t for w in windows], [math.nan if v is None else v for v in values],
                      marker="o", markersize=3, label=name)
        if p.paced:
            axes.axhline(5, color="red", linestyle="--", linewidth=1, label="goal: p99 ≤ 5 ms")
        axes.set_yscale("log")
        axes.set(title=f"{p.name}: {p.rate:,.0f} requests/s", ylabel="latency ms")
        axes.grid(alpha=0.3, which="both")
        axes.legend(loc="upper right", fontsize="small")
    grid[-1, 0].set_xlabel("seconds into the phase")
    figure.tight_layout()
    written.append(out / "latency.png")
    figure.savefig(written[-1], dpi=100)
    plt.close(figure)
    return written


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog="See benchmarks/README.md.",
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
                        "(default 20000; quick 1000)")
    parser.add_argument("--server", choices=("granian", "uvicorn"),
                        help="tracker's HTTP server (local mode; default: tracker's default)")
    parser.add_argument("--workers", type=int, default=1, help="server workers (local mode)")
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
        if args.server:
            parser.error("--server is for local mode")
        # The other programs start their own server and database.
        args.stages &= {"load"}
    if min(args.connections, args.threads, args.probe_connections) < 1 or \
            args.connections % args.threads:
        parser.error("--connections, --threads, --probe-connections: at least 1, and the "
                     "connections a multiple of the threads")
    if args.probe_rate <= 0:
        parser.error("--probe-rate: above 0")
    args.seconds = args.seconds or (2.0 if args.quick else 15.0)
    args.window = args.window or (0.25 if args.quick else 1.0)
    args.messages = args.messages or (1000 if args.quick else 20_000)
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
        "programs": {p.title: {"ok": p.ok, "available": p.available, "figures": p.figures}
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


if __name__ == "__main__":
    sys.exit(main())
