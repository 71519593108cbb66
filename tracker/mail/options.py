"""A campaign's link options: what registration does to a message's links and pixel beyond
tracking them. Pure, no I/O.

- `utm`: UTM parameters (`utm_source`, `utm_medium`, ...) added to every destination that
  tracker rewrites, so the site's own analytics sees where the visit came from. A
  parameter the destination has already (with any value, even empty) is never replaced,
  and a destination the additions would take past the length limit keeps its own. Links
  left as they are (no consent, `data-track="off"`, a URL as visible text) are not
  touched at all.
- `track_url_text`: a link whose visible text is itself a URL (`<a href=...>https://shop
  .example/sale</a>`) is left untracked unless this is true: mail filters flag a visible
  URL that differs from the link's real target as phishing, and a tracked URL is such a
  target.
- `pixel`: `"bottom"` puts the open pixel just before `</body>`; `"top"` just after
  `<body>`, so that Gmail, which clips messages past ~102 kB and then never loads what
  is cut off, still loads it.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any
from urllib.parse import quote, unquote_plus

import orjson

from tracker.mail import destinations

UTM_FIELDS = ("source", "medium", "campaign", "term", "content", "id")
MAX_UTM_CHARS = 200
PIXEL_PLACES = ("bottom", "top")
_FIELDS = ("utm", "track_url_text", "pixel")


class InvalidOptions(ValueError):
    """Link options the API refuses (422); the message says where and why."""


@dataclass(frozen=True)
class LinkOptions:
    # utm field (source, medium, ...) -> value, in UTM_FIELDS order; empty: none added
    utm: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))
    track_url_text: bool = False
    pixel: str = "bottom"

    def as_json(self) -> dict[str, Any]:
        return {"utm": dict(self.utm) or None, "track_url_text": self.track_url_text,
                "pixel": self.pixel}

    def stored(self) -> str:
        return orjson.dumps(self.as_json()).decode()

    def updated(self, changes: object, where: str = "options") -> LinkOptions:
        """These options with the fields given in an API object changed, validated. `utm`
        is replaced whole (null: none)."""
        if not isinstance(changes, dict):
            raise InvalidOptions(f"{where}: must be an object")
        unknown = set(changes) - set(_FIELDS)
        if unknown:
            raise InvalidOptions(f"{where}: unknown field(s) {', '.join(sorted(unknown))} "
                                 f"(it takes {', '.join(_FIELDS)})")
        options = self
        if "utm" in changes:
            options = replace(options, utm=_utm(changes["utm"], f"{where}.utm"))
        if "track_url_text" in changes:
            if not isinstance(changes["track_url_text"], bool):
                raise InvalidOptions(f"{where}.track_url_text: must be true or false")
            options = replace(options, track_url_text=changes["track_url_text"])
        if "pixel" in changes:
            if changes["pixel"] not in PIXEL_PLACES:
                raise InvalidOptions(f"{where}.pixel: must be one of {', '.join(PIXEL_PLACES)}")
            options = replace(options, pixel=changes["pixel"])
        return options

    def destination(self, url: str) -> str:
        """`url` with the UTM parameters it lacks, or as it is when it lacks none (or when
        they would make it no valid destination: too long)."""
        if not self.utm:
            return url
        return with_utm(url, self.utm)


DEFAULT_OPTIONS = LinkOptions()


def from_stored(stored: str | dict[str, Any] | None) -> LinkOptions:
    """The options as the campaigns table keeps them (jsonb, as text)."""
    data = orjson.loads(stored) if isinstance(stored, str) else (stored or {})
    return DEFAULT_OPTIONS.updated({k: v for k, v in data.items() if k in _FIELDS})


def _utm(value: object, where: str) -> MappingProxyType[str, str]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict) or not value:
        raise InvalidOptions(f"{where}: must be null or an object with any of "
                             f"{', '.join(UTM_FIELDS)}")
    unknown = set(value) - set(UTM_FIELDS)
    if unknown:
        raise InvalidOptions(f"{where}: unknown field(s) {', '.join(sorted(unknown))} (it takes "
                             f"{', '.join(UTM_FIELDS)}, each becoming utm_<field>)")
    for name, text in value.items():
        if not isinstance(text, str) or not text.strip():
            raise InvalidOptions(f"{where}.{name}: must be a non-empty string")
        if len(text) > MAX_UTM_CHARS:
            raise InvalidOptions(f"{where}.{name}: longer than {MAX_UTM_CHARS} characters")
        if any(unicodedata.category(c) == "Cc" for c in text):
            raise InvalidOptions(f"{where}.{name}: contains a control character")
    return MappingProxyType({name: value[name] for name in UTM_FIELDS if name in value})


def with_utm(url: str, utm: MappingProxyType[str, str] | dict[str, str]) -> str:
    """`url` with `utm_<field>=<value>` appended for each field whose parameter it lacks.
    Every other byte stays as it is: the query string's own order and encoding, the
    fragment after it."""
    base, hash_, fragment = url.partition("#")
    _, question, query = base.partition("?")
    present = {unquote_plus(pair.partition("=")[0]) for pair in query.split("&") if pair}
    added = [f"utm_{name}={quote(value, safe='')}" for name, value in utm.items()
             if f"utm_{name}" not in present]
    if not added:
        return url
    joiner = "" if query.endswith("&") or (question and not query) else "&" if question else "?"
    result = f"{base}{joiner}{'&'.join(added)}{hash_}{fragment}"
    return result if destinations.problem(result) is None else url
