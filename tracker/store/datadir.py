"""One `tracker serve` per data dir.

A data dir holds one embedded PostgreSQL, one journal and one generated secret: a second
server on it would share them all, and stopping it would stop the first one's database
under it. `tracker serve` therefore holds an exclusive `flock` on `serve.lock` in the data
dir for as long as it runs, with its pid and address written in the file so that a second
one can say which server is in the way.

The kernel drops the lock when the process ends, however it ends (a `kill -9` too), so a
crashed server never leaves a stale lock behind: the file stays, its lock does not. CLI
commands do not take this lock; they use the running server's embedded database through
its Unix socket (store/embedded_db.py counts them as its users).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = "serve.lock"
# A CLI command looking for the running server holds a shared lock for a moment; a serve
# starting at that moment waits this long for it rather than report the data dir in use.
_PROBE_GRACE_S = 0.5


class DataDirInUse(RuntimeError):
    """Another `tracker serve` runs on the data dir; the message names it."""


@dataclass(frozen=True)
class RunningServer:
    pid: int | None
    address: str | None

    def describe(self) -> str:
        pid = f"pid {self.pid}" if self.pid is not None else "pid unknown"
        return f"{pid}, {self.address}" if self.address else pid


@contextlib.contextmanager
def held(data_dir: Path, address: str, setting: str) -> Iterator[None]:
    """Hold the data dir for this server until the block ends. Raises DataDirInUse naming
    the server that holds it (`setting` is how the user gave the data dir)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + _PROBE_GRACE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read(path)
                    raise DataDirInUse(
                        f"{setting}: {data_dir.resolve()} is in use by another tracker serve "
                        f"({holder.describe()}); stop it first, or give this server a data "
                        "dir of its own") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "address": address}).encode() + b"\n", 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def running_server(data_dir: Path) -> RunningServer | None:
    """The server that holds the data dir, or None when no server runs on it."""
    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(path)
        return None  # free: closing the descriptor lets go of it at once
    finally:
        os.close(fd)


def _read(path: Path) -> RunningServer:
    try:
        found = json.loads(path.read_text())
        return RunningServer(int(found["pid"]), str(found["address"]))
    except (OSError, ValueError, KeyError, TypeError):
        return RunningServer(None, None)  # written a moment from now, or damaged
