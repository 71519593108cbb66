"""A worker's numbers as a `Snapshot`, how the snapshots of several workers add up
(`merge`), and where the workers of one server run share them (`SharedSnapshots`)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracker.web.metrics.counters import Histogram

# The first word of the counter and histogram keys of the HTTP answers ("http group code",
# "http group"): the families of requests and latency gather them by it.
HTTP = "http"


@dataclass
class Snapshot:
    """Everything a worker reports, as plain numbers: what workers share and add up."""

    hits: dict[str, list[int]] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"hits": self.hits, "drops": self.drops, "counters": self.counters,
                "gauges": self.gauges,
                "histograms": {k: h.as_json() for k, h in self.histograms.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        return cls(
            hits={str(k): [int(v[0]), int(v[1])] for k, v in data["hits"].items()},
            drops={str(k): int(v) for k, v in data["drops"].items()},
            counters={str(k): float(v) for k, v in data["counters"].items()},
            gauges={str(k): float(v) for k, v in data["gauges"].items()},
            histograms={str(k): Histogram.from_json(v) for k, v in data["histograms"].items()})


# How gauges of several workers combine; anything not named here is summed.
_GAUGE_MERGE: dict[str, Callable[[float, float], float]] = {
    "writer_healthy": min, "journal_oldest_at": min, "resident_bytes": max,
    "resident_peak_bytes": max, "replica_lag_s": max, "replica_lag_bytes": max,
    "replica_in_use": min, "journal_capacity": max}


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    total = Snapshot()
    for snap in snapshots:
        for endpoint, pair in snap.hits.items():
            mine = total.hits.setdefault(endpoint, [0, 0])
            mine[0] += pair[0]
            mine[1] += pair[1]
        for reason, n in snap.drops.items():
            total.drops[reason] = total.drops.get(reason, 0) + n
        for name, value in snap.counters.items():
            total.counters[name] = total.counters.get(name, 0) + value
        for name, value in snap.gauges.items():
            combine = _GAUGE_MERGE.get(name)
            if name in total.gauges and combine is not None:
                total.gauges[name] = combine(total.gauges[name], value)
            else:
                total.gauges[name] = total.gauges.get(name, 0) + value
        for name, histogram in snap.histograms.items():
            if name not in total.histograms:
                total.histograms[name] = Histogram(histogram.buckets)
            total.histograms[name].add(histogram)
    return total


class SharedSnapshots:
    """The snapshots of the workers of one server run, in `<data dir>/metrics/<run>/`.

    A run is named by the parent process (the server that started the workers) and the
    port, so the workers of one `tracker serve` find each other and nobody else. A
    worker's file is replaced atomically (write, then rename). Files of a worker that
    died keep counting (their counters are part of the run's totals) but their gauges
    are ignored once the file is older than `STALE_S`.
    """

    STALE_S = 10.0

    def __init__(self, root: Path, run: str, pid: int | None = None) -> None:
        self.root = root
        self.dir = root / run
        self.pid = pid if pid is not None else os.getpid()
        self._path = self.dir / f"{self.pid}.json"

    @classmethod
    def for_server(cls, data_dir: Path, port: int) -> SharedSnapshots:
        return cls(data_dir / "metrics", f"{os.getppid()}-{port}")

    def prepare(self) -> None:
        """Create the run's directory and remove the ones of runs whose server is gone."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.root.iterdir():
            parent, _, _ = old.name.partition("-")
            if old == self.dir or not parent.isdigit() or _alive(int(parent)):
                continue
            for path in old.glob("*"):
                with contextlib.suppress(OSError):
                    path.unlink()
            with contextlib.suppress(OSError):
                old.rmdir()

    def write(self, snapshot: Snapshot) -> None:
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(snapshot.as_json()))
        tmp.replace(self._path)

    def others(self) -> Iterator[Snapshot]:
        now = time.time()
        for path in self.dir.glob("*.json"):
            if path == self._path:
                continue
            try:
                stat = path.stat()
                snapshot = Snapshot.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                continue  # a worker mid-write on a platform without atomic rename, or junk
            if now - stat.st_mtime > self.STALE_S:
                snapshot.gauges = {}
            yield snapshot


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
