"""Health, readiness, /metrics and failed-authentication throttling.

Unit tests pin the pieces (histogram buckets, merging workers' snapshots, the token
buckets); the rest runs against a real server and a real PostgreSQL. To make the
database unreachable without stopping the session's PostgreSQL, the server of the
readiness tests reaches it through a TCP relay (`DatabaseRelay`) that the test cuts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tracker.ingest.pipeline import DropReason, Event, event_id
from tracker.store.database import connect
from tracker.store.writer import BatchWriter
from tracker.web.metrics import (
    BATCH_SIZE_BUCKETS,
    Histogram,
    Metrics,
    MetricsCollector,
    SharedSnapshots,
    Snapshot,
    merge,
    observe_flushes,
    registry_for,
)
from tracker.web.throttle import AuthThrottle

from .support import Server, campaign, db_fetch, new_account, register, wait_for

ROOT = Path(__file__).resolve().parent.parent
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
# Sent an hour ago: a click seconds after sending is a scanner's (the too_soon rule).
SENT_AT = (datetime.now(UTC) - timedelta(hours=1)).isoformat()


def scrape(url: str, **headers: str) -> dict[str, float]:
    """/metrics as {'name{label="value",...}': value}, labels sorted."""
    response = httpx.get(url + "/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return samples(response.text)


def samples(text: str) -> dict[str, float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


# --- pieces -----------------------------------------------------------------------------------


def test_histogram_counts_a_value_on_a_bound_in_that_bucket() -> None:
    histogram = Histogram((1, 10, 100))
    for value in (0, 1, 2, 10, 11, 100, 1000):
        histogram.observe(value)
    assert histogram.counts == [2, 2, 2, 1]  # le=1: 0, 1; le=10: 2, 10; le=100: 11, 100; +Inf
    family = histogram.family("x", "x")
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "x_bucket"}
    assert buckets == {"1": 2, "10": 4, "100": 6, "+Inf": 7}
    assert histogram.sum == 1124


def test_every_exported_metric_is_documented_and_every_documented_one_exported() -> None:
    metrics = Metrics()
    writer = _stub_writer()
    collector = MetricsCollector(metrics, lambda: writer, 100)
    replica = SimpleNamespace(lag_s=0.0, lag_bytes=0, in_use=True)
    collector.replica = lambda: replica  # type: ignore[assignment,return-value]
    text = registry_for(collector).collect()
    exported = {family.name for family in text}
    documented = set(re.findall(r"^\| `(tracker_[a-z_]+)`",
                                (ROOT / "docs" / "metrics.md").read_text(), re.MULTILINE))
    # prometheus-client names a counter family without its _total suffix, an info family
    # without its _info one.
    documented = {name.removesuffix("_total").removesuffix("_info") for name in documented}
    assert exported == documented


def test_every_drop_reason_is_exported_from_zero() -> None:
    text = _exposition(Metrics())
    assert {f'tracker_drops_total{{reason="{r}"}}' for r in DropReason} <= set(samples(text))


def test_counting_is_plain_integers_on_the_hot_path() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.count_hit("open", False)
    metrics.count_hit("click", True)
    metrics.count_drop(DropReason.HEAD_OPEN)
    found = samples(_exposition(metrics))
    assert found['tracker_hits_total{endpoint="open",verdict="human"}'] == 3
    assert found['tracker_hits_total{endpoint="click",verdict="machine"}'] == 1
    assert found['tracker_hits_total{endpoint="click",verdict="human"}'] == 0
    assert found['tracker_drops_total{reason="head_open"}'] == 1


def test_merging_workers_adds_counters_and_takes_the_worst_health_and_memory() -> None:
    a, b = Snapshot(), Snapshot()
    a.hits, b.hits = {"open": [1, 2]}, {"open": [10, 20], "click": [5, 0]}
    a.drops, b.drops = {"invalid_token": 1}, {"invalid_token": 2, "buffer_full": 3}
    a.counters, b.counters = {"written": 4}, {"written": 6}
    a.gauges = {"buffered": 7, "writer_healthy": 1, "journal_oldest_at": 50.0,
                "resident_bytes": 100.0, "resident_peak_bytes": 300.0}
    b.gauges = {"buffered": 8, "writer_healthy": 0, "journal_oldest_at": 40.0,
                "resident_bytes": 200.0, "resident_peak_bytes": 250.0}
    a.histograms = {"batch_size": Histogram(BATCH_SIZE_BUCKETS)}
    b.histograms = {"batch_size": Histogram(BATCH_SIZE_BUCKETS)}
    a.histograms["batch_size"].observe(3)
    b.histograms["batch_size"].observe(3000)
    total = merge([a, b])
    assert total.hits == {"open": [11, 22], "click": [5, 0]}
    assert total.drops == {"invalid_token": 3, "buffer_full": 3}
    assert total.counters == {"written": 10}
    # Memory is per worker: the largest one, not a sum (a sum would hide the one near its limit).
    assert total.gauges == {"buffered": 15, "writer_healthy": 0, "journal_oldest_at": 40.0,
                            "resident_bytes": 200.0, "resident_peak_bytes": 300.0}
    assert sum(total.histograms["batch_size"].counts) == 2
    assert total.histograms["batch_size"].sum == 3003
    assert a.hits == {"open": [1, 2]}  # the inputs are left alone


def test_shared_snapshots_add_up_live_workers_and_keep_a_dead_ones_counters(
        tmp_path: Path) -> None:
    root = tmp_path / "metrics"
    me = SharedSnapshots(root, "1-8000", pid=101)
    live = SharedSnapshots(root, "1-8000", pid=102)
    dead = SharedSnapshots(root, "1-8000", pid=103)
    other_run = SharedSnapshots(root, "1-9000", pid=104)
    for shared in (me, live, dead, other_run):
        shared.prepare()
    for shared, hits in ((me, 1), (live, 10), (dead, 100), (other_run, 1000)):
        shared.write(Snapshot(hits={"open": [hits, 0]}, gauges={"buffered": hits}))
    stale = time.time() - SharedSnapshots.STALE_S - 5
    os.utime(dead.dir / "103.json", (stale, stale))
    (me.dir / "105.json").write_text("{not json")  # a torn or foreign file is skipped
    others = list(me.others())
    assert sorted(s.hits["open"][0] for s in others) == [10, 100]
    assert sorted(s.gauges.get("buffered", 0) for s in others) == [0, 10]


def test_start_up_removes_the_snapshots_of_runs_whose_server_is_gone(tmp_path: Path) -> None:
    root = tmp_path / "metrics"
    gone = _dead_pid()
    SharedSnapshots(root, f"{gone}-8000", pid=1).prepare()
    (root / f"{gone}-8000" / "1.json").write_text("{}")
    SharedSnapshots(root, f"{os.getpid()}-8001", pid=2).prepare()  # a live server's run
    SharedSnapshots(root, f"{os.getppid()}-8000", pid=3).prepare()
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [f"{os.getpid()}-8001", f"{os.getppid()}-8000"])


def test_a_failing_client_gets_its_burst_then_waits_for_the_refill() -> None:
    now = [1000.0]
    throttle = AuthThrottle(burst=3, refill_per_s=0.5, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.retry_after("203.0.113.9") is None
        throttle.failed("203.0.113.9")
    assert throttle.retry_after("203.0.113.9") == 2  # one token takes 2 s to come back
    assert throttle.retry_after("203.0.113.10") is None  # its neighbour is not punished
    now[0] += 1.0
    assert throttle.retry_after("203.0.113.9") == 1
    now[0] += 1.0
    assert throttle.retry_after("203.0.113.9") is None
    throttle.failed("203.0.113.9")
    assert throttle.retry_after("203.0.113.9") == 2
    now[0] += 60
    assert throttle.retry_after("203.0.113.9") is None
    assert len(throttle) == 0  # a full bucket is forgotten


def test_ipv6_clients_share_the_bucket_of_their_64_and_loopback_is_never_throttled() -> None:
    throttle = AuthThrottle(burst=2, refill_per_s=0.01, clock=lambda: 0.0)
    throttle.failed("2001:db8:1:2::1")
    throttle.failed("2001:db8:1:2:ffff::9")
    assert throttle.retry_after("2001:db8:1:2::77") is not None
    assert throttle.retry_after("2001:db8:1:3::1") is None
    throttle.failed("::ffff:203.0.113.1")
    throttle.failed("203.0.113.1")
    assert throttle.retry_after("203.0.113.1") is not None
    for _ in range(10):
        throttle.failed("127.0.0.1")
        throttle.failed("::1")
    assert throttle.retry_after("127.0.0.1") is None and throttle.retry_after("::1") is None


def test_throttle_memory_is_bounded() -> None:
    throttle = AuthThrottle(burst=1, refill_per_s=0.001, max_clients=100, clock=lambda: 0.0)
    for i in range(10_000):
        throttle.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(throttle) == 100
    assert throttle.retry_after("10.0.39.15") is not None  # the most recent is remembered


def test_api_keys_are_stored_only_as_a_hash_of_their_secret(dsn: str) -> None:
    key = new_account(dsn, "hashed")
    _, account, key_id, secret = key.split("_", 3)
    (row,) = db_fetch(dsn, "select * from api_keys where account_id = $1", int(account))
    assert row["key_id"] == key_id
    assert row["secret_hash"] == hashlib.sha256(secret.encode()).digest()
    dump = "".join(str(r) for r in db_fetch(dsn, "select * from api_keys"))
    assert secret not in dump and secret.encode().hex() not in dump


async def test_flush_histograms_count_exactly_the_writers_batches(dsn: str) -> None:
    metrics = Metrics()
    writer = BatchWriter(lambda: connect(dsn), batch_size=3, interval_s=3600,
                         max_buffered=1000)
    observe_flushes(writer, metrics)
    now_us = time.time_ns() // 1000
    for i in range(7):
        writer.add(Event(account_id=1, at_us=now_us + i, id=event_id(now_us + i), campaign_id=1,
                         message_id=i, type="open").record())
    try:
        assert await writer.flush() == 7
    finally:
        await writer.close(5)
    assert writer.stats.batches == 3
    assert metrics.batch_sizes.counts[:3] == [1, 2, 0]  # 3, 3, 1: le=1 once, le=10 twice
    assert metrics.batch_sizes.sum == 7
    assert sum(metrics.flush_seconds.counts) == 3
    assert 0 < metrics.flush_seconds.sum < 60


# --- against a real server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_key(server: Server, module_dsn: str) -> str:
    return new_account(module_dsn, "metrics")


def test_healthz_and_readyz_answer_200_when_all_is_well(server: Server) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "writer": "ok"}}
    assert ready.headers["cache-control"] == "no-store"


def test_metrics_count_hits_by_endpoint_and_verdict_and_drops_by_reason(
        server: Server, api_key: str) -> None:
    with server.client(api_key) as api:
        message = register(api, campaign(api), ["https://example.com/a"], sent_at=SENT_AT)
    before = scrape(server.url)
    with httpx.Client(timeout=10) as public:
        pixel, link = message["pixel_url"], message["links"][0]["tracked_url"]
        assert public.get(pixel, headers={"user-agent": CHROME}).status_code == 200
        assert public.get(pixel, headers={"user-agent": CHROME}).status_code == 200
        assert public.get(pixel, headers={"user-agent": GOOGLEBOT}).status_code == 200
        assert public.head(pixel, headers={"user-agent": CHROME}).status_code == 200
        assert public.get(link, headers={"user-agent": CHROME}).status_code == 302
        assert public.head(link, headers={"user-agent": CHROME}).status_code == 302
        assert public.get(server.url + "/o/forged.gif").status_code == 200
        assert public.get(server.url + "/c/forged").status_code == 404

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0)

    # Counted when captured, so the very next scrape sees them.
    after = scrape(server.url)
    assert delta('tracker_hits_total{endpoint="open",verdict="human"}') == 2
    assert delta('tracker_hits_total{endpoint="open",verdict="machine"}') == 1
    assert delta('tracker_hits_total{endpoint="click",verdict="human"}') == 1
    assert delta('tracker_hits_total{endpoint="click",verdict="machine"}') == 1
    assert delta('tracker_drops_total{reason="head_open"}') == 1
    assert delta('tracker_drops_total{reason="invalid_token"}') == 2
    # Every answer of the tracking endpoints, by status.
    assert delta('tracker_http_requests_total{code="200",group="open"}') == 5
    assert delta('tracker_http_requests_total{code="302",group="click"}') == 2
    assert delta('tracker_http_requests_total{code="404",group="click"}') == 1
    after = wait_for(lambda: (s := scrape(server.url))
                     and s["tracker_events_written_total"] - before.get(
                         "tracker_events_written_total", 0) >= 5 and s,
                     message="the five events to be written")
    assert delta("tracker_events_written_total") == 5
    assert after["tracker_flush_batch_size_events_count"] == after[
        "tracker_writer_batches_total"]
    assert after["tracker_flush_batch_size_events_sum"] >= 5
    assert after["tracker_flush_duration_seconds_count"] == after["tracker_writer_batches_total"]
    assert after["tracker_writer_buffered_events"] == 0
    assert after["tracker_writer_healthy"] == 1
    assert after["tracker_workers"] == 1
    resident = after["tracker_worker_resident_memory_bytes"]
    assert 20 * 2**20 < resident <= after["tracker_worker_resident_memory_peak_bytes"] < 2**31


def test_web_requests_are_counted_by_group_and_status_and_timed(
        server: Server, api_key: str) -> None:
    before = scrape(server.url)
    with server.client(api_key) as api:
        assert api.get("/api/campaigns").status_code == 200
        assert api.get("/api/campaigns/999999999").status_code == 404
    with httpx.Client(base_url=server.url, timeout=10) as anonymous:
        assert anonymous.get("/api/campaigns").status_code == 401
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/dashboard/sign-in").status_code == 200
    after = scrape(server.url)

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert delta('tracker_http_requests_total{code="200",group="api"}') == 1
    assert delta('tracker_http_requests_total{code="404",group="api"}') == 1
    assert delta('tracker_http_requests_total{code="401",group="api"}') == 1
    assert delta('tracker_http_requests_total{code="200",group="health"}') == 1
    assert delta('tracker_http_requests_total{code="200",group="dashboard"}') == 1
    # The scrape before this one is counted, and timed, once it has been answered.
    assert delta('tracker_http_requests_total{code="200",group="metrics"}') == 1
    assert delta('tracker_http_request_duration_seconds_count{group="api"}') == 3
    assert delta('tracker_http_request_duration_seconds_bucket{group="api",le="+Inf"}') == 3
    assert 0 < delta('tracker_http_request_duration_seconds_sum{group="api"}') < 30
    assert after['tracker_http_request_duration_seconds_bucket{group="api",le="30"}'] == (
        after['tracker_http_request_duration_seconds_count{group="api"}'])


def test_build_info_names_the_version_tracker_version_prints(server: Server) -> None:
    import platform
    import subprocess
    import sys

    from tracker import __version__

    printed = subprocess.run([sys.executable, "-m", "tracker", "--version"],
                             capture_output=True, text=True, check=True).stdout
    assert printed == f"tracker {__version__}\n"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'\nversion = "{__version__}"\n' in pyproject
    info = scrape(server.url)
    assert info[f'tracker_build_info{{python="{platform.python_version()}",'
                f'version="{__version__}"}}'] == 1


def test_metrics_speak_openmetrics_to_a_scraper_that_asks(server: Server) -> None:
    response = httpx.get(server.url + "/metrics",
                         headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
    plain = httpx.get(server.url + "/metrics")
    assert plain.headers["content-type"].startswith("text/plain")


def test_failed_authentication_is_throttled_per_address_with_retry_after(
        server: Server, api_key: str) -> None:
    attacker = {"x-forwarded-for": "198.51.100.7"}
    bystander = {"x-forwarded-for": "198.51.100.8"}
    before = scrape(server.url)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        wrong = {"authorization": api_key[:-4] + "AAAA"}
        statuses = [client.get("/api/campaigns", headers={**attacker, **wrong}).status_code
                    for _ in range(10)]
        assert statuses == [401] * 10
        refused = client.get("/api/campaigns", headers={**attacker, **wrong})
        assert refused.status_code == 429
        assert refused.json().keys() == {"error"}
        assert 1 <= int(refused.headers["retry-after"]) <= 6
        # The right key from that address waits too: the key is not even looked at.
        good = {"authorization": f"Bearer {api_key}"}
        assert client.get("/api/campaigns", headers={**attacker, **good}).status_code == 429
        # Another address is not affected, and its success gives the attacker nothing back.
        assert client.get("/api/campaigns", headers={**bystander, **good}).status_code == 200
        assert client.get("/api/campaigns", headers={**bystander, **wrong}).status_code == 401
        assert client.get("/api/campaigns", headers={**attacker, **wrong}).status_code == 429
        # Loopback (no forwarded address) is the machine itself: never throttled.
        for _ in range(12):
            assert client.get("/api/campaigns", headers=wrong).status_code == 401
    after = scrape(server.url)
    assert after["tracker_auth_throttled_total"] - before["tracker_auth_throttled_total"] == 3
    assert after["tracker_auth_failures_total"] - before["tracker_auth_failures_total"] == 23


def test_a_success_does_not_refill_the_bucket_of_a_failing_address(
        server: Server, api_key: str) -> None:
    # An attacker holding a valid key of their own must not buy more guesses with it.
    headers = {"x-forwarded-for": "198.51.100.9"}
    wrong = {"authorization": "Bearer tk_1_00000000_guess"}
    good = {"authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=server.url, timeout=10, headers=headers) as client:
        for _ in range(9):
            assert client.get("/api/campaigns", headers=wrong).status_code == 401
        for _ in range(5):
            assert client.get("/api/campaigns", headers=good).status_code == 200
        assert client.get("/api/campaigns", headers=wrong).status_code == 401
        assert client.get("/api/campaigns", headers=wrong).status_code == 429


# --- readiness with the database cut ----------------------------------------------------------


class DatabaseRelay:
    """A TCP port that relays to PostgreSQL's Unix socket until `cut()`.

    Cut, it closes every relayed connection and refuses new ones (accepts and closes at
    once), which is what a server sees when PostgreSQL goes away."""

    def __init__(self, socket_path: str) -> None:
        self._target = socket_path
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open = True
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            self._open = False
            live, self._live = self._live, set()
        for sock in live:
            _close(sock)

    def restore(self) -> None:
        with self._lock:
            self._open = True

    def close(self) -> None:
        self.cut()
        _close(self._listener)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                is_open = self._open
            if not is_open:
                _close(client)
                continue
            upstream = socket.socket(socket.AF_UNIX)
            try:
                upstream.connect(self._target)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._live |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.fixture(scope="module")
def relay(postgres: Any, module_dsn: str) -> Iterator[tuple[DatabaseRelay, str]]:
    running = postgres.running()
    database = urlsplit(module_dsn).path.lstrip("/")
    relay = DatabaseRelay(f"{running.socket_dir}/.s.PGSQL.{running.port}")
    yield relay, f"postgresql://postgres@127.0.0.1:{relay.port}/{database}"
    relay.close()


@pytest.fixture(scope="module")
def relayed_server(relay: tuple[DatabaseRelay, str],
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(relay[1], tmp_path_factory.mktemp("relayed"),
                 env={"TRACKER_FLUSH_INTERVAL_MS": "50"}).start()
    yield srv
    srv.stop()


@pytest.mark.slow
def test_readyz_is_503_with_a_reason_while_the_database_is_unreachable_and_200_after(
        relayed_server: Server, relay: tuple[DatabaseRelay, str], module_dsn: str) -> None:
    url = relayed_server.url
    key = new_account(module_dsn, "relayed")
    with relayed_server.client(key) as api:
        message = register(api, campaign(api))
    assert httpx.get(url + "/readyz").status_code == 200
    before = scrape(url)
    relay[0].cut()
    try:
        # A hit makes the writer try (and fail) to write while the database is away.
        assert httpx.get(message["pixel_url"], headers={"user-agent": CHROME}).status_code == 200
        # (The database's state is cached for a second, so it may trail the writer's.)
        down = wait_for(lambda: (r := httpx.get(url + "/readyz", timeout=10))
                        and r.status_code == 503 and "ok" not in r.json()["checks"].values()
                        and r, timeout=20, message="/readyz to report both problems")
        body = down.json()
        assert body["status"] == "not ready"
        assert body["reason"].startswith("database: ") and "; writer: " in body["reason"]
        during = scrape(url)
        assert during["tracker_writer_healthy"] == 0
        # The hit waits in memory or in the journal (which takes over during an outage).
        assert (during["tracker_writer_buffered_events"]
                + during.get("tracker_journal_pending_events", 0)) == 1
        assert during['tracker_database_errors_total{source="writer"}'] > before[
            'tracker_database_errors_total{source="writer"}']
        assert during['tracker_database_errors_total{source="readiness"}'] > before[
            'tracker_database_errors_total{source="readiness"}']
        # The API answers 503 and counts it.
        api_errors = during['tracker_database_errors_total{source="api"}']
        with relayed_server.client(key) as api:
            assert api.get("/api/campaigns").status_code == 503
        assert scrape(url)['tracker_database_errors_total{source="api"}'] == api_errors + 1
    finally:
        relay[0].restore()
    wait_for(lambda: httpx.get(url + "/readyz", timeout=10).status_code == 200, timeout=30,
             message="/readyz to be 200 again")
    wait_for(lambda: (s := scrape(url))["tracker_writer_buffered_events"] == 0
             and s.get("tracker_journal_pending_events", 0) == 0,
             message="the waiting hit to be written")


def test_a_throttled_address_is_refused_without_a_database_query(
        relayed_server: Server, relay: tuple[DatabaseRelay, str]) -> None:
    url = relayed_server.url
    with httpx.Client(base_url=url, timeout=10,
                      headers={"x-forwarded-for": "198.51.100.21",
                               "authorization": "Bearer tk_1_00000000_guess"}) as client:
        for _ in range(10):
            assert client.get("/api/campaigns").status_code == 401
        relay[0].cut()
        try:
            # With the database away, anything that queried it would be a 503.
            assert client.get("/api/campaigns").status_code == 429
        finally:
            relay[0].restore()


# --- several workers --------------------------------------------------------------------------


@pytest.mark.slow
def test_with_several_workers_any_worker_answers_with_everyones_counts(
        module_dsn: str, tmp_path: Path) -> None:
    srv = Server(module_dsn, tmp_path, env={"TRACKER_WORKERS": "2"}).start()
    try:
        with srv.client(new_account(module_dsn, "workers")) as api:
            message = register(api, campaign(api), sent_at=SENT_AT)
        opens = 0

        def per_worker() -> list[int]:
            """Each worker's own count of human opens, from the snapshots it publishes."""
            return [json.loads(p.read_text())["hits"]["open"][0]
                    for p in (tmp_path / "data" / "metrics").glob("*/*.json")]

        def both_worked() -> bool:
            nonlocal opens
            # A fresh connection per request, so the kernel spreads them over both workers.
            for _ in range(10):
                assert httpx.get(message["pixel_url"], headers={"user-agent": CHROME},
                                 timeout=10).status_code == 200
            opens += 10
            counts = wait_for(lambda: (c := per_worker()) and sum(c) == opens and c,
                              message="the workers to publish their counts")
            return len(counts) == 2 and min(counts) > 0

        # Until each worker has counted some (and so neither alone knows the total)...
        wait_for(both_worked, timeout=30, interval=0, message="hits in both workers")
        # ...whichever worker answers a scrape, it answers with the total.
        for _ in range(8):
            answer = scrape(srv.url)
            assert answer["tracker_workers"] == 2
            assert answer['tracker_hits_total{endpoint="open",verdict="human"}'] == opens
    finally:
        srv.stop()


# --- helpers ----------------------------------------------------------------------------------


def _stub_writer() -> Any:
    """What the collector reads from a writer, with a journal: the full set of metrics."""
    journal = SimpleNamespace(
        disk_bytes=0, pending_events=0, max_bytes=2**30, oldest_age_s=lambda: 0.0,
        stats=SimpleNamespace(appended_events=0, committed_events=0, corrupt_records=0,
                              torn_tails=0, skipped_bytes=0))
    return SimpleNamespace(
        stats=SimpleNamespace(written=0, duplicates=0, relabelled=0, batches=0, failures=0),
        journal=journal, buffered=0, healthy=True)


def _exposition(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry_for(MetricsCollector(metrics, lambda: None, 10))).decode()


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1

