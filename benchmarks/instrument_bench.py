"""HTML instrumentation benchmark: µs per corpus document for extract and render, per engine.

    python benchmarks/instrument_bench.py [--rounds 7] [--number 50]

Engines (each finds the same kind of links and hands the same Extraction to render):

- `tokenizer`: tracker.instrument, the one in use. `first` is a document whose links
  were never seen (the destination and urlsplit caches cleared before each call),
  `repeat` the same document again (a campaign's next message: destinations cached).
- `tree-sitter`: tree-sitter-html parses the bytes in C; a query picks href attributes
  of a/area/v:* start tags; conditional comments are parsed again on their own; byte
  offsets are mapped back to str indices. Needs `pip install tree-sitter tree-sitter-html`.
- `html.parser`: the standard library's HTMLParser; raw start tag text and line/column
  positions give the value spans.

`render` is the same splice for every engine (tracker.instrument.render), measured once.
`agrees` says whether the engine found exactly the links (spans and destinations) and
pixel position of `tokenizer`; where it does not, the first difference is printed below
the table. Times are the best of `--rounds` rounds of CPU time (process time, so other
work on a shared machine does not count).
"""

from __future__ import annotations

import argparse
import bisect
import re
import sys
import time
import timeit
import urllib.parse
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tracker.mail import instrument
from tracker.mail.instrument import Extraction, LinkSpot, extract, render

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "corpus"
TRACKED = "https://t.example.com/c/AQIBAAAAAAAAAAEAAAAAAAAAAgAAAAAAAAADZzCCAAAAAQAAAAAAAAAB{}"
PIXEL = "https://t.example.com/o/AQEBAAAAAAAAAAEAAAAAAAAAAgAAAAAAAAADZzCCAAA.gif"
_CONDITION = re.compile(r"<!--\[if[^\]]*\]>", re.IGNORECASE)
_ATTRIBUTE = re.compile(  # html.parser's own attribute pattern (attrfind_tolerant)
    r'((?<=[\'"\s/])[^\s/>][^\s/=>]*)(\s*=+\s*'
    r'(\'[^\']*\'|"[^"]*"|(?![\'"])[^>\s]*))?(?:\s|/(?!>))*')


class _Found:
    """What an engine saw, turned into an Extraction by the shared rules."""

    def __init__(self) -> None:
        self.candidates: list[tuple[int, int, str, str]] = []
        self.base: str | None = None
        self.body_end = -1

    def extraction(self, length: int) -> Extraction:
        base = instrument._base_url(self.base)
        links = []
        for start, end, raw, quote in self.candidates:
            url = instrument._destination(raw, base)
            if url is not None:
                links.append(LinkSpot(start, end, url, quote))
        return Extraction(tuple(links), self.body_end if self.body_end >= 0 else length)


def _is_link_element(name: str) -> bool:
    return name in ("a", "area") or name.startswith("v:")


def _tracking_off(value: str | None) -> bool:
    return value is not None and instrument._decode(value).strip().lower() == "off"


# --- tree-sitter-html ----------------------------------------------------------------------

def tree_sitter_engine() -> Callable[[str], Extraction] | None:
    try:
        import tree_sitter
        import tree_sitter_html
    except ImportError:
        return None
    language = tree_sitter.Language(tree_sitter_html.language())
    parser = tree_sitter.Parser(language)
    query = tree_sitter.Query(language, """
        (start_tag (tag_name) @tag) @start
        (self_closing_tag (tag_name) @tag) @start
        (comment) @comment
        (end_tag (tag_name) @end)
    """)

    def scan(source: bytes, offset: int, found: _Found, top: bool,
             spans: list[tuple[int, int, str, str]]) -> None:
        tree = parser.parse(source)
        for _, captures in tree_sitter.QueryCursor(query).matches(tree.root_node):
            if "comment" in captures:
                node = captures["comment"][0]
                text = source[node.start_byte:node.end_byte].decode()
                cond = _CONDITION.match(text)
                if cond is not None:
                    inner_start = node.start_byte + len(text[:cond.end()].encode())
                    inner_end = node.end_byte - 3 if text.endswith("-->") else node.end_byte
                    scan(source[inner_start:inner_end], offset + inner_start, found, False, spans)
            elif "end" in captures:
                node = captures["end"][0]
                if top and node.text is not None and node.text.lower() == b"body":
                    found.body_end = offset + node.parent.start_byte  # type: ignore[union-attr, unused-ignore]
            else:
                name = (captures["tag"][0].text or b"").decode().lower()
                if not (_is_link_element(name) or name == "base"):
                    continue
                href = track = None
                for attribute in captures["start"][0].children:
                    if attribute.type != "attribute":
                        continue
                    attribute_name = (attribute.children[0].text or b"").decode().lower()
                    if attribute_name == "href" and href is None:
                        href = attribute
                    elif attribute_name == "data-track" and track is None:
                        track = attribute
                if href is None or len(href.children) < 3:
                    continue
                value = href.children[2]
                quote = ""
                if value.type == "quoted_attribute_value":
                    quote = chr(source[value.start_byte])
                    start, end = value.start_byte + 1, value.end_byte - 1
                else:
                    start, end = value.start_byte, value.end_byte
                raw = source[start:end].decode()
                if name == "base":
                    if top and found.base is None:
                        found.base = instrument._decode(raw)
                    continue
                if track is not None and len(track.children) >= 3:
                    track_text = (track.children[2].text or b"").decode().strip("\"'")
                    if _tracking_off(track_text):
                        continue
                spans.append((offset + start, offset + end, raw, quote))

    def run(html: str) -> Extraction:
        source = html.encode()
        found = _Found()
        spans: list[tuple[int, int, str, str]] = []
        scan(source, 0, found, True, spans)
        spans.sort()
        if len(source) == len(html):  # ASCII: byte offsets are str indices
            found.candidates = spans
        else:
            to_index = _byte_offsets(html)
            found.candidates = [(to_index(s), to_index(e), raw, q) for s, e, raw, q in spans]
            if found.body_end >= 0:
                found.body_end = to_index(found.body_end)
        return found.extraction(len(html))

    return run


def _byte_offsets(html: str) -> Callable[[int], int]:
    """UTF-8 byte offset -> str index, through the byte offsets of non-ASCII characters."""
    marks: list[int] = []  # byte offset just after each non-ASCII character
    extra: list[int] = []  # bytes beyond one per character up to there
    byte = 0
    total = 0
    for char in html:
        size = 1 if char < "\x80" else len(char.encode())
        byte += size
        if size > 1:
            total += size - 1
            marks.append(byte)
            extra.append(total)

    def to_index(offset: int) -> int:
        i = bisect.bisect_right(marks, offset)
        return offset - (extra[i - 1] if i else 0)

    return to_index


# --- html.parser ---------------------------------------------------------------------------

class _Parser(HTMLParser):
    RAW = ("script", "style", "textarea", "title", "xmp", "iframe", "noembed", "noframes")

    def __init__(self, html: str, offset: int, found: _Found, top: bool) -> None:
        super().__init__(convert_charrefs=False)
        self.html, self.at, self.found, self.top = html, offset, found, top
        self.lines = [0] + [m.end() for m in re.finditer("\n", html)]

    def _at(self) -> int:
        line, column = self.getpos()
        return self.lines[line - 1] + column

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.RAW:
            self.set_cdata_mode(tag)
        if not (_is_link_element(tag) or tag == "base"):
            return
        text = self.get_starttag_text() or ""
        start = self._at()
        href = track = None
        for m in _ATTRIBUTE.finditer(text, len(tag) + 1):
            name = m.group(1).lower()
            if name == "href" and href is None:
                href = m
            elif name == "data-track" and track is None:
                track = m
        if href is None or href.group(3) is None:
            return
        value = href.group(3)
        quote = value[:1] if value[:1] in ("'", '"') else ""
        inner = (href.start(3) + 1, href.end(3) - 1) if quote else href.span(3)
        raw = text[inner[0]:inner[1]]
        if tag == "base":
            if self.top and self.found.base is None:
                self.found.base = instrument._decode(raw)
            return
        if track is not None and _tracking_off((track.group(3) or "").strip("\"'")):
            return
        self.found.candidates.append((self.at + start + inner[0],
                                      self.at + start + inner[1], raw, quote))

    handle_startendtag = handle_starttag

    def handle_endtag(self, tag: str) -> None:
        if tag == "body" and self.top:
            self.found.body_end = self.at + self._at()

    def handle_comment(self, data: str) -> None:
        cond = re.match(r"\[if[^\]]*\]>", data, re.IGNORECASE)
        if cond is not None:
            start = self.at + self._at() + 4 + cond.end()
            inner = _Parser(data[cond.end():], start, self.found, False)
            inner.feed(data[cond.end():])
            inner.close()


def html_parser_engine(html: str) -> Extraction:
    found = _Found()
    parser = _Parser(html, 0, found, True)
    parser.feed(html)
    parser.close()
    found.candidates.sort()
    return found.extraction(len(html))


# --- the table -----------------------------------------------------------------------------

def _forget() -> None:
    """As for a message whose links were never seen: no cached destination or URL split."""
    instrument._cached_destination.cache_clear()
    urllib.parse.urlsplit.cache_clear()  # type: ignore[attr-defined]


def best(function: Callable[[], object], rounds: int, number: int) -> float:
    return min(timeit.repeat(function, number=number, repeat=rounds,
                             timer=time.process_time)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=50)
    args = parser.parse_args()

    def first(html: str) -> Extraction:
        _forget()
        return extract(html)

    engines: dict[str, Callable[[str], Extraction] | None] = {
        "tree-sitter": tree_sitter_engine(),
        "html.parser": html_parser_engine,
    }
    header = (f"{'document':18} {'KB':>5} {'links':>5} | {'tokenizer first':>15} {'repeat':>7}"
              f" {'render':>7} | " + " | ".join(f"{name:>12} {'agrees':>6}" for name in engines))
    print(header)
    print("-" * len(header))
    notes = []
    for path in sorted(CORPUS.glob("*.html")):
        html = path.read_bytes().decode()
        ours = extract(html)
        tracked = [TRACKED.format(i) for i in range(len(ours.links))]
        timings = [
            best(lambda: first(html), args.rounds, args.number),  # noqa: B023
            best(lambda: extract(html), args.rounds, args.number),  # noqa: B023
            best(lambda: render(html, ours, tracked, PIXEL), args.rounds, args.number),  # noqa: B023
        ]
        row = [f"{path.stem:18} {len(html.encode()) / 1024:5.1f} {len(ours.links):5} |",
               f"{timings[0]:15.1f} {timings[1]:7.1f} {timings[2]:7.1f} |"]
        cells = []
        for name, engine in engines.items():
            if engine is None:
                cells.append(f"{'not installed':>12} {'':>6}")
                continue

            def theirs(html: str = html, engine: Callable[[str], Extraction] = engine) -> None:
                _forget()
                engine(html)

            result = engine(html)
            agrees = result == ours
            if not agrees:
                notes.append(f"{name} on {path.stem}: " + _difference(ours, result))
            cells.append(f"{best(theirs, args.rounds, max(1, args.number // 5)):12.1f}"
                         f" {'yes' if agrees else 'NO':>6}")
        print(" ".join(row), " | ".join(cells))
    print()
    print("µs per document, best of", args.rounds, "rounds of CPU time; tree-sitter and"
          " html.parser measured like 'tokenizer first'.")
    for note in notes:
        print(" -", note)


def _difference(ours: Extraction, theirs: Extraction) -> str:
    if ours.pixel_at != theirs.pixel_at:
        return f"pixel at {theirs.pixel_at}, not {ours.pixel_at}"
    mine = {(s.start, s.url) for s in ours.links}
    other = {(s.start, s.url) for s in theirs.links}
    extra, missing = sorted(other - mine), sorted(mine - other)
    parts = []
    if extra:
        parts.append(f"{len(extra)} extra (first: {extra[0][1][:60]})")
    if missing:
        parts.append(f"{len(missing)} missing (first: {missing[0][1][:60]})")
    return ", ".join(parts) or "same links, other spans or quotes"


if __name__ == "__main__":
    main()
