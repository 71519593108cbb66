"""benchmarks/load.py end to end, briefly: it runs against nginx and tracker, sends readers'
traffic (every event labelled human), and every request wrk completed became one event; and
the load generator runs on its own core, at real-time priority where that is permitted."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "benchmarks"))

from common import LOAD_CORE, load_generator, real_time_permitted  # noqa: E402

MISSING = [tool for tool in ("wrk", "nginx", "taskset") if shutil.which(tool) is None]


def test_a_short_load_run_lands_every_request_as_one_human_event() -> None:
    if MISSING:
        pytest.skip(f"load.py needs {', '.join(MISSING)}: apt-get install wrk nginx-light")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "load.py"), "--duration", "1",
         "--rounds", "1", "--messages", "200"],
        capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for row in ("nginx static GIF", "nginx, PG busy", "uvicorn pixel", "uvicorn click"):
        assert re.search(rf"^{re.escape(row)}\s+\d+", output, re.MULTILINE), output
    landed = re.findall(r"^uvicorn (pixel|click)\s+(\d+)\s+(\d+)\s+(\S+)$", output, re.MULTILINE)
    assert {kind for kind, *_ in landed} == {"pixel", "click"}, output
    for _, completed, events, verdict in landed:
        # Every completed request, plus at most one in flight per connection (64) when
        # wrk's time ran out.
        assert 0 < int(completed) <= int(events) <= int(completed) + 64, output
        assert verdict == "ok", output
    priority = "real-time priority" if real_time_permitted() else "normal priority"
    assert f"wrk at {priority}" in output, output
    assert "click events labelled: human 100%" in output, output
    assert "open events labelled: human 100%" in output, output


def test_the_load_generator_runs_on_its_core_at_real_time_priority_where_permitted() -> None:
    if shutil.which("taskset") is None or shutil.which("chrt") is None:
        pytest.skip("needs taskset and chrt (util-linux)")
    # What a program started with the prefix gets: its scheduling policy and its cores.
    shown = subprocess.run([*load_generator(), "sh", "-c", "chrt -p $$; taskset -cp $$"],
                           capture_output=True, text=True, timeout=30, check=True).stdout
    policy = re.search(r"scheduling policy: (\S+)", shown)
    cores = re.search(r"affinity list: (\S+)", shown)
    assert policy is not None and cores is not None, shown
    assert policy.group(1) == ("SCHED_FIFO" if real_time_permitted() else "SCHED_OTHER"), shown
    assert cores.group(1) == LOAD_CORE, shown
