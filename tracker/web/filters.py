"""Query parameters of the lists and reports, read and checked: a bad one is a 422 that
names it, never ignored (web/http.py refuses the unknown ones).

- `tag`, `from`, `to`: the messages (or campaigns) with a tag, sent (created) at or after
  `from` and before `to` (ISO 8601; without a zone, UTC);
- `status`, `link`, `client`, `country`, `search`: which messages of a campaign;
- `cursor`, `limit`: pages. A cursor is opaque: it carries the last id of the page before
  and a digest of the filter it was made for, so one used with another filter is refused
  rather than quietly giving a wrong page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from datetime import UTC, datetime

from starlette.datastructures import QueryParams

from tracker.store.labels import InvalidLabel, check_tag
from tracker.store.results import STATUSES, MessageFilter, Selection
from tracker.web.http import HttpError

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
SELECTION = frozenset({"tag", "from", "to"})
_CURSOR = struct.Struct(">BQ8s")
_CURSOR_VERSION = 1
_MAX_TEXT = 320


def _one(params: QueryParams, name: str) -> str | None:
    values = params.getlist(name)
    if len(values) > 1:
        raise HttpError(422, f"{name}: given {len(values)} times; give it once")
    return values[0] if values else None


def time_param(params: QueryParams, name: str) -> datetime | None:
    raw = _one(params, name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise HttpError(422, f"{name}: {raw!r} is not an ISO 8601 date-time") from None
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    if not 1970 <= value.astimezone(UTC).year <= 9998:
        raise HttpError(422, f"{name}: must lie between 1970 and 9998")
    return value


def selection(params: QueryParams) -> Selection:
    raw_tag = _one(params, "tag")
    try:
        tag = check_tag(raw_tag, "tag") if raw_tag is not None else None
    except InvalidLabel as exc:
        raise HttpError(422, str(exc)) from None
    since, until = time_param(params, "from"), time_param(params, "to")
    if since is not None and until is not None and since >= until:
        raise HttpError(422, "from: must be before to")
    return Selection(tag, since, until)


def text_param(params: QueryParams, name: str) -> str | None:
    raw = _one(params, name)
    if raw is None:
        return None
    if not raw.strip() or len(raw) > _MAX_TEXT or not raw.isprintable():
        raise HttpError(422, f"{name}: must be 1 to {_MAX_TEXT} printable characters")
    return raw.strip()


def status(params: QueryParams) -> str | None:
    raw = _one(params, "status")
    if raw is not None and raw not in STATUSES:
        raise HttpError(422, f"status: must be one of {', '.join(STATUSES)}")
    return raw


def country(params: QueryParams) -> str | None:
    raw = _one(params, "country")
    if raw is None:
        return None
    if not (len(raw) == 2 and raw.isascii() and raw.isalpha()):
        raise HttpError(422, "country: an ISO 3166-1 alpha-2 code, such as DE")
    return raw.upper()


def limit(params: QueryParams, default: int | None = DEFAULT_LIMIT) -> int | None:
    raw = _one(params, "limit")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
        raise HttpError(422, f"limit: a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


def _digest(found: MessageFilter) -> bytes:
    return hashlib.sha256(repr(found).encode()).digest()[:8]


def make_cursor(last_id: int, found: MessageFilter) -> str:
    raw = _CURSOR.pack(_CURSOR_VERSION, last_id, _digest(found))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def read_cursor(params: QueryParams, found: MessageFilter) -> int | None:
    raw = _one(params, "cursor")
    if raw is None:
        return None
    try:
        data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        version, last_id, digest = _CURSOR.unpack(data)
    except (binascii.Error, ValueError, struct.error):
        raise HttpError(422, "cursor: not a cursor this API handed out") from None
    if version != _CURSOR_VERSION:
        raise HttpError(422, "cursor: not a cursor this API handed out")
    if digest != _digest(found):
        raise HttpError(422, "cursor: made for other filters; start again without it")
    return int(last_id)
