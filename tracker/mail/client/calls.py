"""An operation of the API as data, written once for the sync and the async client.

An operation is a generator: it yields the HTTP calls it needs (`Call`), is sent each
call's decoded JSON answer (or has the call's `TrackerError` thrown into it), and returns
a typed result. It never touches the network; `transport.py` drives it.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import quote

T = TypeVar("T")
Id = int | str


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    path: str
    body: Any = None
    params: Mapping[str, str] | None = None


# An operation: yields calls, is sent each call's decoded JSON answer, returns its result.
Op = Generator[Call, Any, T]


def path_id(value: Id) -> str:
    # Quoted, so that an id such as "../x" names nothing rather than another endpoint.
    return quote(str(value), safe="")


def given(**fields: Any) -> dict[str, Any]:
    """The keyword arguments that were given (not None), for a POST or PATCH body."""
    return {name: value for name, value in fields.items() if value is not None}


def selection(tag: str | None, since: datetime | None,
              until: datetime | None) -> dict[str, str]:
    """The query parameters choosing campaigns or messages by tag and time."""
    params = {"tag": tag, "from": since.isoformat() if since else None,
              "to": until.isoformat() if until else None}
    return {name: value for name, value in params.items() if value is not None}
