"""Device classes as Matomo device-detector gives them (every agent below is copied from
Matomo's fixtures, as the device-detector package ships them: the file is named), the
index's first match against Matomo's regex-by-regex loop, and the degraded mode: without
the package's rules, classes come from tokens, with one warning."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import regex
import yaml_rs

from tracker.ingest import devices
from tracker.ingest.useragent import DEVICE_CLASSES, parse_agent

TRUTH = Path(__file__).resolve().parent.parent / "benchmarks" / "truth" / "devices.jsonl"

CASES = [
    # Tablets whose browsers say "Mobile": only the model tells.
    ("Mozilla/5.0 (Linux; Android 9; BTOUCH7_PLUS) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/80.0.3987.162 Mobile Safari/537.36", "tablet", "tablet-6.yml"),
    ("Mozilla/5.0 (Linux; U; Android 4.1.1; AllviewCity Build/JRO03C) AppleWebKit/537.36 "
     "(KHTML, like Gecko) Chrome/71.0.3578.99 Mobile Safari/537.36", "tablet", "tablet.yml"),
    # Android TV boxes: Matomo's tv, tracker's other.
    ("Mozilla/5.0 (Linux; Android 4.4.2; MiBOX2 Build/KOT49H; wv) AppleWebKit/537.36 (KHTML, "
     "like Gecko) Version/4.0 Chrome/62.0.3202.97 Mobile Safari/537.36", "other", "tv.yml"),
    ("Mozilla/5.0 (Linux; Android 7.1.2; VINABOX-X10PLUS) AppleWebKit/537.36 (KHTML, like "
     "Gecko) Chrome/78.0.3904.108 Safari/537.36", "other", "tv-1.yml"),
    # Android's own HTTP client, which never says "Mobile", on phones.
    ("Dalvik/2.1.0 (Linux; U; Android 11; V2039 Build/RP1A.200720.012)", "mobile",
     "smartphone-28.yml"),
    ("Dalvik/2.1.0 (Linux; U; Android 5.0; SCL22 Build/LRX21V)", "mobile", "phablet.yml"),
    # iPads.
    ("Mozilla/5.0 (iPad; U; CPU iPhone OS 5_1_1 like Mac OS X; en-us)", "tablet", "tablet.yml"),
    ("Apple-iPad2C7/1002.329", "tablet", "tablet.yml"),
    # Desktops, a Chromebook's Android runtime among them.
    ("Mozilla/5.0 (Windows NT 6.1; WOW64; Trident/7.0; MANMJS; rv:11.0) like Gecko", "desktop",
     "desktop.yml"),
    ("Microsoft Office Word/16.78.1008 (Mac OS/14.0; Desktop; en-US; NonAppStore; "
     "Apple/Mac13,2)", "desktop", "desktop.yml"),
    ("Dalvik/2.1.0 (Linux; U; Android 7.1.1; HP Chromebook 11 G5 Build/R79-12607.81.0)",
     "desktop", "desktop.yml"),
    # Watches: Matomo's wearable, tracker's other.
    ("Mozilla/5.0 (Linux; Android 11; SAMSUNG SM-R920) AppleWebKit/537.36 (KHTML, like Gecko) "
     "SamsungBrowser/2.2. Chrome/102.0.5005.125 Mobile Safari/537.36", "other", "wearable.yml"),
    ("atc/1.0 watchOS/6.1.1 model/Watch5,1 hwp/t8006 build/17S449 (6; dt:201)", "other",
     "wearable.yml"),
]


@pytest.mark.parametrize(("agent", "expected", "fixture"), CASES,
                         ids=[f"{c[2]}:{c[0][:40]}" for c in CASES])
def test_device_class_is_matomos(agent: str, expected: str, fixture: str) -> None:
    assert parse_agent(agent).device == expected


def test_spiders_stay_bots() -> None:
    agent = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
    assert parse_agent(agent).device == "bot"


def test_an_agent_naming_hundreds_of_models_still_gets_a_class() -> None:
    models = " ".join(f"SM-T{n}" for n in range(100, 400))
    agent = f"Mozilla/5.0 (Linux; Android 13; {models}) Chrome/120.0 Safari/537.36"
    assert parse_agent(agent).device in DEVICE_CLASSES


# --- the index against Matomo's loop ---------------------------------------------------

@functools.cache
def _wrapped(pattern: str) -> Callable[[str], object]:
    """Matomo's AbstractParser::matchUserAgent (re where it reads the pattern: faster)."""
    wrapped = rf"(?:^|[^A-Z0-9_-]|[^A-Z0-9-]_|sprd-|MZ-)(?:{pattern})"
    try:
        return re.compile(wrapped, re.IGNORECASE).search
    except re.error:
        return regex.compile(wrapped, regex.IGNORECASE).search


def _matomo_first(rules: list[tuple[str, Any]], agent: str) -> tuple[str, object] | None:
    """AbstractDeviceParser::parse: the first brand whose regex matches, then the type
    of its first matching model, else the brand's."""
    for brand, entry in rules:
        if _wrapped(entry["regex"])(agent):
            for model in entry.get("models") or []:
                if _wrapped(model["regex"])(agent):
                    return brand, model.get("device") or entry.get("device")
            return brand, entry.get("device")
    return None


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache the module's tests share: one build."""
    path = tmp_path_factory.mktemp("cache")
    assert devices.load(path) is not None
    return path


@pytest.mark.slow
def test_index_finds_what_matomos_loop_finds(cache_dir: Path) -> None:
    index = devices.load(cache_dir)
    assert index is not None
    rules_dir = devices.package_rules_dir()
    files = range(devices.FILES.index("consoles"), len(devices.FILES))
    rules = [(str(brand), entry) for number in files
             for brand, entry in yaml_rs.loads(
                 (rules_dir / f"{devices.FILES[number]}.yml").read_text()).items()]
    agents = [json.loads(line)["user_agent"] for line in TRUTH.read_text().splitlines()][::30]
    found = 0
    for agent in agents:
        expected = _matomo_first(rules, agent)
        got = index.first(agent, files)
        assert ((got[0].name, got[1]) if got else None) == expected, agent
        found += expected is not None
    assert found > 0.8 * len(agents)


def test_cache_is_read_back_not_rebuilt(cache_dir: Path, tmp_path: Path) -> None:
    [cache] = cache_dir.glob("devices-*.json")
    shutil.copy(cache, tmp_path / cache.name)
    written = (tmp_path / cache.name).stat().st_mtime_ns
    index = devices.load(tmp_path)
    assert index is not None and (tmp_path / cache.name).stat().st_mtime_ns == written
    found = index.first(CASES[0][0], range(len(devices.FILES)))
    assert found is not None and found[1] == "tablet"


# --- degraded ----------------------------------------------------------------------------

@pytest.mark.slow
def test_corrupt_rules_give_no_index_and_one_warning(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    rules = tmp_path / "device"
    shutil.copytree(devices.package_rules_dir(), rules)
    (rules / "mobiles.yml").write_text("Samsung:\n  regex: 'SM-[\n  - : : :\n")
    with caplog.at_level(logging.WARNING, logger="tracker.ingest.devices"):
        assert devices.load(tmp_path / "cache", rules_dir=rules) is None
    [warning] = caplog.records
    assert "classifying by tokens only" in warning.getMessage()
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_a_corrupt_cache_is_rebuilt_with_one_warning(cache_dir: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    [cache] = cache_dir.glob("devices-*.json")
    (tmp_path / cache.name).write_text('{"format": 1, "brands": [')
    with caplog.at_level(logging.WARNING, logger="tracker.ingest.devices"):
        index = devices.load(tmp_path)
    assert index is not None and index.first(CASES[0][0], range(7)) is not None
    [warning] = caplog.records
    assert "unreadable cache" in warning.getMessage()
    assert (tmp_path / cache.name).read_bytes() == cache.read_bytes()  # rebuilt, whole


@pytest.mark.slow
def test_without_the_packages_rules_classes_come_from_tokens(tmp_path: Path) -> None:
    """A `device_detector` package with no rules in it, found first on the path: tracker
    classify still answers, from tokens (a tablet that says Mobile passes for a phone, an
    iPad is still a tablet), and says once why."""
    (tmp_path / "device_detector").mkdir()
    (tmp_path / "device_detector" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
           "TRACKER_CACHE_DIR": str(tmp_path / "cache")}
    answers = {}
    for agent, _, _ in (CASES[0], CASES[6]):
        done = subprocess.run([sys.executable, "-m", "tracker", "classify", "--json",
                               "--user-agent", agent], env=env, capture_output=True,
                              text=True, timeout=60, check=True)
        answers[agent] = json.loads(done.stdout)["device"]
        warnings = [line for line in done.stderr.splitlines() if "device types" in line]
        assert len(warnings) == 1, done.stderr
        assert "classifying by tokens only" in warnings[0]
    assert answers == {CASES[0][0]: "mobile", CASES[6][0]: "tablet"}
