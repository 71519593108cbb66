"""The collectors a scrape runs: a worker's counters with its writer's, journal's and
read replica's state and its memory, added up with the other workers' (`MetricsCollector`),
and the webhook endpoints' delivery statistics (`WebhookCollector`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tracker.ingest.endpoints import ANSWERS
from tracker.ingest.rules import Rules, load_rules
from tracker.store.replica import ReadReplica
from tracker.store.writer import BatchWriter
from tracker.web.metrics.counters import Metrics
from tracker.web.metrics.exposition import (
    JOURNAL_COUNTERS,
    build_info,
    families,
    rules_families,
)
from tracker.web.metrics.snapshots import HTTP, SharedSnapshots, Snapshot, merge

log = logging.getLogger("tracker.web.metrics")

# How often a worker publishes its numbers for the others (with --workers N): what the
# answer to a scrape may lag behind for the workers that did not answer it.
PUBLISH_INTERVAL_S = 1.0


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
                        **{f"{HTTP} {group}": h for group, h in m.request_seconds.items()}})
        snap.counters.update({f"{HTTP} {key}": n for key, n in m.requests.items()})
        if self.tracking_answers is not None:
            for (endpoint, status), n in zip(ANSWERS, self.tracking_answers(), strict=True):
                snap.counters[f"{HTTP} {endpoint} {status}"] = n
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


# The disk journal (tracker/store/journal.py) is read defensively, by these names: `writer.journal`
# with `disk_bytes`, `pending_events`, `oldest_age_s()` and `stats.<counter>`. A writer
# without one reports no journal metrics.
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


class WebhookCollector(Collector):
    """Per webhook endpoint: events delivered, attempts failed, queues retrying, the age of
    the oldest waiting event. Read from the delivery loop's last look at the database
    (every few seconds), so every worker shows the same numbers for every endpoint."""

    def __init__(self, stats: Callable[[], Sequence[Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        labels = ("account", "endpoint")
        delivered = CounterMetricFamily("tracker_webhook_delivered_events",
                                        "Events delivered to a webhook endpoint.", labels=labels)
        failed = CounterMetricFamily("tracker_webhook_failed_attempts",
                                     "Webhook delivery attempts that failed.", labels=labels)
        retrying = GaugeMetricFamily("tracker_webhook_retrying_queues",
                                     "Delivery queues of an endpoint waiting to retry.",
                                     labels=labels)
        oldest = GaugeMetricFamily("tracker_webhook_oldest_pending_seconds",
                                   "How long the endpoint's oldest queue has had events "
                                   "waiting (0: none wait).", labels=labels)
        enabled = GaugeMetricFamily("tracker_webhook_enabled",
                                    "1 while the endpoint is enabled; 0 once disabled.",
                                    labels=labels)
        for row in self._stats():
            values = [str(row["account_id"]), str(row["id"])]
            delivered.add_metric(values, row["delivered"])
            failed.add_metric(values, row["failed"])
            retrying.add_metric(values, row["retrying"])
            oldest.add_metric(values, row["oldest_pending_s"])
            enabled.add_metric(values, int(row["enabled"]))
        yield from (delivered, failed, retrying, oldest, enabled)
