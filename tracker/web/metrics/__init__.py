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

counters.py holds what the hot path touches; snapshots.py what the workers share and how
it adds up; collectors.py what a scrape reads; exposition.py the families and the text.
"""

from tracker.web.metrics.collectors import (
    PUBLISH_INTERVAL_S,
    MetricsCollector,
    WebhookCollector,
)
from tracker.web.metrics.counters import (
    BATCH_SIZE_BUCKETS,
    DB_ERROR_SOURCES,
    ENDPOINTS,
    FLUSH_SECONDS_BUCKETS,
    REQUEST_SECONDS_BUCKETS,
    Histogram,
    Metrics,
    observe_flushes,
)
from tracker.web.metrics.exposition import (
    JOURNAL_COUNTERS,
    build_info,
    exposition,
    families,
    registry_for,
    rules_families,
)
from tracker.web.metrics.snapshots import SharedSnapshots, Snapshot, merge

__all__ = [
    "BATCH_SIZE_BUCKETS", "DB_ERROR_SOURCES", "ENDPOINTS", "FLUSH_SECONDS_BUCKETS",
    "JOURNAL_COUNTERS", "PUBLISH_INTERVAL_S", "REQUEST_SECONDS_BUCKETS", "Histogram",
    "Metrics", "MetricsCollector", "SharedSnapshots", "Snapshot", "WebhookCollector",
    "build_info", "exposition", "families", "merge", "observe_flushes", "registry_for",
    "rules_families",
]
