"""ruff, mypy and the import contracts run with the test suite, so none can rot."""

from __future__ import annotations

import subprocess
import sys
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
