"""What the client's calls return: typed records of the API's answers, and `NewMessage`,
the one record a caller fills in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypedDict

from tracker.ingest.policy import Policy


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


@dataclass(frozen=True, slots=True)
class Webhook:
    id: str
    url: str
    events: tuple[str, ...]  # of "open", "click", "relabel"
    campaign_id: str | None  # only this campaign's events; None: all
    machine: bool  # whether events a rule judged machine are sent
    concurrency: int
    enabled: bool
    disabled_reason: str | None
    secret: str | None = None  # in the answer to create_webhook and rotate_webhook_secret only
    stats: Mapping[str, Any] | None = None  # delivered, failed, retrying, oldest_pending_seconds


@dataclass(frozen=True, slots=True)
class EventPage:
    events: list[dict[str, Any]]  # README: Events out
    next: str | None  # pass as `after` for the events after these; None: nothing more yet


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
