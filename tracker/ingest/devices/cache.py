"""The device index cached as JSON, keyed by the package's version and this code, and
built by a process of its own (`python -m tracker.ingest.devices`, __main__.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tracker.ingest import regex_split
from tracker.ingest.devices.index import FORMAT, DeviceIndex
from tracker.ingest.devices.rules import PACKAGE, build, find_rules

log = logging.getLogger("tracker.ingest.devices")

_BUILD_TIMEOUT_S = 300


def load(cache_dir: Path | None, rules_dir: Path | None = None) -> DeviceIndex | None:
    """The index, from the cache when it is there for this package version and code, else
    built from `rules_dir` (default: the package's device rules) and cached. None, with a
    warning, when the package or its rules cannot be read."""
    found = find_rules(rules_dir)
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
    found = find_rules(None)
    if found is not None:
        cache = cache_dir / f"devices-{_cache_key(*found)}.json"
        if not cache.is_file():
            _build_apart(cache, found[1])


def build_into(cache: Path, rules_dir: Path) -> int:
    """Build the index into the file `cache`: the child process `load` starts. Its exit
    status: 0 when the cache is written."""
    found = find_rules(rules_dir)
    if found is None:
        return 1
    try:
        form = build(found[1], found[0])
        DeviceIndex(form)  # what the workers will read must load
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 1
    return 0 if _write_cache(cache, form) else 1


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


def _cache_key(source: str, rules_dir: Path) -> str:
    # The arrays in the cache are in this machine's byte order. The code is every module
    # of this package (what builds and reads the index) and the regex splitter.
    digest = hashlib.sha256(f"{FORMAT} {source} {rules_dir} {sys.byteorder}".encode())
    modules = sorted(Path(__file__).parent.glob("*.py"))
    for module in (*modules, Path(regex_split.__file__)):
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
