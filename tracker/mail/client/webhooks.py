"""Events out: webhook endpoints (create, list, read, change, delete, rotate the signing
secret, replay a time range) and the pull stream of stored events."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from tracker.mail.client.calls import Call, Id, Op, given, path_id
from tracker.mail.client.results import EventPage, Webhook
from tracker.mail.client.transport import operation


class Webhooks:
    """The calls on webhooks and the event stream, for Client and AsyncClient."""

    @operation
    def create_webhook(self, url: str, *, events: Sequence[str] | None = None,
                       campaign_id: Id | None = None, machine: bool | None = None,
                       concurrency: int | None = None) -> Op[Webhook]:
        """A webhook endpoint; its `secret` (to verify deliveries) is shown this once."""
        return _create_webhook(url, given(
            events=None if events is None else list(events),
            campaign_id=None if campaign_id is None else str(campaign_id),
            machine=machine, concurrency=concurrency))

    @operation
    def list_webhooks(self) -> Op[list[Webhook]]:
        return [_webhook(item) for item in (yield Call("GET", "/api/webhooks"))]

    @operation
    def get_webhook(self, webhook_id: Id) -> Op[Webhook]:
        return _webhook((yield _webhook_call("GET", webhook_id)))

    @operation
    # `self, /`: positional only, so that **fields may hold any name (as in dict()).
    def update_webhook(self, /, webhook_id: Id, **fields: Any) -> Op[Webhook]:
        """Change `url`, `events`, `campaign_id`, `machine` or `enabled`."""
        return _webhook((yield _webhook_call("PATCH", webhook_id, body=dict(fields))))

    @operation
    def delete_webhook(self, webhook_id: Id) -> Op[None]:
        yield _webhook_call("DELETE", webhook_id)

    @operation
    def rotate_webhook_secret(self, webhook_id: Id) -> Op[Webhook]:
        return _webhook((yield _webhook_call("POST", webhook_id, "/rotate-secret")))

    @operation
    def replay_webhook(self, webhook_id: Id, since: datetime,
                       until: datetime) -> Op[dict[str, Any]]:
        """Send the endpoint's events stored for times in [since, until) again."""
        answer: dict[str, Any] = yield _webhook_call(
            "POST", webhook_id, "/replay", {"from": since.isoformat(), "to": until.isoformat()})
        return answer

    @operation
    def pull_events(self, after: str | None = None, limit: int = 100) -> Op[EventPage]:
        """The events stored after the cursor `after` (from the oldest if None)."""
        params = {"limit": str(limit), **({"after": after} if after else {})}
        answer = yield Call("GET", "/api/events", params=params)
        return EventPage(answer["events"], answer["next"])


def _webhook(data: Mapping[str, Any]) -> Webhook:
    return Webhook(str(data["id"]), data["url"], tuple(data["events"]), data["campaign_id"],
                   data["machine"], data["concurrency"], data["enabled"],
                   data["disabled_reason"], data.get("secret"), data.get("stats"))


def _create_webhook(url: str, fields: Mapping[str, Any]) -> Op[Webhook]:
    return _webhook((yield Call("POST", "/api/webhooks", {"url": url, **fields})))


def _webhook_call(method: str, webhook_id: Id, tail: str = "", body: Any = None) -> Call:
    return Call(method, f"/api/webhooks/{path_id(webhook_id)}{tail}", body)
