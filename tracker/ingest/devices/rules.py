"""Matomo's device rules: where the `device-detector` package keeps its YAML files, and
those files read into the index's JSON form (see index.DeviceIndex)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path
from typing import Any

from tracker.ingest import regex_split
from tracker.ingest.devices.index import FORMAT, encoded

log = logging.getLogger("tracker.ingest.devices")

PACKAGE = "device-detector"
# Matomo's device parsers, in the order DeviceDetector.php tries them. Shell TVs need no
# regexes (any is a tv), so they are not read.
FILES = ("televisions", "notebooks", "consoles", "car_browsers", "cameras",
         "portable_media_player", "mobiles")
HBBTV, NOTEBOOKS = 0, 1


def find_rules(rules_dir: Path | None) -> tuple[str, Path] | None:
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
    return {"format": FORMAT, "source": source, "brands": brands,
            "owner_brand": encoded(owner_brand), "owner_type": owner_type,
            "patterns": patterns, "piece_owner": encoded(piece_owner), "relaxed": relaxed,
            "words": words, "word_start": encoded(starts),
            "word_pieces": encoded(p for word in words for p in by_word[word]),
            "always": always}
