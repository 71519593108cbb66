"""A delivery's request: its body and its Standard Webhooks headers.

Signed by the specification's reference library (`standardwebhooks`): HMAC-SHA256 over
`id.timestamp.body`, `v1,<base64>`, one signature per secret in force (two while a rotated
secret overlaps the new one). The `webhook-id` is made from the endpoint and the events'
ids, so a retry of the same events carries the same id, and a receiver can drop one it
has already taken.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook

USER_AGENT = "tracker-webhooks"


def delivery_id(endpoint_id: int, events: Sequence[dict[str, Any]]) -> str:
    digest = hashlib.sha256(str(endpoint_id).encode())
    for event in events:
        digest.update(b"," + event["id"].encode())
    return "msg_" + digest.hexdigest()[:32]


def signed_request(endpoint_id: int, secrets: Sequence[str],
                   events: Sequence[dict[str, Any]],
                   now: datetime | None = None) -> tuple[str, bytes, dict[str, str]]:
    """(webhook id, body, headers) of a delivery of `events`."""
    body = orjson.dumps({"events": list(events)})
    message_id = delivery_id(endpoint_id, events)
    at = now or datetime.now(UTC)
    signature = " ".join(Webhook(secret).sign(message_id, at, body) for secret in secrets)
    return message_id, body, {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
    }
