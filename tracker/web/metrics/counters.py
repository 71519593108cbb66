"""What a worker counts, as plain integers: the hot path's counters (`count_hit`,
`count_drop`) and the histograms of flushes and requests. They become metric families
only at scrape time (collectors.py)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from prometheus_client.metrics_core import HistogramMetricFamily

from tracker.ingest.pipeline import CLICK, OPEN, DropReason
from tracker.store.writer import BatchWriter

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


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(float(bound))
