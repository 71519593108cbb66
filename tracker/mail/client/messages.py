"""Messages: register one or any number, read one with its events, list a campaign's
messages with their readers' counts, export them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from tracker.mail.client.calls import Call, Id, Op, path_id, selection
from tracker.mail.client.errors import InvalidRequest, ItemError, TrackerError
from tracker.mail.client.results import (
    Event,
    Link,
    Message,
    MessagePage,
    MessageResult,
    NewMessage,
    Registered,
)
from tracker.mail.client.transport import operation

# The server takes up to 5,000 messages a call; 1,000 keeps one call (with HTML bodies)
# to a few MB and well inside a timeout, and costs one round trip per 1,000 messages.
BATCH_SIZE = 1000


class Messages:
    """The calls on messages, for Client and AsyncClient (which add iter_messages)."""

    @operation
    def register_message(self, campaign_id: Id, recipient: str, *,
                         subject: str | None = None, sent_at: datetime | None = None,
                         links: Sequence[str | Mapping[str, Any]] = (),
                         html: str | None = None, tags: Sequence[str] = (),
                         metadata: Mapping[str, Any] | None = None) -> Op[Registered]:
        return _register_message(
            campaign_id, NewMessage(recipient, subject, sent_at, links, html, tags, metadata))

    @operation
    def register_batch(self, campaign_id: Id, messages: Iterable[NewMessage], *,
                       batch_size: int = BATCH_SIZE) -> Op[list[Registered]]:
        """Registers any number of messages, `batch_size` per call; results in input order.
        Each call is all or nothing; when one fails, the earlier calls' messages stay
        registered and are in the exception's `registered`."""
        # Checked now, not when the operation first runs: there a ValueError would pass
        # for an answer of an unexpected shape.
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        return _register_chunks(f"/api/campaigns/{path_id(campaign_id)}/messages/batch",
                                list(messages), batch_size)

    @operation
    def get_message(self, message_id: Id) -> Op[Message]:
        return _message((yield Call("GET", f"/api/messages/{path_id(message_id)}")))

    @operation
    def list_messages(self, campaign_id: Id, *, status: str | None = None,
                      link: str | None = None, tag: str | None = None,
                      since: datetime | None = None, until: datetime | None = None,
                      client: str | None = None, country: str | None = None,
                      search: str | None = None, cursor: str | None = None,
                      limit: int | None = None) -> Op[MessagePage]:
        """A page of the campaign's messages with their readers' counts. `status`: opened,
        clicked, not_opened, machine_only or untracked; `link`: its reader clicked this
        destination; `cursor`: the page's `next` before."""
        return _list_messages(campaign_id, _message_params(
            status, link, tag, since, until, client, country, search, cursor, limit))

    @operation
    # `self, /`: positional only, so that **filters may hold any name.
    def export_messages(self, /, campaign_id: Id, format: str = "csv",
                        **filters: Any) -> Op[bytes]:
        """Every matching message as CSV or JSON Lines (`format`), as the server sends it."""
        params = {**_export_params(filters), "format": format}
        return _raw("GET", f"/api/campaigns/{path_id(campaign_id)}/messages", params)


def _message_json(message: NewMessage) -> dict[str, Any]:
    body: dict[str, Any] = {"recipient": message.recipient}
    if message.subject is not None:
        body["subject"] = message.subject
    if message.sent_at is not None:
        body["sent_at"] = message.sent_at.isoformat()
    if message.links:
        body["links"] = [link if isinstance(link, str) else dict(link)
                         for link in message.links]
    if message.html is not None:
        body["html"] = message.html
    if message.tags:
        body["tags"] = list(message.tags)
    if message.metadata:
        body["metadata"] = dict(message.metadata)
    return body


def _registered(data: Mapping[str, Any]) -> Registered:
    return Registered(str(data["id"]), data["pixel_url"],
                      tuple(Link(link["url"], link["tracked_url"], link.get("destination"))
                            for link in data["links"]),
                      data.get("html"))


def _register_message(campaign_id: Id, message: NewMessage) -> Op[Registered]:
    path = f"/api/campaigns/{path_id(campaign_id)}/messages"
    return _registered((yield Call("POST", path, _message_json(message))))


_ITEM_PREFIX = re.compile(r"^messages\[(\d+)\]")


def _register_chunks(path: str, items: list[NewMessage],
                     batch_size: int) -> Op[list[Registered]]:
    done: list[Registered] = []
    for offset in range(0, len(items), batch_size):
        chunk = items[offset:offset + batch_size]
        try:
            answer = yield Call("POST", path, {"messages": [_message_json(m) for m in chunk]})
        except TrackerError as exc:
            exc.registered = tuple(done)
            if isinstance(exc, InvalidRequest) and exc.errors:
                # The server counts from the start of its call; the caller from the start
                # of the whole list, in the index and in the text ("messages[3].links[0]").
                def shift(match: re.Match[str], offset: int = offset) -> str:
                    return f"messages[{int(match.group(1)) + offset}]"
                exc.errors = tuple(ItemError(e.index + offset, _ITEM_PREFIX.sub(shift, e.error))
                                   for e in exc.errors)
            raise
        done.extend(_registered(item) for item in answer["messages"])
    return done


def _event(data: Mapping[str, Any]) -> Event:
    return Event(data["type"], datetime.fromisoformat(data["at"]), data["url"], data["country"],
                 data["region"], data["city"], data["browser"], data["os"], data["device"],
                 data["machine"], data["reason"])


def _message(data: Mapping[str, Any]) -> Message:
    return Message(str(data["id"]), data["recipient"], data["subject"],
                   datetime.fromisoformat(data["sent_at"]),
                   tuple(_event(e) for e in data["events"]))


def _message_params(status: str | None, link: str | None, tag: str | None,
                    since: datetime | None, until: datetime | None, client: str | None,
                    country: str | None, search: str | None, cursor: str | None,
                    limit: int | None) -> dict[str, str]:
    params = {"status": status, "link": link, "client": client, "country": country,
              "search": search, "cursor": cursor,
              "limit": str(limit) if limit is not None else None}
    return {**{k: v for k, v in params.items() if v is not None},
            **selection(tag, since, until)}


def _message_result(data: Mapping[str, Any]) -> MessageResult:
    return MessageResult(str(data["id"]), data["recipient"], data["subject"],
                         datetime.fromisoformat(data["sent_at"]), data["opens"], data["clicks"],
                         data["machine"])


def _list_messages(campaign_id: Id, params: dict[str, str]) -> Op[MessagePage]:
    page = yield Call("GET", f"/api/campaigns/{path_id(campaign_id)}/messages", params=params)
    return MessagePage(tuple(_message_result(m) for m in page["messages"]), page["next"])


_FILTERS = ("status", "link", "tag", "since", "until", "client", "country", "search", "cursor",
            "limit")


def _export_params(filters: Mapping[str, Any]) -> dict[str, str]:
    unknown = set(filters) - set(_FILTERS)
    if unknown:
        raise TypeError(f"unknown filter(s): {', '.join(sorted(unknown))}")
    return _message_params(**{name: filters.get(name) for name in _FILTERS})


def _raw(method: str, path: str, params: dict[str, str]) -> Op[bytes]:
    body: bytes = yield Call(method, path, params=params)
    return body
