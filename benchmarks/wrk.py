"""wrk driven by a finite plan (plan.lua): every request sent at most once, nothing in
flight at the end, answers counted per time window and, on timed plans, each one timed.

`write_plan` lays the requests out for wrk's threads; `run_plans` starts one wrk process
per plan at the same moment and reads back what each sent and how its answers came.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    LOAD_CORE,
    LOAD_PRIORITY,
    PROBE_PRIORITY,
    BenchError,
    load_generator,
    tree_cpu_seconds,
    tree_wait_seconds,
)

PLAN_LUA = Path(__file__).resolve().parent / "plan.lua"


@dataclass
class Window:
    """Answers that came in during one time window of a phase."""

    t: float  # seconds from the phase's first request to the window's middle
    rate: float  # answers per second of the window's part inside the phase
    p50: float | None  # latency, ms (None: no timed answer in the window)
    p90: float | None
    p99: float | None
    timed: int  # answers whose latency is known


def nearest_rank(ordered: Sequence[float], q: float) -> float:
    """The q-quantile (0..1] of sorted values, by the nearest-rank method."""
    return float(ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))])


@dataclass
class Plan:
    """One wrk process over a plan written by write_plan."""

    directory: Path
    connections: int
    threads: int
    rate: float = 0.0  # requests/s of the whole process; 0: as fast as answered
    timed: bool = False  # one connection per thread, every latency kept
    stop: Path | None = None  # send nothing more once this file exists
    finished: Path | None = None  # created when this plan is done


@dataclass
class PlanRun:
    """What one wrk process sent, when, and how its answers came."""

    planned: int
    sent: int
    answered: int
    complete: bool  # every thread parked: nothing in flight when wrk stopped
    first_us: int  # CLOCK_MONOTONIC of the first request written
    done_us: int  # and of the last answer read
    wall_s: float  # the wrk process, start to exit
    errors: dict[str, int]  # wrk's: connect, read, write, timeout, status (answers >= 400)
    fillers: int  # requests outside the plan (only after a connection error)
    late: int  # paced runs: requests sent more than 1 ms after their slot
    late_max_ms: float
    wrk_cpu_s: float
    wrk_wait_s: float  # wrk's threads runnable but waiting for a CPU
    counts: dict[int, int]  # window (CLOCK_MONOTONIC // window_us) -> answers
    latencies: dict[int, list[int]]  # window -> latencies in µs (timed runs)
    window_us: int
    thread_sent: list[int]  # per thread (plan-<n>.txt): how many of its lines it sent
    server_cpu_s: float = 0.0
    server_wait_s: float = 0.0  # the server's threads runnable but waiting for a CPU

    @property
    def active_s(self) -> float:
        return (self.done_us - self.first_us) / 1e6 if self.done_us > self.first_us else 0.0

    @property
    def rate(self) -> float:
        return self.answered / self.active_s if self.active_s else 0.0

    @property
    def socket_errors(self) -> int:
        return sum(v for k, v in self.errors.items() if k != "status")


def http_request(method: str, path: str, host: str, agent: str = "",
                 forwarded: str = "") -> str:
    """One HTTP/1.1 request as wrk sends it; no User-Agent or X-Forwarded-For when empty."""
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
            + (f"User-Agent: {agent}\r\n" if agent else "")
            + (f"X-Forwarded-For: {forwarded}\r\n" if forwarded else "") + "\r\n")


def write_plan(directory: Path, requests: Sequence[str], threads: int) -> None:
    """The files plan.lua reads: the requests (see http_request, no bodies) dealt
    round-robin into one plan-<n>.txt per thread."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in (*directory.glob("done-*"), *directory.glob("lat-*")):
        stale.unlink()
    for n in range(threads):
        (directory / f"plan-{n + 1}.txt").write_text("".join(requests[n::threads]),
                                                     newline="")


def run_plans(url: str, plans: Sequence[Plan], *, window_s: float = 1.0, cap_s: float = 60.0,
              core: str | None = LOAD_CORE,
              server_pids: Sequence[int] = ()) -> list[PlanRun]:
    """wrk with plan.lua, one process per plan, all starting at the same moment; each stops
    when its plan is answered (or its STOP file appears), or at `cap_s`. On `core` (None:
    anywhere) at real-time priority where permitted, timed plans above the others
    (common.load_generator). `server_pids`: processes whose CPU, and wait for a CPU, (with
    their descendants) are measured over the runs (given to the first PlanRun)."""
    window_us = max(1, round(window_s * 1e6))
    size = sum(path.stat().st_size for plan in plans
               for path in plan.directory.glob("plan-*.txt"))
    threads = sum(plan.threads for plan in plans)
    # wrk loads each thread's plan before starting it, one thread after the other: ~5 ms
    # per MB of plan and ~2 ms a thread here, three times that to be sure. The threads wait
    # for this moment to start together.
    start_us = round((time.monotonic() + 0.1 + 3 * (size / 2e8 + 0.002 * threads)) * 1e6)
    server_before = sum(tree_cpu_seconds(p) for p in server_pids)
    wait_before = sum(tree_wait_seconds(p) for p in server_pids)
    started = time.monotonic()
    procs = []
    try:
        for plan in plans:
            if plan.timed and plan.connections != plan.threads:
                raise ValueError("a timed plan needs one connection per thread")
            for stale in (plan.stop, plan.finished):
                if stale is not None and stale.exists():
                    stale.unlink()
            per_thread = max(1, plan.connections // plan.threads)
            prefix = [] if core is None else load_generator(
                core, PROBE_PRIORITY if plan.timed else LOAD_PRIORITY)
            command = [*prefix, "wrk", f"-t{plan.threads}", f"-c{per_thread * plan.threads}",
                       f"-d{max(1, math.ceil(cap_s))}s", "--timeout", "10s", "-s",
                       str(PLAN_LUA), url, "--", str(plan.directory),
                       f"{plan.rate / plan.threads:.6f}", str(window_us), str(plan.threads),
                       str(per_thread), str(start_us), "1" if plan.timed else "0",
                       str(plan.stop or "-"), str(plan.finished or "-")]
            out = (plan.directory / "wrk.out").open("wb")
            procs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT))
            out.close()
        usages: dict[int, tuple[Any, float]] = {}
        # wrk's own wait for a CPU, read while it runs (gone with it): up to the last 50 ms.
        waits = {proc.pid: 0.0 for proc in procs}
        waits_read = 0.0
        while len(usages) < len(procs):
            if time.monotonic() - waits_read >= 0.05:
                waits_read = time.monotonic()
                for proc in procs:
                    if proc.pid not in usages:
                        waits[proc.pid] = max(waits[proc.pid], tree_wait_seconds(proc.pid))
            for proc in procs:
                if proc.pid in usages:
                    continue
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    usages[pid] = (usage, time.monotonic() - started)
            time.sleep(0.005)
    except BaseException:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
        raise
    server_cpu = sum(tree_cpu_seconds(p) for p in server_pids) - server_before
    server_wait = sum(tree_wait_seconds(p) for p in server_pids) - wait_before
    runs = [_plan_run(plan, proc, *usages[proc.pid], waits[proc.pid], window_us)
            for plan, proc in zip(plans, procs, strict=True)]
    runs[0].server_cpu_s = server_cpu
    runs[0].server_wait_s = server_wait
    return runs


def _plan_run(plan: Plan, proc: subprocess.Popen[bytes], usage: Any, wall: float,
              wait_s: float, window_us: int) -> PlanRun:
    text = (plan.directory / "wrk.out").read_text(errors="replace")
    found = re.search(r"^PLAN-RESULT (.*)$", text, re.MULTILINE)
    if found is None:
        raise BenchError(f"wrk gave no result (exit {proc.returncode}): {text.strip()[-500:]}")
    result = json.loads(found[1])
    rows = sorted(result["threads"], key=lambda r: int(r["id"]))
    counts: dict[int, int] = {}
    latencies: dict[int, list[int]] = {}
    for path in plan.directory.glob("lat-*.txt"):
        for line in path.read_text().splitlines():
            window, count, *values = (int(v) for v in line.split())
            counts[window] = counts.get(window, 0) + count
            if values:
                latencies.setdefault(window, []).extend(values)
    working = [r for r in rows if r["sent"]]
    return PlanRun(
        planned=sum(r["planned"] for r in rows), sent=sum(r["sent"] for r in rows),
        answered=sum(r["answered"] for r in rows),
        complete=all(r["complete"] and r["answered"] == r["sent"] for r in rows),
        first_us=min((r["first_us"] for r in working), default=0),
        done_us=max((r["done_us"] for r in working), default=0),
        wall_s=wall, errors=result["errors"], fillers=sum(r["fillers"] for r in rows),
        late=sum(r["late"] for r in rows),
        late_max_ms=max((r["late_max_us"] for r in rows), default=0) / 1000,
        wrk_cpu_s=usage.ru_utime + usage.ru_stime, wrk_wait_s=wait_s, counts=counts,
        latencies=latencies,
        window_us=window_us, thread_sent=[r["sent"] for r in rows])


def latency_ms(runs: Sequence[PlanRun], q: float) -> float | None:
    """The q-quantile of every timed answer's latency in these runs, in ms."""
    values = sorted(v for run in runs for vs in run.latencies.values() for v in vs)
    return nearest_rank(values, q) / 1000 if values else None


def series(runs: Sequence[PlanRun]) -> list[Window]:
    """Answers/s of the runs together and the latency percentiles of their timed answers,
    window by window. The slivers at either end (less than a quarter of a window inside the
    runs) are left out: too few answers to tell."""
    working = [run for run in runs if run.answered]
    if not working:
        return []
    width = working[0].window_us
    first = min(run.first_us for run in working)
    last = max(run.done_us for run in working)
    out = []
    for index in sorted({w for run in working for w in run.counts}):
        start, end = max(index * width, first), min((index + 1) * width, last)
        if end - start < width / 4:
            continue
        count = sum(run.counts.get(index, 0) for run in working)
        values = sorted(v for run in working for v in run.latencies.get(index, ()))
        p50, p90, p99 = ((nearest_rank(values, q) / 1000 for q in (0.5, 0.9, 0.99))
                         if values else (None, None, None))
        out.append(Window((index * width + width / 2 - first) / 1e6,
                          count / ((end - start) / 1e6), p50, p90, p99, len(values)))
    return out
