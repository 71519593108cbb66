"""User-agent string -> browser, OS and device class, cached.

Parsing uses ua-parser's current rules through its Rust resolver (ua-parser-rs, ~15 µs a
string); the device class is worked out here from what the resolver found and the tokens
phones and tablets put in their agents, following Matomo device-detector's conventions
(the reference the benchmarks score it against: `benchmarks/truth.py`).

Only names from a closed set are ever returned: a browser or OS family that ua-parser's
rules spell out literally (`known_names`), else "other". Several of its rules copy a
piece of the agent into the family (`(\\w+)-iPhone/...`), and an app may put anything
there, a person's name included; such text never reaches the database.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from ua_parser import Domain, load_lazy_builtins
from ua_parser.regex import Resolver

from tracker.agent_names import known_names

DEVICE_CLASSES = ("desktop", "mobile", "tablet", "bot", "other")
OTHER = "other"
# Longer strings are not user agents any mail client sends; parsing them only costs.
_MAX_PARSED_CHARS = 1024
_matchers = load_lazy_builtins()
_resolve = Resolver(_matchers)
_BROWSERS = known_names(_matchers[0])
_SYSTEMS = known_names(_matchers[1])

# Tokens that settle the device class before anything else is looked at.
_TABLET = re.compile(
    r"\biPad\b|\bTablet(?! PC)|\bTab(?:let)?[ _-]?\d|\bKindle|\bSilk/|\bPlayBook\b"
    r"|\bKF[A-Z]{2,4}\b|Nexus (?:7|9|10)\b|\bSM-[PTX]\d|\bGT-[PN]\d|\bSCH-I[89]\d\d"
    r"|\bLenovo TB|\bTB-\d"
    r"|\bMediaPad|\bMatePad|\bMi Pad|\bXiaoxin Pad|\bRedmi Pad|\bLenovo Yoga Tab", re.IGNORECASE)
_MOBILE = re.compile(
    r"\biPhone\b|\biPod\b|\bWindows Phone|\bWindows Mobile|\bBlackBerry|\bBB10\b|\bKAIOS\b"
    r"|\bSymbian|\bSeries ?[46]0|\bJ2ME|\bMIDP\b|\bOpera Mini|\bMobile Safari|\bIEMobile"
    r"|\bFirefox OS|\bKaiOS|\bNokia|\bSamsung-SGH|\bSonyEricsson|\bUP\.Browser|\bObigo"
    r"|\bDoCoMo/|\bKDDI-|\bSoftBank/|\bVodafone/",
    re.IGNORECASE)
_ANDROID = re.compile(r"\bAndroid\b|\bAdr\b|Dalvik/", re.IGNORECASE)
_ANDROID_PHONE = re.compile(r"\bMobile\b|\bPhone\b", re.IGNORECASE)
_OTHER_DEVICE = re.compile(
    r"\bSmart-?TV|\bSmartTV|\bHbbTV|\bTizen.*TV|\bWeb0S|\bwebOS.*TV|\bAppleTV|\bGoogleTV"
    r"|\bAndroid TV|\bApple ?TV|\bApple Watch|\bwatchOS|\bBRAVIA|\bCrKey|\bRoku|\bAFT[A-Z]"
    r"|\bPlayStation|\bXbox|\bNintendo"
    r"|\bOculus|\bQuest\b"
    r"|\bTesla/|\bCarPlay", re.IGNORECASE)
_DESKTOP_SYSTEMS = frozenset({
    "Windows", "Mac OS X", "Linux", "Ubuntu", "Fedora", "Debian", "Chrome OS", "FreeBSD",
    "OpenBSD", "NetBSD", "Solaris", "SUSE", "Red Hat", "Mandriva", "Gentoo", "Slackware",
    "Linux Mint", "Arch Linux", "Kubuntu", "Xubuntu", "CentOS", "Haiku", "BeOS", "OS/2",
    "Windows NT", "Windows 95", "Windows 98", "Windows ME", "Windows 2000", "Windows XP",
    "Windows Vista", "Windows 7", "Windows 8", "Windows 8.1", "Windows 10", "Windows RT",
    "Windows RT 8.1", "Mac OS", "macOS"})


@dataclass(frozen=True, slots=True)
class Agent:
    browser: str | None
    os: str | None
    device: str  # one of DEVICE_CLASSES


@lru_cache(maxsize=16384)
def parse_agent(user_agent: str) -> Agent:
    user_agent = user_agent.strip()[:_MAX_PARSED_CHARS]
    if not user_agent:
        return Agent(None, None, OTHER)
    result = _resolve(user_agent, Domain.ALL)
    browser = _named(result.user_agent.family if result.user_agent else None, _BROWSERS)
    system = _named(result.os.family if result.os else None, _SYSTEMS)
    spider = result.device is not None and result.device.family == "Spider"
    return Agent(browser, system, "bot" if spider else device_class(user_agent, system))


def device_class(user_agent: str, system: str | None) -> str:
    """desktop, mobile, tablet or other, from the agent's own tokens and its OS."""
    if _OTHER_DEVICE.search(user_agent):
        return OTHER
    if _TABLET.search(user_agent):
        return "tablet"
    if system == "Android" or _ANDROID.search(user_agent):
        # Android's convention: a phone's browser says "Mobile", a tablet's does not.
        return "mobile" if _ANDROID_PHONE.search(user_agent) else "tablet"
    if _MOBILE.search(user_agent) or system in ("iOS", "Windows Phone", "BlackBerry OS"):
        return "mobile"
    if system in _DESKTOP_SYSTEMS or (system or "").startswith(("Windows", "Mac OS")):
        return "desktop"
    return OTHER


def _named(family: str | None, known: Iterable[str]) -> str | None:
    """The family if ua-parser's rules spell it out, None when it found none, else "other"."""
    if family is None or family == "Other":
        return None
    return family if family in known else OTHER
