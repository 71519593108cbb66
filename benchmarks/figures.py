"""What the benchmark suite prints and draws: the load's tables, the correctness checks,
the goals table, and the charts (matplotlib, optional: `pip install 'tracker[bench]'`)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.common import LOAD_CORE, percentile, priority_note
from benchmarks.wrk import series

if TYPE_CHECKING:
    from benchmarks.suite import LoadResult


def events_label(events: int) -> str:
    return f"{events / 1e6:g}M" if events >= 1_000_000 else f"{events / 1e3:g}k"


@dataclass
class Goal:
    figure: str
    value: str
    goal: str
    met: bool | None  # None: not measured here

    @property
    def verdict(self) -> str:
        return {True: "met", False: "MISSED", None: "-"}[self.met]


def goals(load: LoadResult | None, others: dict[str, Any]) -> list[Goal]:
    rows = []
    nginx = load.find("nginx static GIF") if load else None
    for endpoint, wanted, aim in (("pixel", 0.5, 0.8), ("click", 0.45, 0.7)):
        phase = load.find(f"tracker {endpoint}") if load else None
        if phase is None:
            continue
        if nginx is None or not nginx.per_cpu_second or not phase.per_cpu_second:
            rows.append(Goal(f"{endpoint} ÷ nginx, requests per CPU-second", "local only",
                             f"≥ {wanted:.2f}×", None))
            continue
        ratio = phase.per_cpu_second / nginx.per_cpu_second
        rows.append(Goal(f"{endpoint} ÷ nginx, requests per CPU-second (aim {aim:.1f}×)",
                         f"{ratio:.2f}×", f"≥ {wanted:.2f}×", ratio >= wanted))
        rows.append(Goal(f"  {endpoint}: µs of server CPU a hit (nginx a request: "
                         f"{1e6 / nginx.per_cpu_second:.1f}; aim: ≤ "
                         f"{1e6 / nginx.per_cpu_second / aim:.1f})",
                         f"{1e6 / phase.per_cpu_second:.1f} µs",
                         f"≤ {1e6 / nginx.per_cpu_second / wanted:.1f} µs", ratio >= wanted))
    if nginx is not None and nginx.seconds:
        # nginx is measured at the rate wrk can send: below saturation each of its
        # wake-ups serves fewer requests and costs more CPU each, which flatters tracker.
        busy = nginx.server_cpu_s / nginx.seconds + nginx.server_wait
        rows.append(Goal("nginx saturated (its CPU and its wait for core 0, of the phase)",
                         f"{busy:.0%}", "≥ 90 %", busy >= 0.9))
    for endpoint in ("pixel", "click"):
        phase = load.find(f"tracker {endpoint}, half rate") if load else None
        if phase is None:
            continue
        p99 = phase.latency_ms(0.99)
        rows.append(Goal(f"{endpoint} p99 at half the maximum rate ({phase.rate:,.0f}/s)",
                         f"{p99:.2f} ms", "≤ 5 ms", p99 <= 5))
    ingest = others.get("ingest")
    if ingest is not None:
        rate = (ingest.figures or {}).get("events_per_s")
        rows.append(Goal("ingest, events/s through the writer (idempotent)",
                         f"{rate:,.0f}" if rate else "failed", "≥ 100,000",
                         None if not rate else rate >= 100_000
                         and bool(ingest.figures.get("idempotent", True))))
    if load is not None:
        peak = max((m["peak_mb"] for m in load.memory), default=None)
        rows.append(Goal("RSS per worker under load (peak)",
                         f"{peak:.0f} MB" if peak else "local only", "≤ 150 MB",
                         None if peak is None else peak <= 150))
    registration = others.get("registration")
    if registration is not None:
        rate = (registration.figures or {}).get("messages_per_s")
        rows.append(Goal("registration, messages/s (16 KB HTML, 5 links)",
                         f"{rate:,.0f}" if rate else "failed", "≥ 5,000",
                         None if not rate else rate >= 5000))
    elif load is not None:
        rate = load.messages / load.registration_s
        rows.append(Goal("registration, messages/s (links only, the load's campaign)",
                         f"{rate:,.0f}", "≥ 5,000", rate >= 5000))
    for events, program in others.get("reports", []):
        p50 = (program.figures or {}).get("report_p50_ms")
        rows.append(Goal(f"report latency, {events_label(events)} events (p50)",
                         f"{p50:.1f} ms" if p50 is not None else "failed", "≤ 200 ms",
                         None if p50 is None else p50 <= 200))
    if load is not None and not others.get("reports"):
        p50 = percentile(load.report_ms, 0.5)
        rows.append(Goal(f"report latency, the load's campaign ({load.events:,} events, p50)",
                         f"{p50:.1f} ms", "≤ 200 ms", p50 <= 200))
    if load is not None:
        passed = sum(c.ok for c in load.checks)
        rows.append(Goal("end-to-end correctness (report = what was sent)",
                         f"{'PASS' if load.correct else 'FAIL'} ({passed}/{len(load.checks)})",
                         "all equal", load.correct))
        busiest = max(load.phases, key=lambda p: p.wrk_share)
        rows.append(Goal(f"load generator CPU, busiest phase ({busiest.name})",
                         f"{busiest.wrk_share:.0%} of a core", "< 90 %",
                         busiest.wrk_share < 0.9))
    return rows


def print_load(load: LoadResult, args: argparse.Namespace) -> None:
    nginx = load.find("nginx static GIF")
    where = ("remote deployment" if args.url else
             f"tracker serve ({args.server_used}) pinned to core 0, wrk and PostgreSQL on core "
             f"{LOAD_CORE}, {priority_note()}; geo database: "
             f"{args.geoip_used or 'none (nothing is located: the figures flatter tracker)'}")
    print(f"\nLoad: the {args.mix} mix; wrk with a finite plan per run, {args.connections} "
          f"connections on {args.threads} thread(s), alone at full speed; at half rate a probe "
          f"of {args.probe_connections} paced connections (up to {args.probe_rate:,.0f} "
          "requests/s) beside it times every answer; "
          f"{load.messages:,} messages, {args.links} links each; {where}\n")
    print(f"{'phase':<26} {'requests':>9} {'req/s':>8} {'p50 ms':>7} {'p90 ms':>7} "
          f"{'p99 ms':>7} {'p99.9':>7} {'errors':>6} {'404 want/got':>12} {'wrk cpu':>7} "
          f"{'wrk wait':>8} {'PG cpu':>6} {'spilled':>7} "
          f"{'req/cpu-s':>9} {'µs/req':>6} {'cpu wait':>8} {'× nginx':>7} {'×/cpu':>6}")
    for p in load.phases:
        ratio = f"{p.rate / nginx.rate:.2f}" if nginx and not p.reference else ""
        cpu_ratio = (f"{p.per_cpu_second / nginx.per_cpu_second:.2f}"
                     if nginx and not p.reference and nginx.per_cpu_second else "")
        status = (f"{p.not_found_expected}/{p.not_found}"
                  if p.not_found_expected is not None else "")
        per_cpu = f"{p.per_cpu_second:,.0f}" if p.per_cpu_second else "n/a"
        per_request = f"{1e6 / p.per_cpu_second:.1f}" if p.per_cpu_second else "n/a"
        wait = f"{p.server_wait:.0%}" if p.per_cpu_second else "n/a"
        database = "" if args.url or p.reference else f"{p.database_share:.0%}"
        spilled = "" if p.spilled_share is None else f"{p.spilled_share:.0%}"
        p50, p90, p99, p999 = (_ms(p.latency_ms(q) if p.timed else None)
                               for q in (0.5, 0.9, 0.99, 0.999))
        print(f"{p.name:<26} {p.requests:>9,} {p.rate:>8,.0f} {p50:>7} {p90:>7} {p99:>7} "
              f"{p999:>7} {p.socket_errors:>6} {status:>12} "
              f"{p.wrk_share:>7.0%} {p.wrk_wait:>8.1%} {database:>6} {spilled:>7} "
              f"{per_cpu:>9} {per_request:>6} {wait:>8} {ratio:>7} {cpu_ratio:>6}")
    if not args.url:
        print("  µs/req: the server's CPU per request; cpu wait: the share of the phase the "
              "server's threads were ready to run but waited for core 0 (other work on the "
              f"machine); wrk wait: the same for wrk on core {LOAD_CORE}, which it shares with "
              "PostgreSQL (its latency counts that wait); PG cpu: PostgreSQL's share of a "
              "core; spilled: the share of the requests whose events went to the journal "
              "(PostgreSQL behind); errors: socket errors")
    paced = [p for p in load.phases if p.paced]
    for p in paced:
        share = p.late / p.requests if p.requests else 0
        print(f"  {p.name}: asked {p.paced:,.0f}/s, got {p.rate:,.0f}/s; {share:.1%} of the "
              f"requests left more than 1 ms after their slot (latest {p.late_max_ms:.1f} ms)")

    print(f"\nOver time, windows of {args.window:g} s: requests/s (load and probe) and the "
          "probe's latency percentiles (ms; paced phases)")
    for p in load.phases:
        print(f"  {p.name}")
        print(f"  {'t s':>7} {'req/s':>8} {'p50':>7} {'p90':>7} {'p99':>7} {'timed':>6}")
        for w in series(p.runs):
            print(f"  {w.t:>7.2f} {w.rate:>8,.0f} {_ms(w.p50):>7} {_ms(w.p90):>7} "
                  f"{_ms(w.p99):>7} {w.timed:>6}")

    print("\nCorrectness: the campaign's report against what the plan sent")
    print(f"  {'figure':<34} {'sent (expected)':>18} {'report':>18}")
    for c in load.checks:
        print(f"  {c.name:<34} {_show(c.expected):>18} {_show(c.got):>18}  "
              f"{'PASS' if c.ok else 'FAIL'}")
    for p in load.phases:
        if p.not_found_expected is not None:
            print(f"  {p.name + ': 404 answers':<34} {p.not_found_expected:>18} "
                  f"{p.not_found:>18}  {'PASS' if p.not_found == p.not_found_expected else 'FAIL'}")
    for problem in load.problems:
        print(f"  FAIL: {problem}")
    if load.memory:
        print("\nMemory of the server's workers after the full-speed phases")
        for m in load.memory:
            print(f"  pid {m['pid']}: VmRSS {m['rss_mb']:.0f} MB, VmHWM (peak) "
                  f"{m['peak_mb']:.0f} MB")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(_show(v) for v in value)
    return str(value)


def print_goals(rows: list[Goal]) -> None:
    width = max(len(r.figure) for r in rows)
    print(f"\nGoals\n  {'figure':<{width}} {'measured':>20} {'goal':>11}  verdict")
    for r in rows:
        print(f"  {r.figure:<{width}} {r.value:>20} {r.goal:>11}  {r.verdict}")


def charts(load: LoadResult, out: Path) -> list[Path]:
    """throughput.png and latency.png; none if matplotlib is missing (said so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\ncharts skipped: matplotlib is not installed (pip install 'tracker[bench]')")
        return []
    written = []
    figure, axes = plt.subplots(figsize=(10, 5))
    for p in load.phases:
        windows = series(p.runs)
        axes.plot([w.t for w in windows], [w.rate for w in windows], marker="o",
                  markersize=3, label=p.name)
    axes.set(title="Throughput over time", xlabel="seconds into the phase",
             ylabel="requests/s")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    written.append(out / "throughput.png")
    figure.savefig(written[-1], dpi=100)
    plt.close(figure)

    timed = [p for p in load.phases if p.timed] or load.phases
    figure, grid = plt.subplots(len(timed), 1, figsize=(10, 2.6 * max(2, len(timed))),
                                sharex=True, squeeze=False)
    for axes, p in zip(grid[:, 0], timed, strict=True):
        windows = series(p.runs)
        for name in ("p50", "p90", "p99"):
            values = [getattr(w, name) for w in windows]
            axes.plot([w.t for w in windows], [math.nan if v is None else v for v in values],
                      marker="o", markersize=3, label=name)
        if p.paced:
            axes.axhline(5, color="red", linestyle="--", linewidth=1, label="goal: p99 ≤ 5 ms")
        axes.set_yscale("log")
        axes.set(title=f"{p.name}: {p.rate:,.0f} requests/s", ylabel="latency ms")
        axes.grid(alpha=0.3, which="both")
        axes.legend(loc="upper right", fontsize="small")
    grid[-1, 0].set_xlabel("seconds into the phase")
    figure.tight_layout()
    written.append(out / "latency.png")
    figure.savefig(written[-1], dpi=100)
    plt.close(figure)
    return written
