"""What counting a hit costs on the hot path, and what a scrape costs.

    python benchmarks/metrics_bench.py

Compares the plain counters tracker uses (`tracker.metrics.Metrics`, exported by a
collector at scrape time) with prometheus-client's own counters incremented per hit,
through the same call the fast path makes (`count_hit(endpoint, machine)`). Prints
nanoseconds per call, the best of several rounds (a shared machine is noisy; the best
round is the one least disturbed).
"""

from __future__ import annotations

import timeit
from collections import Counter
from collections.abc import Callable
from functools import partial

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter

from tracker.ingest.pipeline import DropReason
from tracker.web.metrics import Metrics, MetricsCollector, registry_for

CALLS = 500_000
ROUNDS = 5


def _best_ns(call: Callable[[], None]) -> float:
    return min(timeit.repeat(call, number=CALLS, repeat=ROUNDS)) / CALLS * 1e9


def main() -> None:
    metrics = Metrics()
    old_hits: Counter[tuple[str, bool]] = Counter()
    old_drops: Counter[str] = Counter()

    def counter_hit(endpoint: str, machine: bool) -> None:
        old_hits[(endpoint, machine)] += 1

    def counter_drop(reason: DropReason) -> None:
        old_drops[reason] += 1

    registry = CollectorRegistry()
    hits = PromCounter("hits", "hits", ["endpoint", "verdict"], registry=registry)
    drops = PromCounter("drops", "drops", ["reason"], registry=registry)
    children = {(e, m): hits.labels(e, "machine" if m else "human")
                for e in ("open", "click") for m in (False, True)}

    def prom_labels_hit(endpoint: str, machine: bool) -> None:
        hits.labels(endpoint, "machine" if machine else "human").inc()

    def prom_child_hit(endpoint: str, machine: bool) -> None:
        children[(endpoint, machine)].inc()

    def prom_labels_drop(reason: DropReason) -> None:
        drops.labels(reason).inc()

    baseline = _best_ns(lambda: None)
    rows: list[tuple[str, float]] = []
    for name, hit in (("tracker Metrics.count_hit (plain ints)", metrics.count_hit),
                      ("collections.Counter[(endpoint, machine)]", counter_hit),
                      ("prometheus Counter, pre-bound child .inc()", prom_child_hit),
                      ("prometheus Counter .labels(...).inc()", prom_labels_hit)):
        rows.append((f"hit:  {name}", _best_ns(partial(hit, "open", False)) - baseline))
    for name, drop in (("tracker Metrics.count_drop (plain ints)", metrics.count_drop),
                       ("collections.Counter[reason]", counter_drop),
                       ("prometheus Counter .labels(...).inc()", prom_labels_drop)):
        rows.append((f"drop: {name}", _best_ns(partial(drop, DropReason.INVALID_TOKEN))
                     - baseline))

    collector = MetricsCollector(metrics, lambda: None, 1_000_000)
    scrape_registry = registry_for(collector)
    scrape_us = min(timeit.repeat(lambda: generate_latest(scrape_registry), number=200,
                                  repeat=ROUNDS)) / 200 * 1e6

    print(f"{'what':62s} {'ns/call':>8s}")
    for name, ns in rows:
        print(f"{name:62s} {ns:8.0f}")
    print(f"\n(call overhead of an empty lambda, subtracted above: {baseline:.0f} ns)")
    print(f"one scrape of /metrics (collect + text format): {scrape_us:.0f} µs")


if __name__ == "__main__":
    main()
