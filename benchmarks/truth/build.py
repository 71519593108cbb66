"""Build corpus.jsonl and devices.jsonl from public third-party sources (see SOURCES.md).

Not run by the tests or CI: it needs the sources on disk.

    pip download --no-deps -d WHEELS device-detector==6.5.1 crawler-user-agents==1.67.0
    tracker rules update --data-dir LISTS_DATA [--mirror ...]   # the full address lists
    python benchmarks/truth/build.py --wheels WHEELS --lists LISTS_DATA/rules/lists

Every agent string comes from a source; every label from the source's own meaning
(a crawler list says bot, Apple's egress list with MPP's agent says MPP, a browser
fixture says person). Where an address or a time must be chosen, it is drawn by the
rules below from one random generator seeded with SEED, so the output is the same on
every run with the same inputs.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import random
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

HERE = Path(__file__).resolve().parent
SEED = 14
DD_WHEEL = "device_detector-6.5.1-py3-none-any.whl"
CUA_WHEEL = "crawler_user_agents-1.67.0-py3-none-any.whl"
DD = "pypi:device-detector==6.5.1 (matomo-org/device-detector Tests/fixtures, as packaged)"
CUA = "pypi:crawler-user-agents==1.67.0 (monperrus/crawler-user-agents)"
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0

# Quoted from public issue threads and documentation: (agent, source).
MPP_BARE = ("Mozilla/5.0", "https://github.com/ua-parser/uap-core/issues/509")
APPLE_MAIL = [  # Apple Mail 8-13, as uap-core issue 528 lists them
    (f"Mozilla/5.0 (Macintosh; Intel Mac OS X {os_}) AppleWebKit/{webkit} (KHTML, like Gecko)",
     "https://github.com/ua-parser/uap-core/issues/528")
    for os_, webkit in (("10_15_6", "605.1.15"), ("10_14_6", "605.1.15"),
                        ("10_13_6", "605.1.15"), ("10_12_6", "603.3.8"),
                        ("10_11_6", "601.7.8"), ("10_10_5", "600.8.9"))]
OUTLOOK_DESKTOP = (
    "Mozilla/4.0 (compatible; MSIE 7.0; Windows NT 10.0; WOW64; Trident/7.0; .NET4.0C; "
    ".NET4.0E; .NET CLR 2.0.50727; .NET CLR 3.0.30729; .NET CLR 3.5.30729; Microsoft Outlook "
    "16.0.9126; Microsoft Outlook 16.0.9126; ms-office; MSOffice 16)",
    "https://github.com/gophish/gophish/issues/1920")
GMAIL_SCANNER = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/42.0.2311.135 Safari/537.36 Edge/12.246 Mozilla/5.0",
    "https://github.com/mautic/mautic/pull/10245")
GOOGLE_PROXY = [
    ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
     "https://github.com/browscap/browscap/issues/1108"),
    ("Mozilla/5.0 (Windows; U; Windows NT 5.1; de; rv:1.9.0.7) Gecko/2009021910 "
     "Firefox/3.0.7 (via ggpht.com GoogleImageProxy)",
     "https://github.com/browscap/browscap/issues/121")]
YAHOO_PROXY = ("YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html", DD)
# Google's published mail-server ranges (https://support.google.com/a/answer/27642, as
# quoted by MISP/misp-warninglists lists/google-gmail-sending-ips @ 154896d7): where
# Gmail's scanner fetches from (mautic#10245: "one of many Google IP addresses").
GOOGLE_MAIL = ["209.85.128.0/17", "74.125.0.0/16"]
# Consumer ISPs' access pools: every IPv4 prefix of /12 or shorter in ipverse/asn-ip's
# as/ASN/ipv4-aggregated.txt (read at the commits named), the large residential blocks.
ISP_SOURCE = {
    "AS7922 Comcast": "github:ipverse/asn-ip as/7922/ipv4-aggregated.txt @ "
                      "0663383061fa54489424750fd48c873e6583bd49",
    "AS3320 Deutsche Telekom": "github:ipverse/asn-ip as/3320/ipv4-aggregated.txt @ "
                               "01b36fc05ef7d449ac6ae6c9784abd65a7ff295f",
}
ISP_PREFIXES = {
    "AS7922 Comcast": """24.0.0.0/12 50.128.0.0/9 67.160.0.0/11 68.32.0.0/11 69.240.0.0/12
        71.192.0.0/12 71.224.0.0/12 73.0.0.0/8 74.16.0.0/12 76.16.0.0/12 76.96.0.0/11
        76.128.0.0/11 96.64.0.0/11 96.128.0.0/10 96.192.0.0/11 98.32.0.0/11 98.192.0.0/10
        174.48.0.0/12 174.160.0.0/11 184.112.0.0/12""",
    "AS3320 Deutsche Telekom": """2.160.0.0/12 31.224.0.0/11 37.80.0.0/12 46.80.0.0/12
        79.192.0.0/10 80.128.0.0/11 84.128.0.0/10 87.128.0.0/10 91.0.0.0/10 93.192.0.0/10
        217.80.0.0/12 217.224.0.0/11""",
}
# The snapshots the full lists (--lists) were built from with `tracker rules update
# --mirror` (SOURCES.md says how): each corpus address names its list's snapshot.
LIST_SNAPSHOTS = {
    "apple_mpp": "Apple's egress-ip-ranges.csv as mirrored by github:lord-alfred/ipranges "
                 "apple-proxy/ipv4.txt @ 14dd971b18758c856dd47b2fc51c9376d2413c6a and "
                 "github:hroost/icloud-private-relay-iplist ipv6/ipv6-ranges.txt @ "
                 "16f49afc1896c81f60e1f56b9f5dcc9a7cdb2c83",
    "microsoft": "Microsoft: Azure ServiceTags_Public (AzureCloud) from "
                 "github:femueller/cloud-ip-ranges microsoft-azure-ip-ranges.json @ "
                 "60937f4cdba4fca4d1706d0bfec2d72d9029c54d, Microsoft's public IP space and "
                 "service tags from github:lord-alfred/ipranges microsoft/ipv4_merged.txt "
                 "and ipv6_merged.txt @ 14dd971b18758c856dd47b2fc51c9376d2413c6a, Exchange "
                 "Online's documented ranges",
    "google_cloud": "Google Cloud's cloud.json from github:femueller/cloud-ip-ranges "
                    "google-cloud-ip-ranges.json @ 60937f4cdba4fca4d1706d0bfec2d72d9029c54d",
    "aws": "AWS ip-ranges.json from github:femueller/cloud-ip-ranges aws-ip-ranges.json @ "
           "60937f4cdba4fca4d1706d0bfec2d72d9029c54d",
}
# Where Apple's list holds Apple's own networks rather than its egress (added by
# `tracker rules update`): MPP addresses are drawn from the egress prefixes only.
APPLE_OWN = [ipaddress.ip_network(n) for n in
             ("17.0.0.0/8", "2620:149::/32", "2403:300::/32", "2a01:b740::/32")]

# Matomo's device types -> ours (SOURCES.md).
DEVICE_CLASS = {"smartphone": "mobile", "phablet": "mobile", "feature phone": "mobile",
                "tablet": "tablet", "desktop": "desktop"}
MAIL_CLIENT = [(re.compile(p, re.I), c) for p, c in (
    (r"outlook", "Outlook"), (r"thunderbird", "Thunderbird"), (r"apple mail", "Apple Mail"),
    (r"gmail", "Gmail"), (r"yahoo", "Yahoo Mail"))]


class Corpus:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.lines: list[dict[str, Any]] = []
        self._seen: set[str] = set()

    def add(self, *, user_agent: str, ip: str | None, kind: str, after: float, label: str,
            category: str, client: str | None, source: str, method: str = "GET") -> None:
        line = {"user_agent": user_agent, "ip": ip, "method": method, "kind": kind,
                "seconds_after_send": round(after, 1), "label": label, "category": category,
                "client": client, "source": source}
        key = json.dumps(line, sort_keys=True)
        if key not in self._seen:
            self._seen.add(key)
            self.lines.append(line)

    def log_uniform(self, low: float, high: float) -> float:
        return math.exp(self.rng.uniform(math.log(low), math.log(high)))


def _host(rng: random.Random, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """A host address drawn uniformly inside the network (not its first or last)."""
    size = network.num_addresses
    offset = rng.randrange(1, size - 1) if size > 2 else 0
    return str(network.network_address + offset)


def _networks(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(t) for t in text.split()]


def _read_list(path: Path) -> tuple[list[ipaddress.IPv4Network | ipaddress.IPv6Network], str]:
    """A list written by `tracker rules update`: its networks and its snapshot."""
    nets = [ipaddress.ip_network(line) for line in path.read_text().splitlines()
            if line and not line.startswith("#")]
    return nets, LIST_SNAPSHOTS[path.name.split(".", 1)[0]]


def _yaml(wheel: zipfile.ZipFile, member: str) -> list[dict[str, Any]]:
    data = yaml.load(wheel.read(member), Loader=yaml.CSafeLoader)
    return [d for d in data or [] if isinstance(d, dict) and isinstance(d.get("user_agent"), str)]


def _fixtures(wheel_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    prefix = "device_detector/tests/fixtures/upstream/"
    with zipfile.ZipFile(wheel_path) as wheel:
        for member in sorted(wheel.namelist()):
            if member.startswith(prefix) and member.endswith(".yml"):
                for entry in _yaml(wheel, member):
                    yield member[len(prefix):], entry


def _mail_client(name: str) -> str:
    for pattern, client in MAIL_CLIENT:
        if pattern.search(name):
            return client
    return "other"


def build(wheels: Path, lists: Path, out: Path) -> None:
    rng = random.Random(SEED)
    corpus = Corpus(rng)
    fixtures = list(_fixtures(wheels / DD_WHEEL))
    with zipfile.ZipFile(wheels / CUA_WHEEL) as wheel:
        crawlers = json.loads(wheel.read("crawleruseragents/crawler-user-agents.json"))

    apple, apple_src = _read_list(lists / "apple_mpp.txt")
    egress = [n for n in apple if not any(n.version == o.version and n.subnet_of(o)  # type: ignore[arg-type]
                                          for o in APPLE_OWN)]
    clouds = {name: _read_list(lists / f"{name}.txt")
              for name in ("microsoft", "google_cloud", "aws")}
    isps = [(name, net) for name, text in ISP_PREFIXES.items() for net in _networks(text)]

    def isp_address() -> tuple[str, str]:
        name, net = rng.choice(isps)
        return _host(rng, net), ISP_SOURCE[name]

    # --- Apple MPP prefetches: MPP's agents from Apple's published egress -----------------
    apple_agents = [MPP_BARE] * 6 + APPLE_MAIL + [
        (e["user_agent"], f"{DD} {f}") for f, e in fixtures
        if (e.get("client") or {}).get("name") == "Apple Mail"]
    for _ in range(240):
        agent, source = rng.choice(apple_agents)
        net = rng.choice(egress)
        corpus.add(user_agent=agent, ip=_host(rng, net), kind="open",
                   after=corpus.log_uniform(1, 6 * HOUR), label="machine",
                   category="apple_mpp", client="Apple Mail",
                   source=f"agent: {source}; address: {apple_src}")

    # --- security scanners ------------------------------------------------------------
    # Windows 10 Chrome (and Chromium-based browsers), as gophish#2446 describes the
    # scanner's clicks: device-detector's desktop fixtures of a Chrome-engine browser
    # whose agent says Windows NT 10.0.
    desktop_chrome = sorted({(e["user_agent"], f"{DD} {f}") for f, e in fixtures
                             if (e.get("device") or {}).get("type") == "desktop"
                             and (e.get("client") or {}).get("type") == "browser"
                             and (e.get("client") or {}).get("engine") == "Blink"
                             and "Windows NT 10.0" in e["user_agent"]})
    ms_nets, ms_src = clouds["microsoft"]
    for _ in range(20):  # Defender / Safe Links clicks: Windows Chrome, seconds after send
        agent, source = rng.choice(desktop_chrome)
        corpus.add(user_agent=agent, ip=_host(rng, rng.choice(ms_nets)), kind="click",
                   after=rng.uniform(1, 30), label="machine", category="scanner", client=None,
                   source=f"behaviour: https://github.com/gophish/gophish/issues/2446; agent: "
                          f"{source}; address: {ms_src}")
    for _ in range(10):  # Defender opening the pixel on delivery
        agent, source = rng.choice(desktop_chrome)
        corpus.add(user_agent=agent, ip=_host(rng, rng.choice(ms_nets)), kind="open",
                   after=rng.uniform(1, 30), label="machine", category="scanner", client=None,
                   source=f"behaviour: https://github.com/gophish/gophish/issues/2549; agent: "
                          f"{source}; address: {ms_src}")
    for _ in range(10):  # Gmail's scanner
        corpus.add(user_agent=GMAIL_SCANNER[0],
                   ip=_host(rng, ipaddress.ip_network(rng.choice(GOOGLE_MAIL))), kind="open",
                   after=rng.uniform(1, 30), label="machine", category="scanner", client=None,
                   source=f"agent: {GMAIL_SCANNER[1]}; address: https://support.google.com/a/answer/27642")
    for f, e in fixtures:  # Matomo's security checkers
        bot = e.get("bot") or {}
        if bot.get("category") in ("Security Checker", "Security search bot"):
            corpus.add(user_agent=e["user_agent"], ip=None, kind=rng.choice(("open", "click")),
                       after=rng.uniform(1, 60), label="machine", category="scanner",
                       client=None, source=f"{DD} {f} (category: {bot['category']})")

    # --- bots and crawlers ---------------------------------------------------------
    instances = [(i, f"{CUA} crawler-user-agents.json pattern {c['pattern']!r}")
                 for c in crawlers for i in c.get("instances", [])
                 if not re.search("ImageProxy|MailProxy", c["pattern"])]
    for agent, source in rng.sample(instances, 250):
        corpus.add(user_agent=agent, ip=None, kind=rng.choice(("open", "click")),
                   after=corpus.log_uniform(10, 7 * DAY), label="machine", category="bot",
                   client=None, source=source)
    bots = [(e["user_agent"], f"{DD} {f} (category: {(e.get('bot') or {}).get('category')})")
            for f, e in fixtures if f == "bots.yml"
            and (e.get("bot") or {}).get("category") not in ("Security Checker",
                                                             "Security search bot")
            and not re.search("ImageProxy|MailProxy", e["user_agent"])]
    libraries = [(e["user_agent"], f"{DD} {f} (client type: library)") for f, e in fixtures
                 if (e.get("client") or {}).get("type") == "library"]
    for agent, source in rng.sample(bots, 100) + libraries:
        corpus.add(user_agent=agent, ip=None, kind=rng.choice(("open", "click")),
                   after=corpus.log_uniform(10, 7 * DAY), label="machine", category="bot",
                   client=None, source=source)

    # --- real readers ------------------------------------------------------------------
    def reader(agent: str, source: str, kind: str, client: str | None) -> None:
        address, where = isp_address()
        corpus.add(user_agent=agent, ip=address, kind=kind,
                   after=corpus.log_uniform(5 * MINUTE, 3 * DAY), label="human",
                   category="reader", client=client, source=f"agent: {source}; address: {where}")

    mail_apps = [(e, f) for f, e in fixtures
                 if (e.get("client") or {}).get("type") in ("pim", "mobile app")
                 and re.search(r"mail|outlook|aol", (e.get("client") or {}).get("name", ""), re.I)]
    for entry, f in mail_apps:
        reader(entry["user_agent"], f"{DD} {f}", "open", _mail_client(entry["client"]["name"]))
    reader(*OUTLOOK_DESKTOP, "open", "Outlook")
    for agent, source in APPLE_MAIL:  # Apple Mail without MPP, from a consumer address
        reader(agent, source, "open", "Apple Mail")
    browsers = [(e["user_agent"], f"{DD} {f}") for f, e in fixtures
                if (e.get("client") or {}).get("type") == "browser"
                and (e.get("device") or {}).get("type") in DEVICE_CLASS]
    for agent, source in rng.sample(browsers, 500):
        reader(agent, source, "click", None)
    for agent, source in rng.sample(browsers, 60):  # webmail in a browser: opens
        reader(agent, source, "open", "webmail")
    for _ in range(40):  # a corporate VPN or cloud desktop, hours later
        agent, source = rng.choice(desktop_chrome)
        name = rng.choice(sorted(clouds))
        nets, where = clouds[name]
        corpus.add(user_agent=agent, ip=_host(rng, rng.choice(nets)),
                   kind=rng.choice(("open", "click")), after=rng.uniform(2 * HOUR, 10 * HOUR),
                   label="human", category="reader", client=None,
                   source=f"agent: {source}; address: {where} (a reader behind a cloud "
                          f"desktop or VPN)")

    # --- image proxies: a person's open, device unknown ------------------------------------
    for _ in range(40):
        agent, source = rng.choice(GOOGLE_PROXY)
        corpus.add(user_agent=agent, ip=None, kind="open",
                   after=corpus.log_uniform(MINUTE, 2 * DAY), label="human",
                   category="image_proxy", client="Gmail", source=source)
    for _ in range(20):
        corpus.add(user_agent=YAHOO_PROXY[0], ip=None, kind="open",
                   after=corpus.log_uniform(MINUTE, 2 * DAY), label="human",
                   category="image_proxy", client="Yahoo Mail", source=f"{YAHOO_PROXY[1]} bots.yml")

    _write(out / "corpus.jsonl", corpus.lines)
    _write(out / "devices.jsonl", _devices(fixtures, rng))


def _devices(fixtures: list[tuple[str, dict[str, Any]]],
             rng: random.Random) -> list[dict[str, Any]]:
    """1,500 fixtures drawn without replacement, each agent once."""
    seen: set[str] = set()
    pool = []
    for f, e in fixtures:
        matomo = (e.get("device") or {}).get("type")
        if f == "bots.yml" or not isinstance(matomo, str) or e["user_agent"] in seen:
            continue
        seen.add(e["user_agent"])
        pool.append({"user_agent": e["user_agent"],
                     "device": DEVICE_CLASS.get(matomo, "other"),
                     "matomo_type": matomo, "source": f"{DD} {f}"})
    return rng.sample(pool, 1500)


def _write(path: Path, lines: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, required=True,
                        help=f"directory holding {DD_WHEEL} and {CUA_WHEEL}")
    parser.add_argument("--lists", type=Path, required=True,
                        help="directory of full lists written by `tracker rules update`")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    build(args.wheels, args.lists, args.out)


if __name__ == "__main__":
    main()
