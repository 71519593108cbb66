"""What a dashboard request brings, checked: form bodies, ids in paths, the time zone,
whether a POST comes from this site."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import asyncpg
from starlette.requests import Request

from tracker.store import campaigns, reports
from tracker.web.http import HttpError

_MAX_FORM_BYTES = 16 * 1024
_MAX_ID = 2**63 - 1


def same_origin(request: Request) -> bool:
    """False when the browser says the POST comes from another site.

    Sec-Fetch-Site is set by every current browser and cannot be forged by a page; an
    older browser still sends Origin on a form POST. A client that sends neither is not
    a browser, so it has no ambient cookie to abuse."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form body (the only kind these pages send), first value per field."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            raise HttpError(413, "That form is too large.")
    if media_type != "application/x-www-form-urlencoded":
        return {}
    try:
        fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True,
                          max_num_fields=16)
    except ValueError:
        raise HttpError(400, "That form has too many fields.") from None
    return {name: values[0] for name, values in fields.items()}


def parse_id(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > _MAX_ID:
        raise HttpError(404, "There is no such page.")
    return int(raw)


def object_id(request: Request) -> int:
    return parse_id(request.path_params["id"])


def zone_of(request: Request) -> tuple[str, ZoneInfo]:
    tz = request.query_params.get("tz") or "UTC"
    try:
        return tz, reports.zone(tz)
    except reports.UnknownTimeZone:
        raise HttpError(400, f"Unknown time zone {tz!r}.") from None


async def own_campaign(conn: asyncpg.Connection, account_id: int,
                       campaign_id: int) -> asyncpg.Record:
    row = await campaigns.get(conn, account_id, campaign_id)
    if row is None:  # someone else's or deleted: the same answer, so nothing is revealed
        raise HttpError(404, "There is no such campaign.")
    return row
