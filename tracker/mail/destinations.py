"""What tracker accepts as a link destination, for registration and instrumentation alike.

An absolute http(s) URL with a host, a valid port if any, no whitespace or control
characters, at most MAX_URL_BYTES of UTF-8. The redirect sends exactly these bytes as
`Location`, so this check is also what keeps a header from being split.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import urlsplit

from tracker.ingest.tokens import MAX_URL_BYTES

_ASCII_REFUSED = re.compile(r"[\x00-\x20\x7f]")
# Most destinations are plain: scheme, a host of letters, digits, dots and dashes, then
# printable ASCII. One pattern settles those without urlsplit or a look at each character
# (registration checks every link of thousands of messages a second).
_PLAIN_URL = re.compile(r"[hH][tT][tT][pP][sS]?://[a-zA-Z0-9.-]+(?:[/?#][\x21-\x7e]*+)?\Z")
_REFUSED_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Zl", "Zp"))


def problem(url: str) -> str | None:
    """Why `url` cannot be a destination, or None when it can."""
    if not url:
        return "must be a non-empty string"
    if len(url) > MAX_URL_BYTES:
        return f"longer than {MAX_URL_BYTES} bytes"
    if _PLAIN_URL.match(url):
        return None
    if url.isascii():
        refused = _ASCII_REFUSED.search(url)
        if refused:
            return f"contains whitespace or a control character (U+{ord(refused[0]):04X})"
    else:
        for char in url:
            if char.isspace() or unicodedata.category(char) in _REFUSED_CATEGORIES:
                return f"contains whitespace or a control character (U+{ord(char):04X})"
        if len(url.encode()) > MAX_URL_BYTES:
            return f"longer than {MAX_URL_BYTES} bytes"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a malformed port
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme.lower() not in ("http", "https"):
        return "must be an absolute http or https URL"
    if not parts.hostname:
        return "has no host"
    return None

