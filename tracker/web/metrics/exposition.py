"""A snapshot as Prometheus metric families, and the scrape's body in text or
OpenMetrics format."""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from datetime import UTC, datetime

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
from tracker.ingest.rules import Rules
from tracker.web.metrics.counters import DB_ERROR_SOURCES
from tracker.web.metrics.snapshots import HTTP, Snapshot

# The disk journal's counters (`stats.<name>` of tracker/store/journal.py) and what each means.
JOURNAL_COUNTERS = {
    "appended_events": "Events written to the disk journal.",
    "committed_events": "Journal events since committed to PostgreSQL (replayed).",
    "corrupt_records": "Corrupt journal records skipped (followed by a valid one).",
    "torn_tails": "Torn journal tails skipped (a crash in the middle of a write).",
    "skipped_bytes": "Journal bytes skipped as corrupt or torn.",
}


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


def _http_families(snap: Snapshot) -> Iterator[Metric]:
    """Answers by endpoint group and status, and the latency of the web app's groups."""
    requests = CounterMetricFamily(
        "tracker_http_requests", "Requests answered, by endpoint group (open and click are "
        "the tracking endpoints) and status code.", labels=["group", "code"])
    for key, n in sorted(snap.counters.items()):
        kind, _, rest = key.partition(" ")
        if kind == HTTP:
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
        if kind == HTTP:
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


def registry_for(collector: Collector) -> CollectorRegistry:
    """A private registry: nothing from the process-wide default one leaks in."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The scrape body and its content type (OpenMetrics when the scraper asks for it)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
