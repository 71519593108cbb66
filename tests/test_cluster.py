"""The cluster on loopback (benchmarks/cluster.py, its short run): PostgreSQL, three
tracker nodes and HAProxy; a node killed with SIGKILL mid-load and restarted. Every
request answered through the balancer is recorded exactly once, the report says so, and
the balancer failed over and back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_node_killed_mid_load_loses_no_answered_hit_and_the_balancer_fails_over() -> None:
    missing = [tool for tool in ("haproxy", "wrk") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install haproxy wrk)")
    done = subprocess.run([sys.executable, "-m", "benchmarks", "cluster", "--quick", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.stdout.strip(), done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    counted, failover = result["counted"], result["failover"]
    assert result["failures"] == [], result
    assert done.returncode == 0
    # Most of the counting client's requests were answered, each recorded exactly once.
    assert counted["answered_200"] >= 0.9 * counted["asked"]
    assert counted["answered_recorded_once"] == counted["answered_200"]
    assert counted["recorded_more_than_once"] == 0
    assert counted["report_opens"] == counted["events"]
    # HAProxy noticed the dead node, the others carried the load, and it came back.
    assert failover["down_detected_s"] is not None
    assert failover["victim_served_after_restart"] > 0
    assert result["wrk"]["answered"] <= result["wrk_events"]
