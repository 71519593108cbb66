"""The hit pipeline: µs per `Pipeline.open` / `Pipeline.click` call, in process.

    python -m benchmarks pipeline

Every case is on the cache-hit path (the user agent, location and address parts are
warm), which is what nearly every real hit takes: mail clients send few distinct user
agents. Prints a table; best of 7 rounds.
"""

from __future__ import annotations

import argparse
import time
import timeit
from collections.abc import Callable, Sequence
from dataclasses import replace

from tracker.ingest.geo import Location
from tracker.ingest.pipeline import Pipeline
from tracker.ingest.policy import DEFAULT, PolicyBook
from tracker.ingest.tokens import ClickToken, OpenToken
from tracker.ingest.useragent import parse_agent

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")
APPLE_MAIL = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
              "(KHTML, like Gecko)")
GMAIL_PROXY = ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 "
               "(via ggpht.com GoogleImageProxy)")
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
READER_IP = "81.2.69.142"
APPLE_IP = "17.58.101.9"
MESSAGES = 200_000  # more than the burst tracker remembers: evictions are part of the cost
NUMBER = 100_000
ROUNDS = 7


def _pipeline() -> Pipeline:
    book = PolicyBook()
    book.put(1, 1, replace(DEFAULT, location="city", ip="truncated"), recording=True)
    here = Location("DE", "Hesse", "Frankfurt am Main")
    return Pipeline(book, parse_agent, lambda ip: here)


def _per_call(fn: Callable[[], object]) -> float:
    return min(timeit.repeat(fn, number=NUMBER, repeat=ROUNDS)) / NUMBER * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m benchmarks pipeline",
                            description=__doc__.splitlines()[0]).parse_args(argv)
    now_us = time.time_ns() // 1000
    sent = now_us // 1_000_000 - 3600  # an hour ago: no timing rule applies
    pipeline = _pipeline()
    opened = OpenToken(1, 1, 7, sent)
    clicks = [ClickToken(1, 1, m, sent, 0, 0, 1, b"https://example.com/") for m in range(MESSAGES)]
    just_sent = ClickToken(1, 1, 7, now_us // 1_000_000, 0, 0, 1, b"https://example.com/")
    cursor = iter(range(1 << 62))

    def click_new_message() -> object:
        # Each click on another message (one click per message): the tracker's common case.
        return pipeline.click(clicks[next(cursor) % MESSAGES], "GET", CHROME, READER_IP,
                              now_us + next(cursor) * 10_000_000)

    cases: list[tuple[str, Callable[[], object]]] = [
        ("open, Chrome", lambda: pipeline.open(opened, "GET", CHROME, READER_IP, now_us)),
        ("open, Apple Mail, reader's address",
         lambda: pipeline.open(opened, "GET", APPLE_MAIL, READER_IP, now_us)),
        ("open, Apple Mail, Apple proxy address",
         lambda: pipeline.open(opened, "GET", APPLE_MAIL, APPLE_IP, now_us)),
        ("open, Gmail image proxy",
         lambda: pipeline.open(opened, "GET", GMAIL_PROXY, READER_IP, now_us)),
        ("open, Googlebot", lambda: pipeline.open(opened, "GET", GOOGLEBOT, READER_IP, now_us)),
        ("click, Chrome, same message and link",
         lambda: pipeline.click(clicks[7], "GET", CHROME, READER_IP, now_us)),
        ("click, Chrome, a new message each time", click_new_message),
        ("click, Chrome, seconds after sent_at",
         lambda: pipeline.click(just_sent, "GET", CHROME, READER_IP, now_us)),
        ("click, Googlebot", lambda: pipeline.click(clicks[7], "GET", GOOGLEBOT, READER_IP,
                                                    now_us)),
        ("click, HEAD", lambda: pipeline.click(clicks[7], "HEAD", CHROME, READER_IP, now_us)),
    ]
    for _, fn in cases:  # warm every cache
        fn()
    print(f"| {'case':42s} | {'µs/call':>8s} |")
    print("|---|---:|")
    for name, fn in cases:
        print(f"| {name:42s} | {_per_call(fn):8.2f} |")
    return 0
