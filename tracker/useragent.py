"""User-agent string -> browser, OS and device class, cached.

Parsing uses ua-parser's current rules through its Rust resolver (ua-parser-rs,
~15 µs a string) and user-agents' device heuristics on top. user-agents' own
`parse` goes through ua-parser's legacy pure-Python regex path (~500 µs a string,
measured here), so it is fed the fast resolver's result instead. Mail clients send
few distinct user agents, so nearly every hit is a cache hit anyway.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from ua_parser import Domain, load_lazy_builtins
from ua_parser.regex import Resolver
from user_agents.parsers import UserAgent, parse_browser, parse_device, parse_operating_system

DEVICE_CLASSES = ("desktop", "mobile", "tablet", "bot", "other")
# Longer strings are not user agents any mail client sends; parsing them only costs.
_MAX_PARSED_CHARS = 1024
_resolve = Resolver(load_lazy_builtins())
# Mailbox image proxies fetch for a reader whose device we cannot see.
_IMAGE_PROXY = re.compile(r"GoogleImageProxy|YahooMailProxy|ggpht\.com", re.IGNORECASE)
# HTTP libraries and headless tools: no person reads mail with these. ua-parser calls
# most of them "Other" rather than a spider.
_AUTOMATED = re.compile(
    r"bot\b|crawl|spider|slurp|curl/|wget|python-|requests|httpx|aiohttp|go-http-client|okhttp|"
    r"^java/|axios|node-fetch|headless|libwww|scrapy|phantomjs", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Agent:
    browser: str | None
    os: str | None
    device: str  # one of DEVICE_CLASSES


class _ParsedAgent(UserAgent):  # type: ignore[misc]
    """user-agents' UserAgent (is_mobile, is_tablet, ...) built from the fast resolver."""

    def __init__(self, user_agent: str) -> None:
        result = _resolve(user_agent, Domain.ALL)
        browser, os_, device = result.user_agent, result.os, result.device
        self.ua_string = user_agent
        self.browser = (parse_browser(browser.family, browser.major, browser.minor, browser.patch)
                        if browser else parse_browser("Other"))
        self.os = (parse_operating_system(os_.family, os_.major, os_.minor, os_.patch,
                                          os_.patch_minor)
                   if os_ else parse_operating_system("Other"))
        self.device = (parse_device(device.family, device.brand, device.model)
                       if device else parse_device("Other", None, None))


@lru_cache(maxsize=16384)
def parse_agent(user_agent: str) -> Agent:
    user_agent = user_agent.strip()[:_MAX_PARSED_CHARS]
    if not user_agent:
        return Agent(None, None, "other")
    parsed = _ParsedAgent(user_agent)
    if _IMAGE_PROXY.search(user_agent):
        device = "other"
    elif parsed.is_bot or _AUTOMATED.search(user_agent):
        device = "bot"
    elif parsed.is_tablet:
        device = "tablet"
    elif parsed.is_mobile:
        device = "mobile"
    elif parsed.is_pc or parsed.is_email_client:
        device = "desktop"
    else:
        device = "other"
    return Agent(_known(parsed.browser.family), _known(parsed.os.family), device)


def _known(family: str) -> str | None:
    return None if family == "Other" else family
