"""The operator's kit: backup and restore end to end, JSON logs, and the Grafana dashboard
and Prometheus alert rules in deploy/ checked against what /metrics really exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .support import Server, campaign, register, wait_for

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "tracker.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")
# Metrics of other programs an alert may use: Prometheus' own per target.
NOT_TRACKERS = {"up"}
# PromQL words that look like metric names.
_PROMQL_WORDS = {"sum", "min", "max", "avg", "count", "rate", "increase", "by", "without",
                 "histogram_quantile", "time", "le", "and", "or", "unless", "on", "ignoring",
                 "group_left", "group_right", "bool", "offset", "topk", "bottomk", "irate",
                 "humanizePercentage", "humanizeDuration"}


def tracker(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRACKER_DATA_DIR": str(data_dir)}
    env.pop("TRACKER_DATABASE_URL", None)
    env.pop("TRACKER_SECRET_KEY", None)
    return subprocess.run([sys.executable, "-m", "tracker", *args], env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


# --- backup and restore -----------------------------------------------------------------------


@pytest.mark.slow
def test_backup_and_restore_with_the_signing_key_keep_every_link_already_sent(
        tmp_path: Path) -> None:
    """docs/operations.md's procedure, step by step: `tracker backup` of the running
    server, the key file copied beside it; `tracker restore` into a new data dir, the key
    put back; the new server answers the old pixel and link, and reports the old events."""
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = Server(None, tmp_path / "old").start()
    old_data = tmp_path / "old" / "data"
    try:
        created = tracker(old_data, "accounts", "create", "acme", "--json")
        assert created.returncode == 0, created.stderr
        api_key = json.loads(created.stdout)["api_key"]
        with old.client(api_key) as api:
            campaign_id = campaign(api)
            message = register(api, campaign_id, ["https://example.com/offer?id=7"])
            pixel = path_of(message["pixel_url"])
            link = path_of(message["links"][0]["tracked_url"])
            agent = {"user-agent": CHROME}
            assert httpx.get(old.url + pixel, headers=agent).status_code == 200
            assert httpx.get(old.url + link, headers=agent).status_code == 302
            wait_for(lambda: api.get(f"/api/campaigns/{campaign_id}/report").json()[
                "clicks"]["total"] == 1, message="the click to be written")
        archive = tmp_path / "backups" / "tracker.dump"
        archive.parent.mkdir()
        backup = tracker(old_data, "backup", str(archive))  # while the server runs
        assert backup.returncode == 0, backup.stderr
        assert str(old_data / "secret_key") in backup.stderr  # what else to keep
        shutil.copy2(old_data / "secret_key", archive.parent / "secret_key")
    finally:
        old.stop()

    new_data = tmp_path / "new" / "data"
    restored = tracker(new_data, "restore", str(archive))
    assert restored.returncode == 0, restored.stderr
    assert "signing keys" in restored.stderr  # not in place yet: said
    shutil.copy2(archive.parent / "secret_key", new_data / "secret_key")
    (new_data / "secret_key").chmod(0o600)
    new = Server(None, tmp_path / "new").start()
    try:
        assert "signing key generated" not in new.log()
        with new.client(api_key) as api:
            report = api.get(f"/api/campaigns/{campaign_id}/report").json()
            assert (report["opens"]["total"], report["clicks"]["total"]) == (1, 1)
            redirect = httpx.get(new.url + link, headers=agent)
            assert redirect.status_code == 302
            assert redirect.headers["location"] == "https://example.com/offer?id=7"
            assert httpx.get(new.url + pixel, headers=agent).status_code == 200
            wait_for(lambda: api.get(f"/api/campaigns/{campaign_id}/report").json()[
                "opens"]["total"] == 2, message="the new open on the restored database")
        # Never over live data.
        again = tracker(new_data, "restore", str(archive))
        assert again.returncode == 1
        assert "already holds" in again.stderr and "Traceback" not in again.stderr
    finally:
        new.stop()
    assert stat.S_IMODE((new_data / "secret_key").stat().st_mode) == 0o600


@pytest.mark.slow
def test_a_generated_signing_key_is_announced_with_what_losing_it_breaks(
        tmp_path: Path) -> None:
    done = tracker(tmp_path / "data", "migrate")
    assert done.returncode == 0, done.stderr
    server = Server(None, tmp_path).start()
    server.stop()
    log = server.log()
    assert "signing key generated into" in log or "signing key:" in log
    assert "every pixel and link already sent stops working" in log


# --- JSON logs --------------------------------------------------------------------------------


@pytest.mark.slow
def test_json_logs_are_one_object_per_line_from_tracker_and_uvicorn_alike(
        module_dsn: str, tmp_path: Path) -> None:
    server = Server(module_dsn, tmp_path, env={"TRACKER_LOG_FORMAT": "json",
                                               "TRACKER_LOG_LEVEL": "debug",
                                               "TRACKER_WORKERS": "2"}).start()
    httpx.get(server.url + "/healthz")
    assert server.stop() == 0
    lines = server.log().splitlines()
    records = [json.loads(line) for line in lines]  # every line, or this raises
    assert {"time", "level", "logger", "message"} <= set().union(*records)
    loggers = {record["logger"] for record in records}
    assert any(name.startswith("uvicorn") for name in loggers), loggers
    assert any(name.startswith("tracker") for name in loggers), loggers


# --- the dashboard and the alert rules --------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _dashboard_exprs() -> list[str]:
    panels = _dashboard()["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def _rule_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [str(rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions,
    keywords, label names (inside braces) or durations."""
    without_labels = re.sub(r"\{[^}]*\}", "", expr)
    without_strings = re.sub(r'"[^"]*"', "", without_labels)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_strings)
    without_groupings = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", without_ranges)
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()", without_groupings))
    return {name for name in names if name not in _PROMQL_WORDS and not name[0].isdigit()}


def exported(text: str) -> set[str]:
    """Every sample name a /metrics answer can hold, from its TYPE lines."""
    names = set()
    for kind_line in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        name, kind = kind_line
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        if kind == "counter" and not name.endswith("_total"):
            names.add(f"{name}_total")
    return names


def test_the_expression_reader_finds_metric_names() -> None:
    assert metric_names('histogram_quantile(0.99, sum by (le, group) (rate('
                        'tracker_http_request_duration_seconds_bucket{group="api"}[5m]))) > 1'
                        ) == {"tracker_http_request_duration_seconds_bucket"}
    assert metric_names("tracker_journal_bytes / tracker_journal_capacity_bytes > 0.5") == {
        "tracker_journal_bytes", "tracker_journal_capacity_bytes"}
    assert metric_names('time() - min by (instance) (tracker_address_list_date_seconds)'
                        ) == {"tracker_address_list_date_seconds"}


@pytest.mark.slow
def test_every_metric_the_dashboard_and_the_alerts_use_is_on_metrics(
        module_dsn: str, tmp_path: Path) -> None:
    # The database as its own read replica: the replica's metrics are exported too.
    server = Server(module_dsn, tmp_path,
                    env={"TRACKER_READ_DATABASE_URL": module_dsn}).start()
    try:
        text = httpx.get(server.url + "/metrics", timeout=10).text
    finally:
        server.stop()
    available = exported(text)
    used = {name for expr in (*_dashboard_exprs(), *_rule_exprs())
            for name in metric_names(expr)}
    assert "tracker_read_replica_lag_seconds" in used and "tracker_journal_bytes" in used
    webhooks = {name for name in used if name.startswith("tracker_webhook_")}
    # The webhook deliveries' metrics are checked once the server exports any of them.
    if not any(name.startswith("tracker_webhook_") for name in available):
        used -= webhooks
    missing = used - available - NOT_TRACKERS
    assert not missing, f"used but not exported: {sorted(missing)}"


def test_the_dashboard_is_a_grafana_model_with_unique_panels_on_a_chosen_datasource() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    # No two panels overlap.
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return promtool


def test_the_alert_rules_pass_promtool() -> None:
    done = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dashboards_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool checks the dashboard's queries as recording rules (with Grafana's
    $__rate_interval as a plain range)."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{n}", "expr": expr.replace("$__rate_interval", "5m")}
        for n, expr in enumerate(_dashboard_exprs())]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_journal_alert_fires_when_the_journal_passes_half_its_cap(tmp_path: Path) -> None:
    """promtool's rule unit test: series in, alerts out."""
    test = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": 'tracker_journal_bytes{instance="a",job="tracker"}',
             "values": "0+100x20"},
            {"series": 'tracker_journal_capacity_bytes{instance="a",job="tracker"}',
             "values": "2000x20"}],
        "alert_rule_test": [
            # Past half from 11 m on: pending for its 5 minutes, then firing.
            {"eval_time": "15m", "alertname": "TrackerJournalFilling", "exp_alerts": []},
            {"eval_time": "17m", "alertname": "TrackerJournalFilling", "exp_alerts": [
                {"exp_labels": {"severity": "page", "instance": "a", "job": "tracker"},
                 "exp_annotations": {
                     "summary": "tracker's journal on a is 85% full",
                     "description": "Events wait on disk for PostgreSQL. When the journal is "
                                    "full, events are dropped (journal_full)."}}]}],
    }]}
    path = tmp_path / "alerts-test.yml"
    path.write_text(yaml.safe_dump(test))
    done = subprocess.run([_promtool(), "test", "rules", str(path)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
