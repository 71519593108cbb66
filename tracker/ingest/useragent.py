"""User-agent string -> browser, OS and device class, cached.

Parsing uses ua-parser's current rules through its Rust resolver (ua-parser-rs). The
device class is Matomo device-detector's device type (ingest/devices/: its brand and
model rules, from the `device-detector` package, word-indexed so that a new agent costs
tens of µs rather than the package's own milliseconds; `python -m benchmarks agents`),
mapped to desktop, mobile, tablet or other; ua-parser's spiders are "bot". Should the
package's rules be missing or unreadable, the class comes from the tokens phones and
tablets put in their agents (a warning says so once); `python -m benchmarks truth` scores both
against Matomo's own fixtures.

Only names from a closed set are ever returned: a browser or OS family that ua-parser's
rules spell out literally (`known_names`), else "other". Several of its rules copy a
piece of the agent into the family (`(\\w+)-iPhone/...`), and an app may put anything
there, a person's name included; such text never reaches the database.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ua_parser import Domain, load_lazy_builtins
from ua_parser.regex import Resolver

from tracker.ingest import devices
from tracker.ingest.agent_names import known_names

DEVICE_CLASSES = ("desktop", "mobile", "tablet", "bot", "other")
OTHER = "other"
_CACHE_ENV = "TRACKER_CACHE_DIR"
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
# Matomo's types as tracker's classes (benchmarks/truth/SOURCES.md); any other is "other".
_CLASS_OF_TYPE = {"smartphone": "mobile", "phablet": "mobile", "feature phone": "mobile",
                  "tablet": "tablet", "desktop": "desktop"}


class _DeviceRules:
    """Matomo's device rules, loaded once per process (`prepare`)."""

    lock = threading.Lock()
    loaded = False
    index: devices.DeviceIndex | None = None


@dataclass(frozen=True, slots=True)
class Agent:
    browser: str | None
    os: str | None
    device: str  # one of DEVICE_CLASSES


def prepare(cache_dir: Path | None) -> bool:
    """Load the device rules now, their index cached in `cache_dir` (None: not cached), so
    that no request waits for them: a worker calls this as it starts. Later calls do
    nothing. False when the rules cannot be read and device classes come from tokens."""
    with _DeviceRules.lock:
        if not _DeviceRules.loaded:
            _DeviceRules.index = devices.load(cache_dir)
            _DeviceRules.loaded = True
            parse_agent.cache_clear()
    return _DeviceRules.index is not None


@lru_cache(maxsize=16384)
def parse_agent(user_agent: str) -> Agent:
    user_agent = user_agent.strip()[:_MAX_PARSED_CHARS]
    if not user_agent:
        return Agent(None, None, OTHER)
    result = _resolve(user_agent, Domain.ALL)
    browser = _named(result.user_agent.family if result.user_agent else None, _BROWSERS)
    system = _named(result.os.family if result.os else None, _SYSTEMS)
    if result.device is not None and result.device.family == "Spider":
        return Agent(browser, system, "bot")
    version = (result.os.major, result.os.minor) if result.os else (None, None)
    return Agent(browser, system, device_class(user_agent, system, version))


def device_class(user_agent: str, system: str | None,
                 version: tuple[str | None, str | None] = (None, None)) -> str:
    """desktop, mobile, tablet or other for an agent whose OS ua-parser reads as `system`
    (family) and `version` (major, minor)."""
    if not _DeviceRules.loaded:  # not prepared by a worker or command: cache where told to
        prepare(Path(os.environ[_CACHE_ENV]) if os.environ.get(_CACHE_ENV) else None)
    if _DeviceRules.index is not None:
        kind = devices.device_type(_DeviceRules.index, user_agent, system, version)
        return _CLASS_OF_TYPE.get(kind or "", OTHER)
    return _device_class_by_tokens(user_agent, system)


def _device_class_by_tokens(user_agent: str, system: str | None) -> str:
    """The class from the agent's own tokens and its OS, where Matomo's rules are missing."""
    if _OTHER_DEVICE.search(user_agent):
        return OTHER
    if _TABLET.search(user_agent):
        return "tablet"
    if system == "Android" or _ANDROID.search(user_agent):
        # Android's convention: a phone's browser says "Mobile", a tablet's does not.
        return "mobile" if _ANDROID_PHONE.search(user_agent) else "tablet"
    if _MOBILE.search(user_agent) or system in ("iOS", "Windows Phone", "BlackBerry OS"):
        return "mobile"
    if system in devices.DESKTOP_SYSTEMS or (system or "").startswith(("Windows", "Mac OS")):
        return "desktop"
    return OTHER


def _named(family: str | None, known: Iterable[str]) -> str | None:
    """The family if ua-parser's rules spell it out, None when it found none, else "other"."""
    if family is None or family == "Other":
        return None
    return family if family in known else OTHER
