"""The deployment under test, seen only over HTTP, and the load phases run against it.

A phase is one endpoint under one kind of load (as fast as it answers, or paced): warm-up
runs, then the measured run, each run two wrk processes over a finite plan (plan.lua). The
`Load` keeps the tally of everything its runs sent, so that `correctness` can hold the
campaign's report against it. The suite and durability measure through it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from benchmarks.common import LOAD_CORE, BenchError, Database, tree_cpu_seconds
from benchmarks.traffic import LINKS, Message, Mix, Tally, report_figures
from benchmarks.wrk import Plan, PlanRun, http_request, latency_ms, run_plans, series, write_plan

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

    def metric(self, name: str) -> float | None:
        """One unlabelled sample of /metrics (summed over the workers); None where the
        deployment does not expose /metrics to this client."""
        try:
            response = self.client.get("/metrics")
        except httpx.HTTPError:
            return None
        found = re.search(rf"^{re.escape(name)} (\S+)$", response.text, re.MULTILINE)
        return float(found[1]) if response.status_code == 200 and found else None

    def worker_memory(self) -> list[dict[str, Any]]:
        """The largest worker's resident memory, now and at its peak, from /metrics (how a
        remote run sees memory); [] if the deployment does not expose /metrics to us."""
        try:
            response = self.client.get("/metrics")
        except httpx.HTTPError:
            return []
        if response.status_code != 200:
            return []
        found = dict(re.findall(
            r"^(tracker_worker_resident_memory(?:_peak)?_bytes) ([0-9.e+]+)$", response.text,
            re.MULTILINE))
        if len(found) < 2:
            return []
        return [{"pid": "largest worker (/metrics)",
                 "rss_mb": float(found["tracker_worker_resident_memory_bytes"]) / 2**20,
                 "peak_mb": float(found["tracker_worker_resident_memory_peak_bytes"]) / 2**20}]

    def create_campaign(self, name: str) -> None:
        self.campaign = self.call("POST", "/api/campaigns", json={"name": name}).json()["id"]

    def delete_campaign(self) -> None:
        if self.campaign:
            self.call("DELETE", f"/api/campaigns/{self.campaign}")

    def register(self, count: int, links: int = len(LINKS),
                 batch: int = 1000) -> tuple[list[Message], float, str]:
        """`count` messages with the first `links` of LINKS, sent an hour ago (a click
        within seconds of sent_at is a machine's). Returns them, the seconds it took, and
        the origin of their tracking URLs (TRACKER_PUBLIC_URL: where mail clients send the
        hits)."""
        sent_at = (datetime.now(UTC) - timedelta(hours=1)).isoformat()

        def one(start: int) -> list[dict[str, Any]]:
            body = {"messages": [{"recipient": f"reader{n}@bench.example", "sent_at": sent_at,
                                  "subject": "Our November news", "links": list(LINKS[:links])}
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
    """One endpoint under one kind of load: the load's wrk, and the probe's beside it
    where answers are timed."""

    name: str
    endpoint: str  # pixel | click
    reference: bool  # nginx
    paced: float  # the requests/s asked for; 0: as fast as answered
    runs: list[PlanRun]  # the load, then the probe if any (warm-ups are not in the figures)
    not_found_expected: int | None  # 404s its plans must get (tampered click tokens)
    settle_s: float = 0.0
    server_cpu_s: float = 0.0  # the runs, and the writer catching up after them
    database_cpu_s: float = 0.0  # PostgreSQL during the measured run (local)
    spilled: int | None = None  # events put in the journal during it (None: not known)

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
        """wrk's CPU (both processes, loading their plans included) as a share of one core
        over the phase's sending time: on the high side, as a check of the load generator
        should be."""
        return self.wrk_cpu_s / self.seconds if self.seconds else 0.0

    @property
    def wrk_wait(self) -> float:
        """Share of the phase wrk's threads were ready to run but waited for their core: time
        a request waits on the load generator, counted in its latency and not the server's
        doing (PostgreSQL shares wrk's core in local runs)."""
        return sum(run.wrk_wait_s for run in self.runs) / self.seconds if self.seconds else 0.0

    @property
    def database_share(self) -> float:
        """PostgreSQL's CPU during the measured run, as a share of one core."""
        return self.database_cpu_s / self.seconds if self.seconds else 0.0

    @property
    def spilled_share(self) -> float | None:
        """The share of the phase's requests whose events the writer put in its journal
        (PostgreSQL behind, memory past its bound): each costs the server a write and a
        read back."""
        return None if self.spilled is None else self.spilled / max(self.requests, 1)

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

    @property
    def timed(self) -> int:
        """Answers the probe timed (none where it did not run beside the load)."""
        return sum(sum(map(len, r.latencies.values())) for r in self.runs)

    def latency_ms(self, q: float) -> float:
        return latency_ms(self.runs, q) or 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "endpoint": self.endpoint, "reference": self.reference,
            "paced_rate": self.paced, "requests": self.requests, "seconds": self.seconds,
            "rate": self.rate, "timed": self.timed,
            "runs": [{"planned": r.planned, "sent": r.sent, "answered": r.answered,
                      "complete": r.complete, "errors": r.errors, "fillers": r.fillers,
                      "late": r.late, "late_max_ms": r.late_max_ms, "wrk_cpu_s": r.wrk_cpu_s,
                      "wrk_wait_s": r.wrk_wait_s,
                      "wall_s": r.wall_s} for r in self.runs],
            "not_found_expected": self.not_found_expected,
            "latency_ms": {f"p{k}": self.latency_ms(q) if self.timed else None
                           for k, q in PERCENTILES},
            "wrk_cpu_s": self.wrk_cpu_s, "wrk_cpu_share": self.wrk_share,
            "wrk_wait_share": self.wrk_wait,
            "server_cpu_s": self.server_cpu_s, "per_cpu_second": self.per_cpu_second,
            "server_wait_share": self.server_wait, "settle_s": self.settle_s,
            "database_cpu_s": self.database_cpu_s, "database_cpu_share": self.database_share,
            "spilled": self.spilled,
            "windows": [w.__dict__ for w in series(self.runs)],
        }


PERCENTILES = (("50", 0.5), ("90", 0.9), ("99", 0.99), ("99.9", 0.999))


@dataclass
class Target:
    url: str
    pids: list[int]  # whose CPU is the server's (local); none for a remote deployment
    database: Database | None = None  # the local PostgreSQL, whose CPU is read too


@dataclass(frozen=True)
class LoadSettings:
    """How the phases load their target."""

    seconds: float = 15.0  # per measured run
    connections: int = 64  # of the load's wrk
    threads: int = 1  # of the load's wrk
    probe_rate: float = 1000.0  # requests/s of the probe that times answers
    probe_connections: int = 16
    # Whether the probe also runs beside the load at full speed. Its 16 paced connections
    # change how the server under test is woken (nginx took ~0.6 µs less a request beside
    # it), so the suite leaves it out of the runs whose CPU per request it reports, and
    # times answers in the paced phases only.
    probe_full_speed: bool = True
    window: float = 1.0  # seconds per time window
    warmup: int = 40  # requests per connection in the first warm-up run
    settle_s: float = 180.0  # how long the writer may take to catch up after a phase
    local: bool = True  # wrk pinned to LOAD_CORE; a remote deployment's wrk runs anywhere


class Load:
    """Runs the phases over one campaign, keeps the tally of what they sent, and notes every
    run whose answers were not all as planned.

    A run is the load's wrk process, and the probe's started with it where answers are
    timed (paced runs; full-speed ones too unless `probe_full_speed` is off). The load: one
    thread, many connections (wrk's cheapest way to send), answers counted per window. The
    probe: a few connections of one thread each, paced, every answer timed; it stops when
    the load is done. Their requests are drawn from the same mix and both are counted in
    the tally. (wrk can time
    an answer only where a thread has one connection, and a thread per connection costs
    wrk about three times the CPU per request, which would make wrk the bottleneck.)"""

    def __init__(self, settings: LoadSettings, deployment: Deployment, mix: Mix,
                 workdir: Path) -> None:
        self.settings = settings
        self.deployment = deployment
        self.mix = mix
        self.workdir = workdir
        self.tally = Tally(len(mix.messages), len(mix.messages[0].links))
        self.problems: list[str] = []
        self.runs = 0

    def phase(self, name: str, endpoint: str, target: Target, *, reference: bool = False,
              paced: float = 0.0) -> Phase:
        settings = self.settings
        kind = "open" if endpoint == "pixel" else "click"
        record = not reference
        if paced:
            sent = self._send(name, target, kind, paced * settings.seconds, paced, record)
        else:
            # Short runs first: they warm the server's caches and tell how many requests
            # fill the phase's seconds. A run that ends much sooner than that was a warm-up
            # too (the pace picks up once caches are warm), and the next one is sized anew.
            sent = self._send(name, target, kind, settings.connections * settings.warmup,
                              0.0, record)
            for _ in range(4):
                count = max(settings.connections * 20, _rate(sent.runs) * settings.seconds * 1.1)
                sent = self._send(name, target, kind, count, 0.0, record)
                if sent.runs[0].active_s >= 0.75 * settings.seconds:
                    break
        phase = Phase(name, endpoint, reference, paced, sent.runs,
                      None if reference else sent.not_found,
                      server_cpu_s=sent.runs[0].server_cpu_s, database_cpu_s=sent.database_cpu_s,
                      spilled=sent.spilled)
        if record:
            before = sum(tree_cpu_seconds(p) for p in target.pids)
            phase.settle_s = self.settle(settings.settle_s)
            phase.server_cpu_s += sum(tree_cpu_seconds(p) for p in target.pids) - before
        print(f"  {name:<26} {phase.requests:>9,} requests in {phase.seconds:5.1f} s: "
              f"{phase.rate:>7,.0f}/s, "
              + (f"p99 {phase.latency_ms(0.99):6.2f} ms, " if phase.timed else "")
              + f"wrk {phase.wrk_share:4.0%} of a core"
              + (f", writer caught up in {phase.settle_s:.1f} s" if record else ""), flush=True)
        return phase

    def _send(self, name: str, target: Target, kind: str, count: float, paced: float,
              record: bool) -> _Sent:
        """One run of about `count` requests (paced at `paced`/s in all if not 0): the
        load's PlanRun and the probe's (if it ran), the 404s their plans must get, and what
        PostgreSQL and the journal took meanwhile."""
        settings = self.settings
        self.runs += 1
        directory = self.workdir / f"run-{self.runs}"
        probed = bool(paced) or settings.probe_full_speed
        probe_rate = 0.0 if not probed else (
            min(settings.probe_rate, paced / 4) if paced else settings.probe_rate)
        expected_s = count / paced if paced else settings.seconds
        load_count = max(settings.connections, round(count - probe_rate * expected_s))
        plans = [Plan(directory / "load", settings.connections, settings.threads,
                      rate=paced - probe_rate if paced else 0.0,
                      finished=directory / "load-finished")]
        counts = [load_count]
        if probed:
            # The probe's plan outlasts the load's; it stops when the load is done.
            counts.append(max(settings.probe_connections, round(probe_rate * expected_s * 3)))
            plans.append(Plan(directory / "probe", settings.probe_connections,
                              settings.probe_connections, rate=probe_rate, timed=True,
                              stop=directory / "load-finished"))
        host = urlsplit(target.url).netloc
        requests = []
        for plan, n in zip(plans, counts, strict=True):
            requests.append(self.mix.requests(kind, n))
            write_plan(plan.directory, [http_request(r.method, r.path, host, r.agent,
                                                     r.forwarded) for r in requests[-1]],
                       plan.threads)
        database_before = target.database.cpu_seconds() if target.database else 0.0
        spilled_before = self._spilled() if record else None
        runs = run_plans(target.url, plans, window_s=settings.window, cap_s=max(30, 5 * expected_s),
                         core=LOAD_CORE if settings.local else None, server_pids=target.pids)
        database_cpu = (target.database.cpu_seconds() - database_before
                        if target.database else 0.0)
        spilled_after = self._spilled() if spilled_before is not None else None
        spilled = (None if spilled_before is None or spilled_after is None
                   else round(spilled_after - spilled_before))
        starts = [run.first_us for run in runs if run.sent]
        if len(starts) == len(runs) and max(starts) - min(starts) > 50_000:
            print(f"    (the load and the probe started {(max(starts) - min(starts)) / 1e3:.0f} "
                  "ms apart: wrk took longer than expected to load the plan)", flush=True)
        # What was sent: each thread's first `sent` requests.
        sent = [r for plan, run, planned in zip(plans, runs, requests, strict=True)
                for n, k in enumerate(run.thread_sent) for r in planned[n::plan.threads][:k]]
        not_found = sum(1 for r in sent if r.kind == "click" and r.machine is None)
        if record:
            self.tally.add(sent)
            problems = []
            for label, run in zip(("load", "probe"), runs, strict=False):
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
        return _Sent(runs, not_found, database_cpu, spilled)

    def _spilled(self) -> float | None:
        return self.deployment.metric("tracker_journal_appended_events_total")

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


@dataclass
class _Sent:
    runs: list[PlanRun]  # the load's, then the probe's if it ran
    not_found: int  # 404s their plans must get
    database_cpu_s: float
    spilled: int | None


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
