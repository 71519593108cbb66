"""A verified hit becomes an event row, or is dropped with a reason: pure, no I/O.

The pipeline is a list of small named steps, as in Plausible's ingest: campaign
state -> user agent -> classification -> location -> policy. Each step enriches
the hit or drops it with a reason from the closed set `DropReason`; the caller
counts every drop. The row that comes out holds only what the campaign's policy
allows, so nothing else can reach the writer, the journal or the database.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from random import getrandbits

from asyncpg.pgproto.pgproto import UUID

from tracker.classify import HEAD, Verdict, classify_agent
from tracker.geo import Location
from tracker.policy import PolicyBook, stored_ip
from tracker.tokens import ClickToken, OpenToken
from tracker.useragent import Agent

_MAX_PROFILES = 16384
OPEN = "open"
CLICK = "click"

# The order of the events table's columns, which is also the order of a row.
EVENT_COLUMNS = (
    "account_id", "occurred_at", "id", "campaign_id", "message_id", "type", "link_position",
    "url_id", "machine", "reason", "country", "region", "city", "browser", "os", "device", "ip",
)
EventRow = tuple[int, datetime, UUID, int, int, str, int | None, int | None, bool,
                 str | None, str | None, str | None, str | None, str | None, str | None,
                 str | None, str | None]


class DropReason(enum.StrEnum):
    INVALID_TOKEN = "invalid_token"  # noqa: S105 -- a reason name, not a secret
    HEAD_OPEN = "head_open"  # the contract: a HEAD on the pixel records nothing
    CAMPAIGN_DISABLED = "campaign_disabled"
    BUFFER_FULL = "buffer_full"


@dataclass(frozen=True, slots=True)
class Hit:
    """What the pipeline sees of a request. The raw user agent and address live only here."""

    method: str
    user_agent: str
    client_ip: str | None
    at: float


class Pipeline:
    """The steps, in order: campaign state, agent profile (user agent and what it says about
    the client, cached per string), verdict, location (cached per address), policy."""

    def __init__(self, policies: PolicyBook, parse_agent: Callable[[str], Agent],
                 locate: Callable[[str], Location | None]) -> None:
        self._policies = policies
        self._parse_agent = parse_agent
        self._locate = locate
        self._profiles: dict[str, tuple[Agent, Verdict]] = {}

    def use_locator(self, locate: Callable[[str], Location | None]) -> None:
        self._locate = locate

    def open(self, token: OpenToken, hit: Hit) -> EventRow | DropReason:
        if hit.method == "HEAD":
            return DropReason.HEAD_OPEN
        return self._event(OPEN, token.account_id, token.campaign_id, token.message_id,
                           None, None, hit)

    def click(self, token: ClickToken, hit: Hit) -> EventRow | DropReason:
        return self._event(CLICK, token.account_id, token.campaign_id, token.message_id,
                           token.link_position, token.url_id, hit)

    def _event(self, kind: str, account_id: int, campaign_id: int, message_id: int,
               link_position: int | None, url_id: int | None, hit: Hit) -> EventRow | DropReason:
        policy, recording = self._policies.policy_for(account_id, campaign_id)
        if not recording:
            return DropReason.CAMPAIGN_DISABLED
        agent, verdict = self._profile(hit.user_agent)
        if hit.method == "HEAD":
            verdict = HEAD
        country = region = city = None
        # A mailbox image proxy fetches from its own data centre: that place is not the reader's.
        if policy.location != "none" and not verdict.proxied and hit.client_ip:
            found = self._locate(hit.client_ip)
            if found is not None:
                country = found.country
                if policy.location != "country":
                    region = found.region
                    if policy.location == "city":
                        city = found.city
        return (
            account_id, datetime.fromtimestamp(hit.at, UTC), event_id(hit.at), campaign_id,
            message_id, kind, link_position, url_id, verdict.machine, verdict.reason,
            country, region, city,
            agent.browser if policy.device else None,
            agent.os if policy.device else None,
            agent.device if policy.device else None,
            stored_ip(policy, hit.client_ip),
        )

    def _profile(self, user_agent: str) -> tuple[Agent, Verdict]:
        profile = self._profiles.get(user_agent)
        if profile is None:
            agent = self._parse_agent(user_agent)
            profile = (agent, classify_agent(user_agent, agent))
            if len(self._profiles) >= _MAX_PROFILES:
                self._profiles.clear()  # junk user agents must not grow memory without bound
            self._profiles[user_agent] = profile
        return profile


_VERSION_7 = 0x7 << 76
_VARIANT = 0x2 << 62
_RANDOM_MASK = ((1 << 80) - 1) & ~(0xF << 76) & ~(0x3 << 62)


def event_id(at: float) -> UUID:
    """A UUIDv7: time-ordered, so ids made together sit together in the index.

    The 74 random bits only need to be unique, not unpredictable, so they come from
    the process's Mersenne Twister (seeded from os.urandom, and reseeded by Python in
    every forked worker; ~0.1 µs)
    rather than a syscall per event. asyncpg's own UUID type skips a conversion
    when the row is encoded for COPY."""
    value = (int(at * 1000) << 80) | (getrandbits(80) & _RANDOM_MASK) | _VERSION_7 | _VARIANT
    return UUID(value.to_bytes(16))
