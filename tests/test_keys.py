"""Named API keys with scopes, against a real server and PostgreSQL: what each scope may do
(a read key gets a 403 on every write the app has, enumerated from its routes), keys listed
without secrets, rotated and revoked (refused at once, in every worker), when a key was last
used (written at most once a minute), `tracker keys` and `tracker accounts list`."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.routing import Route

from tracker.ingest.tokens import Signer
from tracker.lifespan import Runtime
from tracker.settings import load
from tracker.web.api import build_api

from .support import SECRET, Server, campaign, db_fetch, db_value, new_account, register
from .test_privacy_workers import one_connection_per_worker


def _keys(api: httpx.Client) -> list[dict[str, Any]]:
    response = api.get("/api/keys")
    assert response.status_code == 200, response.text
    listed: list[dict[str, Any]] = response.json()
    return listed


def _new_key(api: httpx.Client, name: str, scope: str) -> dict[str, Any]:
    response = api.post("/api/keys", json={"name": name, "scope": scope})
    assert response.status_code == 201, response.text
    made: dict[str, Any] = response.json()
    return made


def _write_routes(tmp_path: Path, dsn: str) -> list[tuple[str, str]]:
    """(method, path) of every API route that is not a read, its parameters filled in."""
    settings = load({"TRACKER_DATABASE_URL": dsn, "TRACKER_SECRET_KEY": SECRET,
                     "TRACKER_DATA_DIR": str(tmp_path), "TRACKER_GEOIP_FETCH": "off"})
    app = build_api(Runtime(settings, Signer.from_setting(SECRET), dsn))
    found = []
    for route in app.routes:
        assert isinstance(route, Route)
        if not route.path.startswith("/api/"):
            continue
        path = (route.path.replace("{address:address}", "someone@example.com")
                .replace("{id}", "1"))
        found += [(method, path) for method in sorted(route.methods or ())
                  if method not in ("GET", "HEAD")]
    return found


def test_a_read_key_gets_403_on_every_write_and_reads_everything(
        server: Server, module_dsn: str, tmp_path: Path) -> None:
    full = new_account(module_dsn, "scopes")
    with server.client(full) as api:
        cid = campaign(api, name="scoped")
        message = register(api, cid, ["https://example.com/a"])
        reader_key = _new_key(api, "reports", "read")["api_key"]
    writes = _write_routes(tmp_path, module_dsn)
    assert len(writes) >= 14, writes  # the test sees the app's routes, not a list of its own
    with server.client(reader_key) as reader:
        for method, path in writes:
            response = reader.request(method, path, json={})
            assert response.status_code == 403, (method, path, response.text)
            assert "read" in response.json()["error"]
        for path in (f"/api/campaigns/{cid}", f"/api/campaigns/{cid}/report",
                     f"/api/campaigns/{cid}/messages", f"/api/messages/{message['id']}",
                     f"/api/campaigns/{cid}/export", "/api/campaigns", "/api/account"):
            assert reader.get(path).status_code == 200, path
        # Managing keys is a full key's, reading the list included.
        assert reader.get("/api/keys").status_code == 403
    # Nothing was changed by the refused writes.
    assert db_value(module_dsn, "select count(*) from messages where campaign_id = $1",
                    int(cid)) == 1


def test_a_register_key_registers_messages_and_changes_nothing_else(
        server: Server, module_dsn: str) -> None:
    full = new_account(module_dsn, "sender")
    with server.client(full) as api:
        cid = campaign(api, name="sent by a system")
        sender_key = _new_key(api, "mailer", "register")["api_key"]
    with server.client(sender_key) as sender:
        made = register(sender, cid, ["https://example.com/b"])
        assert made["pixel_url"]
        batch = sender.post(f"/api/campaigns/{cid}/messages/batch",
                            json={"messages": [{"recipient": "x@example.com"}]})
        assert batch.status_code == 201, batch.text
        assert sender.get(f"/api/campaigns/{cid}/report").status_code == 200
        for method, path, body in (("POST", "/api/campaigns", {"name": "no"}),
                                   ("PATCH", f"/api/campaigns/{cid}", {"name": "no"}),
                                   ("DELETE", f"/api/campaigns/{cid}", None),
                                   ("PUT", "/api/recipients/x@example.com/consent",
                                    {"opens": True, "clicks": True, "method": "form"}),
                                   ("POST", "/api/keys", {"name": "more", "scope": "full"})):
            response = sender.request(method, path, json=body)
            assert response.status_code == 403, (method, path, response.text)
        # The scope is checked before the campaign is looked up: another account's
        # campaign and no campaign at all get the same answer as this one.
        assert sender.post("/api/campaigns/999999999/messages",
                           json={"recipient": "y@example.com"}).status_code == 404


def test_keys_are_listed_without_secrets_and_names_are_unique_among_live_keys(
        server: Server, module_dsn: str) -> None:
    full = new_account(module_dsn, "listing")
    with server.client(full) as api:
        made = _new_key(api, "reports", "read")
        assert set(made) == {"id", "name", "scope", "created_at", "last_used_at", "api_key"}
        assert made["api_key"].startswith(f"tk_{full.split('_')[1]}_{made['id']}_")
        listed = _keys(api)
        assert {(k["name"], k["scope"]) for k in listed} == {("default", "full"),
                                                            ("reports", "read")}
        assert all(set(k) == {"id", "name", "scope", "created_at", "last_used_at"}
                   for k in listed)
        dump = orjson.dumps(listed).decode()
        assert made["api_key"].split("_", 3)[3] not in dump and full.split("_", 3)[3] not in dump
        again = api.post("/api/keys", json={"name": "reports", "scope": "full"})
        assert again.status_code == 422 and "reports" in again.json()["error"]
        for body in ({"name": "x"}, {"scope": "read"}, {"name": "x", "scope": "admin"},
                     {"name": "", "scope": "read"}, {"name": "a\nb", "scope": "read"},
                     {"name": "x" * 101, "scope": "read"},
                     {"name": "x", "scope": "read", "extra": 1}):
            response = api.post("/api/keys", json=body)
            assert response.status_code == 422, (body, response.text)
        assert api.get("/api/keys", params={"all": "1"}).status_code == 422
        # A revoked key's name is free again.
        assert api.delete(f"/api/keys/{made['id']}").status_code == 204
        assert _new_key(api, "reports", "register")["scope"] == "register"


def test_the_last_full_key_is_not_revoked_through_the_api(server: Server,
                                                          module_dsn: str) -> None:
    full = new_account(module_dsn, "last key")
    own_id = full.split("_")[2]
    with server.client(full) as api:
        refused = api.delete(f"/api/keys/{own_id}")
        assert refused.status_code == 409, refused.text
        assert "only full key" in refused.json()["error"]
        other = _new_key(api, "second", "full")
        assert api.delete(f"/api/keys/{own_id}").status_code == 204
    with server.client(other["api_key"]) as api:
        assert [k["id"] for k in _keys(api)] == [other["id"]]
        assert api.delete("/api/keys/00000000").status_code == 404
        assert api.delete("/api/keys/not-a-key").status_code == 404


@pytest.mark.slow
def test_revoked_and_rotated_keys_are_refused_at_once_in_every_worker(
        dsn: str, tmp_path: Path) -> None:
    """Two workers, a keep-alive connection to each: a key revoked (or rotated) through one
    is refused by the other on the very next request, in a tight loop."""
    server = Server(dsn, tmp_path, env={"TRACKER_WORKERS": "2"}).start()
    try:
        full = new_account(dsn, "two workers")
        auth = {"authorization": f"Bearer {full}"}
        with server.client(full) as api, one_connection_per_worker(server, 2) as workers:
            for round_ in range(10):
                changing, other = workers[round_ % 2], workers[(round_ + 1) % 2]
                key = _new_key(api, f"short-lived {round_}", "read")
                use = {"authorization": f"Bearer {key['api_key']}"}
                assert other.request("GET", "/api/campaigns", headers=use)[0] == 200
                if round_ % 2:
                    status, body, _ = changing.request("DELETE", f"/api/keys/{key['id']}",
                                                       headers=auth)
                    assert status == 204, body
                    replacement = None
                else:
                    status, body, _ = changing.request("POST",
                                                       f"/api/keys/{key['id']}/rotate",
                                                       headers=auth)
                    assert status == 201, body
                    replacement = orjson.loads(body)
                    assert (replacement["name"], replacement["scope"]) == (key["name"], "read")
                    assert replacement["id"] != key["id"]
                for worker in (other, changing):
                    assert worker.request("GET", "/api/campaigns", headers=use)[0] == 401
                    if replacement is not None:
                        assert worker.request("GET", "/api/campaigns", headers={
                            "authorization": f"Bearer {replacement['api_key']}"})[0] == 200
    finally:
        server.stop()


def test_last_use_is_kept_to_the_minute_without_a_write_per_request(
        server: Server, module_dsn: str) -> None:
    full = new_account(module_dsn, "last used")
    with server.client(full) as api:
        key = _new_key(api, "busy", "read")
        assert key["last_used_at"] is None
        account_id = int(full.split("_")[1])

        def stored() -> datetime | None:
            value: datetime | None = db_value(
                module_dsn, "select last_used_at from api_keys where account_id = $1 "
                            "and key_id = $2", account_id, key["id"])
            return value

        assert stored() is None
        before = datetime.now(UTC) - timedelta(seconds=5)
        with server.client(key["api_key"]) as busy:
            assert busy.get("/api/campaigns").status_code == 200
            first = stored()
            assert first is not None and before <= first <= datetime.now(UTC) + timedelta(1)
            for _ in range(20):
                assert busy.get("/api/campaigns").status_code == 200
            assert stored() == first  # no write for each request
            listed = {k["id"]: k for k in _keys(api)}[key["id"]]
            assert datetime.fromisoformat(listed["last_used_at"]) == first
            # A minute later, the next use is written again.
            db_fetch(module_dsn, "update api_keys set last_used_at = now() - interval "
                                 "'2 minutes' where account_id = $1 and key_id = $2",
                     account_id, key["id"])
            stale = stored()
            assert busy.get("/api/campaigns").status_code == 200
            renewed = stored()
            assert stale is not None and renewed is not None and renewed > stale


def _cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracker", *args, "--database-url", dsn],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.slow
def test_keys_and_accounts_through_the_cli(server: Server, module_dsn: str) -> None:
    made = _cli(module_dsn, "accounts", "create", "cli keys", "--json")
    assert made.returncode == 0, made.stderr
    account = orjson.loads(made.stdout)
    created = _cli(module_dsn, "keys", "create", "dashboard", "--scope", "read", "--account",
                   account["id"], "--json")
    assert created.returncode == 0, created.stderr
    key = orjson.loads(created.stdout)
    assert (key["name"], key["scope"]) == ("dashboard", "read")
    with server.client(key["api_key"]) as reader:
        assert reader.get("/api/campaigns").status_code == 200
        assert reader.post("/api/campaigns", json={"name": "x"}).status_code == 403

    listed = _cli(module_dsn, "keys", "list", "--account", account["id"], "--json")
    assert listed.returncode == 0, listed.stderr
    assert {k["name"] for k in orjson.loads(listed.stdout)} == {"default", "dashboard"}
    assert key["api_key"].split("_", 3)[3] not in listed.stdout
    table = _cli(module_dsn, "keys", "list", "--account", account["id"])
    assert re.search(r"dashboard\s+read\s", table.stdout), table.stdout

    rotated = _cli(module_dsn, "keys", "rotate", key["id"], "--account", account["id"],
                   "--json")
    assert rotated.returncode == 0, rotated.stderr
    new = orjson.loads(rotated.stdout)
    with server.client(key["api_key"]) as old, server.client(new["api_key"]) as current:
        assert old.get("/api/campaigns").status_code == 401
        assert current.get("/api/campaigns").status_code == 200
    revoked = _cli(module_dsn, "keys", "revoke", new["id"], "--account", account["id"])
    assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stderr
    with server.client(new["api_key"]) as gone:
        assert gone.get("/api/campaigns").status_code == 401
    # The operator may revoke the last full key (the CLI can always make another).
    default_id = account["api_key"].split("_")[2]
    assert _cli(module_dsn, "keys", "revoke", default_id, "--account",
                account["id"]).returncode == 0
    for bad in (("keys", "revoke", "abcdef12", "--account", account["id"]),
                ("keys", "list", "--account", "999999999"),
                ("keys", "create", "x", "--scope", "read", "--account", "999999999")):
        failed = _cli(module_dsn, *bad)
        assert failed.returncode == 1 and failed.stderr.startswith("tracker: "), bad
        assert "Traceback" not in failed.stderr

    everyone = _cli(module_dsn, "accounts", "list", "--json")
    assert everyone.returncode == 0, everyone.stderr
    rows = {a["id"]: a for a in orjson.loads(everyone.stdout)}
    mine = rows[account["id"]]
    assert (mine["name"], mine["state"], mine["keys"]) == ("cli keys", "active", 0)
    assert mine["last_used_at"] is not None
    assert set(mine) == {"id", "name", "state", "created_at", "deleted_at", "keys",
                         "campaigns", "last_used_at"}
    plain = _cli(module_dsn, "accounts", "list")
    assert plain.returncode == 0 and "cli keys" in plain.stdout and "STATE" in plain.stdout
    assert _cli(module_dsn, "accounts", "delete", account["id"]).returncode == 0
    after = {a["id"]: a for a in orjson.loads(_cli(module_dsn, "accounts", "list",
                                                   "--json").stdout)}
    assert after[account["id"]]["state"] == "deleted"


def _sign_in(client: httpx.Client, key: str) -> httpx.Response:
    form = client.get("/dashboard/sign-in").text
    token = re.search(r'name="form_token" value="([^"]+)"', form)
    assert token, form
    return client.post("/dashboard/sign-in", data={"form_token": token.group(1),
                                                   "api_key": key})


@pytest.mark.parametrize(("scope", "shown"), [("read", "read-only key"), ("full", "full key"),
                                              ("register", "register key")])
def test_the_dashboard_says_which_key_signed_in(server: Server, module_dsn: str, scope: str,
                                                shown: str) -> None:
    full = new_account(module_dsn, f"dashboard {scope}")
    with server.client(full) as api:
        key = _new_key(api, f"{scope} key", scope) if scope != "full" else {"api_key": full}
    with httpx.Client(base_url=server.url, timeout=10) as browser:
        assert _sign_in(browser, key["api_key"]).status_code == 303
        page = browser.get("/dashboard/campaigns")
        assert page.status_code == 200
        assert f'data-scope="{scope}"' in page.text and shown in page.text
        # Rotating the key ends the session, as revoking it does.
        if scope != "full":
            with server.client(full) as api:
                assert api.post(f"/api/keys/{key['id']}/rotate").status_code == 201
            assert browser.get("/dashboard/campaigns", follow_redirects=False
                               ).status_code == 303


def test_keys_through_the_python_client(server: Server, module_dsn: str) -> None:
    from tracker.mail.client import Client, TrackerError

    full = new_account(module_dsn, "client keys")
    with Client(server.url, full) as client:
        made = client.create_key("reports", "read")
        assert (made.key.name, made.key.scope, made.key.last_used_at) == ("reports", "read", None)
        assert {k.name for k in client.list_keys()} == {"default", "reports"}
        rotated = client.rotate_key(made.key.id)
        assert rotated.key.name == "reports" and rotated.api_key != made.api_key
        with Client(server.url, rotated.api_key) as reader:
            assert reader.list_campaigns() == []
            with pytest.raises(TrackerError) as refused:
                reader.create_campaign("not allowed")
            assert refused.value.status == 403
        client.revoke_key(rotated.key.id)
        assert {k.name for k in client.list_keys()} == {"default"}
        with Client(server.url, made.api_key) as old, pytest.raises(TrackerError) as gone:
            old.list_campaigns()
        assert gone.value.status == 401
