"""Tell readers from machines: every verdict names the rule that fired.

This is the first cut (HEAD requests, self-declared bots, mailbox image
proxies); the reports issue grows it into versioned rules kept as data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tracker.useragent import Agent

# Mailbox image proxies fetch the pixel for a real reader, from the provider's data centre.
_IMAGE_PROXIES = ("GoogleImageProxy", "YahooMailProxy")


@dataclass(frozen=True, slots=True)
class Verdict:
    machine: bool
    reason: str | None
    proxied: bool = False  # fetched through a proxy: the address says nothing of the reader
    line: str = field(init=False, repr=False, compare=False)  # machine and reason, COPY text

    def __post_init__(self) -> None:
        reason = "\\N" if self.reason is None else self.reason
        object.__setattr__(self, "line", f"{'t' if self.machine else 'f'}\t{reason}")


HUMAN = Verdict(False, None)
HEAD = Verdict(True, "head")
BOT = Verdict(True, "bot")
PROXIED = Verdict(False, "image_proxy", proxied=True)


def classify_agent(user_agent: str, agent: Agent) -> Verdict:
    """What the user agent alone says; the caller caches it per user-agent string."""
    if any(proxy in user_agent for proxy in _IMAGE_PROXIES):
        return PROXIED
    if agent.device == "bot":
        return BOT
    return HUMAN
