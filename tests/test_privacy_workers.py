"""Privacy changes hold in every worker from the moment the API answers.

A real server with two workers. The test holds a keep-alive connection to each worker
(found through /proc: which worker process has the server end of the connection), so
it can send a hit to the one worker that did not answer the API, right after the
answer. Each change is made many times in a tight loop, each time followed at once by
hits on both workers: a worker that learnt of changes a second late (as polling the
database every second did) records some of them. The server is then stopped (it writes
everything it captured) and PostgreSQL is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tracker.ingest.addresses import ClientAddress
from tracker.ingest.capture import Capture
from tracker.ingest.geo import no_location
from tracker.ingest.pipeline import DropReason, EventRecord, Pipeline
from tracker.ingest.policy import Policy, PolicyBook
from tracker.ingest.suppression import SuppressionBook
from tracker.ingest.tokens import OpenToken, Signer
from tracker.ingest.useragent import parse_agent
from tracker.privacy.sync import PrivacySync
from tracker.store.journal import Journal

from .support import (
    Server,
    campaign,
    db_fetch,
    db_value,
    new_account,
    register,
    socket_inodes,
    wait_for,
    worker_pids,
)

pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; SO_REUSEPORT"),
              pytest.mark.slow]

ROUNDS = 15
LINK = "https://example.com/offer?utm_source=mail"
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")
BEFORE = "198.51.100.10"  # the client address of hits sent before a change
AFTER = "198.51.100.20"  # ... and after it
FULL = {"location": "country", "device": True, "ip": "full"}
STRICT = {"location": "none", "device": False, "ip": "none"}


def _server_end(port: int, client_port: int) -> int | None:
    """The inode of the server's end of our connection from `client_port`."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1].split(":"), fields[2].split(":")
        if int(local[1], 16) == port and int(remote[1], 16) == client_port:
            return int(fields[9])
    return None


class Worker:
    """A keep-alive connection that a given worker process serves."""

    def __init__(self, pid: int, conn: http.client.HTTPConnection) -> None:
        self.pid = pid
        self.conn = conn

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
        payload = orjson.dumps(body) if body is not None else None
        all_headers = {"content-type": "application/json"} if payload else {}
        self.conn.request(method, path, body=payload, headers={**all_headers, **(headers or {})})
        response = self.conn.getresponse()
        return response.status, response.read(), {k.lower(): v for k, v in
                                                   response.getheaders()}

    def hit(self, url: str, address: str) -> None:
        path = url.split("/", 3)[3]
        status, _, _ = self.request("GET", "/" + path, headers={
            "user-agent": CHROME, "x-forwarded-for": address})
        assert status in (200, 302), status


def _connect(server: Server) -> Worker:
    """A new connection, and the worker process the kernel gave it to."""
    assert server.proc is not None
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.connect()
    assert conn.sock is not None
    client_port = conn.sock.getsockname()[1]
    inode = wait_for(lambda: _server_end(server.port, client_port),
                     message="the server end of a connection")
    pids = [pid for pid in worker_pids(server.proc.pid) if inode in socket_inodes(pid)]
    assert len(pids) == 1, pids
    return Worker(pids[0], conn)


def _connect_to(server: Server, pid: int) -> Worker:
    for _ in range(200):
        worker = _connect(server)
        if worker.pid == pid:
            return worker
        worker.conn.close()
    raise AssertionError(f"no connection reached worker {pid}")


@contextmanager
def one_connection_per_worker(server: Server, workers: int) -> Iterator[list[Worker]]:
    found: dict[int, Worker] = {}
    try:
        for _ in range(200):
            worker = _connect(server)
            if worker.pid in found:
                worker.conn.close()
                continue
            found[worker.pid] = worker
            if len(found) == workers:
                break
        assert len(found) == workers, f"connections reached {len(found)} of {workers} workers"
        yield list(found.values())
    finally:
        for worker in found.values():
            worker.conn.close()


@pytest.fixture
def two_workers(dsn: str, tmp_path: Path) -> Iterator[Server]:
    server = Server(dsn, tmp_path, env={"TRACKER_WORKERS": "2"}).start()
    try:
        yield server
    finally:
        server.stop()


def _api(worker: Worker, key: str, method: str, path: str, body: Any = None) -> Any:
    status, content, _ = worker.request(method, path, body, {"authorization": f"Bearer {key}"})
    assert status in (200, 201, 204), (status, content)
    return orjson.loads(content) if content else None


def _call(key: str, method: str, path: str, body: Any = None) -> Callable[[Worker], object]:
    """An API call, to be made through a given worker."""
    def call(worker: Worker) -> object:
        return _api(worker, key, method, path, body)
    return call


def _change_then_hit(workers: list[Worker], round_: int, message: dict[str, Any],
                     change: Callable[[Worker], object]) -> None:
    """A change through one worker's API (each in turn), then at once the message's pixel
    and link on the other worker, and on that one."""
    answering, other = workers[round_ % 2], workers[(round_ + 1) % 2]
    change(answering)
    for worker in (other, answering):
        worker.hit(message["pixel_url"], AFTER)
        worker.hit(message["links"][0]["tracked_url"], AFTER)


def _events(dsn: str, message_ids: list[int]) -> list[dict[str, Any]]:
    rows = db_fetch(dsn, "select message_id, country, browser, host(ip) as ip from events_decoded "
                         "where message_id = any($1::bigint[])", message_ids)
    return [dict(row) for row in rows]


def test_privacy_changes_hold_in_every_worker_from_the_moment_the_api_answers(
        two_workers: Server, dsn: str) -> None:
    server = two_workers
    key = new_account(dsn, "two workers")
    sent_at = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    with server.client(key) as api, one_connection_per_worker(server, 2) as workers:
        # A stricter policy: campaigns that store the full address, city and browser,
        # known as such to both workers (a hit stores the address) before each PATCH.
        tightened = [campaign(api, FULL, name=f"tightened {i}") for i in range(ROUNDS)]
        tightened_messages = [register(api, cid, [LINK], sent_at=sent_at) for cid in tightened]
        # A worker reads campaigns in the order they changed: once it knows the probe's
        # policy, made last, it knows theirs.
        probe = register(api, campaign(api, FULL, name="probe"), [], sent_at=sent_at)
        for worker in workers:
            def knows_the_policy(worker: Worker = worker) -> bool:
                worker.hit(probe["pixel_url"], BEFORE)
                return bool(db_value(dsn, "select count(*) from events where message_id = $1 "
                                          "and host(ip) = $2", int(probe["id"]), BEFORE))
            wait_for(knows_the_policy, timeout=30, interval=0.2,
                     message=f"worker {worker.pid} to store the full address")
        opted_out_campaign = campaign(api, FULL, name="opt-out")
        erased_campaign = campaign(api, FULL, name="erasure")

        for i, (cid, message) in enumerate(zip(tightened, tightened_messages, strict=True)):
            _change_then_hit(workers, i, message,
                             _call(key, "PATCH", f"/api/campaigns/{cid}", {"policy": STRICT}))

        opted_out = []
        for i in range(ROUNDS):
            address = f"opted-out-{i}@example.com"
            message = register(api, opted_out_campaign, [LINK], sent_at=sent_at,
                               recipient=address)
            opted_out.append(int(message["id"]))
            _change_then_hit(workers, i, message,
                             _call(key, "POST", f"/api/recipients/{address}/opt-out"))

        erased = []
        for i in range(ROUNDS):
            address = f"erased-{i}@example.com"
            message = register(api, erased_campaign, [LINK], sent_at=sent_at,
                               recipient=address)
            erased.append(int(message["id"]))
            _change_then_hit(workers, i, message,
                             _call(key, "DELETE", f"/api/recipients/{address}"))

    assert server.stop() == 0  # every worker writes what it captured before it exits

    after = _events(dsn, [int(m["id"]) for m in tightened_messages])
    assert len(after) == 4 * ROUNDS  # recorded, under the stricter policy
    problems = []
    leaked = [e for e in after if e["ip"] or e["browser"] or e["country"]]
    if leaked:
        problems.append(f"{len(leaked)} of {len(after)} hits after a PATCH kept what it forbade")
    if recorded := _events(dsn, opted_out):
        problems.append(f"{len(recorded)} hits after an opt-out were recorded")
    if recorded := _events(dsn, erased):
        problems.append(f"{len(recorded)} hits after an erasure were recorded")
    counted = db_value(dsn, "select coalesce(sum(opens + clicks + machine_opens + "
                            "machine_clicks), 0) from rollup_campaign where campaign_id = $1",
                       int(erased_campaign))
    if counted:
        problems.append(f"{counted} hits after an erasure were counted in the report's rollups")
    assert not problems, problems


def test_a_worker_that_was_stopped_applies_the_change_before_recording_again(
        two_workers: Server, dsn: str) -> None:
    """A wedged worker cannot confirm a change: the API answers after a bounded wait, and
    the worker, once it runs again, holds every hit until it has read the change."""
    server = two_workers
    key = new_account(dsn, "wedged")
    sent_at = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    with server.client(key) as api, one_connection_per_worker(server, 2) as workers:
        answering, wedged = workers
        cid = campaign(api, FULL, name="wedged")
        message = register(api, cid, [LINK], sent_at=sent_at)
        probe = register(api, cid, [], sent_at=sent_at)

        def knows_the_policy() -> bool:
            wedged.hit(probe["pixel_url"], BEFORE)
            return bool(db_value(dsn, "select count(*) from events where message_id = $1 and "
                                      "host(ip) = $2", int(probe["id"]), BEFORE))
        wait_for(knows_the_policy, timeout=30, interval=0.2, message="the full policy")

        os.kill(wedged.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            _api(answering, key, "PATCH", f"/api/campaigns/{cid}", {"policy": STRICT})
            waited = time.monotonic() - started
        finally:
            os.kill(wedged.pid, signal.SIGCONT)
        assert waited < 15, waited
        # Its idle keep-alive connection timed out while it was stopped: a new one to it.
        resumed = _connect_to(server, wedged.pid)
        try:
            for _ in range(5):
                resumed.hit(message["pixel_url"], AFTER)
                resumed.hit(message["links"][0]["tracked_url"], AFTER)
        finally:
            resumed.conn.close()
        ids = [int(message["id"])]
    assert server.stop() == 0
    after = _events(dsn, ids)
    assert len(after) == 10
    assert not [e for e in after if e["ip"] or e["browser"] or e["country"]], after
    assert "did not confirm" in server.log(), "the bounded wait is not logged"


# --- the check on every hit, in one process -------------------------------------------------


async def test_hits_wait_while_a_change_cannot_be_read_and_are_then_recorded_under_it(
        tmp_path: Path) -> None:
    """While the worker is behind and PostgreSQL does not answer, hits are answered (this
    is the recording side) and held; once the change is read they are recorded under it,
    with the time of their request."""
    book = SuppressionBook()
    recorded: list[EventRecord] = []
    dropped: list[DropReason] = []
    down = [2]  # the first two reads fail

    async def read_changes() -> bool:
        if down[0]:
            down[0] -= 1
            raise OSError("the database is down")
        return book.put_recipient(1, 5, opted_out=True, erased_through=None)  # what it reads

    async def write_out() -> None:
        return None

    sync = PrivacySync(tmp_path, read_changes, write_out)
    sync.open()
    policies = PolicyBook()
    policies.put(1, 1, Policy(), recording=True)

    class Writer:
        def add(self, row: EventRecord) -> None:
            recorded.append(row)

        def synced(self) -> None:
            return None

    class Counter:
        def count_hit(self, endpoint: str, machine: bool) -> None:
            pass

        def count_drop(self, reason: DropReason) -> None:
            dropped.append(reason)

    capture = Capture(Signer(["k" * 32]), Pipeline(policies, parse_agent, no_location),
                      ClientAddress(()), Writer(), Counter(), book, sync)
    released = asyncio.Event()

    def release() -> None:
        capture.release_held()
        released.set()

    sync.start(release)
    try:
        scope = {"method": "GET", "headers": [(b"user-agent", CHROME.encode())],
                 "client": ("203.0.113.1", 1)}
        capture.record("open", scope, OpenToken(1, 1, 10, 0, 6), 1_000)
        assert recorded and not sync.behind()  # current: recorded at once
        assert sync.shared is not None
        sync.shared.change(erasure=False)  # another worker opts recipient 5 out
        assert sync.behind()
        capture.record("open", scope, OpenToken(1, 1, 11, 0, 5), 2_000)
        capture.record("open", scope, OpenToken(1, 1, 12, 0, 6), 3_000)
        assert len(recorded) == 1 and capture.held == 2 and not dropped
        await asyncio.wait_for(released.wait(), 10)
        assert capture.held == 0 and not sync.behind()
        assert dropped == [DropReason.OPTED_OUT]
        assert [row[0].split("\t")[1] for row in recorded] == ["1000", "3000"]
    finally:
        await sync.stop()


# --- the journal ----------------------------------------------------------------------------


def test_an_erased_recipients_journal_lines_are_off_the_disk_when_the_erasure_answers(
        dsn: str, tmp_path: Path) -> None:
    """With TRACKER_DURABILITY=journal every event is on disk before its hit is answered.
    Under steady traffic a segment keeps getting new records, so the ones already in
    PostgreSQL stayed in it until it filled up: an erased recipient's address among
    them. The erasure's write-out starts new segments, so the old ones go as soon as
    they are written."""
    server = Server(dsn, tmp_path, env={"TRACKER_WORKERS": "2",
                                        "TRACKER_DURABILITY": "journal"}).start()
    journal = tmp_path / "data" / "journal"
    erased_address = "203.0.113.77"
    stop = threading.Event()

    def steady_traffic(url: str) -> None:
        with httpx.Client(timeout=30, headers={"user-agent": CHROME}) as client:
            while not stop.is_set():
                client.get(url, headers={"x-forwarded-for": BEFORE})

    def on_disk() -> bool:
        found = False
        for path in journal.glob("*.seg"):
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                found = found or erased_address.encode() in path.read_bytes()
        return found

    threads: list[threading.Thread] = []
    try:
        key = new_account(dsn, "journal")
        sent_at = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        with server.client(key) as api, one_connection_per_worker(server, 2) as workers:
            cid = campaign(api, {"ip": "full"}, name="journal")
            steady = register(api, cid, [], sent_at=sent_at, recipient="steady@example.com")
            erased = register(api, cid, [LINK], sent_at=sent_at,
                              recipient="erased@example.com")
            # Steady traffic, on new connections (so on both workers): their segments
            # keep getting records, and are never all written at once.
            threads = [threading.Thread(target=steady_traffic, args=(steady["pixel_url"],))
                       for _ in range(4)]
            for thread in threads:
                thread.start()
            wait_for(lambda: db_value(dsn, "select count(*) from events where message_id = $1",
                                      int(steady["id"])) > 50, message="steady traffic")
            # Answered once on disk (durable); erased at once, with the writers busy. (Should
            # a writer have caught up with everything in between, and removed the segment,
            # again.)
            for _ in range(20):
                for worker in workers:
                    worker.hit(erased["pixel_url"], erased_address)
                if on_disk():
                    break
            assert on_disk(), "the test needs the erased line on disk before the erasure"
            _api(workers[0], key, "DELETE", "/api/recipients/erased@example.com")
            assert not on_disk(), "an erased recipient's line is in the journal"
        assert db_value(dsn, "select count(*) from events where message_id = $1",
                        int(erased["id"])) == 0
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        server.stop()


def test_a_sealed_segment_goes_once_its_events_are_committed(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=1 << 20)
    journal.append(["erased line\n"])
    chunk = journal.read(10)
    assert chunk is not None
    journal.append(["later line\n"])  # the segment keeps getting records
    journal.commit(chunk)
    assert len(journal.segments()) == 1  # the committed record stays on disk with it
    (sealed,) = journal.segments()
    journal.seal()
    journal.append(["after the seal\n"])
    assert len(journal.segments()) == 2  # a new segment took the append
    rest = journal.read(10)
    assert rest is not None and rest.lines == ["later line\n", "after the seal\n"]
    journal.commit(rest)
    assert sealed not in journal.segments() and not sealed.exists()
    journal.seal()  # the active one, all committed: it goes at once
    assert journal.segments() == [] and list(tmp_path.glob("*.seg")) == []
    journal.close()


def test_another_node_writes_out_and_drops_an_erased_recipients_journal_lines_in_a_second(
        dsn: str, tmp_path: Path) -> None:
    """Two servers on one database (two nodes). The one that did not take the erasure
    reads it within a second and writes out what it captured, its journal segments going
    with it (here its writer would otherwise wait a minute), and the erasure's sweep then
    deletes those events."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    nodes = [Server(dsn, tmp_path / "a", env={"TRACKER_DURABILITY": "journal"}),
             Server(dsn, tmp_path / "b", env={"TRACKER_DURABILITY": "journal",
                                                "TRACKER_FLUSH_INTERVAL_MS": "60000",
                                                "TRACKER_BATCH_SIZE": "1000000"})]
    for node in nodes:
        node.start()
    other_journal = tmp_path / "b" / "data" / "journal"
    erased_address = "203.0.113.78"

    def on_disk() -> bool:
        return any(erased_address.encode() in path.read_bytes()
                   for path in other_journal.glob("*.seg"))

    try:
        key = new_account(dsn, "nodes")
        sent_at = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        with nodes[0].client(key) as api:
            cid = campaign(api, {"ip": "full"}, name="nodes")
            erased = register(api, cid, [], sent_at=sent_at, recipient="erased@example.com")
            other_pixel = erased["pixel_url"].replace(nodes[0].url, nodes[1].url)

            def journaled() -> bool:
                # Answered once in the journal (durable), written in a minute; with the
                # address once the node has read the campaign (made on the other one).
                httpx.get(other_pixel, headers={"user-agent": CHROME,
                                                "x-forwarded-for": erased_address}, timeout=30)
                return on_disk()
            wait_for(journaled, timeout=15, interval=0.2, message="the line in the journal")
            assert api.delete("/api/recipients/erased@example.com").status_code == 200
            wait_for(lambda: not on_disk(), timeout=10,
                     message="the other node to drop the erased line from its journal")
            wait_for(lambda: db_value(dsn, "select swept_at from erasures"), timeout=30,
                     message="the erasure's sweep")
            assert db_value(dsn, "select count(*) from events where message_id = $1",
                            int(erased["id"])) == 0
    finally:
        for node in nodes:
            node.stop()
