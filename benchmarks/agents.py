"""What user-agent parsing costs a worker: start-up, memory, and time per new agent.

    python -m benchmarks agents [--devices benchmarks/truth/devices.jsonl] [--hostile 2000]

Each figure is taken in a fresh Python process of its own (so imports and caches start
cold), on the 1,500 agents of benchmarks/truth/devices.jsonl (Matomo's fixtures), each
parsed once with tracker's per-agent cache empty: the cost a worker pays on a cache miss.
Times are the CPU time of the parsing thread (the machine may be shared). "first pass"
is a new worker's (the device rules' regexes compile on first use); "warm"
is the same agents again once the cache is cleared. "hostile" agents are made of the
words Matomo's model rules look for, so that each picks as many regexes as it can.
Start-up is measured with the device index cached (every start after the first) and
without (the first start of a version: it builds the cache). Prints one table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT

DEVICES = ROOT / "benchmarks" / "truth" / "devices.jsonl"

# Runs in the child: prints one JSON line of figures.
_CHILD = r"""
import json, random, resource, sys, time
from pathlib import Path

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

def timed(fn, items):
    # CPU time of this thread, per item: what the worker pays, whatever else the
    # (shared) machine runs meanwhile; wall time would count the waits for a core.
    out = []
    clock = time.thread_time
    for item in items:
        start = clock()
        fn(item)
        out.append((clock() - start) * 1e6)
    return out

mode, cache, agents_path = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
hostile_count = int(sys.argv[4])
figures = {"rss_python_mib": rss_mib()}
wall, cpu = time.perf_counter(), time.process_time()
from tracker.ingest import useragent
figures["import_s"] = time.perf_counter() - wall
figures["import_cpu_s"] = time.process_time() - cpu
figures["rss_import_mib"] = rss_mib()
if mode == "start":
    wall, cpu = time.perf_counter(), time.process_time()
    assert useragent.prepare(cache)
    figures["prepare_s"] = time.perf_counter() - wall
    figures["prepare_cpu_s"] = time.process_time() - cpu
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    figures["builder_cpu_s"] = children.ru_utime + children.ru_stime
    figures["builder_peak_rss_mib"] = children.ru_maxrss / 1024
    figures["rss_prepared_mib"] = rss_mib()
    figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(figures))
    sys.exit(0)

assert useragent.prepare(cache)
figures["rss_prepared_mib"] = rss_mib()
agents = [json.loads(line)["user_agent"] for line in open(agents_path)]
from ua_parser import Domain
resolve = lambda agent: useragent._resolve(agent, Domain.ALL)
figures["ua_parser_us"] = timed(resolve, agents)
def tokens_only(agent):
    result = resolve(agent)
    useragent._device_class_by_tokens(agent, result.os.family if result.os else None)
figures["tokens_us"] = timed(tokens_only, agents)
useragent.parse_agent.cache_clear()
wall = time.perf_counter()
figures["first_us"] = timed(useragent.parse_agent, agents)
figures["first_wall_us"] = (time.perf_counter() - wall) / len(agents) * 1e6
figures["rss_agents_mib"] = rss_mib()
useragent.parse_agent.cache_clear()
figures["warm_us"] = timed(useragent.parse_agent, agents)
index = useragent._DeviceRules.index
words = json.loads(next(cache.glob("devices-*.json")).read_bytes())["words"]
rng = random.Random(14)
hostile = []
for n in range(hostile_count):
    names = " ".join(rng.choice(words) for _ in range(rng.choice((5, 20, 60, 150))))
    hostile.append(f"Mozilla/5.0 (Linux; Android 13; {names}) Chrome/120.0 Mobile Safari/537.36")
figures["hostile_ua_parser_us"] = timed(resolve, [h.strip()[:1024] for h in hostile])
from tracker.ingest import devices
figures["hostile_devices_us"] = timed(
    lambda agent: devices.device_type(index, agent, "Android", ("13", None)), hostile)
useragent.parse_agent.cache_clear()
figures["hostile_us"] = timed(useragent.parse_agent, hostile)
useragent.parse_agent.cache_clear()
figures["hostile_warm_us"] = timed(useragent.parse_agent, hostile)
figures["hostile_chars"] = sorted(len(h) for h in hostile)[len(hostile) // 2]
figures["rss_hostile_mib"] = rss_mib()
figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(figures))
"""


def child(mode: str, cache: Path, agents: Path, hostile: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", _CHILD, mode, str(cache), str(agents),
                           str(hostile)], capture_output=True, text=True, cwd=ROOT,
                          check=False, timeout=900)
    if done.returncode != 0:
        sys.exit(f"agents.py: the measuring process failed:\n{done.stderr}")
    figures: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return figures


def _quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return f"{at(0.5):8.1f} {at(0.99):8.1f} {ordered[-1]:9.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks agents",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=Path, default=DEVICES)
    parser.add_argument("--hostile", type=int, default=2000, help="hostile agents to time")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tracker-agents-") as tmp:
        cache = Path(tmp) / "cache"
        cold = child("start", cache, args.devices, 0)  # builds the cache
        warm = child("start", cache, args.devices, 0)
        run = child("parse", cache, args.devices, args.hostile)
    print("start-up of a worker (a fresh process)       wall s    CPU s   RSS MiB after")
    print(f"  python itself                                                 "
          f"{cold['rss_python_mib']:7.1f}")
    print(f"  import tracker.ingest.useragent (ua-parser)        {warm['import_s']:6.3f}   "
          f"{warm['import_cpu_s']:6.3f}   {warm['rss_import_mib']:7.1f}")
    print(f"  device index, cached                        {warm['prepare_s']:6.3f}   "
          f"{warm['prepare_cpu_s']:6.3f}   {warm['rss_prepared_mib']:7.1f}")
    print(f"  device index, built and cached (first start){cold['prepare_s']:6.3f}   "
          f"{cold['prepare_cpu_s']:6.3f}   {cold['rss_prepared_mib']:7.1f}")
    print(f"    of which the building process (once)               "
          f"{cold['builder_cpu_s']:6.3f}   {cold['builder_peak_rss_mib']:7.1f} (its peak)")
    print()
    print(f"CPU per new agent, µs ({len(run['first_us'])} agents)       median      p99       max")
    print(f"  ua-parser alone                            {_quantiles(run['ua_parser_us'])}")
    print(f"  ua-parser + token heuristics (fallback)    {_quantiles(run['tokens_us'])}")
    print(f"  parse_agent, first pass (new worker)       {_quantiles(run['first_us'])}"
          f"   (wall {run['first_wall_us']:.1f} µs mean)")
    print(f"  parse_agent, warm                          {_quantiles(run['warm_us'])}")
    print(f"  parse_agent, hostile agents ({len(run['hostile_us'])}, median "
          f"{run['hostile_chars']} chars) {_quantiles(run['hostile_us'])}")
    print(f"  parse_agent, the same hostile agents again {_quantiles(run['hostile_warm_us'])}")
    print(f"  of which ua-parser                         "
          f"{_quantiles(run['hostile_ua_parser_us'])}")
    print(f"  of which Matomo's rules                    "
          f"{_quantiles(run['hostile_devices_us'])}")
    print()
    print(f"memory of the parsing worker: RSS {run['rss_prepared_mib']:.1f} MiB prepared, "
          f"{run['rss_agents_mib']:.1f} after the agents, {run['rss_hostile_mib']:.1f} after the "
          f"hostile ones (peak {run['peak_rss_mib']:.1f}); {run['rss_import_mib']:.1f} with "
          f"ua-parser alone")
    return 0
