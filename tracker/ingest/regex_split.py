"""A regular expression split into small alternatives, each with the words it needs.

Trying thousands of regexes on a string one after another is slow, and slower still when
one regex is an alternation of hundreds of model names, as Matomo's device rules are.
Split into alternatives (an alternation inside a group that must match exactly once is
distributed over what surrounds it: `A(?:B|C)D` becomes `ABD` and `ACD`), each piece is
small, and the literal text a piece cannot match without (its "words", lower-cased) lets
one Aho-Corasick scan of the string pick the few pieces worth trying.

Only the syntax Matomo's rules use is read (groups, look-arounds, classes, escapes,
quantifiers); a pattern that cannot be read raises ValueError, and its owner keeps it
whole, to be tried on every string.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# An alternation is kept as it is when splitting it would pass this many pieces.
MAX_PIECES = 4096
# Exact sets of strings (`[ _]`, `(?:4G|5G)`) are multiplied out up to this many strings.
_EXACT_LIMIT = 16
_LOOKAROUNDS = ("(?=", "(?!", "(?<=", "(?<!")
_PLAIN_GROUPS = ("(", "(?:")
# Text in nearly every user agent: a word found in it picks pieces on every string, so a
# rarer word is preferred even when shorter.
_COMMON_TEXT = " ".join([
    "mozilla/5.0 (linux; u; android 4.4.2; en-us; ) applewebkit/537.36 (khtml, like gecko)",
    "version/4.0 chrome/120.0.0.0 mobile safari/537.36 build/ (windows nt 10.0; win64; x64;",
    "wow64; trident/7.0; rv:11.0) compatible; msie 9.0; (iphone; ipad; cpu iphone os 17_0",
    "like mac os x) (macintosh; intel mac os x 10_15_7) firefox/121.0 gecko/20100101",
    "opera/9.80 presto/2.12 dalvik/2.1.0 wv) (x11; ubuntu; linux x86_64; arm64; aarch64",
    *(f"android {n}.0; android {n};" for n in range(1, 17))])

_TOKEN = re.compile(r"""
      (?P<literal>[^\\\[()|?*+{.^$]+)
    | (?P<escape>\\.)
    | (?P<cls>\[\^?\]?(?:\\.|[^\]\\])*\])
    | (?P<open>\((?:\?(?:<=|<!|[:=!>]|P?<\w+>))?)
    | (?P<close>\))
    | (?P<bar>\|)
    | (?P<char>.)""", re.VERBOSE | re.DOTALL)
_QUANTIFIER = re.compile(r"(?:[?*+]|\{\d+(?:,\d*)?\})[?+]?")
_ZERO_WIDTH_ESCAPES = frozenset("bBAZz")


@dataclass(frozen=True, slots=True)
class Leaf:
    text: str
    chars: frozenset[str] | None  # what one repetition matches, when a few strings
    quantifier: str = ""
    zero_width: bool = False


@dataclass(frozen=True, slots=True)
class Group:
    opener: str  # "(", "(?:", "(?!", "(?<=", "(?P<name>" ...
    alternatives: tuple[tuple[Item, ...], ...]
    quantifier: str = ""


Item = Leaf | Group
Sequence = tuple[Item, ...]


@dataclass(frozen=True, slots=True)
class Piece:
    pattern: str
    words: tuple[str, ...] | None  # None: no word found, the piece is tried on every string
    has_lookaround: bool
    without_lookarounds: str  # matches whenever `pattern` does (a cheaper first test)


def split(pattern: str, max_pieces: int = MAX_PIECES) -> list[Piece]:
    """The pieces of `pattern`: a string matches it exactly when it matches one piece."""
    pieces = []
    for alternative in parse(pattern):
        for sequence in _expand(alternative, max_pieces):
            lookaround = _has_lookaround(sequence)
            pieces.append(Piece(_text(sequence), words(sequence), lookaround,
                                _text(sequence, drop_lookarounds=True) if lookaround else ""))
    return pieces


def parse(pattern: str) -> list[Sequence]:
    """The top-level alternatives of `pattern`, parsed."""
    alternatives, end = _alternatives(pattern, 0)
    if end != len(pattern):
        raise ValueError(f"unbalanced ')' at {end} in {pattern!r}")
    return alternatives


def _alternatives(pattern: str, pos: int) -> tuple[list[Sequence], int]:
    out: list[list[Item]] = [[]]
    while pos < len(pattern):
        token = _TOKEN.match(pattern, pos)
        assert token is not None  # (?P<char>.) matches anything
        kind, text, end = token.lastgroup, token.group(), token.end()
        if kind == "close":
            break
        if kind == "bar":
            out.append([])
            pos = end
            continue
        if kind == "open":
            if text == "(" and pattern.startswith("(?", pos):
                raise ValueError(f"unsupported group at {pos} in {pattern!r}")
            inner, close = _alternatives(pattern, end)
            if close >= len(pattern):
                raise ValueError(f"unbalanced '(' at {pos} in {pattern!r}")
            quantifier, pos = _quantifier(pattern, close + 1)
            out[-1].append(Group(text, tuple(tuple(a) for a in inner), quantifier))
            continue
        quantifier, pos = _quantifier(pattern, end)
        if kind == "literal" and quantifier and len(text) > 1:  # it repeats the last only
            out[-1].append(Leaf(text[:-1], frozenset({text[:-1].lower()})))
            text = text[-1]
        out[-1].append(_leaf(kind, text, quantifier))
    return [tuple(a) for a in out], pos


def _quantifier(pattern: str, pos: int) -> tuple[str, int]:
    found = _QUANTIFIER.match(pattern, pos)
    return (found.group(), found.end()) if found else ("", pos)


def _leaf(kind: str | None, text: str, quantifier: str) -> Leaf:
    if kind == "escape":
        symbol = text[1]
        if symbol in _ZERO_WIDTH_ESCAPES:
            return Leaf(text, None, quantifier, zero_width=True)
        if symbol.isalnum():  # \d \w \s \n ...
            return Leaf(text, None, quantifier)
        return Leaf(text, frozenset(symbol.lower()), quantifier)
    if kind == "cls":
        return Leaf(text, _class_chars(text), quantifier)
    if text in "^$":
        return Leaf(text, None, quantifier, zero_width=True)
    return Leaf(text, None if text == "." else frozenset({text.lower()}), quantifier)


def _class_chars(text: str) -> frozenset[str] | None:
    body = text[1:-1]
    if body.startswith("^"):
        return None
    symbols: list[str] = []
    i = 0
    while i < len(body):
        if body[i] == "\\":
            if body[i + 1].isalnum():
                return None
            symbols.append(body[i + 1])
            i += 2
        else:
            symbols.append(body[i])
            i += 1
    chars: set[str] = set()
    k = 0
    while k < len(symbols):
        if k + 2 < len(symbols) and symbols[k + 1] == "-":
            low, high = ord(symbols[k]), ord(symbols[k + 2])
            if high - low >= _EXACT_LIMIT:
                return None
            chars.update(chr(c).lower() for c in range(low, high + 1))
            k += 3
        else:
            chars.add(symbols[k].lower())
            k += 1
    return frozenset(chars) if len(chars) <= _EXACT_LIMIT else None


# --- pieces --------------------------------------------------------------------------

def _expand(sequence: Sequence, limit: int) -> list[Sequence]:
    for k, item in enumerate(sequence):
        if not (isinstance(item, Group) and item.quantifier == ""
                and item.opener in _PLAIN_GROUPS):
            continue
        options = item.alternatives
        if len(options) == 1:
            return _expand(sequence[:k] + options[0] + sequence[k + 1:], limit)
        # A short either-or (`(?:[);/ ]|$)`) costs more pieces than it saves.
        worth_it = len(options) > 2 or any(len(_text(o)) > 8 for o in options)
        if not worth_it or len(options) > limit:
            continue
        out: list[Sequence] = []
        for option in options:
            out.extend(_expand(sequence[:k] + option + sequence[k + 1:],
                               max(1, limit // len(options))))
        return out
    return [sequence]


def _text(sequence: Sequence, drop_lookarounds: bool = False) -> str:
    out = []
    for item in sequence:
        if isinstance(item, Leaf):
            out.append(item.text + item.quantifier)
        elif not (drop_lookarounds and item.opener in _LOOKAROUNDS):
            inner = "|".join(_text(a, drop_lookarounds) for a in item.alternatives)
            out.append(f"{item.opener}{inner}){item.quantifier}")
    return "".join(out)


def _has_lookaround(sequence: Sequence) -> bool:
    return any(isinstance(item, Group) and (
        item.opener in _LOOKAROUNDS or any(_has_lookaround(a) for a in item.alternatives))
        for item in sequence)


# --- words ---------------------------------------------------------------------------

Strings = frozenset[str]
_EMPTY: Strings = frozenset({""})


def words(sequence: Sequence, min_length: int = 2) -> tuple[str, ...] | None:
    """Lower-cased strings of which every match of `sequence` contains one, or None when
    there are none of at least `min_length` characters."""
    exact, required = _sequence_info(sequence)
    best = _best([s for s in (exact, required) if s])
    if best is None or min(len(w) for w in best) < min_length:
        return None
    return tuple(sorted(best))


def _sequence_info(sequence: Sequence) -> tuple[Strings | None, Strings | None]:
    """(every string the sequence can match, when few; strings one of which every match
    contains, when known)."""
    run: Strings = _EMPTY
    candidates: list[Strings] = []
    exact = True
    for item in sequence:
        if (type(item) is Leaf and item.chars is not None and len(item.chars) == 1
                and len(run) == 1 and not item.quantifier):
            run = frozenset({next(iter(run)) + next(iter(item.chars))})  # the common case
            continue
        item_exact, item_required = _item_info(item)
        if item_exact is not None:
            joined = frozenset(a + b for a in run for b in item_exact)
            if len(joined) > _EXACT_LIMIT:
                candidates.append(run)
                run, exact = item_exact, False
            else:
                run = joined
            continue
        exact = False
        candidates.append(run)
        run = _EMPTY
        if item_required:
            candidates.append(item_required)
    candidates.append(run)
    return (run if exact else None), _best(candidates)


def _item_info(item: Item) -> tuple[Strings | None, Strings | None]:
    if isinstance(item, Leaf):
        if item.zero_width:
            return frozenset({""}), None
        return _repeated(item.chars, None, item.quantifier)
    if item.opener in _LOOKAROUNDS:
        return frozenset({""}), None
    exacts: list[Strings | None] = []
    required: list[Strings | None] = []
    for alternative in item.alternatives:
        exact, needed = _sequence_info(alternative)
        exacts.append(exact)
        required.append(_best([s for s in (exact, needed) if s]))
    union_exact = None
    if all(e is not None for e in exacts):
        union = frozenset().union(*(e for e in exacts if e is not None))
        union_exact = union if len(union) <= _EXACT_LIMIT else None
    union_required = None
    if all(required):
        union_required = frozenset().union(*(r for r in required if r))
    return _repeated(union_exact, union_required, item.quantifier)


def _repeated(exact: Strings | None, required: Strings | None,
              quantifier: str) -> tuple[Strings | None, Strings | None]:
    if not quantifier:
        return exact, required
    base = quantifier[:quantifier.index("}") + 1] if quantifier[0] == "{" else quantifier[0]
    if base in ("?", "*") or base.startswith(("{0}", "{0,")):
        if base == "?" and exact is not None:
            return exact | {""}, None
        return None, None
    return None, _best([s for s in (exact, required) if s])  # at least once


def _best(candidates: list[Strings]) -> Strings | None:
    best, best_score = None, None
    for candidate in candidates:
        if not candidate or "" in candidate:
            continue
        strings, score = _rated(candidate)
        if best_score is None or score > best_score:
            best, best_score = strings, score
    return best


@functools.lru_cache(maxsize=65536)
def _rated(candidate: Strings) -> tuple[Strings, tuple[bool, int, int, int]]:
    """The candidate without strings that contain another of it (they add nothing), and
    how good a filter it makes: rare before common; then any word of 3+ characters is as
    good as a longer one, and fewer strings (fewer words to look for) win."""
    kept: list[str] = []
    for string in sorted(candidate, key=len):
        if not any(k in string for k in kept):
            kept.append(string)
    shortest = len(kept[0])
    common = any(s in _COMMON_TEXT for s in kept)
    return frozenset(kept), (not common, min(shortest, 3), -len(kept), shortest)
