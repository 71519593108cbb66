"""Which codec an HTML body is in, for markup to be spliced into it as ASCII.

Used where HTML arrives as bytes: the relay's MIME parts (tracker.mime_rewrite) and
`tracker instrument`'s file.
"""

from __future__ import annotations

import codecs
import re

_META_CHARSET = re.compile(
    rb"""<meta\b[^>]*?\bcharset\s*=\s*["']?\s*([a-zA-Z0-9._:+-]+)""", re.IGNORECASE)
# Every character a tracked URL, the pixel tag or ordinary markup uses.
_ASCII = "".join(map(chr, range(0x20, 0x7F)))
# Mail programs and browsers read these labels as windows-1252 (WHATWG Encoding); decoding
# them so keeps € and curly quotes in URLs right. The bytes come back the same either way.
_AS_WINDOWS_1252 = frozenset({"ascii", "iso8859-1"})


def html_charset(data: bytes) -> str | None:
    """The charset a `<meta charset>` or `<meta http-equiv="Content-Type">` near the start of
    an HTML document declares, if any (not checked to be a known one)."""
    # Browsers look at the first 1,024 bytes; mail HTML often has a long <style> first.
    m = _META_CHARSET.search(data, 0, 8192)
    return m.group(1).decode("ascii") if m else None


def text_codec(label: str | None, data: bytes) -> str | None:
    """The Python codec for charset `label`, or None when it is unknown or not ASCII-compatible
    (UTF-16, UTF-7, EBCDIC: markup cannot be spliced into those as ASCII). No label: UTF-8
    when `data` is valid UTF-8, else windows-1252."""
    if label is None:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return "cp1252"
        return "utf-8"
    try:
        name = codecs.lookup(label.strip()).name
    except LookupError:
        return None
    if name in _AS_WINDOWS_1252:
        return "cp1252"
    try:
        compatible = _ASCII.encode(name) == _ASCII.encode("ascii")
    except (UnicodeError, LookupError):
        compatible = False
    return name if compatible else None

