"""python -m benchmarks [NAME [OPTIONS]]: lists the programs, or runs one."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# name: (module, what it measures), in the order the README gives them.
PROGRAMS = {
    "suite": ("benchmarks.suite", "the tracking load against nginx, exact counts, memory, "
              "and the goals of all"),
    "cluster": ("benchmarks.cluster", "three nodes behind HAProxy on loopback, one killed and "
                "restarted: exactly once, failover"),
    "durability": ("benchmarks.durability", "what TRACKER_DURABILITY=journal costs, and what "
                   "a kill -9 loses in each mode"),
    "registration": ("benchmarks.registration", "messages/s registered through the batch API, "
                     "HTML instrumentation included"),
    "reports": ("benchmarks.reports", "report latency on a big campaign, the write rate, and "
                "how soon a hit shows"),
    "messages": ("benchmarks.messages", "listing 100k messages: time to the first page by "
                 "filter, CSV and JSON Lines export rate"),
    "ingest": ("benchmarks.ingest", "events/s into PostgreSQL through the writer, exactly "
               "once, against plain COPY"),
    "webhooks": ("benchmarks.webhooks", "webhook delivery events/s, and the tracking req/s "
                 "with delivery running against without"),
    "storage": ("benchmarks.storage", "bytes per event and per registered message, PostgreSQL "
                "CPU per event, before and after"),
    "hostile": ("benchmarks.hostile", "the server's memory and a bystander's latency under "
                "hostile clients"),
    "truth": ("benchmarks.truth", "the classifier and the device class against labelled "
              "third-party traffic"),
    "agents": ("benchmarks.agents", "user-agent parsing: a worker's start-up, memory, and "
               "CPU per new agent"),
    "instrument": ("benchmarks.instrument", "HTML instrumentation, µs per corpus document"),
    "pipeline": ("benchmarks.pipeline", "the hit pipeline, µs per open and click"),
    "hit": ("benchmarks.hit", "where a hit's CPU goes in process: the protocol, each step, "
            "the caches at a campaign's cardinality"),
}


def listing() -> str:
    width = max(map(len, PROGRAMS))
    lines = ["usage: python -m benchmarks NAME [OPTIONS]   (NAME --help for its options)", ""]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in PROGRAMS.items()]
    lines += ["", "What each figure means, and the current ones: benchmarks/README.md"]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(listing())
        return 0
    name, *options = argv
    if name not in PROGRAMS:
        print(f"python -m benchmarks: no program {name!r}\n\n{listing()}", file=sys.stderr)
        return 2
    program = importlib.import_module(PROGRAMS[name][0])
    code: int = program.main(options)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
