"""The benchmark suite (`python -m benchmarks suite`): in quick local mode it runs every
stage, writes its charts and summary, and every request it sent landed: the campaign's
report counts exactly what the load sent, and each recorded request is one row in
PostgreSQL. No timing is asserted (the figures are the benchmark's business). What it
expects of a request agrees with the report's definitions and tracker's rules; the entry
point lists and runs the programs; the load generator runs on its core, at real-time
priority where permitted."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from ipaddress import ip_address
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.__main__ import PROGRAMS
from benchmarks.common import LOAD_CORE, PROBE_PRIORITY, load_generator, real_time_permitted
from benchmarks.phases import Deployment
from benchmarks.traffic import (
    APPLE_MAIL,
    CLICKS,
    LINKS,
    MIXES,
    OPENS,
    Message,
    Mix,
    Request,
    Tally,
    Visitor,
)

from .geodb import build_test_city_db
from .support import Server, new_account

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

MISSING = [tool for tool in ("wrk", "nginx", "taskset") if shutil.which(tool) is None]
PHASES = {"nginx static GIF", "tracker pixel", "tracker click", "tracker pixel, half rate",
          "tracker click, half rate"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str],
                                                                   Path]:
    if MISSING:
        pytest.skip(f"the suite needs {', '.join(MISSING)}: apt-get install wrk nginx-light")
    out = tmp_path_factory.mktemp("suite-out")
    # A geo database as a user's server has one (every reader's address is looked up).
    geodb = build_test_city_db(tmp_path_factory.mktemp("geo") / "city.mmdb")
    # The realistic mix: machines, MPP, scanners and tampered tokens besides people.
    result = subprocess.run([sys.executable, "-m", "benchmarks", "suite", "--quick",
                             "--mix", "realistic", "--out", str(out), "--geoip-db", str(geodb)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    return result, out


def test_quick_suite_finishes_and_the_report_counts_what_was_sent(
        quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    result, out = quick_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    load = summary["load"]
    assert load["correct"] is True and load["problems"] == []
    checks = {c["name"]: c for c in load["checks"]}
    assert all(c["ok"] for c in checks.values()), [c for c in checks.values() if not c["ok"]]
    assert len([name for name in checks if name.startswith("link ")]) == len(LINKS)
    # A real load reached the report: human and machine opens and clicks, every message.
    for figure in ("opens.total", "opens.machine", "clicks.total", "clicks.machine"):
        assert checks[figure]["got"] > 1000, (figure, checks[figure])
    assert checks["messages"]["got"] == 1000
    assert checks["opens.unique"]["got"] > 900
    # Every request that records an event is one row in PostgreSQL, once.
    rows, ids = checks["events in PostgreSQL (rows, ids)"]["got"]
    recorded = sum(checks[f]["got"] for f in ("opens.total", "opens.machine", "clicks.total",
                                              "clicks.machine"))
    assert rows == ids == recorded
    assert "PASS" in result.stdout and "FAIL" not in result.stdout


def test_quick_suite_measures_every_phase_over_time(
        quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = quick_run
    phases = {p["name"]: p for p in json.loads((out / "summary.json").read_text())["load"]
              ["phases"]}
    assert set(phases) == PHASES
    for phase in phases.values():
        assert phase["requests"] > 500 and phase["rate"] > 0, phase["name"]
        if phase["paced_rate"]:
            # The probe timed answers beside the paced load ...
            assert 0 < phase["latency_ms"]["p50"] <= phase["latency_ms"]["p99"], phase["name"]
            assert phase["timed"] > 100, phase["name"]
            assert len(phase["runs"]) == 2, phase["name"]
        else:
            # ... and stayed out of the full-speed runs, whose CPU is the headline figure.
            assert phase["timed"] == 0 and phase["latency_ms"]["p50"] is None, phase["name"]
            assert len(phase["runs"]) == 1, phase["name"]
        windows = phase["windows"]
        assert len(windows) >= 3 and all(w["rate"] > 0 for w in windows), phase["name"]
        assert 0 < phase["wrk_cpu_share"] < 2, phase["name"]
        assert all(run["complete"] for run in phase["runs"]), phase["name"]
    # The local server's CPU was measured, so the per-core ratio exists.
    assert phases["tracker pixel"]["per_cpu_second"] > 0
    assert phases["nginx static GIF"]["per_cpu_second"] > 0
    # Tampered link tokens were answered 404, exactly as many as planned.
    click = phases["tracker click"]
    assert click["not_found_expected"] > 0
    assert click["not_found_expected"] == sum(r["errors"]["status"] for r in click["runs"])
    # The paced phases were paced at half the full rate, and the pace held them there. (A
    # machine busy with something else may leave them slower than their pace, never faster:
    # how much slower says nothing about the suite.)
    for endpoint in ("pixel", "click"):
        full, half = phases[f"tracker {endpoint}"], phases[f"tracker {endpoint}, half rate"]
        assert half["paced_rate"] == pytest.approx(full["rate"] / 2), endpoint
        assert 0 < half["rate"] <= 1.1 * half["paced_rate"], (endpoint, half["rate"])


def test_quick_suite_writes_charts_and_the_goals_table(
        quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    result, out = quick_run
    for name in ("throughput.png", "latency.png"):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(path) as image:
            assert image.width >= 800 and image.height >= 400
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is not None and len(colours) > 50, name  # lines, not a blank page
    summary = json.loads((out / "summary.json").read_text())
    goals = {g["figure"].split(" (")[0].split(",")[0]: g for g in summary["goals"]}
    for figure in ("pixel ÷ nginx", "click ÷ nginx", "pixel p99 at half the maximum rate",
                   "click p99 at half the maximum rate", "RSS per worker under load",
                   "registration", "report latency", "end-to-end correctness",
                   "load generator CPU"):
        assert figure in goals, (figure, list(goals))
        assert goals[figure]["met"] is not None, goals[figure]
        assert figure in result.stdout
    assert goals["end-to-end correctness"]["met"] is True
    # Beside each ratio, µs of the server's CPU a hit, against nginx's per request; and
    # whether nginx was saturated (if not, its per-CPU figure flatters tracker).
    for endpoint in ("pixel", "click"):
        row = goals[f"  {endpoint}: µs of server CPU a hit"]
        assert re.fullmatch(r"[0-9.]+ µs", row["value"]) and "nginx a request" in row["figure"]
    assert re.fullmatch(r"[0-9]+%", goals["nginx saturated"]["value"])
    assert summary["settings"]["geoip_used"].endswith("city.mmdb")
    assert "geo database: " in result.stdout
    programs = summary["programs"]
    assert programs["registration"]["ok"] and programs["registration"]["figures"][
        "messages_per_s"] > 0
    assert any(title.startswith("report latency") and p["ok"] and p["figures"]["equal"]
               for title, p in programs.items())
    assert programs["ingest"]["ok"], programs["ingest"]
    assert programs["ingest"]["figures"]["events_per_s"] > 0


def test_tally_follows_the_report_definitions() -> None:
    """A click proves an open (opens.unique); machines count apart; tampered tokens count
    nowhere but as 404s; rates are rounded as the report rounds them."""
    tally = Tally(messages=3)
    def hit(kind: str, message: int, link: int | None, machine: bool | None) -> Request:
        return Request("GET", "/", "agent", "", kind, message, link, machine)

    tally.add([
        hit("open", 0, None, False), hit("open", 0, None, False), hit("open", 1, None, True),
        hit("click", 2, 1, False), hit("click", 1, 0, True),
        hit("click", 0, None, None), hit("open", 0, None, None),
    ])
    expected = tally.expected()
    assert expected["opens.total"] == 2 and expected["opens.machine"] == 1
    assert expected["clicks.total"] == 1 and expected["clicks.machine"] == 1
    assert expected["opens.unique"] == 2  # message 0 opened, message 2 clicked
    assert expected["clicks.unique"] == 1
    assert expected["open_rate"] == 0.666667 and expected["click_to_open_rate"] == 0.5
    assert expected["links"][LINKS[1]] == [1, 1] and expected["links"][LINKS[0]] == [0, 0]
    assert tally.not_found == 1


def test_the_mix_agrees_with_trackers_rules() -> None:
    """Every kind of request the suite sends is classified by tracker's packaged rules as the
    suite expects (a rules change would otherwise show up as a wrong count)."""
    messages = [Message(f"/o/AAAAAAAAAAAAAAAAAAAA{n}.gif",
                        tuple(f"/c/BBBBBBBBBBBBBBBBBBBBBBBB{n}x{k}" for k in range(len(LINKS))))
                for n in range(10)]
    mix = Mix(messages, remote=False, seed=1)
    assert mix.check_rules() == []
    # And it does see a wrong expectation: curl is a bot, Apple Mail from Apple is MPP.
    wrong = Mix(messages, remote=False, seed=1)
    wrong.opens = [Visitor("curl as a reader", 1, ("curl/8.5.0",), False),
                   Visitor("MPP as a reader", 1, APPLE_MAIL, False, addresses="apple")]
    wrong.clicks = []
    problems = wrong.check_rules()
    assert len(problems) == 3 and all("the rules say machine" in p for p in problems), problems
    assert any(v.machine for v in OPENS) and any(v.machine is False for v in OPENS)
    assert any(v.method == "HEAD" for v in CLICKS)
    # Remote mode leaves out what needs X-Forwarded-For to be believed.
    remote = Mix(messages, remote=True, seed=1)
    assert all(not v.local_only for v in remote.opens)
    assert all(r.forwarded == "" for r in remote.requests("open", 200))
    assert any(r.forwarded.startswith("17.") for r in mix.requests("open", 200))
    # Readers come from public addresses (the geo database locates them), 2,000 of them
    # with a tenth IPv6, none of them in the rules' address lists (check_rules).
    readers = {r.forwarded for r in mix.requests("open", 3000) if r.forwarded
               and not r.forwarded.startswith(("17.", "192.0.2."))}
    assert len(readers) > 500 and readers <= set(mix.readers)
    assert len(mix.readers) == 2000 and all(ip_address(a).is_global for a in mix.readers)
    assert 100 < sum(":" in a for a in mix.readers) < 300
    lines = mix.requests("click", 2000)
    assert sum(r.machine is None for r in lines) > 20  # tampered tokens are in the mix
    assert {r.path for r in lines if r.machine is None}.isdisjoint(
        {path for m in messages for path in m.links})


def test_a_remote_run_reads_the_largest_workers_memory_from_metrics(
        module_dsn: str, tmp_path: Path) -> None:
    server = Server(module_dsn, tmp_path).start()
    try:
        (memory,) = Deployment(server.url, new_account(module_dsn)).worker_memory()
    finally:
        server.stop()
    assert 20 < memory["rss_mb"] <= memory["peak_mb"] < 2048


def test_the_readers_mix_is_people_only_and_agrees_with_trackers_rules() -> None:
    messages = [Message(f"/o/AAAAAAAAAAAAAAAAAAAA{n}.gif",
                        tuple(f"/c/BBBBBBBBBBBBBBBBBBBBBBBB{n}x{k}" for k in range(len(LINKS))))
                for n in range(10)]
    readers = Mix(messages, remote=False, seed=1, name="readers")
    assert readers.check_rules() == []
    requests = readers.requests("open", 500) + readers.requests("click", 500)
    assert all(r.machine is False for r in requests)
    assert set(MIXES) == {"realistic", "readers"}


def test_the_entry_point_lists_every_program_and_runs_one(tmp_path: Path) -> None:
    listed = subprocess.run([sys.executable, "-m", "benchmarks"], capture_output=True,
                            text=True, cwd=ROOT, timeout=60, check=True).stdout
    for name in PROGRAMS:
        assert re.search(rf"^  {name} ", listed, re.MULTILINE), listed
    unknown = subprocess.run([sys.executable, "-m", "benchmarks", "load"], capture_output=True,
                             text=True, cwd=ROOT, timeout=60, check=False)
    assert unknown.returncode == 2 and "no program 'load'" in unknown.stderr
    for name in PROGRAMS:  # every program answers --help through the entry point
        shown = subprocess.run([sys.executable, "-m", "benchmarks", name, "--help"],
                               capture_output=True, text=True, cwd=ROOT, timeout=60,
                               check=False)
        assert shown.returncode == 0, (name, shown.stderr)
        assert shown.stdout.startswith(f"usage: python -m benchmarks {name}"), shown.stdout


def test_the_load_generator_runs_on_its_core_at_real_time_priority_where_permitted() -> None:
    if shutil.which("taskset") is None or shutil.which("chrt") is None:
        pytest.skip("needs taskset and chrt (util-linux)")
    # What a program started with the prefix gets: its scheduling policy and its cores.
    shown = subprocess.run([*load_generator(LOAD_CORE, PROBE_PRIORITY), "sh", "-c",
                            "chrt -p $$; taskset -cp $$"],
                           capture_output=True, text=True, timeout=30, check=True).stdout
    policy = re.search(r"scheduling policy: (\S+)", shown)
    priority = re.search(r"scheduling priority: (\d+)", shown)
    cores = re.search(r"affinity list: (\S+)", shown)
    assert policy is not None and priority is not None and cores is not None, shown
    if real_time_permitted():
        assert (policy.group(1), int(priority.group(1))) == ("SCHED_FIFO", PROBE_PRIORITY), shown
    else:
        assert policy.group(1) == "SCHED_OTHER", shown
    assert cores.group(1) == LOAD_CORE, shown
