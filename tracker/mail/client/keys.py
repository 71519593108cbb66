"""The account's named API keys: list, create, rotate, revoke."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from tracker.mail.client.calls import Call, Op, path_id
from tracker.mail.client.results import ApiKey, NewApiKey
from tracker.mail.client.transport import operation


class Keys:
    """The calls on API keys, for Client and AsyncClient."""

    @operation
    def list_keys(self) -> Op[list[ApiKey]]:
        return [_api_key(item) for item in (yield Call("GET", "/api/keys"))]

    @operation
    def create_key(self, name: str, scope: str) -> Op[NewApiKey]:
        """A new key ("read", "register" or "full"); its secret is in the answer only."""
        return _new_key((yield Call("POST", "/api/keys", {"name": name, "scope": scope})))

    @operation
    def rotate_key(self, key_id: str) -> Op[NewApiKey]:
        """A new key with the old one's name and scope; the old one is refused at once."""
        return _new_key((yield Call("POST", f"/api/keys/{path_id(key_id)}/rotate")))

    @operation
    def revoke_key(self, key_id: str) -> Op[None]:
        yield Call("DELETE", f"/api/keys/{path_id(key_id)}")


def _api_key(data: Mapping[str, Any]) -> ApiKey:
    return ApiKey(data["id"], data["name"], data["scope"],
                  datetime.fromisoformat(data["created_at"]), _time(data["last_used_at"]))


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


def _new_key(data: Mapping[str, Any]) -> NewApiKey:
    return NewApiKey(_api_key(data), data["api_key"])
