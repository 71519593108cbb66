"""Campaigns: a name and the policy that decides what may be stored about their hits."""

from __future__ import annotations

import unicodedata
from typing import Any

import asyncpg

from tracker.ingest.policy import DEFAULT, Policy
from tracker.store.queries import QUERIES

MAX_NAME_CHARS = 200


def policy_of(row: asyncpg.Record) -> Policy:
    return Policy(location=row["policy_location"], device=row["policy_device"],
                  ip=row["policy_ip"], retention_days=row["retention_days"],
                  recipient=row["policy_recipient"])


def campaign_json(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": str(row["id"]), "name": row["name"], "policy": policy_of(row).as_json(),
            "created_at": row["created_at"].isoformat()}


def check_name(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("name: must be a non-empty string")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError("name: contains a control character")
    if len(value) > MAX_NAME_CHARS:  # as given, white space included (the OpenAPI's maxLength)
        raise ValueError(f"name: longer than {MAX_NAME_CHARS} characters")
    return value.strip()


async def create(conn: asyncpg.Connection | asyncpg.Pool, account_id: int, name: str,
                 policy: Policy = DEFAULT) -> asyncpg.Record:
    row: asyncpg.Record = await conn.fetchrow(
        QUERIES.create_campaign, account_id, name, policy.location, policy.device, policy.ip,
        policy.retention_days, policy.recipient)
    return row


async def get(conn: asyncpg.Connection | asyncpg.Pool, account_id: int,
              campaign_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(QUERIES.get_campaign, account_id, campaign_id)
    return row


async def update(conn: asyncpg.Connection | asyncpg.Pool, account_id: int, campaign_id: int,
                 name: str, policy: Policy) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        QUERIES.update_campaign, account_id, campaign_id, name, policy.location, policy.device,
        policy.ip, policy.retention_days, policy.recipient)
    return row
