"""Named SQL queries from sql/queries.sql (`-- name: some-name` blocks), as listmonk keeps them.

Every query the code uses is a field of `Queries`; loading checks that the file
defines exactly those names, so a typo fails at start-up rather than mid-request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar

from tracker.store.migrations import sql_dir

_NAME = re.compile(r"^-- name: ([a-z0-9-]+)\s*$", re.MULTILINE)
Q = TypeVar("Q")


class QueryFileError(RuntimeError):
    pass


@dataclass(frozen=True)
class Queries:
    create_account: str
    create_campaign: str
    list_campaigns: str
    get_campaign: str
    update_campaign: str
    delete_campaign: str
    campaign_policies_since: str
    reserve_message_ids: str
    insert_urls: str
    find_urls: str
    get_message: str
    message_events: str
    report_totals: str
    report_links: str
    report_timeline: str
    report_breakdown: str
    export_events: str


def load(path: Path) -> Queries:
    return load_as(path, Queries)


def load_as(path: Path, kind: type[Q]) -> Q:
    """The named queries of `path` as a `kind`, a dataclass with one str field per name."""
    text = path.read_text()
    parts = _NAME.split(text)
    found = {name.replace("-", "_"): sql.strip() for name, sql in zip(parts[1::2], parts[2::2],
                                                                        strict=True)}
    expected = {f.name for f in fields(kind)}  # type: ignore[arg-type]
    missing, unknown = expected - set(found), set(found) - expected
    if missing or unknown:
        raise QueryFileError(f"{path}: missing queries {sorted(missing)}, "
                             f"unknown queries {sorted(unknown)}")
    return kind(**found)


QUERIES = load(sql_dir() / "queries.sql")
