"""Matomo's rules for the device type (DeviceDetector.php, `parseDevice`): what its
device parsers say of an agent, through the word index, then the rules for agents no
model names (Chrome on Android without "Mobile" is a tablet, "Android TV" is a tv, a
desktop system is a desktop, ...)."""

from __future__ import annotations

import re

from tracker.ingest import regex_split
from tracker.ingest.devices.index import DeviceIndex
from tracker.ingest.devices.rules import FILES, HBBTV, NOTEBOOKS

# Matomo's fixtures' longest agent has 355 characters, and a model is named early. Past
# this many, an agent is cut before its device is looked for: some rules backtrack, and
# their cost grows with the square of the length a crafted agent can give them.
_MAX_CHARS = 512


class _Rule:
    """One of Matomo's regexes, tried only when the agent (case-folded) holds one of the
    words every match needs: a substring test rules most agents out, and Matomo's
    word-start prefix makes the regex itself slow (no literal scan)."""

    __slots__ = ("_search", "_words")

    def __init__(self, pattern: str, start: str) -> None:
        self._search = re.compile(f"{start}(?:{pattern})", re.IGNORECASE).search
        self._words = _needed_words(pattern)

    def __call__(self, text: str, folded: str) -> bool:
        if self._words is not None and not any(word in folded for word in self._words):
            return False
        return self._search(text) is not None


def _needed_words(pattern: str) -> tuple[str, ...] | None:
    needed: set[str] = set()
    for alternative in regex_split.parse(pattern):
        words = regex_split.words(alternative, min_length=1)
        if words is None:
            return None
        needed.update(words)
    return tuple(sorted(needed))


def _rule(pattern: str) -> _Rule:
    """DeviceDetector::matchUserAgent: the regex, starting a word, case-insensitive."""
    return _Rule(pattern, "(?:^|[^A-Z_-])")


def _part(pattern: str) -> _Rule:
    """AbstractParser::matchUserAgent: the device parsers' word start."""
    return _Rule(pattern, "(?:^|[^A-Z0-9_-]|[^A-Z0-9-]_|sprd-|MZ-)")


_HBBTV_FRAGMENT = _part(r"(?:HbbTV|SmartTvA)/([1-9]{1}(?:\.[0-9]{1}){1,2})")
_SHELL_TV_FRAGMENT = _part(r"[a-z]+[ _]Shell[ _]\w{6}|tclwebkit(\d+[.\d]*)")
_NOTEBOOK_FRAGMENT = _part("FBMD/")
_DESKTOP_FRAGMENT = _part(r"(?:Windows (?:NT|IoT)|X11; Linux x86_64)")
_NOT_DESKTOP_FRAGMENT = _part(
    r"CE-HTML| Mozilla/|Andr[o0]id|Tablet|Mobile|iPhone|Windows Phone|ricoh|OculusBrowser"
    r"|PicoBrowser|Lenovo|compatible; MSIE|Trident/|Tesla/|XBOX|FBMD/|ARM; ?([^)]+)")
_CLIENT_HINTS_FRAGMENT = _Rule(r"Android (?:1[0-6][.\d]*; K(?: Build/|[;)])|1[0-6]\)) AppleWebKit",
                               "")
_VR = _rule(r"Android( [.0-9]+)?; Mobile VR;| VR ")
_CHROME = _rule(r"Chrome/[.0-9]*")
_MOBILE = _rule(r"(?:Mobile|eliboM)")
_PAD = _rule("Pad/APad")
_TABLET = _rule(r"Android( [.0-9]+)?; Tablet;|Tablet(?! PC)|.*\-tablet$|Opera Tablet")
_ANDROID_MOBILE = _rule(r"Android( [.0-9]+)?; Mobile;|.*\-mobile$")
_JAVA_ME = _rule(r"Java ME|J2ME|Profile/MIDP|CLDC|Java; U; MIDP|MMP/\d\.\d")
_TOUCH = _rule("Touch")
_PUFFIN = ((_rule(r"Puffin/(?:\d+[.\d]+)[LMW]D"), "desktop"),
           (_rule(r"Puffin/(?:\d+[.\d]+)[AIFLW]P"), "smartphone"),
           (_rule(r"Puffin/(?:\d+[.\d]+)[AILW]T"), "tablet"))
_OPERA_TV = _rule(r"Opera TV Store| OMI/|Coolita OS")
_TV = _rule(r"Andr0id|(?:Android(?: UHD)?|Google) TV|\(lite\) TV|BRAVIA|Firebolt| TV$")
_SMART_TV = _rule(r"SmartTV|Tizen.+ TV .+$|\(TV;")
_DESKTOP_WORD = _rule(r"Desktop(?: (x(?:32|64)|WOW64))?;")

# ua-parser's names for the systems Matomo's rules single out.
_APPLE_SYSTEMS = frozenset({"iOS", "Mac OS X", "Mac OS", "WatchOS", "tvOS", "ATV OS X"})
_ANDROID_FAMILY = frozenset({"Android", "HarmonyOS"})
DESKTOP_SYSTEMS = frozenset({
    "Windows", "Mac OS X", "Mac OS", "Linux", "Ubuntu", "Kubuntu", "Lubuntu", "Fedora",
    "Debian", "Chrome OS", "FreeBSD", "OpenBSD", "NetBSD", "BSD", "Solaris", "SUSE",
    "openSUSE", "Red Hat", "CentOS", "Mandriva", "Mageia", "Gentoo", "Slackware",
    "Linux Mint", "Arch Linux", "PCLinuxOS", "Puppy", "BackTrack", "SerenityOS"})
_TOUCH_WINDOWS = frozenset({"RT", "8", "10", "11"})


def device_type(index: DeviceIndex, user_agent: str, system: str | None,
                version: tuple[str | None, str | None]) -> str | None:
    """Matomo's device type (smartphone, tablet, phablet, feature phone, desktop, tv,
    console, wearable, ...), or None when Matomo's rules say nothing. `system` and
    `version` (major, minor) are ua-parser's reading of the OS."""
    user_agent = user_agent[:_MAX_CHARS]
    folded = user_agent.lower()
    brand, kind = _parsed(index, user_agent, folded)
    if brand == "Apple" and system not in _APPLE_SYSTEMS:  # a fake: not Apple's
        kind = None
    android = system in _ANDROID_FAMILY
    if kind is None and _VR(user_agent, folded):
        kind = "wearable"
    if kind is None and android and _CHROME(user_agent, folded):
        # Chrome on Android says "Mobile" on phones and not on tablets.
        kind = "smartphone" if _MOBILE(user_agent, folded) else "tablet"
    if kind == "smartphone" and _PAD(user_agent, folded):
        kind = "tablet"
    if kind is None and _TABLET(user_agent, folded):
        kind = "tablet"
    if kind is None and _ANDROID_MOBILE(user_agent, folded):
        kind = "smartphone"
    if kind is None and system == "Android" and version[0]:
        # Android before 2 ran on phones only, Android 3 on tablets only.
        if _version_below(version, 2):
            kind = "smartphone"
        elif version[0] == "3":
            kind = "tablet"
    if kind == "feature phone" and android:
        kind = "smartphone"
    if kind is None and system is None and _JAVA_ME(user_agent, folded):
        kind = "feature phone"
    if system == "KaiOS":
        kind = "feature phone"
    if (kind is None and system == "Windows" and version[0] in _TOUCH_WINDOWS
            and _TOUCH(user_agent, folded)):
        kind = "tablet"
    if kind is None:
        kind = next((k for fragment, k in _PUFFIN if fragment(user_agent, folded)), None)
    if _OPERA_TV(user_agent, folded):
        kind = "tv"
    if kind not in ("tv", "peripheral") and _TV(user_agent, folded):
        kind = "tv"
    if kind is None and _SMART_TV(user_agent, folded):
        kind = "tv"
    if kind != "desktop" and "Desktop" in user_agent and _DESKTOP_WORD(user_agent, folded):
        kind = "desktop"
    if kind is None and system in DESKTOP_SYSTEMS:
        kind = "desktop"
    return kind


def _parsed(index: DeviceIndex, user_agent: str, folded: str) -> tuple[str, str | None]:
    """What Matomo's device parsers say: (brand, type), either may be empty."""
    if _HBBTV_FRAGMENT(user_agent, folded):
        found = (None if _no_device_parse(user_agent, folded)
                 else index.first(user_agent, (HBBTV,)))
        return (found[0].name, found[1] or "tv") if found else ("", "tv")
    if _SHELL_TV_FRAGMENT(user_agent, folded):
        return "", "tv"
    if _no_device_parse(user_agent, folded):
        return "", None
    files = range(NOTEBOOKS if _NOTEBOOK_FRAGMENT(user_agent, folded) else NOTEBOOKS + 1,
                  len(FILES))
    found = index.first(user_agent, files)
    return (found[0].name, found[1]) if found else ("", None)


def _no_device_parse(user_agent: str, folded: str) -> bool:
    """Agents Matomo's device parsers leave alone: a desktop system's, and Android's
    reduced agents (`Android 10; K`), whose model only client hints tell."""
    if _CLIENT_HINTS_FRAGMENT(user_agent, folded) and "telegram-android/" not in folded:
        return True
    return (_DESKTOP_FRAGMENT(user_agent, folded)
            and not _NOT_DESKTOP_FRAGMENT(user_agent, folded))


def _version_below(version: tuple[str | None, str | None], major: int) -> bool:
    try:
        return int(version[0] or "") < major
    except ValueError:
        return False
