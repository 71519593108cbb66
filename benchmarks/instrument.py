"""HTML instrumentation: µs of CPU per corpus document to find the links and splice them.

    python -m benchmarks instrument [--rounds 7] [--number 50]

For each document of tests/corpus (tracker.mail.instrument): `first`, extract from a
document whose links were never seen (the destination and urlsplit caches cleared before
each call); `repeat`, the same document again (a campaign's next message: destinations
cached); `render`, splicing the tracked URLs and the pixel in. Times are the best of
`--rounds` rounds of CPU time (process time, so other work on a shared machine does not
count).
"""

from __future__ import annotations

import argparse
import time
import timeit
import urllib.parse
from collections.abc import Callable, Sequence

from benchmarks.common import ROOT
from tracker.mail import instrument
from tracker.mail.instrument import Extraction, extract, render

CORPUS = ROOT / "tests" / "corpus"
TRACKED = "https://t.example.com/c/AQIBAAAAAAAAAAEAAAAAAAAAAgAAAAAAAAADZzCCAAAAAQAAAAAAAAAB{}"
PIXEL = "https://t.example.com/o/AQEBAAAAAAAAAAEAAAAAAAAAAgAAAAAAAAADZzCCAAA.gif"


def _first(html: str) -> Extraction:
    """As for a message whose links were never seen: no cached destination or URL split."""
    instrument._cached_destination.cache_clear()
    urllib.parse.urlsplit.cache_clear()  # type: ignore[attr-defined]
    return extract(html)


def best(function: Callable[[], object], rounds: int, number: int) -> float:
    return min(timeit.repeat(function, number=number, repeat=rounds,
                             timer=time.process_time)) / number * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks instrument",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=50)
    args = parser.parse_args(argv)
    print(f"| {'document':18} | {'KB':>5} | {'links':>5} | {'first µs':>8} | {'repeat µs':>9} "
          f"| {'render µs':>9} |")
    print("|---|---:|---:|---:|---:|---:|")
    for path in sorted(CORPUS.glob("*.html")):
        html = path.read_bytes().decode()
        found = extract(html)
        tracked = [TRACKED.format(i) for i in range(len(found.links))]
        first = best(lambda: _first(html), args.rounds, args.number)  # noqa: B023
        repeat = best(lambda: extract(html), args.rounds, args.number)  # noqa: B023
        spliced = best(lambda: render(html, found, tracked, PIXEL),  # noqa: B023
                       args.rounds, args.number)
        print(f"| {path.stem:18} | {len(html.encode()) / 1024:5.1f} | {len(found.links):5} "
              f"| {first:8.1f} | {repeat:9.1f} | {spliced:9.1f} |")
    print(f"\nbest of {args.rounds} rounds of {args.number} calls, CPU time")
    return 0
