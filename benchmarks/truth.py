"""Score the classifier against a labelled corpus of third-party traffic.

    python -m benchmarks truth [--rules FILE] [--misses N] [--json]

Runs benchmarks/truth/corpus.jsonl and devices.jsonl through `tracker classify --jsonl`
(a subprocess: the contract's interface, so any build of tracker can be scored) and
prints a confusion matrix per category, the goals beside the figures, the
device-class agreement with Matomo device-detector's fixtures, and the mail-client
agreement where the corpus names one. It always exits 0: it is a benchmark, not a test.
See benchmarks/truth/SOURCES.md for how the corpus was built.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "truth" / "corpus.jsonl"
DEVICES = HERE / "truth" / "devices.jsonl"
CATEGORIES = ("apple_mpp", "scanner", "bot", "reader", "image_proxy")
REQUEST_FIELDS = ("user_agent", "ip", "method", "kind", "seconds_after_send")


def read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    lines = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                lines.append(json.loads(line))
            if limit is not None and len(lines) >= limit:
                break
    return lines


def classify(requests: Sequence[dict[str, Any]], rules: str | None) -> list[dict[str, Any]]:
    """One verdict per request, in order, from `tracker classify --jsonl`."""
    command = [sys.executable, "-m", "tracker", "classify", "--jsonl"]
    if rules:
        command += ["--rules", rules]
    defaults = {"ip": None, "method": "GET", "kind": "open", "seconds_after_send": None}
    stdin = "".join(json.dumps({k: r.get(k, defaults.get(k)) for k in REQUEST_FIELDS}) + "\n"
                    for r in requests)
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False)
    verdicts = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    if len(verdicts) != len(requests):
        raise RuntimeError(f"tracker classify answered {len(verdicts)} lines for "
                           f"{len(requests)} (exit {result.returncode}): "
                           f"{result.stderr.strip()[-300:]}")
    return verdicts


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def score(corpus: Sequence[dict[str, Any]], verdicts: Sequence[dict[str, Any]],
          devices: Sequence[dict[str, Any]], device_verdicts: Sequence[dict[str, Any]],
          misses: int) -> dict[str, Any]:
    matrix: dict[str, Counter[str]] = {c: Counter() for c in CATEGORIES}
    missed: dict[str, list[dict[str, Any]]] = {c: [] for c in CATEGORIES}
    reasons: dict[str, Counter[str]] = {c: Counter() for c in CATEGORIES}
    client_total = client_agree = 0
    client_field = False
    for line, verdict in zip(corpus, verdicts, strict=True):
        category = line["category"]
        called = "error" if "error" in verdict else (
            "machine" if verdict.get("machine") else "human")
        matrix[category][f"{line['label']}->{called}"] += 1
        if called == "machine":
            reasons[category][verdict.get("reason") or "?"] += 1
        if called != line["label"] and len(missed[category]) < misses:
            missed[category].append({
                "user_agent": line["user_agent"], "ip": line["ip"], "kind": line["kind"],
                "seconds_after_send": line["seconds_after_send"], "truth": line["label"],
                "verdict": called, "reason": verdict.get("reason"), "rule": verdict.get("rule"),
                "error": verdict.get("error"), "source": line["source"]})
        if line.get("client") is not None:
            client_total += 1
            if "client" in verdict:
                client_field = True
                client_agree += verdict["client"] == line["client"]

    def called_machine(category: str) -> tuple[int, int]:
        counts = matrix[category]
        total = sum(counts.values())
        return sum(n for k, n in counts.items() if k.endswith("->machine")), total

    machine_calls = sum(n for c in CATEGORIES for k, n in matrix[c].items()
                        if k.endswith("->machine"))
    true_machine_calls = sum(n for c in CATEGORIES for k, n in matrix[c].items()
                             if k == "machine->machine")
    mpp, mpp_total = called_machine("apple_mpp")
    scanners, scanners_total = called_machine("scanner")
    bots, bots_total = called_machine("bot")
    readers, readers_total = called_machine("reader")
    goals = [
        {"slice": "Apple MPP opens called machine", "value": _share(mpp, mpp_total),
         "count": f"{mpp}/{mpp_total}", "goal": ">= 95 %",
         "met": mpp_total > 0 and mpp >= 0.95 * mpp_total},
        {"slice": "security scanners called machine", "value": _share(scanners, scanners_total),
         "count": f"{scanners}/{scanners_total}", "goal": "all but one",
         "met": scanners_total > 0 and scanners >= scanners_total - 1},
        {"slice": "bots and crawlers called machine", "value": _share(bots, bots_total),
         "count": f"{bots}/{bots_total}", "goal": ">= 90 %",
         "met": bots_total > 0 and bots >= 0.9 * bots_total},
        {"slice": "real readers called machine", "value": _share(readers, readers_total),
         "count": f"{readers}/{readers_total}", "goal": "<= 0.5 %",
         "met": readers_total > 0 and readers <= 0.005 * readers_total},
        {"slice": "machine precision", "value": _share(true_machine_calls, machine_calls),
         "count": f"{true_machine_calls}/{machine_calls}", "goal": ">= 99.5 %",
         "met": machine_calls > 0 and true_machine_calls >= 0.995 * machine_calls},
    ]
    device_agree = sum(v.get("device") == d["device"] for d, v in
                       zip(devices, device_verdicts, strict=True))
    by_type: dict[str, Counter[str]] = {}
    for d, v in zip(devices, device_verdicts, strict=True):
        by_type.setdefault(d["device"], Counter())[str(v.get("device"))] += 1
    goals.append({"slice": "device class agrees with Matomo's fixtures",
                  "value": _share(device_agree, len(devices)),
                  "count": f"{device_agree}/{len(devices)}", "goal": ">= 95 %",
                  "met": bool(devices) and device_agree >= 0.95 * len(devices)})
    return {
        "lines": len(corpus),
        "confusion": {c: dict(matrix[c]) for c in CATEGORIES},
        "machine_reasons": {c: dict(reasons[c]) for c in CATEGORIES},
        "goals": goals,
        "devices": {"lines": len(devices), "agree": device_agree,
                    "by_expected": {k: dict(v) for k, v in sorted(by_type.items())}},
        "clients": {"lines": client_total, "agree": client_agree if client_field else None,
                    "field": client_field},
        "misses": missed,
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def render(result: dict[str, Any]) -> str:
    out = [f"corpus: {result['lines']} requests; devices: {result['devices']['lines']} agents", "",
           "confusion (truth -> verdict)", "",
           f"| {'category':<12} | {'lines':>5} | {'human->human':>12} | {'human->machine':>14} "
           f"| {'machine->machine':>16} | {'machine->human':>14} | machine reasons |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for category in CATEGORIES:
        m = result["confusion"][category]
        reasons = ", ".join(f"{k} {n}" for k, n in sorted(result["machine_reasons"][category]
                                                          .items(), key=lambda kv: -kv[1]))
        errors = sum(n for k, n in m.items() if k.endswith("->error"))
        out.append(f"| {category:<12} | {sum(m.values()):>5} | {m.get('human->human', 0):>12} "
                   f"| {m.get('human->machine', 0):>14} | {m.get('machine->machine', 0):>16} "
                   f"| {m.get('machine->human', 0):>14} | {reasons or '-'}"
                   + (f" (errors: {errors})" if errors else "") + " |")
    out += ["", "goals", "", "| slice | now | count | goal | met |",
            "|---|---:|---:|---:|:---:|"]
    for goal in result["goals"]:
        out.append(f"| {goal['slice']} | {_pct(goal['value'])} | {goal['count']} "
                   f"| {goal['goal']} | {'yes' if goal['met'] else 'no'} |")
    clients = result["clients"]
    out += ["", "mail client: " + (
        f"{clients['agree']}/{clients['lines']} lines agree "
        f"({_pct(_share(clients['agree'], clients['lines']))})" if clients["field"] else
        f"n/a: tracker classify gives no `client` field ({clients['lines']} lines name one)")]
    devices = result["devices"]
    out.append("device class by Matomo's class: " + "; ".join(
        f"{expected}: " + ", ".join(f"{k} {n}" for k, n in
                                    sorted(got.items(), key=lambda kv: -kv[1]))
        for expected, got in devices["by_expected"].items()))
    for category, lines in result["misses"].items():
        if lines:
            out += ["", f"misclassified {category} (first {len(lines)}):"]
            for m in lines:
                out.append(f"  truth {m['truth']}, called {m['verdict']} ({m['reason']}; "
                           f"rule: {m['rule']}) {m['kind']} +{m['seconds_after_send']}s "
                           f"ip {m['ip']}: {m['user_agent'][:120]!r}")
                out.append(f"    source: {m['source'][:200]}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks truth",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", help="a rules file laid over the packaged rules "
                        "(passed to tracker classify)")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--devices", type=Path, default=DEVICES)
    parser.add_argument("--limit", type=int, help="only the first N lines of each file")
    parser.add_argument("--misses", type=int, default=0, metavar="N",
                        help="print the first N misclassified lines of each category")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        corpus = read_jsonl(args.corpus, args.limit)
        devices = read_jsonl(args.devices, args.limit)
        verdicts = classify(corpus, args.rules)
        device_verdicts = classify([{"user_agent": d["user_agent"], "kind": "open"}
                                    for d in devices], args.rules)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"truth: cannot score: {exc}", file=sys.stderr)
        return 0
    result = score(corpus, verdicts, devices, device_verdicts, args.misses)
    print(json.dumps(result, indent=1) if args.json else render(result))
    return 0
