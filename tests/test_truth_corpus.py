"""The truth corpus (benchmarks/truth) is well-formed, and `python -m benchmarks truth` scores a
slice of it through `tracker classify --jsonl` (no assertion on the figures: they are
the benchmark's business)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRUTH = ROOT / "benchmarks" / "truth"
LABELS = {"apple_mpp": "machine", "scanner": "machine", "bot": "machine",
          "reader": "human", "image_proxy": "human"}
CLIENTS = {"Apple Mail", "Gmail", "Outlook", "Yahoo Mail", "Thunderbird", "webmail", "other"}


def _lines(name: str) -> list[tuple[str, dict[str, Any]]]:
    text = (TRUTH / name).read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [(raw, json.loads(raw)) for raw in text.splitlines()]


def test_every_corpus_line_is_a_labelled_request_with_a_source() -> None:
    lines = _lines("corpus.jsonl")
    assert len(lines) > 1000
    assert len({raw for raw, _ in lines}) == len(lines), "duplicate lines"
    for raw, line in lines:
        assert set(line) == {"user_agent", "ip", "method", "kind", "seconds_after_send",
                             "label", "category", "client", "source"}, raw
        assert isinstance(line["user_agent"], str) and line["user_agent"], raw
        assert line["ip"] is None or isinstance(line["ip"], str), raw
        assert line["method"] == "GET" and line["kind"] in ("open", "click"), raw
        assert isinstance(line["seconds_after_send"], int | float), raw
        assert line["seconds_after_send"] > 0, raw
        assert LABELS[line["category"]] == line["label"], raw
        assert line["client"] is None or line["client"] in CLIENTS, raw
        assert isinstance(line["source"], str) and len(line["source"]) > 10, raw
    assert {line["category"] for _, line in lines} == set(LABELS)


def test_every_device_line_names_a_class_and_its_source_once() -> None:
    lines = _lines("devices.jsonl")
    assert 1000 <= len(lines) <= 2000
    assert len({line["user_agent"] for _, line in lines}) == len(lines), "duplicate agents"
    for raw, line in lines:
        assert set(line) == {"user_agent", "device", "matomo_type", "source"}, raw
        assert line["device"] in ("desktop", "mobile", "tablet", "other"), raw
        assert isinstance(line["matomo_type"], str) and line["source"], raw


@pytest.mark.slow
def test_truth_scores_a_slice_and_prints_the_goals(tmp_path: Path) -> None:
    corpus = [raw for raw, _ in _lines("corpus.jsonl")]
    devices = [raw for raw, _ in _lines("devices.jsonl")]
    # Every n-th line: all categories in 50 lines.
    (tmp_path / "corpus.jsonl").write_text("\n".join(corpus[:: len(corpus) // 50][:50]) + "\n")
    (tmp_path / "devices.jsonl").write_text("\n".join(devices[:50]) + "\n")
    command = [sys.executable, "-m", "benchmarks", "truth",
               "--corpus", str(tmp_path / "corpus.jsonl"),
               "--devices", str(tmp_path / "devices.jsonl")]
    shown = subprocess.run([*command, "--misses", "2"], capture_output=True, text=True,
                           cwd=ROOT, timeout=120, check=False)
    assert shown.returncode == 0, shown.stderr
    for row in ("| apple_mpp ", "| scanner ", "| bot ", "| reader ", "| image_proxy ",
                "| Apple MPP opens called machine |", "| machine precision |",
                "| device class agrees with Matomo's fixtures |"):
        assert row in shown.stdout, shown.stdout
    machine = subprocess.run([*command, "--json"], capture_output=True, text=True,
                             cwd=ROOT, timeout=120, check=False)
    result = json.loads(machine.stdout)
    assert result["lines"] == 50 and result["devices"]["lines"] == 50
    assert sum(sum(m.values()) for m in result["confusion"].values()) == 50
