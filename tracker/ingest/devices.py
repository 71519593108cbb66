"""Matomo device-detector's device type of a user agent, at a cost a hot path can pay.

Matomo's rules (the YAML files the `device-detector` package ships: a regex per brand,
then per model, each naming a type such as smartphone, tablet or tv) know which of
thousands of Android models is a tablet; user-agent tokens alone cannot. The package
itself takes tens of milliseconds an agent, trying the regexes one after another. Here
the same rules, in Matomo's order, are split into small pieces indexed by the words each
needs (`regex_split`); one Aho-Corasick scan of an agent picks the few pieces worth
trying, so an agent costs tens of microseconds. The prepared index is cached as JSON,
keyed by the package's version and this code, so that a worker loads it in well under a
tenth of a second; building it takes a second or two of CPU, once, in a process of its
own (`python -m tracker.devices`), so that no worker keeps the memory building takes.

`device_type` then applies Matomo's own rules for agents no model names (DeviceDetector.php
`parseDevice`: Chrome on Android without "Mobile" is a tablet, "Android TV" is a tv, a
desktop system is a desktop, ...). The reference is Matomo device-detector 6.5.
"""

from __future__ import annotations

import array
import base64
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracker.ingest import regex_split

log = logging.getLogger("tracker.ingest.devices")

PACKAGE = "device-detector"
# Matomo's device parsers, in the order DeviceDetector.php tries them. Shell TVs need no
# regexes (any is a tv), so they are not read.
FILES = ("televisions", "notebooks", "consoles", "car_browsers", "cameras",
         "portable_media_player", "mobiles")
_HBBTV, _NOTEBOOKS = 0, 1
# A hostile agent could name thousands of models; past this many regex tries it gets
# no brand, and Matomo's rules that need none still apply.
_MAX_TRIES = 64
# Matomo's fixtures' longest agent has 355 characters, and a model is named early. Past
# this many, an agent is cut before its device is looked for: some rules backtrack, and
# their cost grows with the square of the length a crafted agent can give them.
_MAX_CHARS = 512
_FORMAT = 2
_BUILD_TIMEOUT_S = 300


@dataclass(frozen=True, slots=True)
class Brand:
    name: str
    file: int  # index into FILES
    type: str | None  # its `device:`
    models: range  # its owners (see DeviceIndex) that are models, in order


class DeviceIndex:
    """Matomo's brand and model regexes, first match in Matomo's order.

    Every regex (an "owner": a brand's, or one of its models') is split into pieces;
    pieces are numbered in Matomo's order, brand by brand, a brand's own before its
    models'. The words a piece needs map to its number."""

    def __init__(self, form: dict[str, Any]) -> None:
        import ahocorasick_rs
        import regex  # noqa: F401 -- now, rather than in the first agent that needs it

        self.source = str(form["source"])
        self.brands = [Brand(str(name), int(file), kind, range(int(first), int(end)))
                       for name, file, kind, first, end in form["brands"]]
        types: dict[str, str] = {}  # one string object per type, not one per model
        self._owner_brand = _numbers(form["owner_brand"])
        self._owner_type = [types.setdefault(t, t) if t else None for t in form["owner_type"]]
        self._patterns: list[str] = form["patterns"]
        self._piece_owner = _numbers(form["piece_owner"])
        self._relaxed = {int(piece): str(text) for piece, text in form["relaxed"].items()}
        self._word_start = _numbers(form["word_start"])
        self._word_pieces = _numbers(form["word_pieces"])
        self._always = tuple(int(piece) for piece in form["always"])
        self._tests: list[_Test | None] = [None] * len(self._patterns)
        if not (len(self._piece_owner) == len(self._patterns)
                and len(self._word_start) == len(form["words"]) + 1
                and len(self._owner_type) == len(self._owner_brand)
                and all(isinstance(p, str) for p in self._patterns)
                and all(t is None or isinstance(t, str) for t in self._owner_type)):
            raise ValueError("inconsistent device index")
        self._automaton = ahocorasick_rs.AhoCorasick(form["words"])

    def first(self, user_agent: str, files: Iterable[int]) -> tuple[Brand, str | None] | None:
        """The first brand (of `files`, in Matomo's order) whose regex matches, and the
        type its first matching model names (else the brand's); None when none matches."""
        wanted = frozenset(files)
        text = user_agent.lower()  # the pieces are lower-cased: see _compiled
        start, pieces = self._word_start, self._word_pieces
        candidates = set(self._always)
        for word, _, _ in self._automaton.find_matches_as_indexes(text, overlapping=True):
            candidates.update(pieces[start[word]:start[word + 1]])
        ordered = sorted(candidates)
        tries = 0
        for position, piece in enumerate(ordered):
            owner = self._piece_owner[piece]
            brand = self.brands[self._owner_brand[owner]]
            if owner >= brand.models.start or brand.file not in wanted:
                continue  # a model's piece, or a parser Matomo does not run on this agent
            tries += 1
            if tries > _MAX_TRIES:
                return None
            if not self._matches(piece, text):
                continue
            for model_piece in ordered[position + 1:]:
                model = self._piece_owner[model_piece]
                if model >= brand.models.stop:
                    break
                if model in brand.models:
                    tries += 1
                    if tries > _MAX_TRIES:
                        break
                    if self._matches(model_piece, text):
                        return brand, self._owner_type[model] or brand.type
            return brand, brand.type
        return None

    def _matches(self, piece: int, text: str) -> bool:
        test = self._tests[piece]
        if test is None:  # compiled on first use: most pieces never are
            test = self._tests[piece] = _compiled(self._patterns[piece],
                                                  self._relaxed.get(piece))
        return _found(test, text)


def _numbers(encoded: str) -> array.array[int]:
    """An array of unsigned ints, from its base64 form in the JSON cache."""
    numbers = array.array("I")
    numbers.frombytes(base64.b64decode(encoded, validate=True))
    return numbers


def _encoded(numbers: Iterable[int]) -> str:
    return base64.b64encode(array.array("I", numbers).tobytes()).decode("ascii")


# A compiled piece: a pattern of `re` or `regex`, or (a cheaper `re` pattern that must
# match first, the `regex` one).
_Test = Any
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


def _compiled(pattern: str, relaxed: str | None) -> _Test:
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


def _found(test: _Test, text: str) -> bool:
    """Whether the test matches `text` at the start of a word (Matomo's wrapper)."""
    pos = 0
    while pos <= len(text):
        if isinstance(test, tuple):
            if test[0].search(text, pos) is None:
                return False
            found = test[1].search(text, pos)
        else:
            found = test.search(text, pos)
        if found is None:
            return False
        if _starts_word(text, found.start()):
            return True
        pos = found.start() + 1
    return False


# --- Matomo's rules for the type (DeviceDetector.php, parseDevice) --------------------

class _Rule:
    """One of Matomo's regexes, tried only when the agent (case-folded) holds one of the
    words every match needs: a substring test rules most agents out, and Matomo's
    word-start prefix makes the regex itself slow (no literal scan)."""

    __slots__ = ("_search", "_words")

    def __init__(self, pattern: str, start: str) -> None:
        self._search = re.compile(f"{start}(?:{pattern})", re.IGNORECASE).search
        self._words = _needed_words(pattern)

    def __call__(self, text: str, folded: str) -> bool:
        if self._words is not None and not any(word in folded for word in self._words):
            return False
        return self._search(text) is not None


def _needed_words(pattern: str) -> tuple[str, ...] | None:
    needed: set[str] = set()
    for alternative in regex_split.parse(pattern):
        words = regex_split.words(alternative, min_length=1)
        if words is None:
            return None
        needed.update(words)
    return tuple(sorted(needed))


def _rule(pattern: str) -> _Rule:
    """DeviceDetector::matchUserAgent: the regex, starting a word, case-insensitive."""
    return _Rule(pattern, "(?:^|[^A-Z_-])")


def _part(pattern: str) -> _Rule:
    """AbstractParser::matchUserAgent: the device parsers' word start."""
    return _Rule(pattern, "(?:^|[^A-Z0-9_-]|[^A-Z0-9-]_|sprd-|MZ-)")


_HBBTV_FRAGMENT = _part(r"(?:HbbTV|SmartTvA)/([1-9]{1}(?:\.[0-9]{1}){1,2})")
_SHELL_TV_FRAGMENT = _part(r"[a-z]+[ _]Shell[ _]\w{6}|tclwebkit(\d+[.\d]*)")
_NOTEBOOK_FRAGMENT = _part("FBMD/")
_DESKTOP_FRAGMENT = _part(r"(?:Windows (?:NT|IoT)|X11; Linux x86_64)")
_NOT_DESKTOP_FRAGMENT = _part(
    r"CE-HTML| Mozilla/|Andr[o0]id|Tablet|Mobile|iPhone|Windows Phone|ricoh|OculusBrowser"
    r"|PicoBrowser|Lenovo|compatible; MSIE|Trident/|Tesla/|XBOX|FBMD/|ARM; ?([^)]+)")
_CLIENT_HINTS_FRAGMENT = _Rule(r"Android (?:1[0-6][.\d]*; K(?: Build/|[;)])|1[0-6]\)) AppleWebKit",
                               "")
_VR = _rule(r"Android( [.0-9]+)?; Mobile VR;| VR ")
_CHROME = _rule(r"Chrome/[.0-9]*")
_MOBILE = _rule(r"(?:Mobile|eliboM)")
_PAD = _rule("Pad/APad")
_TABLET = _rule(r"Android( [.0-9]+)?; Tablet;|Tablet(?! PC)|.*\-tablet$|Opera Tablet")
_ANDROID_MOBILE = _rule(r"Android( [.0-9]+)?; Mobile;|.*\-mobile$")
_JAVA_ME = _rule(r"Java ME|J2ME|Profile/MIDP|CLDC|Java; U; MIDP|MMP/\d\.\d")
_TOUCH = _rule("Touch")
_PUFFIN = ((_rule(r"Puffin/(?:\d+[.\d]+)[LMW]D"), "desktop"),
           (_rule(r"Puffin/(?:\d+[.\d]+)[AIFLW]P"), "smartphone"),
           (_rule(r"Puffin/(?:\d+[.\d]+)[AILW]T"), "tablet"))
_OPERA_TV = _rule(r"Opera TV Store| OMI/|Coolita OS")
_TV = _rule(r"Andr0id|(?:Android(?: UHD)?|Google) TV|\(lite\) TV|BRAVIA|Firebolt| TV$")
_SMART_TV = _rule(r"SmartTV|Tizen.+ TV .+$|\(TV;")
_DESKTOP_WORD = _rule(r"Desktop(?: (x(?:32|64)|WOW64))?;")

# ua-parser's names for the systems Matomo's rules single out.
_APPLE_SYSTEMS = frozenset({"iOS", "Mac OS X", "Mac OS", "WatchOS", "tvOS", "ATV OS X"})
_ANDROID_FAMILY = frozenset({"Android", "HarmonyOS"})
DESKTOP_SYSTEMS = frozenset({
    "Windows", "Mac OS X", "Mac OS", "Linux", "Ubuntu", "Kubuntu", "Lubuntu", "Fedora",
    "Debian", "Chrome OS", "FreeBSD", "OpenBSD", "NetBSD", "BSD", "Solaris", "SUSE",
    "openSUSE", "Red Hat", "CentOS", "Mandriva", "Mageia", "Gentoo", "Slackware",
    "Linux Mint", "Arch Linux", "PCLinuxOS", "Puppy", "BackTrack", "SerenityOS"})
_TOUCH_WINDOWS = frozenset({"RT", "8", "10", "11"})


def device_type(index: DeviceIndex, user_agent: str, system: str | None,
                version: tuple[str | None, str | None]) -> str | None:
    """Matomo's device type (smartphone, tablet, phablet, feature phone, desktop, tv,
    console, wearable, ...), or None when Matomo's rules say nothing. `system` and
    `version` (major, minor) are ua-parser's reading of the OS."""
    user_agent = user_agent[:_MAX_CHARS]
    folded = user_agent.lower()
    brand, kind = _parsed(index, user_agent, folded)
    if brand == "Apple" and system not in _APPLE_SYSTEMS:  # a fake: not Apple's
        kind = None
    android = system in _ANDROID_FAMILY
    if kind is None and _VR(user_agent, folded):
        kind = "wearable"
    if kind is None and android and _CHROME(user_agent, folded):
        # Chrome on Android says "Mobile" on phones and not on tablets.
        kind = "smartphone" if _MOBILE(user_agent, folded) else "tablet"
    if kind == "smartphone" and _PAD(user_agent, folded):
        kind = "tablet"
    if kind is None and _TABLET(user_agent, folded):
        kind = "tablet"
    if kind is None and _ANDROID_MOBILE(user_agent, folded):
        kind = "smartphone"
    if kind is None and system == "Android" and version[0]:
        # Android before 2 ran on phones only, Android 3 on tablets only.
        if _version_below(version, 2):
            kind = "smartphone"
        elif version[0] == "3":
            kind = "tablet"
    if kind == "feature phone" and android:
        kind = "smartphone"
    if kind is None and system is None and _JAVA_ME(user_agent, folded):
        kind = "feature phone"
    if system == "KaiOS":
        kind = "feature phone"
    if (kind is None and system == "Windows" and version[0] in _TOUCH_WINDOWS
            and _TOUCH(user_agent, folded)):
        kind = "tablet"
    if kind is None:
        kind = next((k for fragment, k in _PUFFIN if fragment(user_agent, folded)), None)
    if _OPERA_TV(user_agent, folded):
        kind = "tv"
    if kind not in ("tv", "peripheral") and _TV(user_agent, folded):
        kind = "tv"
    if kind is None and _SMART_TV(user_agent, folded):
        kind = "tv"
    if kind != "desktop" and "Desktop" in user_agent and _DESKTOP_WORD(user_agent, folded):
        kind = "desktop"
    if kind is None and system in DESKTOP_SYSTEMS:
        kind = "desktop"
    return kind


def _parsed(index: DeviceIndex, user_agent: str, folded: str) -> tuple[str, str | None]:
    """What Matomo's device parsers say: (brand, type), either may be empty."""
    if _HBBTV_FRAGMENT(user_agent, folded):
        found = (None if _no_device_parse(user_agent, folded)
                 else index.first(user_agent, (_HBBTV,)))
        return (found[0].name, found[1] or "tv") if found else ("", "tv")
    if _SHELL_TV_FRAGMENT(user_agent, folded):
        return "", "tv"
    if _no_device_parse(user_agent, folded):
        return "", None
    files = range(_NOTEBOOKS if _NOTEBOOK_FRAGMENT(user_agent, folded) else _NOTEBOOKS + 1,
                  len(FILES))
    found = index.first(user_agent, files)
    return (found[0].name, found[1]) if found else ("", None)


def _no_device_parse(user_agent: str, folded: str) -> bool:
    """Agents Matomo's device parsers leave alone: a desktop system's, and Android's
    reduced agents (`Android 10; K`), whose model only client hints tell."""
    if _CLIENT_HINTS_FRAGMENT(user_agent, folded) and "telegram-android/" not in folded:
        return True
    return (_DESKTOP_FRAGMENT(user_agent, folded)
            and not _NOT_DESKTOP_FRAGMENT(user_agent, folded))


def _version_below(version: tuple[str | None, str | None], major: int) -> bool:
    try:
        return int(version[0] or "") < major
    except ValueError:
        return False


# --- the index: built from the package's YAML, cached as JSON ------------------------

def load(cache_dir: Path | None, rules_dir: Path | None = None) -> DeviceIndex | None:
    """The index, from the cache when it is there for this package version and code, else
    built from `rules_dir` (default: the package's device rules) and cached. None, with a
    warning, when the package or its rules cannot be read."""
    found = _rules(rules_dir)
    if found is None:
        return None
    source, rules_dir = found
    cache = cache_dir / f"devices-{_cache_key(source, rules_dir)}.json" if cache_dir else None
    if cache is not None:
        index = _read(cache)
        if index is None:
            # Built by a process of its own: building takes ~70 MiB more than the index,
            # which a worker would keep (freed memory seldom returns to the system).
            _build_apart(cache, rules_dir)
            index = _read(cache)
        if index is not None:
            return index
    try:
        form = build(rules_dir, source)
        index = DeviceIndex(form)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("device types: cannot read %s's rules in %s (%s): classifying by tokens "
                    "only", PACKAGE, rules_dir, exc)
        return None
    if cache is not None:
        _write_cache(cache, form)
    return index


def ensure_cached(cache_dir: Path) -> None:
    """Build the index into `cache_dir` unless it is there: before several workers start,
    so that they load it rather than each build it."""
    found = _rules(None)
    if found is not None:
        cache = cache_dir / f"devices-{_cache_key(*found)}.json"
        if not cache.is_file():
            _build_apart(cache, found[1])


def _read(cache: Path) -> DeviceIndex | None:
    """The cached index; None when there is none, or (with a warning, and the file
    removed) when it cannot be read."""
    try:
        return DeviceIndex(json.loads(cache.read_bytes()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("device types: ignoring the unreadable cache %s (%s)", cache, exc)
        with contextlib.suppress(OSError):
            cache.unlink()
        return None


def _build_apart(cache: Path, rules_dir: Path) -> None:
    """Build the index into `cache` in a child process. Whatever goes wrong there, the
    caller finds no cache and builds in-process, saying what went wrong itself."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run([sys.executable, "-m", "tracker.ingest.devices", str(cache), str(rules_dir)],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=_BUILD_TIMEOUT_S, check=False)


def _rules(rules_dir: Path | None) -> tuple[str, Path] | None:
    """(the package's name and version, its device rules' directory)."""
    try:
        return (f"{PACKAGE} {importlib.metadata.version(PACKAGE)}",
                rules_dir or package_rules_dir())
    except (importlib.metadata.PackageNotFoundError, LookupError) as exc:
        log.warning("device types: %s is not installed (%s): classifying by tokens only",
                    PACKAGE, exc)
        return None


def package_rules_dir() -> Path:
    # Found without importing the package: its __init__ loads all of its parsers.
    spec = importlib.util.find_spec("device_detector")
    if spec is None or not spec.submodule_search_locations:
        raise LookupError("device_detector has no package directory")
    return Path(next(iter(spec.submodule_search_locations))) / "regexes" / "upstream" / "device"


def _cache_key(source: str, rules_dir: Path) -> str:
    # The arrays in the cache are in this machine's byte order.
    digest = hashlib.sha256(f"{_FORMAT} {source} {rules_dir} {sys.byteorder}".encode())
    for module in (__file__, regex_split.__file__):
        digest.update(Path(module).read_bytes())
    return digest.hexdigest()[:16]


def _write_cache(cache: Path, form: dict[str, Any]) -> bool:
    """Write the cache atomically (and remove older ones); False, with a warning, when
    the directory is not writable."""
    temporary = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", dir=cache.parent, prefix=".devices-",
                                         delete=False) as out:
            temporary = Path(out.name)
            out.write(json.dumps(form, separators=(",", ":")).encode())
        os.replace(temporary, cache)
        for old in cache.parent.glob("devices-*.json"):
            if old != cache:
                old.unlink(missing_ok=True)
        return True
    except OSError as exc:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        log.warning("device types: cannot cache the index in %s (%s): it is built again at "
                    "the next start", cache.parent, exc)
        return False


def build(rules_dir: Path, source: str) -> dict[str, Any]:
    """The index's JSON form from Matomo's YAML files in `rules_dir`."""
    import yaml_rs

    brands: list[list[Any]] = []
    owner_brand: list[int] = []
    owner_type: list[str | None] = []
    patterns: list[str] = []
    piece_owner: list[int] = []
    relaxed: dict[str, str] = {}
    by_word: dict[str, list[int]] = {}
    always: list[int] = []

    def add(brand: int, kind: str | None, pattern: str) -> None:
        owner = len(owner_brand)
        owner_brand.append(brand)
        owner_type.append(kind)
        try:
            pieces = regex_split.split(pattern)
        except ValueError:  # kept whole, tried on every agent
            pieces = [regex_split.Piece(pattern, None, False, "")]
        for piece in pieces:
            number = len(patterns)
            patterns.append(piece.pattern)
            piece_owner.append(owner)
            if piece.has_lookaround:
                relaxed[str(number)] = piece.without_lookarounds
            if piece.words is None:
                always.append(number)
            for word in piece.words or ():
                by_word.setdefault(word, []).append(number)

    for file_number, name in enumerate(FILES):
        entries = yaml_rs.loads((rules_dir / f"{name}.yml").read_text(encoding="utf-8"))
        if not isinstance(entries, dict):
            raise ValueError(f"{name}.yml: not a mapping of brands")
        for brand, entry in entries.items():
            kind = entry.get("device")
            number = len(brands)
            add(number, None, str(entry["regex"]))
            # Only models that change the brand's type matter here: those after the last
            # such model cannot change it, whether they match or not.
            models = entry.get("models") or []
            last = max((k for k, m in enumerate(models) if (m.get("device") or kind) != kind),
                       default=-1)
            first = len(owner_brand)
            for model in models[:last + 1]:
                add(number, model.get("device"), str(model["regex"]))
            brands.append([str(brand), file_number, kind, first, len(owner_brand)])
    words = sorted(by_word)
    starts = [0]
    for word in words:
        starts.append(starts[-1] + len(by_word[word]))
    return {"format": _FORMAT, "source": source, "brands": brands,
            "owner_brand": _encoded(owner_brand), "owner_type": owner_type,
            "patterns": patterns, "piece_owner": _encoded(piece_owner), "relaxed": relaxed,
            "words": words, "word_start": _encoded(starts),
            "word_pieces": _encoded(p for word in words for p in by_word[word]),
            "always": always}


def _main(cache: str, rules_dir: str) -> int:
    """`python -m tracker.devices CACHE RULES_DIR`: build the index into the file CACHE
    (`load` runs this in a process of its own)."""
    found = _rules(Path(rules_dir))
    if found is None:
        return 1
    try:
        form = build(found[1], found[0])
        DeviceIndex(form)  # what the workers will read must load
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 1
    return 0 if _write_cache(Path(cache), form) else 1


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:3]))
