"""PostgreSQL outages and shutdowns: tracking keeps answering, nothing is lost, nothing doubles.

The outage tests own their PostgreSQL (not the session one), so they can stop and
start it; a restarted PostgreSQL keeps its socket dir and port, so the server's DSN
stays valid. The shutdown tests make the shutdown flush the only write there is.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
import pytest

from tracker.ingest.endpoints import PIXEL_GIF
from tracker.store.embedded_db import EmbeddedPostgres

from .support import (
    Server,
    campaign,
    database_down,
    db_fetch,
    db_value,
    new_account,
    register,
    wait_for,
    wait_for_async,
)

pytestmark = pytest.mark.slow

# Durability is not under test, recovery is: the same fast settings as the session database.
MESSAGES = 10
LINKS = 10
HITS = 2 * MESSAGES * LINKS  # an open and a click per link: 200 distinct hits
# The writer's retry backoff tops out at 5 s; the rest is slack for a loaded 2-core machine.
RECOVERY_S = 30.0
EXIT_S = 30.0


@pytest.fixture(scope="module")
def outage_server(own_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(own_dsn, tmp_path_factory.mktemp("outage-server")).start()
    yield srv
    srv.stop()


def _destination(message: int, link: int) -> str:
    return f"https://example.com/m{message}/l{link}?utm_source=mail&n={message * LINKS + link}"


def _registered(server: Server, dsn: str) -> tuple[str, str, list[dict[str, object]]]:
    """A new account and campaign with MESSAGES messages of LINKS links each."""
    api_key = new_account(dsn)
    with server.client(api_key) as client:
        campaign_id = campaign(client)
        messages = [register(client, campaign_id,
                             [_destination(m, k) for k in range(LINKS)], f"r{m}@example.com")
                    for m in range(MESSAGES)]
    return api_key, campaign_id, messages


def _hit_everything(server: Server, messages: list[dict[str, object]]) -> None:
    """One open per link and one click on every link, each checked on the wire."""
    with httpx.Client(timeout=5) as client:
        for m, message in enumerate(messages):
            links = message["links"]
            assert isinstance(links, list)
            for k, link in enumerate(links):
                pixel = client.get(str(message["pixel_url"]))
                assert pixel.status_code == 200
                assert pixel.headers["content-type"] == "image/gif"
                assert pixel.content == PIXEL_GIF
                click = client.get(link["tracked_url"])
                assert click.status_code == 302
                assert click.headers["location"] == _destination(m, k)


def _events(dsn: str, campaign_id: str) -> int:
    return int(db_value(dsn, "select count(*) from events where campaign_id = $1",
                        int(campaign_id)))


def _assert_each_hit_recorded_once(dsn: str, campaign_id: str) -> None:
    (counts,) = db_fetch(dsn, """
        select count(*) as total, count(distinct id) as ids,
               count(*) filter (where type = 'open') as opens,
               count(*) filter (where type = 'click') as clicks,
               count(distinct (message_id, link_position)) filter (where type = 'click') as links
        from events where campaign_id = $1""", int(campaign_id))
    assert dict(counts) == {"total": HITS, "ids": HITS, "opens": HITS // 2, "clicks": HITS // 2,
                      "links": HITS // 2}


def test_tracking_answers_while_postgres_is_down_and_every_hit_lands_once_when_it_is_back(
        outage_server: Server, own_postgres: EmbeddedPostgres, own_dsn: str) -> None:
    api_key, campaign_id, messages = _registered(outage_server, own_dsn)
    with outage_server.client(api_key) as client:
        sentinel_campaign = campaign(client, name="sentinel")
        sentinel = register(client, sentinel_campaign)
    with database_down(own_postgres):
        _hit_everything(outage_server, messages)
    back = datetime.now(UTC)
    wait_for(lambda: _events(own_dsn, campaign_id) >= HITS, RECOVERY_S, interval=0.2,
             message=f"{HITS} events after PostgreSQL came back")
    # A hit made now is queued behind everything from the outage: once it is in the
    # database, so is every retried batch, and a doubled one would show in the count.
    with httpx.Client(timeout=5) as client:
        assert client.get(str(sentinel["pixel_url"])).status_code == 200
    wait_for(lambda: _events(own_dsn, sentinel_campaign) == 1, RECOVERY_S, interval=0.05,
             message="the hit made after recovery")
    _assert_each_hit_recorded_once(own_dsn, campaign_id)
    # Events carry the time of the hit, not the time PostgreSQL took them.
    latest = db_value(own_dsn, "select max(occurred_at) from events where campaign_id = $1",
                      int(campaign_id))
    assert latest < back


def test_api_answers_503_with_a_json_error_while_postgres_is_down_and_recovers(
        outage_server: Server, own_postgres: EmbeddedPostgres, own_dsn: str) -> None:
    api_key, campaign_id, _ = _registered(outage_server, own_dsn)
    requests = [("GET", "/api/campaigns", None), ("GET", f"/api/campaigns/{campaign_id}", None),
                ("GET", f"/api/campaigns/{campaign_id}/report", None),
                ("POST", "/api/campaigns", {"name": "during the outage"}),
                ("POST", f"/api/campaigns/{campaign_id}/messages",
                 {"recipient": "late@example.com"})]
    with outage_server.client(api_key) as client:
        with database_down(own_postgres):
            for method, path, body in requests:
                response = client.request(method, path, json=body)
                assert response.status_code == 503, (method, path, response.text)
                assert response.headers["content-type"] == "application/json"
                error = response.json()["error"]
                assert isinstance(error, str) and error
                assert "Traceback" not in response.text
            assert client.get("/healthz").status_code == 200

        def answers() -> bool:
            return client.get("/api/campaigns").status_code == 200

        wait_for(answers, RECOVERY_S, interval=0.1, message="the API after PostgreSQL came back")
        assert client.get(f"/api/campaigns/{campaign_id}").json()["id"] == campaign_id


def test_api_requests_in_flight_when_postgres_stops_answer_503(
        outage_server: Server, own_postgres: EmbeddedPostgres, own_dsn: str) -> None:
    # A fast shutdown ends every backend mid-query with "terminating connection due to
    # administrator command" (57P01): the requests waiting on them see the outage. How
    # asyncpg reports that depends on how the error and the socket's end arrive, so
    # several requests are in flight at once.
    api_key, campaign_id, _ = _registered(outage_server, own_dsn)
    in_flight = 6  # under the pool's 10 connections: every one is mid-query

    async def scenario() -> list[httpx.Response]:
        # Not `connected`: the connection dies with PostgreSQL and is ended, not closed.
        blocker = await asyncpg.connect(own_dsn)
        try:
            await blocker.execute("begin; lock table campaigns in access exclusive mode")
            async with httpx.AsyncClient(base_url=outage_server.url, timeout=10,
                                         headers={"authorization": f"Bearer {api_key}"}) as client:
                requests = [asyncio.create_task(client.get(f"/api/campaigns/{campaign_id}"))
                            for _ in range(in_flight)]

                async def all_waiting() -> bool:
                    return bool(await blocker.fetchval(
                        "select count(*) from pg_locks where not granted "
                        "and relation = 'campaigns'::regclass") >= in_flight)

                await wait_for_async(all_waiting, 10, message="the API requests to reach the lock")
                await asyncio.to_thread(own_postgres.stop, "fast")
                return list(await asyncio.gather(*requests))
        finally:
            blocker.terminate()

    try:
        responses = asyncio.run(scenario())
    finally:
        own_postgres.start()
    for response in responses:
        assert response.status_code == 503, response.text
        assert isinstance(response.json()["error"], str)


def _flushed_only_at_shutdown(dsn: str, tmp_path: Path, sig: signal.Signals,
                              env: dict[str, str]) -> None:
    # Neither the timer (60 s) nor a full batch can write: only the shutdown flush can.
    srv = Server(dsn, tmp_path, env={**env, "TRACKER_FLUSH_INTERVAL_MS": "60000",
                                     "TRACKER_BATCH_SIZE": "1000000"}).start()
    try:
        _, campaign_id, messages = _registered(srv, dsn)
        _hit_everything(srv, messages)
        assert _events(dsn, campaign_id) == 0
        srv.signal(sig)
        try:
            code = srv.wait(EXIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit {EXIT_S}s after {sig.name}:\n{srv.log()}") from None
    finally:
        srv.stop()
    _assert_each_hit_recorded_once(dsn, campaign_id)
    assert code == 0, srv.log()
    assert "Traceback" not in srv.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_signal_flushes_every_buffered_event_and_exits_0(
        dsn: str, tmp_path: Path, sig: signal.Signals) -> None:
    _flushed_only_at_shutdown(dsn, tmp_path, sig, {})


def test_sigterm_flushes_the_buffers_of_every_worker(dsn: str, tmp_path: Path) -> None:
    # Each worker holds its own buffer; hits spread over both must all be written.
    _flushed_only_at_shutdown(dsn, tmp_path, signal.SIGTERM, {"TRACKER_WORKERS": "2"})


def test_shutdown_while_postgres_is_down_ends_within_a_bound(
        own_postgres: EmbeddedPostgres, own_dsn: str, tmp_path: Path) -> None:
    # The writer gives its shutdown flush 10 s; a server that waited for PostgreSQL
    # forever would hang every deploy and every reboot during an outage.
    srv = Server(own_dsn, tmp_path).start()
    try:
        _, _, messages = _registered(srv, own_dsn)
        with database_down(own_postgres):
            _hit_everything(srv, messages[:1])
            srv.signal(signal.SIGTERM)
            try:
                srv.wait(EXIT_S)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"no exit {EXIT_S}s after SIGTERM with PostgreSQL down:\n"
                                     f"{srv.log()}") from None
    finally:
        srv.stop()
