"""A typed Python client for tracker's management API: `Client` (sync) and `AsyncClient`.

    from tracker.mail.client import Client, NewMessage

    with Client("http://127.0.0.1:8000", api_key) as tracker:   # or Client.from_env()
        campaign = tracker.create_campaign("November newsletter", policy={"location": "country"})
        sent = tracker.register_message(campaign.id, "ada@example.com", html=html)
        send_mail(to="ada@example.com", html=sent.html)
        tracker.register_batch(campaign.id, [NewMessage(r, html=html) for r in readers])
        print(tracker.report(campaign.id, tz="Europe/Berlin")["open_rate"])
        for row in tracker.iter_messages(campaign.id, status="not_opened"):
            print(row.recipient)                          # who did not open
        tracker.set_consent("ada@example.com", opens=True, clicks=True, method="signup form")

One request/response layer serves both: each operation is a generator that yields the
HTTP calls it needs (`_Call`) and receives their decoded JSON answers, then returns a
typed result. `Client` and `AsyncClient` only drive those generators over httpx's sync
or async transport, and map every failure to a `TrackerError` the same way.

Nothing is retried: a registration whose answer was lost may have been stored, and
sending it again would register the messages twice. `Unavailable` says when to retry.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, Self, TypedDict, TypeVar
from urllib.parse import quote

import httpx
import orjson

from tracker import __version__
from tracker.ingest.policy import Policy

__all__ = [
    "ApiKey", "AsyncClient", "AuthenticationError", "Campaign", "Client", "Consent", "Event",
    "Forbidden", "InvalidRequest", "ItemError", "Link", "Message", "MessagePage",
    "MessageResult", "NewApiKey", "NewMessage", "NotFound", "Policy", "Registered", "Report",
    "TrackerError", "Unavailable",
]

DEFAULT_URL = "http://127.0.0.1:8000"
# The server takes up to 5,000 messages a call; 1,000 keeps one call (with HTML bodies)
# to a few MB and well inside a timeout, and costs one round trip per 1,000 messages.
BATCH_SIZE = 1000
DEFAULT_TIMEOUT = 30.0

T = TypeVar("T")
Id = int | str


# --- errors -------------------------------------------------------------------------------

class TrackerError(Exception):
    """Any failure of a call. `status` is the HTTP status (None when there was no answer),
    `error` the server's error text. After a batch split over several calls fails, the
    messages of the calls that had succeeded are in `registered` (they are stored)."""

    def __init__(self, error: str, status: int | None = None) -> None:
        super().__init__(f"{error} (HTTP {status})" if status is not None else error)
        self.error = error
        self.status = status
        self.registered: tuple[Registered, ...] = ()


class AuthenticationError(TrackerError):
    """401: the API key is missing or wrong."""


class NotFound(TrackerError):
    """404: no such object in this account (another account's objects are not found either)."""


class Forbidden(TrackerError):
    """403: the API key's scope does not allow this (a read key makes no changes)."""


@dataclass(frozen=True, slots=True)
class ItemError:
    index: int  # in the list given to register_batch
    error: str


class InvalidRequest(TrackerError):
    """400, 413 or 422: the server refused the input. For a batch, `errors` names each bad
    message; none of the messages of that call was registered."""

    def __init__(self, error: str, status: int | None = None,
                 errors: Sequence[ItemError] = ()) -> None:
        super().__init__(error, status)
        self.errors = tuple(errors)


class Unavailable(TrackerError):
    """The server could not be reached, timed out, or answered 502/503/504 (its database is
    down). Worth retrying later; `retry_after` is the server's hint in seconds, if any."""

    def __init__(self, error: str, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(error, status)
        self.retry_after = retry_after


# --- results ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Campaign:
    id: str
    name: str
    policy: Policy
    created_at: datetime
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, Any] | None = None
    # {"utm": {...} | None, "track_url_text": bool, "pixel": "bottom" | "top"}
    options: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Link:
    url: str  # as registered
    tracked_url: str | None  # what goes into the message instead; None: leave the link as is
    destination: str | None = None  # where a click lands (`url` with the campaign's UTM)


@dataclass(frozen=True, slots=True)
class Registered:
    id: str
    pixel_url: str | None  # None: no pixel (no consent to opens, or the recipient opted out)
    links: tuple[Link, ...]  # the html's links in document order, then the `links` given
    html: str | None = None  # the instrumented document, when one was given


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to register: its links, its HTML (instrumented in the answer), or both.
    A link is a URL, or `{"url": ..., "text": ...}` with the text a reader sees."""
    recipient: str
    subject: str | None = None
    sent_at: datetime | None = None  # the server's clock when None; naive means UTC
    links: Sequence[str | Mapping[str, Any]] = ()
    html: str | None = None
    tags: Sequence[str] = ()
    metadata: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class MessageResult:
    """A message in a list of results: its readers' counts (kept after retention)."""
    id: str
    recipient: str  # the address, or its pseudonym in a pseudonymous campaign
    subject: str | None
    sent_at: datetime
    opens: int  # human opens
    clicks: int  # human clicks
    machine: int  # opens and clicks by machines


@dataclass(frozen=True, slots=True)
class MessagePage:
    messages: tuple[MessageResult, ...]
    next: str | None  # the cursor of the next page; None: this is the last


@dataclass(frozen=True, slots=True)
class Consent:
    address: str
    opens: bool
    clicks: bool
    method: str
    wording: str | None
    at: datetime  # when the recipient gave or refused it
    recorded_at: datetime
    history: tuple[Mapping[str, Any], ...] = ()  # the latest changes, newest first


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    scope: str  # "read", "register" or "full"
    created_at: datetime
    last_used_at: datetime | None  # to the minute


@dataclass(frozen=True, slots=True)
class NewApiKey:
    key: ApiKey
    api_key: str  # the secret, shown once


@dataclass(frozen=True, slots=True)
class Event:
    type: str  # "open" or "click"
    at: datetime
    url: str | None
    country: str | None
    region: str | None
    city: str | None
    browser: str | None
    os: str | None
    device: str | None
    machine: bool
    reason: str | None


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    recipient: str
    subject: str | None
    sent_at: datetime
    events: tuple[Event, ...] = ()


class Counts(TypedDict):
    total: int
    unique: int
    machine: int


class LinkCounts(TypedDict):
    url: str
    clicks: int
    unique_clicks: int


class Hour(TypedDict):
    at: str  # ISO 8601, the start of the hour in the report's time zone
    opens: int
    clicks: int


class Report(TypedDict):
    """The report object of the contract, as the server sends it."""
    campaign_id: str
    messages: int
    opens: Counts
    clicks: Counts
    open_rate: float
    click_rate: float
    click_to_open_rate: float
    links: list[LinkCounts]
    timeline: list[Hour]
    # "opens" / "clicks" -> dimension (country, region, browser, os, device) -> key -> count
    breakdown: dict[str, dict[str, dict[str, int]]]


# --- the shared request/response layer ----------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Call:
    method: str
    path: str
    body: Any = None
    params: Mapping[str, str] | None = None


# An operation: yields calls, is sent each call's decoded JSON answer, returns its result.
_Op = Generator[_Call, Any, T]


def _path_id(value: Id) -> str:
    # Quoted, so that an id such as "../x" names nothing rather than another endpoint.
    return quote(str(value), safe="")


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


def _policy_json(policy: Policy | Mapping[str, Any]) -> dict[str, Any]:
    return policy.as_json() if isinstance(policy, Policy) else dict(policy)


def _policy(data: Mapping[str, Any]) -> Policy:
    consent = data.get("consent") or {}
    return Policy(location=data["location"], device=data["device"], ip=data["ip"],
                  retention_days=data["retention_days"],
                  recipient=data.get("recipient", "address"),
                  consent_opens=consent.get("opens", False),
                  consent_clicks=consent.get("clicks", False))


def _campaign(data: Mapping[str, Any]) -> Campaign:
    return Campaign(str(data["id"]), data["name"], _policy(data["policy"]),
                    datetime.fromisoformat(data["created_at"]), tuple(data.get("tags", ())),
                    data.get("metadata"), data.get("options"))


def _registered(data: Mapping[str, Any]) -> Registered:
    return Registered(str(data["id"]), data["pixel_url"],
                      tuple(Link(link["url"], link["tracked_url"], link.get("destination"))
                            for link in data["links"]),
                      data.get("html"))


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


def _message_result(data: Mapping[str, Any]) -> MessageResult:
    return MessageResult(str(data["id"]), data["recipient"], data["subject"],
                         datetime.fromisoformat(data["sent_at"]), data["opens"], data["clicks"],
                         data["machine"])


def _consent(data: Mapping[str, Any]) -> Consent:
    return Consent(data["address"], data["opens"], data["clicks"], data["method"],
                   data["wording"], datetime.fromisoformat(data["at"]),
                   datetime.fromisoformat(data["recorded_at"]), tuple(data.get("history", ())))


def _api_key(data: Mapping[str, Any]) -> ApiKey:
    return ApiKey(data["id"], data["name"], data["scope"],
                  datetime.fromisoformat(data["created_at"]), _time(data["last_used_at"]))


def _event(data: Mapping[str, Any]) -> Event:
    return Event(data["type"], datetime.fromisoformat(data["at"]), data["url"], data["country"],
                 data["region"], data["city"], data["browser"], data["os"], data["device"],
                 data["machine"], data["reason"])


def _message(data: Mapping[str, Any]) -> Message:
    return Message(str(data["id"]), data["recipient"], data["subject"],
                   datetime.fromisoformat(data["sent_at"]),
                   tuple(_event(e) for e in data["events"]))


def _labels_json(body: dict[str, Any], tags: Sequence[str] | None,
                 metadata: Mapping[str, Any] | None,
                 options: Mapping[str, Any] | None) -> dict[str, Any]:
    if tags is not None:
        body["tags"] = list(tags)
    if metadata is not None:
        body["metadata"] = dict(metadata)
    if options is not None:
        body["options"] = dict(options)
    return body


def _create_campaign(name: str, policy: Policy | Mapping[str, Any] | None,
                     tags: Sequence[str] | None, metadata: Mapping[str, Any] | None,
                     options: Mapping[str, Any] | None) -> _Op[Campaign]:
    body: dict[str, Any] = {"name": name}
    if policy is not None:
        body["policy"] = _policy_json(policy)
    body = _labels_json(body, tags, metadata, options)
    return _campaign((yield _Call("POST", "/api/campaigns", body)))


def _selection(tag: str | None, since: datetime | None,
               until: datetime | None) -> dict[str, str]:
    params = {"tag": tag, "from": since.isoformat() if since else None,
              "to": until.isoformat() if until else None}
    return {name: value for name, value in params.items() if value is not None}


def _list_campaigns(tag: str | None = None, since: datetime | None = None,
                    until: datetime | None = None) -> _Op[list[Campaign]]:
    params = _selection(tag, since, until) or None
    return [_campaign(item) for item in (yield _Call("GET", "/api/campaigns", params=params))]


def _get_campaign(campaign_id: Id) -> _Op[Campaign]:
    return _campaign((yield _Call("GET", f"/api/campaigns/{_path_id(campaign_id)}")))


def _update_campaign(campaign_id: Id, name: str | None,
                     policy: Policy | Mapping[str, Any] | None, tags: Sequence[str] | None,
                     metadata: Mapping[str, Any] | None,
                     options: Mapping[str, Any] | None) -> _Op[Campaign]:
    body: dict[str, Any] = {}
    if name is not None:
        body["name"] = name
    if policy is not None:
        body["policy"] = _policy_json(policy)
    body = _labels_json(body, tags, metadata, options)
    return _campaign((yield _Call("PATCH", f"/api/campaigns/{_path_id(campaign_id)}", body)))


def _delete_campaign(campaign_id: Id) -> _Op[None]:
    yield _Call("DELETE", f"/api/campaigns/{_path_id(campaign_id)}")


def _register_message(campaign_id: Id, message: NewMessage) -> _Op[Registered]:
    path = f"/api/campaigns/{_path_id(campaign_id)}/messages"
    return _registered((yield _Call("POST", path, _message_json(message))))


_ITEM_PREFIX = re.compile(r"^messages\[(\d+)\]")


def _register_batch(campaign_id: Id, messages: Iterable[NewMessage],
                    batch_size: int) -> _Op[list[Registered]]:
    # Checked now, not when the generator first runs: there a ValueError would pass for an
    # answer of an unexpected shape.
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    return _register_chunks(f"/api/campaigns/{_path_id(campaign_id)}/messages/batch",
                            list(messages), batch_size)


def _register_chunks(path: str, items: list[NewMessage],
                     batch_size: int) -> _Op[list[Registered]]:
    done: list[Registered] = []
    for offset in range(0, len(items), batch_size):
        chunk = items[offset:offset + batch_size]
        try:
            answer = yield _Call("POST", path, {"messages": [_message_json(m) for m in chunk]})
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


def _get_message(message_id: Id) -> _Op[Message]:
    return _message((yield _Call("GET", f"/api/messages/{_path_id(message_id)}")))


def _report(campaign_id: Id, tz: str | None, tag: str | None = None,
            since: datetime | None = None, until: datetime | None = None) -> _Op[Report]:
    params = {**({"tz": tz} if tz is not None else {}), **_selection(tag, since, until)}
    report: Report = yield _Call("GET", f"/api/campaigns/{_path_id(campaign_id)}/report",
                                 params=params or None)
    return report


def _message_params(status: str | None, link: str | None, tag: str | None,
                    since: datetime | None, until: datetime | None, client: str | None,
                    country: str | None, search: str | None, cursor: str | None,
                    limit: int | None) -> dict[str, str]:
    params = {"status": status, "link": link, "client": client, "country": country,
              "search": search, "cursor": cursor,
              "limit": str(limit) if limit is not None else None}
    return {**{k: v for k, v in params.items() if v is not None},
            **_selection(tag, since, until)}


def _list_messages(campaign_id: Id, params: dict[str, str]) -> _Op[MessagePage]:
    page = yield _Call("GET", f"/api/campaigns/{_path_id(campaign_id)}/messages", params=params)
    return MessagePage(tuple(_message_result(m) for m in page["messages"]), page["next"])


def _set_consent(address: str, opens: bool, clicks: bool, method: str, wording: str | None,
                 at: datetime | None) -> _Op[Consent]:
    body: dict[str, Any] = {"opens": opens, "clicks": clicks, "method": method}
    if wording is not None:
        body["wording"] = wording
    if at is not None:
        body["at"] = at.isoformat()
    return _consent((yield _Call("PUT", f"/api/recipients/{_path_id(address)}/consent", body)))


def _get_consent(address: str) -> _Op[Consent | None]:
    try:
        data = yield _Call("GET", f"/api/recipients/{_path_id(address)}/consent")
    except NotFound:
        return None
    return _consent(data)


_FILTERS = ("status", "link", "tag", "since", "until", "client", "country", "search", "cursor",
            "limit")


def _export_params(filters: Mapping[str, Any]) -> dict[str, str]:
    unknown = set(filters) - set(_FILTERS)
    if unknown:
        raise TypeError(f"unknown filter(s): {', '.join(sorted(unknown))}")
    return _message_params(**{name: filters.get(name) for name in _FILTERS})


def _raw(method: str, path: str, params: dict[str, str]) -> _Op[bytes]:
    body: bytes = yield _Call(method, path, params=params)
    return body


def _list_keys() -> _Op[list[ApiKey]]:
    return [_api_key(item) for item in (yield _Call("GET", "/api/keys"))]


def _new_key(data: Mapping[str, Any]) -> NewApiKey:
    return NewApiKey(_api_key(data), data["api_key"])


def _create_key(name: str, scope: str) -> _Op[NewApiKey]:
    return _new_key((yield _Call("POST", "/api/keys", {"name": name, "scope": scope})))


def _rotate_key(key_id: str) -> _Op[NewApiKey]:
    return _new_key((yield _Call("POST", f"/api/keys/{_path_id(key_id)}/rotate")))


def _revoke_key(key_id: str) -> _Op[None]:
    yield _Call("DELETE", f"/api/keys/{_path_id(key_id)}")


def _request(call: _Call) -> dict[str, Any]:
    """httpx.request keyword arguments for `call`."""
    try:
        # orjson: several times faster than json for a batch of a thousand HTML documents.
        content = orjson.dumps(call.body) if call.body is not None else None
    except TypeError as exc:  # a str with lone surrogates, for instance
        raise InvalidRequest(f"the request cannot be encoded as JSON: {exc}") from None
    headers = {"content-type": "application/json"} if content is not None else None
    return {"method": call.method, "url": call.path, "content": content, "headers": headers,
            "params": call.params}


def _answer(response: httpx.Response) -> Any:
    """The decoded JSON of a successful answer, or the TrackerError it stands for."""
    status = response.status_code
    if 200 <= status < 300:
        if status == 204 or not response.content:
            return None
        if response.headers.get("content-type", "").startswith(("text/csv",
                                                                 "application/jsonl")):
            return response.content  # an export: the bytes as they came
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise TrackerError("the server's answer is not JSON", status) from None
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        error: str = body["error"]
    else:  # not tracker's answer: a proxy's error page, say
        error = response.reason_phrase or f"HTTP {status}"
    if status == 401:
        raise AuthenticationError(error, status)
    if status == 403:
        raise Forbidden(error, status)
    if status == 404:
        raise NotFound(error, status)
    if status in (400, 413, 422):
        items = body.get("errors") if isinstance(body, dict) else None
        errors = [ItemError(int(e["index"]), str(e["error"])) for e in items
                  if isinstance(e, dict) and "index" in e] if isinstance(items, list) else []
        raise InvalidRequest(error, status, errors)
    if status in (502, 503, 504):
        raise Unavailable(error, status, _retry_after(response))
    raise TrackerError(error, status)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers.get("retry-after", ""))
    except ValueError:  # absent, or an HTTP date (the server never sends one)
        return None


def _unavailable(exc: httpx.TransportError) -> Unavailable:
    if isinstance(exc, httpx.TimeoutException):
        return Unavailable(f"the tracker API timed out ({type(exc).__name__})")
    return Unavailable(f"cannot reach the tracker API: {exc or type(exc).__name__}")


@dataclass(frozen=True, slots=True)
class _Done(Generic[T]):
    value: T


def _step(op: _Op[T], outcome: httpx.Response | TrackerError | None) -> _Call | _Done[T]:
    """Advance `op` with the outcome of its last call (None to start it): its next call, or
    its result. A failed call is thrown into the operation, which may add to the error."""
    try:
        if isinstance(outcome, httpx.Response):
            try:
                answer = _answer(outcome)
            except TrackerError as exc:
                outcome = exc
            else:
                return op.send(answer)
        if isinstance(outcome, TrackerError):
            return op.throw(outcome)
        return op.send(None)
    except StopIteration as stop:
        return _Done(stop.value)
    except (KeyError, TypeError, ValueError) as exc:  # an answer of an unexpected shape
        raise TrackerError(f"unexpected answer from the server: {exc!r}") from None


class _Base:
    def __init__(self, base_url: str, api_key: str, timeout: float | httpx.Timeout) -> None:
        if not api_key:
            raise TrackerError("an API key is required (TRACKER_API_KEY)")
        self.base_url = base_url.rstrip("/")
        self._options: dict[str, Any] = {
            "base_url": self.base_url,
            "headers": {"authorization": f"Bearer {api_key}",
                        "user-agent": f"tracker-client/{__version__}",
                        "accept": "application/json"},
            "timeout": timeout,
            # The API never redirects; following one would send the key elsewhere.
            "follow_redirects": False,
        }

    @classmethod
    def from_env(cls, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT) -> Self:
        """From TRACKER_API_URL (default http://127.0.0.1:8000) and TRACKER_API_KEY."""
        return cls(os.environ.get("TRACKER_API_URL") or DEFAULT_URL,
                   os.environ.get("TRACKER_API_KEY", ""), timeout)


class Client(_Base):
    """The management API over a synchronous connection pool. Use as a context manager or
    call close(). Every method raises a TrackerError subclass on failure."""

    def __init__(self, base_url: str, api_key: str,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT) -> None:
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.Client(**self._options)

    def _run(self, op: _Op[T]) -> T:
        step = _step(op, None)
        while isinstance(step, _Call):
            outcome: httpx.Response | TrackerError
            try:
                outcome = self._http.request(**_request(step))
            except httpx.TransportError as exc:
                outcome = _unavailable(exc)
            except TrackerError as exc:
                outcome = exc
            step = _step(op, outcome)
        return step.value

    def create_campaign(self, name: str,
                        policy: Policy | Mapping[str, Any] | None = None, *,
                        tags: Sequence[str] | None = None,
                        metadata: Mapping[str, Any] | None = None,
                        options: Mapping[str, Any] | None = None) -> Campaign:
        """A new campaign; `options` are its link options (`{"utm": {"source": ...},
        "track_url_text": False, "pixel": "top"}`)."""
        return self._run(_create_campaign(name, policy, tags, metadata, options))

    def list_campaigns(self, *, tag: str | None = None, since: datetime | None = None,
                       until: datetime | None = None) -> list[Campaign]:
        """The account's campaigns, with `tag`, created in [since, until)."""
        return self._run(_list_campaigns(tag, since, until))

    def get_campaign(self, campaign_id: Id) -> Campaign:
        return self._run(_get_campaign(campaign_id))

    def update_campaign(self, campaign_id: Id, *, name: str | None = None,
                        policy: Policy | Mapping[str, Any] | None = None,
                        tags: Sequence[str] | None = None,
                        metadata: Mapping[str, Any] | None = None,
                        options: Mapping[str, Any] | None = None) -> Campaign:
        """Change what is given (a policy or options mapping changes only the fields it
        has; tags and metadata are replaced)."""
        return self._run(_update_campaign(campaign_id, name, policy, tags, metadata, options))

    def delete_campaign(self, campaign_id: Id) -> None:
        self._run(_delete_campaign(campaign_id))

    def register_message(self, campaign_id: Id, recipient: str, *, subject: str | None = None,
                         sent_at: datetime | None = None,
                         links: Sequence[str | Mapping[str, Any]] = (),
                         html: str | None = None, tags: Sequence[str] = (),
                         metadata: Mapping[str, Any] | None = None) -> Registered:
        return self._run(_register_message(
            campaign_id, NewMessage(recipient, subject, sent_at, links, html, tags, metadata)))

    def register_batch(self, campaign_id: Id, messages: Iterable[NewMessage], *,
                       batch_size: int = BATCH_SIZE) -> list[Registered]:
        """Registers any number of messages, `batch_size` per call; results in input order.
        Each call is all or nothing; when one fails, the earlier calls' messages stay
        registered and are in the exception's `registered`."""
        return self._run(_register_batch(campaign_id, messages, batch_size))

    def get_message(self, message_id: Id) -> Message:
        return self._run(_get_message(message_id))

    def report(self, campaign_id: Id, tz: str | None = None, *, tag: str | None = None,
               since: datetime | None = None, until: datetime | None = None) -> Report:
        """The campaign's report; the timeline's hours in `tz` (an IANA name; UTC if None).
        With `tag`, `since`, `until`: the report of its messages with the tag, sent in
        [since, until)."""
        return self._run(_report(campaign_id, tz, tag, since, until))

    def list_messages(self, campaign_id: Id, *, status: str | None = None,
                      link: str | None = None, tag: str | None = None,
                      since: datetime | None = None, until: datetime | None = None,
                      client: str | None = None, country: str | None = None,
                      search: str | None = None, cursor: str | None = None,
                      limit: int | None = None) -> MessagePage:
        """A page of the campaign's messages with their readers' counts. `status`: opened,
        clicked, not_opened, machine_only or untracked; `link`: its reader clicked this
        destination; `cursor`: the page's `next` before."""
        return self._run(_list_messages(campaign_id, _message_params(
            status, link, tag, since, until, client, country, search, cursor, limit)))

    def iter_messages(self, campaign_id: Id, **filters: Any) -> Iterator[MessageResult]:
        """Every matching message, page after page (the filters of list_messages)."""
        cursor = None
        while True:
            page = self.list_messages(campaign_id, cursor=cursor, **filters)
            yield from page.messages
            if page.next is None:
                return
            cursor = page.next

    def export_messages(self, campaign_id: Id, format: str = "csv", **filters: Any) -> bytes:
        """Every matching message as CSV or JSON Lines (`format`), as the server sends it."""
        params = {**_export_params(filters), "format": format}
        return self._run(_raw("GET", f"/api/campaigns/{_path_id(campaign_id)}/messages",
                              params))

    def set_consent(self, address: str, *, opens: bool, clicks: bool, method: str,
                    wording: str | None = None, at: datetime | None = None) -> Consent:
        """Record the recipient's consent: given (True) or refused / withdrawn (False) for
        opens and for clicks, how it was asked for, the wording shown; it holds in every
        worker of the server when this returns."""
        return self._run(_set_consent(address, opens, clicks, method, wording, at))

    def get_consent(self, address: str) -> Consent | None:
        """The recipient's consent on record, None if there is none."""
        return self._run(_get_consent(address))

    def list_keys(self) -> list[ApiKey]:
        return self._run(_list_keys())

    def create_key(self, name: str, scope: str) -> NewApiKey:
        """A new key ("read", "register" or "full"); its secret is in the answer only."""
        return self._run(_create_key(name, scope))

    def rotate_key(self, key_id: str) -> NewApiKey:
        """A new key with the old one's name and scope; the old one is refused at once."""
        return self._run(_rotate_key(key_id))

    def revoke_key(self, key_id: str) -> None:
        self._run(_revoke_key(key_id))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncClient(_Base):
    """The same API as Client, with coroutines. Use as an async context manager or await
    aclose()."""

    def __init__(self, base_url: str, api_key: str,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT) -> None:
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.AsyncClient(**self._options)

    async def _run(self, op: _Op[T]) -> T:
        step = _step(op, None)
        while isinstance(step, _Call):
            outcome: httpx.Response | TrackerError
            try:
                outcome = await self._http.request(**_request(step))
            except httpx.TransportError as exc:
                outcome = _unavailable(exc)
            except TrackerError as exc:
                outcome = exc
            step = _step(op, outcome)
        return step.value

    async def create_campaign(self, name: str,
                              policy: Policy | Mapping[str, Any] | None = None, *,
                              tags: Sequence[str] | None = None,
                              metadata: Mapping[str, Any] | None = None,
                              options: Mapping[str, Any] | None = None) -> Campaign:
        return await self._run(_create_campaign(name, policy, tags, metadata, options))

    async def list_campaigns(self, *, tag: str | None = None, since: datetime | None = None,
                             until: datetime | None = None) -> list[Campaign]:
        return await self._run(_list_campaigns(tag, since, until))

    async def get_campaign(self, campaign_id: Id) -> Campaign:
        return await self._run(_get_campaign(campaign_id))

    async def update_campaign(self, campaign_id: Id, *, name: str | None = None,
                              policy: Policy | Mapping[str, Any] | None = None,
                              tags: Sequence[str] | None = None,
                              metadata: Mapping[str, Any] | None = None,
                              options: Mapping[str, Any] | None = None) -> Campaign:
        return await self._run(_update_campaign(campaign_id, name, policy, tags, metadata,
                                                options))

    async def delete_campaign(self, campaign_id: Id) -> None:
        await self._run(_delete_campaign(campaign_id))

    async def register_message(self, campaign_id: Id, recipient: str, *,
                               subject: str | None = None, sent_at: datetime | None = None,
                               links: Sequence[str | Mapping[str, Any]] = (),
                               html: str | None = None, tags: Sequence[str] = (),
                               metadata: Mapping[str, Any] | None = None) -> Registered:
        return await self._run(_register_message(
            campaign_id, NewMessage(recipient, subject, sent_at, links, html, tags, metadata)))

    async def register_batch(self, campaign_id: Id, messages: Iterable[NewMessage], *,
                             batch_size: int = BATCH_SIZE) -> list[Registered]:
        return await self._run(_register_batch(campaign_id, messages, batch_size))

    async def get_message(self, message_id: Id) -> Message:
        return await self._run(_get_message(message_id))

    async def report(self, campaign_id: Id, tz: str | None = None, *, tag: str | None = None,
                     since: datetime | None = None, until: datetime | None = None) -> Report:
        return await self._run(_report(campaign_id, tz, tag, since, until))

    async def list_messages(self, campaign_id: Id, *, status: str | None = None,
                            link: str | None = None, tag: str | None = None,
                            since: datetime | None = None, until: datetime | None = None,
                            client: str | None = None, country: str | None = None,
                            search: str | None = None, cursor: str | None = None,
                            limit: int | None = None) -> MessagePage:
        return await self._run(_list_messages(campaign_id, _message_params(
            status, link, tag, since, until, client, country, search, cursor, limit)))

    async def iter_messages(self, campaign_id: Id, **filters: Any
                            ) -> AsyncIterator[MessageResult]:
        cursor = None
        while True:
            page = await self.list_messages(campaign_id, cursor=cursor, **filters)
            for message in page.messages:
                yield message
            if page.next is None:
                return
            cursor = page.next

    async def export_messages(self, campaign_id: Id, format: str = "csv",
                              **filters: Any) -> bytes:
        params = {**_export_params(filters), "format": format}
        return await self._run(_raw("GET", f"/api/campaigns/{_path_id(campaign_id)}/messages",
                                    params))

    async def set_consent(self, address: str, *, opens: bool, clicks: bool, method: str,
                          wording: str | None = None, at: datetime | None = None) -> Consent:
        return await self._run(_set_consent(address, opens, clicks, method, wording, at))

    async def get_consent(self, address: str) -> Consent | None:
        return await self._run(_get_consent(address))

    async def list_keys(self) -> list[ApiKey]:
        return await self._run(_list_keys())

    async def create_key(self, name: str, scope: str) -> NewApiKey:
        return await self._run(_create_key(name, scope))

    async def rotate_key(self, key_id: str) -> NewApiKey:
        return await self._run(_rotate_key(key_id))

    async def revoke_key(self, key_id: str) -> None:
        await self._run(_revoke_key(key_id))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
