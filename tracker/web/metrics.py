"""What a worker counts, and `/metrics` in Prometheus text format.

The hot path only increments plain integers (`Metrics.count_hit`, `count_drop`): a
prometheus-client `Counter.labels(...).inc()` costs ten times as much, a sizeable share
of a whole hit (benchmarks/README.md, "Decided"). The numbers become
metric families at scrape time, in `MetricsCollector`, which also reads the writer's
own statistics there rather than mirroring them.

Each worker process counts on its own. With `--workers N` a scrape reaches one worker
at random, so every worker writes a snapshot of its numbers to the data dir once a
second (`SharedSnapshots`) and the one that answers the scrape adds up all of them:
counters never go backwards and nothing depends on which worker answered. With one
worker nothing is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tracker import __version__
from tracker.ingest.endpoints import ANSWERS
from tracker.ingest.pipeline import CLICK, OPEN, DropReason
from tracker.ingest.rules import Rules, load_rules
from tracker.store.replica import ReadReplica
from tracker.store.writer import BatchWriter

log = logging.getLogger("tracker.web.metrics")

# A batch is at most TRACKER_BATCH_SIZE events (5,000 by default); one flush interval's
# worth is a few hundred at moderate traffic.
BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000)
# A healthy COPY batch takes milliseconds; seconds mean a slow or locked database.
FLUSH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                         5.0, 10.0)
# An API call takes milliseconds; a report over a large campaign or an export, seconds.
REQUEST_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                           2.5, 5.0, 10.0, 30.0)
ENDPOINTS = (OPEN, CLICK)
# Where a database error was met: the batch writer, an API request, the readiness probe.
DB_ERROR_SOURCES = ("writer", "api", "readiness")
# How often a worker publishes its numbers for the others (with --workers N): what the
# answer to a scrape may lag behind for the workers that did not answer it.
PUBLISH_INTERVAL_S = 1.0


class Histogram:
    """Bucket counts as plain integers; becomes a Prometheus histogram at scrape time."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus' `le`).
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value

    def add(self, other: Histogram) -> None:
        if other.buckets != self.buckets:
            return  # a worker of another version; its histogram cannot be merged
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        return HistogramMetricFamily(name, documentation, buckets=self.cumulative(),
                                     sum_value=self.sum)

    def cumulative(self) -> list[tuple[str, float]]:
        total, buckets = 0, list[tuple[str, float]]()
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else _number(bound), total))
        return buckets

    def as_json(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets), "counts": self.counts, "sum": self.sum}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        histogram = cls(data["buckets"])
        if len(data["counts"]) == len(histogram.counts):
            histogram.counts = [int(n) for n in data["counts"]]
            histogram.sum = float(data["sum"])
        return histogram


class Metrics:
    """The counters of one worker. `count_hit` and `count_drop` are on the hot path."""

    def __init__(self) -> None:
        # endpoint -> [human, machine]: indexed by the verdict bool, no tuple, no hashing of one.
        self.hits: dict[str, list[int]] = {endpoint: [0, 0] for endpoint in ENDPOINTS}
        self.drops: dict[str, int] = dict.fromkeys(DropReason, 0)
        self.batch_sizes = Histogram(BATCH_SIZE_BUCKETS)
        self.flush_seconds = Histogram(FLUSH_SECONDS_BUCKETS)
        self.db_errors: dict[str, int] = dict.fromkeys(DB_ERROR_SOURCES, 0)
        self.auth_failures = 0
        self.auth_throttled = 0
        # "group code" -> answers, and group -> latency (web/request_metrics.py).
        self.requests: dict[str, int] = {}
        self.request_seconds: dict[str, Histogram] = {}

    def count_hit(self, endpoint: str, machine: bool) -> None:
        self.hits[endpoint][machine] += 1

    def count_drop(self, reason: DropReason) -> None:
        self.drops[reason] += 1

    def count_db_error(self, source: str) -> None:
        self.db_errors[source] += 1

    def observe_flush(self, size: int, seconds: float) -> None:
        self.batch_sizes.observe(size)
        self.flush_seconds.observe(seconds)

    def observe_request(self, group: str, status: int, seconds: float) -> None:
        key = f"{group} {status}"
        self.requests[key] = self.requests.get(key, 0) + 1
        histogram = self.request_seconds.get(group)
        if histogram is None:
            histogram = self.request_seconds[group] = Histogram(REQUEST_SECONDS_BUCKETS)
        histogram.observe(seconds)


def observe_flushes(writer: BatchWriter, metrics: Metrics) -> None:
    """Feed the flush histograms with every batch the writer writes."""
    writer.on_flush = metrics.observe_flush


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


# The disk journal (tracker/store/journal.py) is read defensively, by these names: `writer.journal`
# with `disk_bytes`, `pending_events`, `oldest_age_s()` and `stats.<counter>`. A writer
# without one reports no journal metrics.
JOURNAL_COUNTERS = {
    "appended_events": "Events written to the disk journal.",
    "committed_events": "Journal events since committed to PostgreSQL (replayed).",
    "corrupt_records": "Corrupt journal records skipped (followed by a valid one).",
    "torn_tails": "Torn journal tails skipped (a crash in the middle of a write).",
    "skipped_bytes": "Journal bytes skipped as corrupt or torn.",
}


class MetricsCollector(Collector):
    """Turns a worker's counters and its writer's statistics into metric families."""

    def __init__(self, metrics: Metrics, writer: Callable[[], BatchWriter | None],
                 buffer_capacity: int, shared: SharedSnapshots | None = None,
                 rules: Rules | None = None) -> None:
        self._metrics = metrics
        self._writer = writer
        self._capacity = buffer_capacity
        self.shared = shared
        self._rules = rules or load_rules()
        # Set by whoever owns them: the fast path's answer counts, the read replica.
        self.tracking_answers: Callable[[], Sequence[int]] | None = None
        self.replica: Callable[[], ReadReplica | None] | None = None

    def snapshot(self) -> Snapshot:
        m = self._metrics
        snap = Snapshot(
            hits={endpoint: list(pair) for endpoint, pair in m.hits.items()},
            drops={str(reason): n for reason, n in m.drops.items()},
            counters={"auth_failures": m.auth_failures, "auth_throttled": m.auth_throttled,
                      **{f"db_errors_{source}": n for source, n in m.db_errors.items()}},
            gauges={"buffer_capacity": self._capacity, **_memory()},
            histograms={"batch_size": m.batch_sizes, "flush_seconds": m.flush_seconds,
                        **{f"{_HTTP} {group}": h for group, h in m.request_seconds.items()}})
        snap.counters.update({f"{_HTTP} {key}": n for key, n in m.requests.items()})
        if self.tracking_answers is not None:
            for (endpoint, status), n in zip(ANSWERS, self.tracking_answers(), strict=True):
                snap.counters[f"{_HTTP} {endpoint} {status}"] = n
        replica = self.replica() if self.replica is not None else None
        if replica is not None:
            snap.gauges.update(replica_lag_s=replica.lag_s, replica_lag_bytes=replica.lag_bytes,
                               replica_in_use=int(replica.in_use))
        writer = self._writer()
        if writer is not None:
            stats = writer.stats
            snap.counters.update(written=stats.written, duplicates=stats.duplicates,
                                 relabelled=getattr(stats, "relabelled", 0),
                                 batches=stats.batches)
            snap.counters["db_errors_writer"] += stats.failures
            snap.gauges.update(buffered=writer.buffered, writer_healthy=int(writer.healthy))
            journal = getattr(writer, "journal", None)
            if journal is not None:
                _read_journal(journal, snap)
        return snap

    def publish(self) -> None:
        """Write this worker's snapshot for the others."""
        if self.shared is not None:
            try:
                self.shared.write(self.snapshot())
            except OSError as exc:
                log.debug("cannot publish metrics: %s", exc)

    async def publish_forever(self, interval_s: float = PUBLISH_INTERVAL_S) -> None:
        try:
            while True:
                self.publish()
                await asyncio.sleep(interval_s)
        finally:
            self.publish()  # the last word of a stopping worker: its final counts

    def collect(self) -> Iterator[Metric]:
        own = self.snapshot()
        snapshots = [own]
        if self.shared is not None:
            with contextlib.suppress(OSError):
                self.shared.write(own)
            snapshots += self.shared.others()
        yield from families(merge(snapshots), workers=len(snapshots))
        yield from rules_families(self._rules)
        yield build_info()


def build_info() -> Metric:
    info = InfoMetricFamily("tracker_build", "The running version of tracker (also "
                            "`tracker --version`) and of Python.", labels=("version", "python"))
    info.add_metric([__version__, platform.python_version()], {})
    return info


def rules_families(rules: Rules) -> Iterator[Metric]:
    """Which classification rules and address lists this server judges hits by."""
    info = InfoMetricFamily("tracker_rules", "The classification rules in use.",
                            labels=("version",))
    info.add_metric([rules.version], {})
    yield info
    dated = GaugeMetricFamily(
        "tracker_address_list_date_seconds", "Date of an address list's data (Unix time, "
        "midnight UTC): how old the Apple, cloud and gateway ranges are.",
        labels=("list", "source"))
    prefixes = GaugeMetricFamily("tracker_address_list_prefixes",
                                 "Networks in an address list.", labels=("list",))
    for listed in rules.address_lists.lists:
        if listed.as_of:
            day = datetime.strptime(listed.as_of, "%Y-%m-%d").replace(tzinfo=UTC)
            dated.add_metric([listed.name, listed.source or ""], day.timestamp())
        prefixes.add_metric([listed.name], listed.prefixes)
    yield dated
    yield prefixes


def _memory() -> dict[str, float]:
    """This process's resident memory now and at its peak (Linux: /proc/self/status)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    found = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):  # "   123456 kB"
            found["resident_bytes" if name == "VmRSS" else "resident_peak_bytes"] = (
                float(value.split()[0]) * 1024)
    return found


def _read_journal(journal: Any, snap: Snapshot) -> None:
    for gauge, name in (("journal_bytes", "disk_bytes"), ("journal_pending", "pending_events"),
                        ("journal_capacity", "max_bytes")):
        value = getattr(journal, name, None)
        if isinstance(value, int | float):
            snap.gauges[gauge] = value
    oldest_age = getattr(journal, "oldest_age_s", None)
    if callable(oldest_age):
        age = oldest_age()
        # As a time, so workers combine by min(); an empty journal (+Inf) drops out of it.
        snap.gauges["journal_oldest_at"] = time.time() - age if age > 0 else float("inf")
    stats = getattr(journal, "stats", None)
    for name in JOURNAL_COUNTERS:
        value = getattr(stats, name, None)
        if isinstance(value, int | float):
            snap.counters[f"journal_{name}"] = value


def families(snap: Snapshot, workers: int = 1) -> Iterator[Metric]:
    hits = CounterMetricFamily("tracker_hits", "Hits recorded (handed to the writer), by "
                               "tracking endpoint and verdict.", labels=["endpoint", "verdict"])
    for endpoint, (human, machine) in sorted(snap.hits.items()):
        hits.add_metric([endpoint, "human"], human)
        hits.add_metric([endpoint, "machine"], machine)
    yield hits
    drops = CounterMetricFamily("tracker_drops", "Hits not recorded, by reason.",
                                labels=["reason"])
    for reason, n in sorted(snap.drops.items()):
        drops.add_metric([reason], n)
    yield drops
    c, g = snap.counters, snap.gauges
    yield from _counter("tracker_events_written", "Events new to PostgreSQL.", c, "written")
    yield from _counter("tracker_events_duplicate", "Events written again after an unclear "
                        "failure and found already there (not counted twice).", c, "duplicates")
    yield from _counter("tracker_events_relabelled", "Human clicks made machine by a honeypot "
                        "or burst click near them.", c, "relabelled")
    yield from _counter("tracker_writer_batches", "Batches committed to PostgreSQL.", c,
                        "batches")
    errors = CounterMetricFamily("tracker_database_errors", "Failed database operations, by "
                                 "where they were met.", labels=["source"])
    for source in DB_ERROR_SOURCES:
        errors.add_metric([source], c.get(f"db_errors_{source}", 0))
    yield errors
    yield from _counter("tracker_auth_failures", "API requests and dashboard sign-ins "
                        "refused for a missing or wrong key.", c, "auth_failures")
    yield from _counter("tracker_auth_throttled", "API requests and dashboard sign-ins "
                        "refused with 429 after too many failed authentications from their "
                        "address.", c, "auth_throttled")
    yield from _gauge("tracker_writer_buffered_events", "Events in memory waiting to be "
                      "written.", g, "buffered")
    yield from _gauge("tracker_writer_buffer_capacity_events", "Events the memory buffer "
                      "holds before new ones are dropped.", g, "buffer_capacity")
    yield from _gauge("tracker_writer_healthy", "1 while the last write to PostgreSQL "
                      "succeeded (in every worker), else 0.", g, "writer_healthy")
    yield from _gauge("tracker_journal_bytes", "Bytes of segment files in the disk journal.",
                      g, "journal_bytes")
    yield from _gauge("tracker_journal_capacity_bytes", "The journal's cap on disk "
                      "(TRACKER_JOURNAL_MAX_BYTES, one for all the workers): past it, events "
                      "that memory cannot hold are dropped.", g, "journal_capacity")
    yield from _gauge("tracker_journal_pending_events", "Events in the disk journal not yet "
                      "in PostgreSQL.", g, "journal_pending")
    if "journal_oldest_at" in g:
        oldest = g["journal_oldest_at"]
        age = max(0.0, time.time() - oldest) if oldest != float("inf") else 0.0
        yield GaugeMetricFamily("tracker_journal_oldest_record_age_seconds",
                                "Age of the oldest event in the journal not yet in "
                                "PostgreSQL (0 when the journal is empty).", value=age)
    for name, documentation in JOURNAL_COUNTERS.items():
        yield from _counter(f"tracker_journal_{name}", documentation, c, f"journal_{name}")
    for name, documentation, histogram in (
            ("tracker_flush_batch_size_events", "Events per batch committed to PostgreSQL.",
             snap.histograms.get("batch_size")),
            ("tracker_flush_duration_seconds", "Time to write one batch to PostgreSQL "
             "(COPY, move and commit).", snap.histograms.get("flush_seconds"))):
        if histogram is not None:
            yield histogram.family(name, documentation)
    yield from _gauge("tracker_worker_resident_memory_bytes", "Resident memory of the "
                      "largest worker now.", g, "resident_bytes")
    yield from _gauge("tracker_worker_resident_memory_peak_bytes", "The largest peak resident "
                      "memory of any worker since it started.", g, "resident_peak_bytes")
    yield GaugeMetricFamily("tracker_workers", "Worker processes whose numbers this answer "
                            "adds up.", value=workers)
    yield from _http_families(snap)
    yield from _gauge("tracker_read_replica_lag_seconds", "How long ago the primary wrote the "
                      "oldest change the read replica has not replayed (0: caught up); the "
                      "largest of any worker.", g, "replica_lag_s")
    yield from _gauge("tracker_read_replica_lag_bytes", "WAL bytes the read replica has not "
                      "replayed yet.", g, "replica_lag_bytes")
    yield from _gauge("tracker_read_replica_in_use", "1 while reads go to the replica, 0 while "
                      "they go to the primary (the replica too far behind or unreachable).",
                      g, "replica_in_use")


_HTTP = "http"


def _http_families(snap: Snapshot) -> Iterator[Metric]:
    """Answers by endpoint group and status, and the latency of the web app's groups."""
    requests = CounterMetricFamily(
        "tracker_http_requests", "Requests answered, by endpoint group (open and click are "
        "the tracking endpoints) and status code.", labels=["group", "code"])
    for key, n in sorted(snap.counters.items()):
        kind, _, rest = key.partition(" ")
        if kind == _HTTP:
            group, _, code = rest.partition(" ")
            requests.add_metric([group, code], n)
    yield requests
    latency = HistogramMetricFamily(
        "tracker_http_request_duration_seconds", "Time from a request's arrival in the web "
        "app to its answer's last byte, by endpoint group (the tracking endpoints are "
        "answered from memory in microseconds: their latency is the load balancer's to "
        "measure).", labels=["group"])
    for key, histogram in sorted(snap.histograms.items()):
        kind, _, group = key.partition(" ")
        if kind == _HTTP:
            latency.add_metric([group], histogram.cumulative(), histogram.sum)
    yield latency


def _counter(name: str, documentation: str, values: dict[str, float],
             key: str) -> Iterator[Metric]:
    if key in values:
        yield CounterMetricFamily(name, documentation, value=values[key])


def _gauge(name: str, documentation: str, values: dict[str, float],
           key: str) -> Iterator[Metric]:
    if key in values:
        yield GaugeMetricFamily(name, documentation, value=values[key])


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(float(bound))


def registry_for(collector: Collector) -> CollectorRegistry:
    """A private registry: nothing from the process-wide default one leaks in."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The scrape body and its content type (OpenMetrics when the scraper asks for it)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
