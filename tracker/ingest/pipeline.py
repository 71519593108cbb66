"""A verified hit becomes an event, or is dropped with a reason: pure, no I/O.

The pipeline is a list of small named steps, as in Plausible's ingest: campaign
state (recording, and consent where the policy requires it) -> user agent (and what it
says about the client) -> verdict -> location -> policy. Each step enriches the hit or
drops it with a reason from the closed set `DropReason`; the caller counts every drop.
What comes out holds only what the campaign's policy allows, so nothing else can reach
the writer, the journal or the database.

An event leaves the pipeline already encoded as a line of PostgreSQL's COPY text
format. That is the hot path's largest saving: the user-agent, location and address
parts of a line are cached per (value, policy setting), so a hit costs one f-string
instead of building a row that asyncpg would then encode field by field (about a
fifth of the cost; binary COPY was ten times dearer in Python than it saved: see
benchmarks/README.md, "Decided").
`Event` is the same thing as a structure, for tests and tools; `Event.line()` and
the pipeline produce identical lines (tested).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from random import getrandbits
from typing import Any, TypeVar

from tracker.ingest.classify import AgentClass, Classifier, Verdict
from tracker.ingest.geo import Location
from tracker.ingest.policy import Policy, PolicyBook, stored_ip
from tracker.ingest.rules import load_rules
from tracker.ingest.tokens import FLAG_CONSENT, ClickToken, OpenToken
from tracker.ingest.useragent import Agent

OPEN = "open"
CLICK = "click"
DAY_MICROSECONDS = 86_400_000_000
_MAX_CACHED = 16384

# The staging table's columns, in the order of a line. `at_us` is Unix time in
# microseconds (an integer is far cheaper to format than a timestamp or a float);
# the move into `events` converts it exactly.
EVENT_COLUMNS = (
    "account_id", "at_us", "id", "campaign_id", "message_id", "type", "link_position",
    "url_id", "machine", "reason", "country", "region", "city", "browser", "os", "device",
    "client", "ip",
)
# A line for the writer, the UTC day (days since 1970) its partition is for, whether it
# is a machine's (for counting), and its message id (the writer's lane: store/lanes.py).
EventRecord = tuple[str, int, bool, int]


_LINE_TABS = len(EVENT_COLUMNS) - 1


def current_line(line: str) -> str:
    """A line from the journal in today's column layout: a line written before events had
    a `client` column (one column fewer, `ip` last) gets a null client before its `ip`.
    Tabs inside values are escaped in COPY text, so counting them counts columns."""
    if line.count("\t") == _LINE_TABS - 1:
        head, _, ip = line.rpartition("\t")
        return f"{head}\t{_NULL}\t{ip}"
    return line


class DropReason(enum.StrEnum):
    INVALID_TOKEN = "invalid_token"  # noqa: S105 -- a reason name, not a secret
    HEAD_OPEN = "head_open"  # the contract: a HEAD on the pixel records nothing
    CAMPAIGN_DISABLED = "campaign_disabled"
    BUFFER_FULL = "buffer_full"
    JOURNAL_FULL = "journal_full"  # memory full, and the journal at its cap or failing
    # The privacy screen (ingest/suppression.py): the hit is answered, and nothing is recorded.
    ACCOUNT_DISABLED = "account_disabled"  # the account is deleted (in its grace period)
    OPTED_OUT = "opted_out"  # the recipient opted out of tracking
    ERASED = "erased"  # a message of a recipient whose data was erased
    PRIVACY_SIGNAL = "privacy_signal"  # Sec-GPC: 1 or DNT: 1, and the account honours them
    # The campaign requires consent and the token's recipient had given none when the
    # message was registered, or has refused or withdrawn it since (privacy/consent.py).
    NO_CONSENT = "no_consent"


_NULL = "\\N"
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text(value: str | int | bool | None) -> str:
    """One value in COPY text format."""
    if value is None:
        return _NULL
    if isinstance(value, bool):
        return "t" if value else "f"
    return str(value).translate(_ESCAPES)


@dataclass(frozen=True, slots=True)
class Event:
    account_id: int
    at_us: int
    id: int  # a UUIDv7 as an integer
    campaign_id: int
    message_id: int
    type: str
    link_position: int | None = None
    url_id: int | None = None
    machine: bool = False
    reason: str | None = None
    country: str | None = None
    region: str | None = None
    city: str | None = None
    browser: str | None = None
    os: str | None = None
    device: str | None = None
    client: str | None = None
    ip: str | None = None

    def line(self) -> str:
        values = [getattr(self, name) for name in EVENT_COLUMNS[3:]]
        return (f"{self.account_id}\t{self.at_us}\t{self.id:032x}\t"
                + "\t".join(copy_text(v) for v in values) + "\n")

    def record(self) -> EventRecord:
        return self.line(), self.at_us // DAY_MICROSECONDS, self.machine, self.message_id


class Pipeline:
    """The steps, in order: campaign state, agent part (user agent and what it says about
    the client), verdict, location part, address part; every part cached.

    Without a classifier the packaged rules are used (tests, tools); the server passes
    one built from TRACKER_RULES."""

    def __init__(self, policies: PolicyBook, parse_agent: Callable[[str], Agent],
                 locate: Callable[[str], Location | None],
                 classifier: Classifier | None = None) -> None:
        self._policies = policies
        self._parse_agent = parse_agent
        self._locate = locate
        self.classifier = classifier or Classifier(load_rules())
        # (agent, policy.device) -> (the open's agent part, the click's, the agent's class)
        self._agents: dict[tuple[str, bool], tuple[str, str, AgentClass]] = {}
        # (address, policy.location, policy.ip) -> (the location part, the address part):
        # one lookup a hit for both (two cost ~0.1 µs more).
        self._places: dict[tuple[str, str, str], tuple[str, str]] = {}

    def use_locator(self, locate: Callable[[str], Location | None]) -> None:
        self._locate = locate
        self._places.clear()

    def open(self, token: OpenToken, method: str, user_agent: str, client_ip: str | None,
             at_us: int) -> EventRecord | DropReason:
        if method == "HEAD":
            return DropReason.HEAD_OPEN
        policy, recording = self._policies.policy_for(token.account_id, token.campaign_id)
        if not recording:
            return DropReason.CAMPAIGN_DISABLED
        if policy.consent_opens and not token.flags & FLAG_CONSENT:
            return DropReason.NO_CONSENT
        agent_part, _, agent = self._agent_parts(user_agent, policy.device)
        verdict = self.classifier.open(agent, client_ip, token, at_us)
        return self._record(OPEN, token, _NULL, _NULL, policy, agent_part, verdict, client_ip,
                            at_us)

    def click(self, token: ClickToken, method: str, user_agent: str, client_ip: str | None,
              at_us: int) -> EventRecord | DropReason:
        policy, recording = self._policies.policy_for(token.account_id, token.campaign_id)
        if not recording:
            return DropReason.CAMPAIGN_DISABLED
        if policy.consent_clicks and not token.flags & FLAG_CONSENT:
            return DropReason.NO_CONSENT
        _, agent_part, agent = self._agent_parts(user_agent, policy.device)
        verdict = self.classifier.click(agent, method, token, at_us, client_ip)
        return self._record(CLICK, token, token.link_position, token.url_id, policy,
                            agent_part, verdict, client_ip, at_us)

    def _record(self, kind: str, token: OpenToken | ClickToken, link_position: int | str,
                url_id: int | str, policy: Policy, agent_part: str, verdict: Verdict,
                client_ip: str | None, at_us: int) -> EventRecord:
        # link_position and url_id: a click's integers, formatted by the f-string below
        # (no str() of each first), or an open's null.
        if client_ip:
            key = (client_ip, policy.location, policy.ip)
            places = self._places.get(key) or self._places_of(key)
            # A mailbox image proxy fetches from its own data centre: that place is not the
            # reader's.
            location_part = _NO_LOCATION if verdict.proxied else places[0]
            address_part = places[1]
        else:
            location_part, address_part = _NO_LOCATION, _NULL
        day = at_us // DAY_MICROSECONDS
        # The id's 32 hex digits as `:032x` writes them for any id under 2**128 (every time
        # up to the year 10889), at a third of its cost: ~0.1 µs an event.
        return (f"{token.account_id}\t{at_us}\t{event_id(at_us).to_bytes(16).hex()}\t"
                f"{token.campaign_id}\t{token.message_id}\t{kind}\t{link_position}\t{url_id}\t{verdict.line}\t"
                f"{location_part}\t{agent_part}\t{address_part}\n", _DAYS.setdefault(day, day),
                verdict.machine, token.message_id)

    def _agent_parts(self, user_agent: str, device: bool) -> tuple[str, str, AgentClass]:
        """The browser, OS, device and mail-client columns of an open's line and of a
        click's, and the agent's class; cached."""
        key = (user_agent, device)
        parts = self._agents.get(key)
        if parts is None:
            agent = self._parse_agent(user_agent)
            agent_class = self.classifier.agent(user_agent, agent)
            parts = (_agent_columns(agent, agent_class, agent_class.client_open, device),
                     _agent_columns(agent, agent_class, agent_class.client_click, device),
                     agent_class)
            _bounded(self._agents)[key] = parts
        return parts

    def _places_of(self, key: tuple[str, str, str]) -> tuple[str, str]:
        """The location and address parts of a line from an address, as the policy's
        location and ip settings allow; cached (`_places`)."""
        client_ip, location, ip = key
        places = (self._location_part(client_ip, location),
                  _NULL if ip == "none" else copy_text(stored_ip(ip, client_ip)))
        _bounded(self._places)[key] = places
        return places

    def _location_part(self, client_ip: str, mode: str) -> str:
        found = self._locate(client_ip) if mode != "none" else None
        if found is None:
            return _NO_LOCATION
        return "\t".join(copy_text(v) for v in (
            found.country,
            found.region if mode in ("region", "city") else None,
            found.city if mode == "city" else None))


_NO_LOCATION = "\t".join((_NULL,) * 3)


def _agent_columns(agent: Agent, agent_class: AgentClass, client: str | None,
                   device: bool) -> str:
    """browser, os, device and client as COPY text. None of them without the policy's
    device data; an image proxy's own agent says nothing of the reader's device."""
    if not device:
        return "\t".join((_NULL,) * 4)
    if agent_class.open.proxied:
        return f"{_NULL}\t{_NULL}\t{_NULL}\t{copy_text(client)}"
    return "\t".join(copy_text(v) for v in (agent.browser, agent.os, agent.device, client))
# One int object per day for every event of that day: 28 bytes less per event waiting
# in memory (~280), where a backlog of them is what a worker's memory grows with.
_DAYS: dict[int, int] = {}
_Cache = TypeVar("_Cache", bound=dict[Any, Any])


def _bounded(cache: _Cache) -> _Cache:
    # Junk user agents and spoofed addresses must not grow memory without bound.
    if len(cache) >= _MAX_CACHED:
        cache.clear()
    return cache


_VERSION_7 = 0x7 << 76
_VARIANT = 0x2 << 62
_RANDOM_MASK = ((1 << 80) - 1) & ~(0xF << 76) & ~(0x3 << 62)
_VERSION_AND_VARIANT = _VERSION_7 | _VARIANT  # one 128-bit OR an event, not two


def event_id(at_us: int) -> int:
    """A UUIDv7 (as an integer): time-ordered, so ids made together sit together in the index.

    The 74 random bits only need to be unique, not unpredictable, so they come from
    the process's Mersenne Twister (seeded from os.urandom, and reseeded by Python in
    every forked worker) rather than a syscall per event."""
    return ((at_us // 1000) << 80) | (getrandbits(80) & _RANDOM_MASK) | _VERSION_AND_VARIANT
