"""One piece of a Matomo device regex, compiled on first use and matched where Matomo's
wrapper would match it: at the start of a word, in lower-cased text."""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger("tracker.ingest.devices")

# A compiled piece: a pattern of `re` or `regex`, or (a cheaper `re` pattern that must
# match first, the `regex` one).
Test = Any
_NEVER = re.compile(r"(?!)")
# Matomo wraps every device regex in `(?:^|[^A-Z0-9_-]|[^A-Z0-9-]_|sprd-|MZ-)(?:...)`, case
# insensitive: a match starts a word. Searching the piece alone and checking the text before
# each match start is the same and several times faster (the wrapper defeats the regex
# engines' literal-prefix scans).
_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


def _starts_word(text: str, start: int) -> bool:
    if start == 0:
        return True
    before = text[start - 1]
    if before == "_":
        return start >= 2 and text[start - 2] not in _WORD_CHARS
    if before not in _WORD_CHARS:
        return True
    return (text[max(0, start - 5):start].lower() == "sprd-"
            or text[max(0, start - 3):start].lower() == "mz-")


def _lower_case(pattern: str) -> str:
    """The pattern for lower-cased text: letters lower-cased, escapes (\\d, \\W) kept."""
    return re.sub(r"\\.|[^\\]+", lambda m: m[0] if m[0][0] == "\\" else m[0].lower(), pattern)


def compiled(pattern: str, relaxed: str | None) -> Test:
    """A test of lower-cased text: the same as the case-insensitive pattern on the text,
    and several times faster (a case-insensitive pattern gets no literal-prefix scan)."""
    pattern = _lower_case(pattern)
    try:
        return re.compile(pattern)
    except re.error:
        pass
    # Look-behinds of several lengths: only the `regex` module reads them. It is slow, so
    # the pattern without its look-arounds (it matches whenever the whole does) rules out
    # most agents first.
    import regex

    try:
        full = regex.compile(pattern)
    except regex.error:
        log.warning("device types: a pattern neither re nor regex reads: %.80s", pattern)
        return _NEVER
    try:
        first = re.compile(_lower_case(relaxed)) if relaxed else None
    except re.error:
        first = None
    return full if first is None else (first, full)


def found(test: Test, text: str) -> bool:
    """Whether the test matches `text` at the start of a word (Matomo's wrapper)."""
    pos = 0
    while pos <= len(text):
        if isinstance(test, tuple):
            if test[0].search(text, pos) is None:
                return False
            match = test[1].search(text, pos)
        else:
            match = test.search(text, pos)
        if match is None:
            return False
        if _starts_word(text, match.start()):
            return True
        pos = match.start() + 1
    return False
