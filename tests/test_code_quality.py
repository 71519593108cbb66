"""ruff, mypy and the import contracts run with the test suite, so none can rot."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, check=False)


def test_ruff_finds_nothing() -> None:
    result = _run("ruff", "check", "tracker", "tests", "benchmarks", "deploy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_finds_nothing() -> None:
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_finds_nothing_in_the_benchmarks_and_deploy_tools() -> None:
    result = _run("mypy", "benchmarks", "deploy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_subpackages_import_only_in_the_allowed_directions() -> None:
    # The contracts are in pyproject.toml ([tool.importlinter]).
    result = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readmes_module_map_names_every_module() -> None:
    """The map under "How it works" is a tree: a folder line ends in "/", a module line
    starts with its file name; every module of tracker/ is on it, and nothing else."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## How it works", 1)[1].split("```", 2)[1]
    mapped: set[str] = set()
    folders: list[str] = []
    for line in block.splitlines():
        name = line.strip().split(" ", 1)[0]
        if not name:
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        del folders[depth:]
        if name.endswith("/"):
            folders.append(name)
        elif name.endswith(".py"):
            mapped.add("".join(folders) + name)
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "tracker").rglob("*.py")
               if p.name != "__init__.py"}
    assert mapped == modules, (sorted(modules - mapped), sorted(mapped - modules))


# A test waits by polling with a deadline, through tests/support.py (`wait_for`,
# `wait_for_async`): a sleep or a clock-bounded loop anywhere else is either a wait that
# fails on a busy machine or a pace that is itself under test, and then says so on its line.
_WAITING = re.compile(r"(?<![\w.])(?:time\.|asyncio\.)?sleep\("
                      r"|^\s*while\b.*(?:monotonic|perf_counter|\.time)\(")
_NOT_A_WAIT = "# not a wait:"


def _test_lines(*exempt: str) -> Iterator[tuple[str, int, str]]:
    """Every line of the test modules but the named ones and this one (its patterns)."""
    for path in sorted((ROOT / "tests").glob("*.py")):
        if path.name not in (*exempt, Path(__file__).name):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                yield path.name, number, line


def test_no_test_waits_but_through_the_polling_helper() -> None:
    found = [f"{name}:{number}: {line.strip()}" for name, number, line in _test_lines("support.py")
             if _WAITING.search(line) and _NOT_A_WAIT not in line]
    assert not found, "poll with support.wait_for / wait_for_async instead:\n" + "\n".join(found)


def test_the_waiting_rule_sees_the_usual_ways_to_wait() -> None:
    for waiting in ("time.sleep(0.1)", "await asyncio.sleep(0.02)", "sleep(1)",
                    "while time.monotonic() < deadline:",
                    "    while loop.time() < deadline and not done:"):
        assert _WAITING.search(waiting), waiting
    for other in ("perform pg_sleep(0.01);", "deadline = time.monotonic() + 5",
                  "while chunk := sock.recv(65536):"):
        assert not _WAITING.search(other), other


# One PostgreSQL for the run and a fresh database per test come from tests/conftest.py;
# test_cli.py's subject is the embedded PostgreSQL itself.
_OWN_DATABASE = re.compile(r"EmbeddedPostgres\(|create database|\.dsn\(", re.IGNORECASE)


def test_no_test_module_makes_a_postgresql_or_a_database_of_its_own() -> None:
    found = [f"{name}:{number}: {line.strip()}"
             for name, number, line in _test_lines("conftest.py", "test_cli.py")
             if _OWN_DATABASE.search(line)]
    assert not found, "use the fixtures of tests/conftest.py instead:\n" + "\n".join(found)
