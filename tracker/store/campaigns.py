"""Campaigns: a name, the policy that decides what may be stored about their hits, the
sender's tags and metadata, and the link options registration applies (mail/options.py,
kept here as the JSON it stores)."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from tracker.ingest.policy import DEFAULT, Policy
from tracker.store.labels import decode_metadata, encode_metadata
from tracker.store.queries import QUERIES

MAX_NAME_CHARS = 200
# What a campaign stored before it had options holds (sql/0010_link_options.sql's default).
DEFAULT_OPTIONS_JSON = '{"utm": null, "track_url_text": false, "pixel": "bottom"}'


@dataclass(frozen=True)
class Labels:
    """A campaign's tags and metadata, and its link options as stored JSON."""
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    options: str = DEFAULT_OPTIONS_JSON


def policy_of(row: asyncpg.Record) -> Policy:
    return Policy(location=row["policy_location"], device=row["policy_device"],
                  ip=row["policy_ip"], retention_days=row["retention_days"],
                  recipient=row["policy_recipient"],
                  consent_opens=row["policy_consent_opens"],
                  consent_clicks=row["policy_consent_clicks"])


def labels_of(row: asyncpg.Record) -> Labels:
    return Labels(list(row["tags"]), decode_metadata(row["metadata"]), row["options"])


def campaign_json(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": str(row["id"]), "name": row["name"], "policy": policy_of(row).as_json(),
            "created_at": row["created_at"].isoformat(), "tags": list(row["tags"]),
            "metadata": decode_metadata(row["metadata"]),
            "options": orjson.loads(row["options"])}


def check_name(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("name: must be a non-empty string")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError("name: contains a control character")
    if len(value) > MAX_NAME_CHARS:  # as given, white space included (the OpenAPI's maxLength)
        raise ValueError(f"name: longer than {MAX_NAME_CHARS} characters")
    return value.strip()


async def create(conn: asyncpg.Connection | asyncpg.Pool, account_id: int, name: str,
                 policy: Policy = DEFAULT, labels: Labels | None = None) -> asyncpg.Record:
    labels = labels or Labels()
    row: asyncpg.Record = await conn.fetchrow(
        QUERIES.create_campaign, account_id, name, policy.location, policy.device, policy.ip,
        policy.retention_days, policy.recipient, policy.consent_opens, policy.consent_clicks,
        labels.tags, encode_metadata(labels.metadata), labels.options)
    return row


async def get(conn: asyncpg.Connection | asyncpg.Pool, account_id: int,
              campaign_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(QUERIES.get_campaign, account_id, campaign_id)
    return row


async def find(conn: asyncpg.Connection | asyncpg.Pool, account_id: int, tag: str | None = None,
               since: datetime | None = None, until: datetime | None = None
               ) -> list[asyncpg.Record]:
    """The account's campaigns, with `tag`, created in [since, until) (None: any)."""
    rows: list[asyncpg.Record] = await conn.fetch(QUERIES.list_campaigns, account_id, tag,
                                                  since, until)
    return rows


async def update(conn: asyncpg.Connection | asyncpg.Pool, account_id: int, campaign_id: int,
                 name: str, policy: Policy, labels: Labels) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        QUERIES.update_campaign, account_id, campaign_id, name, policy.location, policy.device,
        policy.ip, policy.retention_days, policy.recipient, policy.consent_opens,
        policy.consent_clicks, labels.tags, encode_metadata(labels.metadata), labels.options)
    return row
