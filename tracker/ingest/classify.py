"""Tell readers from machines: every verdict names the rule that fired.

Two levels, so that a hit costs a few attribute reads and some integer arithmetic:

- What the user agent says (`AgentClass`): worked out once per distinct user-agent
  string, by the rules' patterns, ua-parser's bot class and crawlerdetect (hundreds of
  µs: the reason it must run once per string), then cached by the pipeline.
- What the hit says, every time: the honeypot flag, HEAD, the time since `sent_at`,
  recent clicks on the same message, and, for Apple Mail's agent only, whether the
  address is one of Apple's proxies (cached per address).

The first rule that applies decides. Clicks: honeypot, head, the agent's verdict
(scanner_ua, bot_ua, empty_ua), too_soon, then the message's recent clicks (honeypot
window, burst). Opens: the agent's verdict, then apple_mpp for Apple Mail's agent.
Image proxies are human (the report contract) with `proxied` set: no location.

Rules live as data in `tracker/ingest/rules/` (see its README); `tracker classify` runs a
request through this module for support questions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from crawlerdetect import CrawlerDetect

from tracker.ingest.rules import Rules
from tracker.ingest.tokens import FLAG_HONEYPOT, ClickToken, OpenToken
from tracker.ingest.useragent import Agent

log = logging.getLogger("tracker.ingest.classify")

# Longer strings are not user agents any mail client sends; matching them only costs.
_MAX_AGENT_CHARS = 1024
_MAX_CACHED = 16384
_US = 1_000_000


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
PROXIED = Verdict(False, "image_proxy", proxied=True)
HEAD = Verdict(True, "head")
HONEYPOT = Verdict(True, "honeypot")
APPLE_MPP = Verdict(True, "apple_mpp")
TOO_SOON = Verdict(True, "too_soon")
BURST = Verdict(True, "burst")
SCANNER = Verdict(True, "scanner_ua")
BOT = Verdict(True, "bot_ua")
EMPTY = Verdict(True, "empty_ua")
SCANNER_NETWORK = Verdict(True, "scanner_network")
# Every reason an event can carry (None: a plain human hit).
REASONS = tuple(v.reason for v in (PROXIED, HEAD, HONEYPOT, APPLE_MPP, TOO_SOON, BURST,
                                   SCANNER, BOT, EMPTY, SCANNER_NETWORK) if v.reason)


@dataclass(frozen=True, slots=True)
class AgentClass:
    """What one user-agent string says, for opens and for clicks."""

    open: Verdict
    click: Verdict
    apple_mail: bool = False  # Apple Mail's WebKit agent: an open may be MPP's prefetch
    browser: bool = False  # a browser's agent, not a mail client's: scanners pose as one
    rule: str | None = None  # the pattern (or crawlerdetect match) that decided
    client_open: str | None = None  # the mail client an open with this agent comes from
    client_click: str | None = None  # ... a click (a browser says nothing of the mail client)


class _Recent:
    """One message's recent clicks, for the burst and honeypot rules."""

    __slots__ = ("burst_until", "clicks", "honeypot_until")

    def __init__(self) -> None:
        self.clicks: dict[int, int] = {}  # link position -> its latest click (at_us)
        self.burst_until = 0
        self.honeypot_until = 0


@dataclass(frozen=True, slots=True)
class Explanation:
    """How one request would be classified, for `tracker classify`."""

    kind: str
    machine: bool
    reason: str | None
    rule: str | None
    recorded: bool
    location_recorded: bool
    rules_version: str
    client: str | None = None
    address_list: str | None = None  # the address list that decided, if one did
    address_list_date: str | None = None  # ... and the date of its data


class Classifier:
    """The rules, compiled, with the caches and the per-message memory they need.

    One per worker. The clicks stored as a reader's before a burst or a honeypot hit
    showed them to be a machine's are re-labelled where the events are written, from the
    stored rows (store/rollups.py)."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        timing = rules.timing
        self._too_soon_us = timing.too_soon_seconds * _US
        self._apple_mpp_us = timing.apple_mpp_seconds * _US
        self._burst_links = timing.burst_links
        self._burst_us = timing.burst_seconds * _US
        self._honeypot_us = timing.honeypot_seconds * _US
        self._generation = max(1, timing.recent_messages // 2)
        self._recent: dict[tuple[int, int], _Recent] = {}
        self._recent_old: dict[tuple[int, int], _Recent] = {}
        self._agents: dict[str, AgentClass] = {}
        self._networks: dict[str, tuple[bool, bool, str | None]] = {}
        self._scanner_us = timing.scanner_network_seconds * _US
        self._crawlers: CrawlerDetect | None = None
        if rules.crawlerdetect:
            self._crawlers = CrawlerDetect()
            self._crawlers.is_crawler("warm-up")  # compiles its ~1,500 patterns (~50 ms) now

    # --- what the user agent says (once per string) ------------------------------------

    def agent(self, user_agent: str, agent: Agent) -> AgentClass:
        """The agent's class, cached per string: crawlerdetect runs once per agent."""
        known = self._agents.get(user_agent)
        if known is None:
            known = self._classify_agent(user_agent.strip()[:_MAX_AGENT_CHARS], agent)
            if len(self._agents) >= _MAX_CACHED:
                self._agents.clear()  # junk agents must not grow memory without bound
            self._agents[user_agent] = known
        return known

    def _classify_agent(self, text: str, agent: Agent) -> AgentClass:
        verdicts, rule, apple_mail = self._agent_verdicts(text, agent)
        open_, click = verdicts
        named = self._client(text)
        browser = (not open_.machine and not open_.proxied and rule is None
                   and agent.browser is not None)
        clients: tuple[str | None, str | None]
        if open_.machine and open_ is not APPLE_MPP:  # a bot naming a mail client is a bot
            clients = (None, None)
        elif named is not None:
            clients = (named, named)
        elif rule is not None:  # a mail client's own agent that no [client] list names
            clients = ("other", "other")
        else:  # a browser opening the pixel is webmail; a click says nothing of the client
            clients = ("webmail" if agent.browser is not None else "other", None)
        return AgentClass(open_, click, apple_mail=apple_mail, browser=browser, rule=rule,
                          client_open=clients[0], client_click=clients[1])

    def _agent_verdicts(self, text: str, agent: Agent
                        ) -> tuple[tuple[Verdict, Verdict], str | None, bool]:
        """(open and click verdicts, the rule that decided, whether it is Apple Mail's)."""
        rules = self.rules
        if not text:
            return (EMPTY, EMPTY), "empty user agent", False
        if rule := rules.apple_bare.first(text):
            return (APPLE_MPP, EMPTY), rule, False
        if rule := rules.near_empty.first(text):
            return (EMPTY, EMPTY), rule, False
        if rule := rules.scanner.first(text):
            return (SCANNER, SCANNER), rule, False
        if rule := rules.bot.first(text):
            return (BOT, BOT), rule, False
        if rule := rules.image_proxy.first(text):
            return (PROXIED, PROXIED), rule, False
        if rule := rules.bot_contact.first(text):
            return (BOT, BOT), rule, False
        if rule := rules.mail_client_fetch.first(text):
            return (HUMAN, SCANNER), rule, False
        if rule := rules.apple_mail.first(text):
            return (HUMAN, HUMAN), rule, True
        if rule := rules.mail_client.first(text):
            return (HUMAN, HUMAN), rule, False
        if agent.device == "bot":
            return (BOT, BOT), f"ua-parser: {agent.browser or 'bot'}", False
        if self._crawlers is not None and self._crawlers.is_crawler(text):
            return (BOT, BOT), f"crawlerdetect: {self._crawlers.get_matches()}", False
        if agent.os is None and agent.device == "other" and agent.browser in (None, "other"):
            # A browser names itself or the system it runs on, and every mail client that
            # does neither is named by the rules above: a program fetching for itself.
            return (BOT, BOT), "names no mail client, browser, system or device", False
        return (HUMAN, HUMAN), None, False

    def _client(self, text: str) -> str | None:
        for name, patterns in self.rules.clients:
            if patterns.first(text):
                return name
        return None

    # --- what the hit says (every hit) ------------------------------------------------

    def open(self, agent: AgentClass, client_ip: str | None, token: OpenToken,
             at_us: int) -> Verdict:
        if agent.apple_mail and (
                -self._apple_mpp_us < at_us - token.sent_at * _US < self._apple_mpp_us
                or (client_ip is not None and self.is_apple_proxy(client_ip))):
            return APPLE_MPP
        if (agent.browser and client_ip is not None
                and -self._scanner_us < at_us - token.sent_at * _US < self._scanner_us
                and self.is_scanner_network(client_ip)):
            return SCANNER_NETWORK
        return agent.open

    def click(self, agent: AgentClass, method: str, token: ClickToken, at_us: int,
              client_ip: str | None = None) -> Verdict:
        if token.flags & FLAG_HONEYPOT:
            self._honeypot_hit(token, at_us)
            return HONEYPOT
        if method == "HEAD":
            return HEAD
        verdict = agent.click
        if verdict.machine:
            return verdict
        after = at_us - token.sent_at * _US
        if -self._too_soon_us < after < self._too_soon_us:
            return TOO_SOON
        if (agent.browser and client_ip is not None and -self._scanner_us < after < self._scanner_us
                and self.is_scanner_network(client_ip)):
            return SCANNER_NETWORK
        # The message's recent clicks: the honeypot window, then bursts. (This generation's
        # found here, without a call: every click that gets this far looks.)
        recent = (self._recent.get((token.account_id, token.message_id))
                  or self._remembered(token))
        if at_us <= recent.honeypot_until:
            return HONEYPOT
        if not self._burst_links:
            return verdict
        if at_us <= recent.burst_until:  # the burst goes on
            recent.burst_until = at_us + self._burst_us
            return BURST
        clicks = recent.clicks
        clicks[token.link_position] = at_us
        if len(clicks) >= self._burst_links:
            # Stale links are only dropped when they could count: fewer than burst_links
            # entries stay here, as reaching it either starts a burst or prunes.
            window = self._burst_us
            for position in [p for p, t in clicks.items() if at_us - t > window]:
                del clicks[position]
            if len(clicks) >= self._burst_links:
                recent.burst_until = at_us + window
                clicks.clear()
                return BURST
        return verdict

    def is_apple_proxy(self, client_ip: str) -> bool:
        return self._network(client_ip)[0]

    def is_scanner_network(self, client_ip: str) -> bool:
        return self._network(client_ip)[1]

    def _network(self, client_ip: str) -> tuple[bool, bool, str | None]:
        """(an Apple proxy, a scanner network, the address list that says so); cached per
        address, in a bounded dict: spoofed or countless addresses cannot grow memory."""
        known = self._networks.get(client_ip)
        if known is None:
            rules = self.rules
            listed = rules.address_lists.lookup(client_ip)
            apple = listed in rules.apple_lists or client_ip in rules.apple_ranges
            scanner = not apple and (listed in rules.scanner_lists
                                     or client_ip in rules.scanner_ranges)
            known = (apple, scanner, listed if apple or scanner else None)
            if len(self._networks) >= _MAX_CACHED:
                self._networks.clear()
            self._networks[client_ip] = known
        return known

    def _remembered(self, token: ClickToken) -> _Recent:
        """The message's recent clicks. Two generations of dicts make a cheap LRU: a
        message used in this or the last generation stays; at most `recent_messages`
        are kept, at a third of the cost of an OrderedDict's move and evict."""
        key = (token.account_id, token.message_id)
        recent = self._recent.get(key)
        if recent is None:
            recent = self._recent_old.pop(key, None)
            if recent is None:
                recent = _Recent()
            if len(self._recent) >= self._generation:
                self._recent_old = self._recent
                self._recent = {}
            self._recent[key] = recent
        return recent

    def _honeypot_hit(self, token: ClickToken, at_us: int) -> None:
        self._remembered(token).honeypot_until = at_us + self._honeypot_us

    # --- for support questions ------------------------------------------------------

    def explain(self, kind: str, method: str, user_agent: str, agent: Agent,
                client_ip: str | None, seconds_after_send: float | None,
                honeypot: bool = False) -> Explanation:
        """How one request would be classified, through the same code as a real hit
        (but on this classifier's memory: use a fresh one, or bursts carry over)."""
        after = 86_400.0 if seconds_after_send is None else seconds_after_send
        sent_at = 1_700_000_000
        at_us = sent_at * _US + round(after * _US)
        agent_class = self.agent(user_agent, agent)
        if kind == "open":
            verdict = (HEAD if method == "HEAD" else
                       self.open(agent_class, client_ip, OpenToken(0, 0, 0, sent_at), at_us))
        else:
            token = ClickToken(0, 0, 0, sent_at, FLAG_HONEYPOT if honeypot else 0, 0, 0, b"")
            verdict = self.click(agent_class, method, token, at_us, client_ip)
        address_list = None
        if client_ip is not None:
            apple, scanner, listed = self._network(client_ip)
            if (verdict is SCANNER_NETWORK and scanner) or (
                    verdict is APPLE_MPP and agent_class.apple_mail and apple):
                address_list = listed or "rules file"
        published = self.rules.address_lists.get(address_list) if address_list else None
        return Explanation(
            kind=kind, machine=verdict.machine, reason=verdict.reason,
            rule=self._rule(verdict, agent_class, client_ip, after),
            # The contract: a HEAD on the pixel records nothing.
            recorded=not (kind == "open" and method == "HEAD"),
            location_recorded=not verdict.proxied and client_ip is not None,
            rules_version=self.rules.version,
            client=agent_class.client_open if kind == "open" else agent_class.client_click,
            address_list=address_list,
            address_list_date=published.as_of if published is not None else None)

    def _rule(self, verdict: Verdict, agent_class: AgentClass, client_ip: str | None,
              after: float) -> str | None:
        timing = self.rules.timing
        if verdict is HEAD:
            return "HEAD request"
        if verdict is HONEYPOT:
            return "hit on the message's honeypot link"
        if verdict is TOO_SOON:
            return f"clicked {after:g} s from sent_at (within {timing.too_soon_seconds} s)"
        if verdict is APPLE_MPP and agent_class.apple_mail:
            if client_ip is not None and self.is_apple_proxy(client_ip):
                return f"Apple Mail's agent from an Apple proxy address ({client_ip})"
            return (f"Apple Mail's agent {after:g} s from sent_at "
                    f"(within {timing.apple_mpp_seconds} s)")
        if verdict is SCANNER_NETWORK:
            return (f"a browser's agent from a scanner network ({client_ip}) {after:g} s from "
                    f"sent_at (within {timing.scanner_network_seconds} s)")
        return agent_class.rule

