"""What the load benchmark sends, and what the report must then say.

A mix is many distinct tokens (every registered message's pixel and links), with the
user agents and addresses real mail traffic has, each kind of request weighted by how
common it is, and each with the verdict tracker's rules give it (`Mix.check_rules` asks
the packaged rules, so a change there shows here as an error, not as a wrong count).
Two mixes (MIXES): `realistic`, what a campaign's tracking URLs receive, machines and
tampered tokens included; and `readers`, people only, the common mail clients and
browsers (every request a human event that goes through the whole pipeline).
`Tally` adds up what a list of requests must have recorded, by the report's definitions
(CONTRACT: `total` and `unique` count human events; `opens.unique` is messages with a
human open or a human click; rates are rounded to 6 places).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import ip_network
from typing import Any

BROWSERS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.6778.81 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; SM-S921B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36",
)
APPLE_MAIL = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Mobile/15E148",
)
OUTLOOK = ("Microsoft Outlook 16.0.17928; Pro", "Mozilla/4.0 (compatible; ms-office; MSOffice 16)")
GMAIL = ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com "
         "GoogleImageProxy)",)
YAHOO = ("YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html",)
THUNDERBIRD = ("Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.5.0",)
SCANNERS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/100.0.4896.127 Safari/537.36 BingPreview/1.0b",
    "Mozilla/5.0 (compatible; Barracuda Sentinel (EE))",
    "Mimecast URL Protect",
    "Mozilla/5.0 (compatible; urlscan.io)",
)
OFFICE_PROBE = ("Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17928; Pro)",)
BOTS = (
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "curl/8.5.0",
    "python-requests/2.32.3",
    "Go-http-client/1.1",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "HeadlessChrome/131.0.0.0 Safari/537.36",
)
NO_AGENT = ("",)


@dataclass(frozen=True)
class Visitor:
    """One kind of request in the mix, and what tracker's rules make of it."""

    label: str
    weight: float
    agents: tuple[str, ...]
    machine: bool | None  # None: records nothing (a tampered token)
    method: str = "GET"
    addresses: str = ""  # X-Forwarded-For pool (local mode only)
    local_only: bool = False  # needs X-Forwarded-For to be believed


OPENS = (
    Visitor("Gmail image proxy", 22, GMAIL, False),
    Visitor("Apple Mail Privacy Protection", 25, APPLE_MAIL, True, addresses="apple",
            local_only=True),
    Visitor("Apple Mail, a reader", 9, APPLE_MAIL, False, addresses="reader"),
    Visitor("Outlook", 11, OUTLOOK, False, addresses="reader"),
    Visitor("Yahoo image proxy", 3, YAHOO, False),
    Visitor("webmail and mobile browsers", 12, BROWSERS, False, addresses="reader"),
    Visitor("Thunderbird", 1, THUNDERBIRD, False, addresses="reader"),
    Visitor("security scanners", 6, SCANNERS, True, addresses="scanner"),
    Visitor("bots", 4, BOTS, True, addresses="scanner"),
    Visitor("no user agent", 1, NO_AGENT, True, addresses="scanner"),
    Visitor("tampered token", 3, BROWSERS, None, addresses="reader"),
)
# wrk cannot read the answer to a HEAD on the pixel (it waits for the 43 bytes its
# Content-Length announces), so HEAD appears on links only, where the 302 has no body.
CLICKS = (
    Visitor("desktop and mobile browsers", 78, BROWSERS, False, addresses="reader"),
    Visitor("security scanners", 8, SCANNERS, True, addresses="scanner"),
    Visitor("Office probing the link", 2, OFFICE_PROBE, True, addresses="reader"),
    Visitor("bots", 3, BOTS, True, addresses="scanner"),
    Visitor("HEAD link checks", 3, BROWSERS, True, method="HEAD", addresses="scanner"),
    Visitor("no user agent", 1, NO_AGENT, True, addresses="scanner"),
    Visitor("tampered token", 4, BROWSERS, None, addresses="reader"),
)
# The readers' mix: five common agents, every request a person's.
IPHONE_MAIL = APPLE_MAIL[1]
READER_OPENS = (
    Visitor("desktop Chrome", 20, BROWSERS[:1], False, addresses="reader"),
    Visitor("iPhone Mail", 20, (IPHONE_MAIL,), False, addresses="reader"),
    Visitor("Outlook", 20, OUTLOOK[:1], False, addresses="reader"),
    Visitor("Firefox", 20, BROWSERS[2:3], False, addresses="reader"),
    Visitor("Gmail image proxy", 20, GMAIL, False, addresses="reader"),
)
READER_CLICKS = (
    Visitor("desktop Chrome", 40, BROWSERS[:1], False, addresses="reader"),
    Visitor("Firefox", 30, BROWSERS[2:3], False, addresses="reader"),
    Visitor("iPhone Safari", 30, BROWSERS[4:5], False, addresses="reader"),
)
MIXES = {"realistic": (OPENS, CLICKS), "readers": (READER_OPENS, READER_CLICKS)}
# Each mix's campaign unless told otherwise: (messages, links each; --quick's messages).
# readers: a newsletter of 300 messages with 3 links; realistic: 20,000 with 5.
CAMPAIGNS = {"readers": (300, 3, 300), "realistic": (20_000, 5, 1000)}
# What a local `tracker serve` is given so that the mixes' X-Forwarded-For addresses are
# believed (wrk connects from loopback) and only the packaged rules classify.
LOCAL_SERVER_ENV = {"TRACKER_TRUSTED_PROXIES": "127.0.0.1/32", "TRACKER_RULES": ""}
LINKS = tuple(f"https://shop.example.com/{path}?utm_source=newsletter&utm_campaign=bench"
              for path in ("", "sale", "new/arrivals", "account/orders", "unsubscribe"))
# Where readers' opens and clicks come from (local only, through X-Forwarded-For): public
# addresses of residential broadband networks in the US and Germany (Comcast's and
# Deutsche Telekom's allocations as RIPE and ARIN list them), which the geo database
# locates and no address list of the rules holds. READER_ADDRESSES of them, drawn once per
# seed; a tenth of the hits from IPv6 addresses in the same providers' ranges.
READER_NETWORKS = (
    "24.0.0.0/12", "50.128.0.0/9", "67.160.0.0/11", "68.32.0.0/11", "69.240.0.0/12",
    "71.192.0.0/12", "73.0.0.0/8", "76.96.0.0/11", "96.64.0.0/11", "98.192.0.0/10",
    "174.48.0.0/12", "2.160.0.0/12", "31.224.0.0/11", "79.192.0.0/10", "84.128.0.0/10",
    "87.128.0.0/10", "91.0.0.0/10", "93.192.0.0/10", "217.80.0.0/12",
)
READER_NETWORKS_V6 = ("2601::/20", "2003::/19")
READER_ADDRESSES = 2000
# Addresses drawn from a visitor's pool when the rules are checked.
_ADDRESS_SAMPLES = 24
# A reader clicks at most two distinct links of a message: three within 2 s would be a
# scanner walking the message (the burst rule), and re-labelled machine.
READER_LINKS = 2


@dataclass(frozen=True)
class Message:
    pixel: str  # path of the pixel URL
    links: tuple[str, ...]  # paths of the tracked links, in LINKS order


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    agent: str  # "": no User-Agent header
    forwarded: str  # X-Forwarded-For; "": none
    kind: str  # open | click
    message: int
    link: int | None
    machine: bool | None  # None: records nothing


class Mix:
    """Requests drawn from the visitors' weights over the registered messages."""

    def __init__(self, messages: Sequence[Message], remote: bool, seed: int,
                 name: str = "realistic") -> None:
        self.messages = messages
        self.remote = remote
        self.name = name
        self._rng = random.Random(seed)
        opens, clicks = MIXES[name]
        self.opens = [v for v in opens if not (remote and v.local_only)]
        self.clicks = [v for v in clicks if not (remote and v.local_only)]
        self.readers = reader_addresses(READER_ADDRESSES, random.Random(seed))

    def address(self, pool: str) -> str:
        rng = self._rng
        if self.remote or not pool:
            return ""
        if pool == "apple":  # Apple's 17.0.0.0/8, where MPP's prefetches come from
            return f"17.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        if pool == "scanner":
            return f"192.0.2.{rng.randrange(1, 255)}"
        return rng.choice(self.readers)

    def requests(self, kind: str, count: int) -> list[Request]:
        rng = self._rng
        visitors = self.opens if kind == "open" else self.clicks
        weights = [v.weight for v in visitors]
        chosen = rng.choices(visitors, weights, k=count)
        total = len(self.messages)
        out = []
        for visitor in chosen:
            # A tenth of the readers make a third of the hits.
            message = rng.randrange(max(1, total // 10)) if rng.random() < 0.3 else \
                rng.randrange(total)
            link = None
            if kind == "open":
                path = self.messages[message].pixel
            else:
                links = len(self.messages[message].links)
                link = ((message + rng.randrange(READER_LINKS)) % links
                        if visitor.machine is False else rng.randrange(links))
                path = self.messages[message].links[link]
            if visitor.machine is None:
                path = _tampered(path, rng)
            out.append(Request(visitor.method, path, rng.choice(visitor.agents),
                               self.address(visitor.addresses), kind, message, link,
                               visitor.machine))
        return out

    def check_rules(self) -> list[str]:
        """Where tracker's packaged rules disagree with what this mix expects of a visitor."""
        from tracker.ingest.classify import Classifier
        from tracker.ingest.rules import load_rules
        from tracker.ingest.useragent import parse_agent

        classifier = Classifier(load_rules(None))
        problems = []
        for kind, visitors in (("open", self.opens), ("click", self.clicks)):
            for visitor in visitors:
                if visitor.machine is None:
                    continue
                for agent in visitor.agents:
                    # Addresses matter to Apple Mail's agent only, but every pool is tried:
                    # a reader's address must never fall in Apple's ranges.
                    for address in {self.address(visitor.addresses) or "127.0.0.1"
                                    for _ in range(_ADDRESS_SAMPLES)}:
                        verdict = classifier.explain(kind, visitor.method, agent,
                                                     parse_agent(agent), address, 7200.0)
                        if verdict.machine != visitor.machine or not verdict.recorded:
                            problems.append(
                                f"{kind} by {visitor.label} ({agent!r}, {address}): the rules "
                                f"say {'machine' if verdict.machine else 'human'} "
                                f"({verdict.reason})")
                            break
        listed = [a for a in self.readers
                  if classifier.is_apple_proxy(a) or classifier.is_scanner_network(a)]
        if listed and not self.remote:
            problems.append(f"{len(listed)} of the readers' addresses are in the rules' "
                            f"address lists ({listed[0]}, ...): change READER_NETWORKS")
        return problems


def reader_addresses(count: int, rng: random.Random) -> list[str]:
    """`count` distinct addresses in READER_NETWORKS, a tenth of them IPv6."""
    networks = [ip_network(n) for n in READER_NETWORKS]
    networks_v6 = [ip_network(n) for n in READER_NETWORKS_V6]
    found: set[str] = set()
    while len(found) < count:
        network = rng.choice(networks_v6 if rng.random() < 0.1 else networks)
        found.add(str(network[rng.randrange(1, network.num_addresses - 1)]))
    return sorted(found)


def _tampered(path: str, rng: random.Random) -> str:
    """The path with one character of its token's middle changed: the MAC fails."""
    start = path.index("/", 1) + 1
    end = path.rfind(".gif") if path.endswith(".gif") else len(path)
    at = (start + end) // 2
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    new = rng.choice(alphabet.replace(path[at], ""))
    return path[:at] + new + path[at + 1:]


@dataclass
class Tally:
    """What the requests sent so far must have recorded, by the report's definitions."""

    messages: int
    links: int = len(LINKS)  # each message's, the first of LINKS
    opens: Counter[bool] = field(default_factory=Counter)  # machine -> count
    clicks: Counter[bool] = field(default_factory=Counter)
    opened: set[int] = field(default_factory=set)  # messages with a human open
    clicked: set[int] = field(default_factory=set)  # ... with a human click
    link_clicks: Counter[int] = field(default_factory=Counter)
    link_clickers: dict[int, set[int]] = field(default_factory=dict)
    not_found: int = 0  # tampered click tokens: 404

    def add(self, requests: Sequence[Request]) -> None:
        for r in requests:
            if r.machine is None:
                self.not_found += r.kind == "click"
                continue
            if r.kind == "open":
                self.opens[r.machine] += 1
                if not r.machine:
                    self.opened.add(r.message)
            else:
                self.clicks[r.machine] += 1
                if not r.machine:
                    assert r.link is not None
                    self.clicked.add(r.message)
                    self.link_clicks[r.link] += 1
                    self.link_clickers.setdefault(r.link, set()).add(r.message)

    def counters(self) -> dict[str, int]:
        return {"opens.total": self.opens[False], "opens.machine": self.opens[True],
                "clicks.total": self.clicks[False], "clicks.machine": self.clicks[True]}

    def expected(self) -> dict[str, Any]:
        unique_opens = len(self.opened | self.clicked)
        unique_clicks = len(self.clicked)

        def rate(part: int, whole: int) -> float:
            return round(part / whole, 6) if whole else 0.0

        return {
            **self.counters(), "messages": self.messages,
            "opens.unique": unique_opens, "clicks.unique": unique_clicks,
            "open_rate": rate(unique_opens, self.messages),
            "click_rate": rate(unique_clicks, self.messages),
            "click_to_open_rate": rate(unique_clicks, unique_opens),
            "links": {LINKS[i]: [self.link_clicks[i], len(self.link_clickers.get(i, ()))]
                      for i in range(self.links)},
            "timeline opens": self.opens[False], "timeline clicks": self.clicks[False],
            "breakdown opens (device)": self.opens[False],
            "breakdown clicks (device)": self.clicks[False],
        }


def report_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The report's figures, keyed as Tally.expected() keys them."""
    return {
        "opens.total": report["opens"]["total"], "opens.machine": report["opens"]["machine"],
        "clicks.total": report["clicks"]["total"], "clicks.machine": report["clicks"]["machine"],
        "messages": report["messages"], "opens.unique": report["opens"]["unique"],
        "clicks.unique": report["clicks"]["unique"], "open_rate": report["open_rate"],
        "click_rate": report["click_rate"], "click_to_open_rate": report["click_to_open_rate"],
        "links": {link["url"]: [link["clicks"], link["unique_clicks"]]
                  for link in report["links"]},
        "timeline opens": sum(h["opens"] for h in report["timeline"]),
        "timeline clicks": sum(h["clicks"] for h in report["timeline"]),
        "breakdown opens (device)": sum(report["breakdown"]["opens"]["device"].values()),
        "breakdown clicks (device)": sum(report["breakdown"]["clicks"]["device"].values()),
    }


