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
