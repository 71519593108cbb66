"""Webhook endpoints: where an account's events go, which of them, and the secret that
signs them (sql/webhooks.sql). Delivery itself is tracker/delivery/.

An endpoint's URL is https, or http to a loopback address (a receiver on the same
machine: development and tests). Its signing secret is a Standard Webhooks secret
(`whsec_` and base64 of 32 random bytes); the API shows it when the endpoint is made and
when it is rotated, never otherwise. After a rotation the old secret signs beside the
new one for `ROTATION_OVERLAP`, so a receiver can switch without refusing a delivery.
"""

from __future__ import annotations

import base64
import ipaddress
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from tracker.store.queries import QUERIES

EVENT_TYPES = ("open", "click", "relabel")
MAX_URL_CHARS = 2000
MAX_CONCURRENCY = 16
ROTATION_OVERLAP = timedelta(hours=24)
_LOOPBACK_NAMES = {"localhost"}


class InvalidWebhook(ValueError):
    """What a client asked of an endpoint cannot be; the message names the field."""


@dataclass(frozen=True)
class EndpointFields:
    url: str
    events: tuple[str, ...]
    campaign_id: int | None
    machine: bool
    enabled: bool = True
    concurrency: int = 1

    def updated(self, body: Mapping[str, Any]) -> EndpointFields:
        """These fields with what a POST or PATCH body gives, each checked."""
        return EndpointFields(
            url=check_url(body["url"]) if "url" in body else self.url,
            events=_events(body["events"]) if "events" in body else self.events,
            campaign_id=(_campaign(body["campaign_id"]) if "campaign_id" in body
                         else self.campaign_id),
            machine=_bool(body, "machine", self.machine),
            enabled=_bool(body, "enabled", self.enabled),
            concurrency=(_concurrency(body["concurrency"]) if "concurrency" in body
                         else self.concurrency))


NEW = EndpointFields(url="", events=("open", "click", "relabel"), campaign_id=None,
                     machine=True)


def check_url(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidWebhook("url: must be a non-empty string")
    url = value.strip()
    if len(url) > MAX_URL_CHARS:
        raise InvalidWebhook(f"url: longer than {MAX_URL_CHARS} characters")
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise InvalidWebhook("url: must be ASCII without white space or control characters "
                             "(percent-encode the rest; an IDN host in its xn-- form)")
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 -- raises on a bad port
    except ValueError as exc:
        raise InvalidWebhook(f"url: {exc}") from None
    if not host or parts.username or parts.password or parts.fragment:
        raise InvalidWebhook("url: must be an absolute URL with a host, and no user, "
                             "password or fragment")
    if parts.scheme == "https":
        return url
    if parts.scheme == "http" and _loopback(host):
        return url
    raise InvalidWebhook("url: must be https (http only to a loopback address)")


def _loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _events(value: object) -> tuple[str, ...]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, str) and v in EVENT_TYPES for v in value)):
        raise InvalidWebhook(f"events: must be a non-empty list of {', '.join(EVENT_TYPES)}")
    return tuple(t for t in EVENT_TYPES if t in value)


def _campaign(value: object) -> int | None:
    if value is None:
        return None
    text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 2**63:
        raise InvalidWebhook("campaign_id: must be a campaign id or null")
    return int(text)


def _bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise InvalidWebhook(f"{name}: must be true or false")
    return value


def _concurrency(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_CONCURRENCY:
        raise InvalidWebhook(f"concurrency: must be a whole number from 1 to {MAX_CONCURRENCY}")
    return value


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def fields_of(row: asyncpg.Record) -> EndpointFields:
    return EndpointFields(url=row["url"], events=tuple(row["events"]),
                          campaign_id=row["campaign_id"], machine=row["machine"],
                          enabled=row["enabled"], concurrency=row["concurrency"])


def webhook_json(row: asyncpg.Record, secret: bool = False) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "id": str(row["id"]), "url": row["url"], "events": list(row["events"]),
        "campaign_id": None if row["campaign_id"] is None else str(row["campaign_id"]),
        "machine": row["machine"], "concurrency": row["concurrency"],
        "enabled": row["enabled"], "disabled_reason": row["disabled_reason"],
        "disabled_at": _iso(row["disabled_at"]), "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"])}
    if secret:
        answer["secret"] = row["secret"]
    return answer


def stats_json(row: asyncpg.Record) -> dict[str, Any]:
    return {"delivered": row["delivered"], "failed": row["failed"],
            "retrying": row["retrying"], "replays": row["replays"],
            "oldest_pending_seconds": round(row["oldest_pending_s"], 3),
            "last_error": row["last_error"]}


def attempt_json(row: asyncpg.Record) -> dict[str, Any]:
    return {"at": _iso(row["at"]), "webhook_id": row["webhook_id"], "events": row["events"],
            "status": row["status"], "duration_ms": row["duration_ms"], "error": row["error"]}


async def create(conn: asyncpg.Connection | asyncpg.Pool, account_id: int,
                 f: EndpointFields) -> asyncpg.Record:
    row: asyncpg.Record = await conn.fetchrow(
        QUERIES.create_webhook, account_id, f.url, list(f.events), f.campaign_id, f.machine,
        f.concurrency, new_secret())
    return row


async def get(conn: asyncpg.Connection | asyncpg.Pool, account_id: int,
              endpoint_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(QUERIES.get_webhook, account_id,
                                                     endpoint_id)
    return row


async def update(conn: asyncpg.Connection | asyncpg.Pool, account_id: int, endpoint_id: int,
                 f: EndpointFields) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        QUERIES.update_webhook, account_id, endpoint_id, f.url, list(f.events), f.campaign_id,
        f.machine, f.enabled)
    return row


async def rotate_secret(conn: asyncpg.Connection | asyncpg.Pool, account_id: int,
                        endpoint_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        QUERIES.rotate_webhook_secret, account_id, endpoint_id, new_secret(),
        datetime.now(UTC) + ROTATION_OVERLAP)
    return row


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
