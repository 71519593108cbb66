"""The named queries: every statement tracker runs is a `-- name:` block of a query file in
sql/, loaded at start-up by tracker/store/queries.py; the code and the files must agree
name for name, and no SQL is left in the Python."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from tracker.store.queries import (
    QUERIES,
    Queries,
    QueryFileError,
    for_table,
    load,
    query_files,
    quote_identifier,
    sql_dir,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sql_copy(tmp_path: Path) -> Path:
    """A copy of sql/ (migrations and sql/citus/ included) to break."""
    copy = tmp_path / "sql"
    shutil.copytree(sql_dir(), copy)
    return copy


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def test_every_block_of_every_query_file_is_a_field_and_nothing_else_is_read() -> None:
    names = [m for path in query_files(sql_dir())
             for m in re.findall(r"^-- name: (\S+)$", path.read_text(), re.M)]
    assert {p.name for p in query_files(sql_dir())} == {
        "queries.sql", "privacy.sql", "writer.sql", "setup.sql", "keys.sql", "consent.sql",
        "results.sql", "operations.sql"}
    assert sorted(n.replace("-", "_") for n in names) == sorted(f.name for f in fields(Queries))
    assert load(sql_dir()) == QUERIES
    assert QUERIES.ping == "-- Readiness (web/health.py): PostgreSQL answers.\nselect 1;"


def test_a_name_no_file_defines_is_an_error_naming_it_and_the_files(sql_copy: Path) -> None:
    _edit(sql_copy / "privacy.sql", "-- name: opt-in\n", "-- name: opt-inn\n")
    with pytest.raises(QueryFileError) as caught:
        load(sql_copy)
    assert str(caught.value).splitlines() == [
        f"{sql_copy / 'privacy.sql'}: unknown query 'opt-inn' (the code has no "
        "QUERIES.opt_inn)",
        f"{sql_copy}: missing 'opt-in' (looked in consent.sql, keys.sql, operations.sql, "
        "privacy.sql, queries.sql, results.sql, setup.sql, writer.sql)"]


def test_a_name_defined_in_two_files_is_an_error_naming_both(sql_copy: Path) -> None:
    (sql_copy / "extra.sql").write_text("-- name: ping\nselect 2;\n")
    with pytest.raises(QueryFileError, match=re.escape(
            f"{sql_copy / 'queries.sql'}: query 'ping' is also defined in extra.sql")):
        load(sql_copy)


@pytest.mark.parametrize(("text", "problem"), [
    ("select 1;\n-- name: ping\nselect 1;\n", "SQL before the first '-- name:' line"),
    ("-- name: Ping\nselect 1;\n", "bad query name 'Ping' (lower case, digits and dashes)"),
    ("-- name: ping\n-- nothing here\n", "query 'ping' is empty"),
    ("create table t (a int);\n", "no '-- name:' blocks (a migration must be named "
                                  "NNNN_name.sql)"),
])
def test_a_malformed_query_file_is_an_error_naming_it(sql_copy: Path, text: str,
                                                      problem: str) -> None:
    (sql_copy / "bad.sql").write_text(text)
    with pytest.raises(QueryFileError, match=re.escape(f"{sql_copy / 'bad.sql'}: {problem}")):
        load(sql_copy)


def test_a_missing_name_stops_tracker_at_start_up(tmp_path: Path) -> None:
    """An installed tracker (its sql/ inside the package) whose query files lack a name the
    code uses does not start: the command fails before it does anything, naming the file."""
    package = tmp_path / "site" / "tracker"
    shutil.copytree(ROOT / "tracker", package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(sql_dir(), package / "sql")
    _edit(package / "sql" / "writer.sql", "-- name: roll-up-campaigns\n",
          "-- name: roll-up-campaign\n")
    result = subprocess.run([sys.executable, "-m", "tracker", "--help"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "usage:" not in result.stdout
    assert (f"{package / 'sql' / 'writer.sql'}: unknown query 'roll-up-campaign'"
            in result.stderr), result.stderr
    assert "missing 'roll-up-campaigns'" in result.stderr


def test_a_table_placeholder_takes_a_quoted_identifier() -> None:
    assert quote_identifier("events_20250101") == '"events_20250101"'
    assert quote_identifier('a"; drop table events; --') == '"a""; drop table events; --"'
    assert for_table(QUERIES.drop_event_partition, "events_20250101").endswith(
        'drop table "events_20250101";')
    with pytest.raises(ValueError, match=re.escape("no {table} placeholder")):
        for_table(QUERIES.ping, "events_20250101")
    with pytest.raises(ValueError, match="not an identifier"):
        quote_identifier("")


# What a statement looks like, as opposed to prose that uses the same words.
_SQL = re.compile(r"""(?isx)\b(
    select\b.+\bfrom\b | select\s+\d | select\s+\w+\( | insert\s+into | delete\s+from
    | update\s+\w+\s+set | (create|alter|drop)\s+(temp\w*\s+|unique\s+)?(table|index|function)
    | on\s+conflict | returning\s | pg_advisory | set\s+local
)""")


def test_no_sql_is_left_in_the_python() -> None:
    """No string, docstring or comment in tracker/ holds a statement: they are all in sql/."""
    found = []
    for path in sorted((ROOT / "tracker").rglob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and _SQL.search(node.value)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value[:60]!r}")
        for number, line in enumerate(source.splitlines(), 1):
            comment = line.partition("#")[2]
            if _SQL.search(comment):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
