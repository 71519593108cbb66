"""User-agent string -> browser, OS and device class, cached.

Mail clients send few distinct user agents, so nearly every hit is a cache hit;
the parse itself (ua-parser's current rules) only runs for new strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import user_agents

DEVICE_CLASSES = ("desktop", "mobile", "tablet", "bot", "other")
# Longer strings are not user agents any mail client sends; parsing them only costs.
_MAX_PARSED_CHARS = 1024


@dataclass(frozen=True, slots=True)
class Agent:
    browser: str | None
    os: str | None
    device: str  # one of DEVICE_CLASSES


@lru_cache(maxsize=16384)
def parse_agent(user_agent: str) -> Agent:
    if not user_agent:
        return Agent(None, None, "other")
    parsed = user_agents.parse(user_agent[:_MAX_PARSED_CHARS])
    if parsed.is_bot:
        device = "bot"
    elif parsed.is_tablet:
        device = "tablet"
    elif parsed.is_mobile:
        device = "mobile"
    elif parsed.is_pc:
        device = "desktop"
    else:
        device = "other"
    return Agent(_known(parsed.browser.family), _known(parsed.os.family), device)


def _known(family: str) -> str | None:
    return None if family == "Other" else family
