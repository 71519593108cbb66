"""Find the links a reader can click in an email's HTML, and splice tracked URLs in.

`extract(html)` returns every trackable link as a span of the document (the raw
attribute value) and the place for the open pixel; `render(...)` puts tracked
URLs into those spans and the pixel `<img>` at its place. Every other character
of the document comes back as it was: nothing is re-serialized. Pure, no I/O.

What is a link: the `href` of `<a>`, `<area>` and of any VML element (`<v:...>`,
Outlook's buttons), in the markup itself or inside a downlevel-hidden conditional
comment (`<!--[if mso]>...<![endif]-->`, which Outlook renders). Tag and attribute
names are matched without regard to case; where an element repeats an attribute
the first one counts, as in a browser. The destination is the attribute value with
character references decoded as in an attribute (`&amp;` -> `&`, while `&copy=1`
stays as it is), leading and trailing whitespace and control characters removed
(as the URL parser does), and, when relative, resolved against the document's
first `<base href>`.

What is left exactly as it is (not tracked):

- anything but an `http`/`https` destination: `mailto:`, `tel:`, `sms:`, `javascript:`, ...
- an empty value or a `#fragment` (a place in the message itself);
- a relative URL when there is no `<base href>` with an absolute http(s) URL to resolve it;
- a value holding a template placeholder: `{{...}}`, `*|...|*` or `%%...%%`
  (the sender's mail merge has not run yet; the real destination is not known);
- an element marked `data-track="off"`;
- a destination that registration refuses (`tracker.registration.check_destination`):
  whitespace or a control character inside, longer than 2048 bytes, no host, a bad port;
- a second `href` on the same element (browsers ignore it);
- text that only looks like a link: inside `<script>`, `<style>`, `<textarea>`, `<title>`
  (and the other raw-text elements: `<xmp>`, `<iframe>`, `<noembed>`, `<noframes>`,
  `<plaintext>`), inside an ordinary comment, or inside another attribute's value
  (`<img alt="<a href=...>">`, `data-href`), and a `<link href>` (a style sheet).

The open pixel goes just before the last `</body>` end tag of the markup (not one
inside a comment or raw text), else at the end of the document.

How: a tokenizer that follows the WHATWG HTML tokenizer's states for the tokens
that matter here (start and end tags with their attributes in any quoting, comments,
bogus comments and declarations, raw-text elements), stepping from token to token
with patterns anchored at the current position, never searching the document.
Tokens that cannot hold a link (text, other tags, ordinary comments, raw text) are
consumed inside one compiled pattern, so Python code runs only for the few tokens
that matter: link elements, `<base>`, `</body>`, conditional comments.

Why this engine (benchmarks/instrument_bench.py; µs per document, extract + render,
on the corpus newsletter of 18 KB with 24 links / the 16 KB receipt with 5 links):

    this tokenizer           ~60 / ~35 µs
    tree-sitter-html         ~1,150 / ~900 µs (parse and a tree query in C, offsets
                             mapped back to str indices); and it is not an HTML
                             tokenizer: an unquoted `href=https://x/?a=1&b=2` is an
                             error node to it, `<textarea>` content is markup
    stdlib html.parser       ~2,700 / ~2,000 µs (pure Python, every token a method call)

Limits, accepted: `<script>` ends at the first `</script>` (the spec's
script-data-escaped states for `<!--<script>` inside scripts are not followed);
`<![CDATA[` inside `<svg>`/`<math>` is read as a bogus comment ending at the first `>`.
"""

from __future__ import annotations

import html as _html
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from html.entities import html5 as _ENTITIES
from urllib.parse import urljoin, urlsplit

from tracker.tokens import MAX_URL_BYTES

__all__ = ["PIXEL_TEMPLATE", "Extraction", "LinkSpot", "extract", "render"]

# Screen readers skip it, layout does not see it; width/height attributes as well as
# CSS because Outlook's Word engine reads only the attributes.
PIXEL_TEMPLATE = (
    '<img src="{url}" width="1" height="1" alt="" border="0" '
    'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0;overflow:hidden" '
    'aria-hidden="true" role="presentation">'
)


@dataclass(frozen=True, slots=True)
class LinkSpot:
    start: int  # str offsets of the raw attribute value (inside the quotes, if quoted)
    end: int
    url: str  # the destination: decoded, resolved against <base href> when relative
    quote: str  # '"', "'" or "" (unquoted)


@dataclass(frozen=True, slots=True)
class Extraction:
    links: tuple[LinkSpot, ...]  # document order; position in the message = index
    pixel_at: int  # just before the last </body>, else len(html)


# --- the tokenizer ------------------------------------------------------------------------
# CR is whitespace here: the HTML input stream turns it into LF before tokenizing.
_WS = r"\t\n\f\r "
# One attribute, per the attribute name / value states: a name runs to whitespace, "/",
# ">" or "=" (its first character may be "="); a value is double-, single- or unquoted.
# An unclosed quote runs to the end: that tag is cut off by the end of input.
_ATTRIBUTE = (rf"[^{_WS}/>][^{_WS}/>=]*+"
              rf"(?:[{_WS}]*+=[{_WS}]*+(?:\"[^\"]*+\"?|'[^']*+'?|[^{_WS}>]*+))?")
_ATTRIBUTES = rf"(?:[{_WS}/]++|{_ATTRIBUTE})*+"
_NAME_END = rf"(?=[{_WS}/>])"
_RAW_TEXT = ("script", "style", "textarea", "title", "xmp", "iframe", "noembed", "noframes")
# Start tags that Python code must see; every other token is consumed by _SKIP.
_WANTED = rf"(?:a|area|base|plaintext|v:[^{_WS}/>]*+){_NAME_END}"

# No capturing group in here: Python 3.11's re raises SystemError for some captures inside
# possessive repeats.
_SKIP = re.compile(
    rf"""(?:
        [^<]++
      | {"|".join(rf"<{name}{_NAME_END}{_ATTRIBUTES}>(?:[^<]++|<(?!/{name}{_NAME_END}))*+"
                  for name in _RAW_TEXT)}                 # raw-text elements, up to their end tag
      | <(?!{_WANTED})[a-z][^{_WS}/>]*+{_ATTRIBUTES}>?      # any other start tag
      | </(?!body{_NAME_END})[a-z][^{_WS}/>]*+{_ATTRIBUTES}>?  # end tag but </body>
      | </(?![a-z])[^>]*+>?                                 # </> and bogus comments
      | <!--(?!\[if)(?:>|->|(?:[^-]++|-(?!-!?>))*+(?:--!?>)?)  # ordinary comment
      | <!(?!--)[^>]*+>? | <\?[^>]*+>?                      # doctype, <![endif]>, <?xml?>
      | <(?![a-z!/?])                                       # a "<" that is text
    )*+""",
    re.IGNORECASE | re.ASCII | re.VERBOSE,
)
_TAG = re.compile(rf"<(/?)([a-z][^{_WS}/>]*+)({_ATTRIBUTES})(>?)", re.IGNORECASE | re.ASCII)
_ATTRIBUTE_PARTS = re.compile(
    rf"[{_WS}/]*+([^{_WS}/>][^{_WS}/>=]*+)"
    rf"(?:[{_WS}]*+=[{_WS}]*+(?:\"([^\"]*+)\"?|'([^']*+)'?|([^{_WS}>]*+)))?")
# A comment's data is group 1; a downlevel-hidden conditional comment's markup follows
# its "[if ...]>" header.
_COMMENT = re.compile(r"<!--(?:>|->|((?:[^-]++|-(?!-!?>))*+)(?:--!?>)?)")
_CONDITION = re.compile(r"\[if[^\]]*+\]>", re.IGNORECASE | re.ASCII)

# --- destinations -------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"\{\{.*?\}\}|\*\|.*?\|\*|%%.*?%%", re.DOTALL)
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*:", re.IGNORECASE | re.ASCII)
_CHARREF = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")
_ASCII_REFUSED = re.compile(r"[\x00-\x20\x7f]")
_REFUSED_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Zl", "Zp"))
_URL_TRIM = "".join(map(chr, range(0x21)))  # C0 controls and space: the URL parser trims them


def extract(html: str) -> Extraction:
    """The trackable links of `html`, in document order, and where the pixel goes."""
    found: list[tuple[int, int, str, str]] = []  # start, end, raw value, quote
    base_href: str | None = None
    body_end = plaintext_at = -1
    pos, end = 0, len(html)
    resume: list[tuple[int, int]] = []  # (pos, end) to go back to after a conditional comment
    skip, tag, attribute_parts = _SKIP.match, _TAG.match, _ATTRIBUTE_PARTS.finditer
    while True:
        pos = skip(html, pos, end).end()  # type: ignore[union-attr]  # matches the empty string
        if pos >= end:
            if not resume:
                break
            pos, end = resume.pop()
            continue
        if html.startswith("<!--", pos):  # a conditional comment: its markup is scanned too
            comment = _COMMENT.match(html, pos, end)
            assert comment is not None
            data_start, data_end = comment.span(1)
            condition = _CONDITION.match(html, data_start, data_end)
            if condition is not None:
                resume.append((comment.end(), end))
                pos, end = condition.end(), data_end
            else:
                pos = comment.end()
            continue
        m = tag(html, pos, end)
        assert m is not None
        pos = m.end()
        if not m.group(4):  # cut off by the end of input (or of a conditional comment)
            continue
        name = m.group(2).lower()
        if m.group(1):  # the only end tag _SKIP stops at
            if not resume:
                body_end = m.start()
            continue
        if name == "plaintext":  # the rest is text
            if not resume:
                plaintext_at = m.start()
                break
            pos = end
            continue
        href: re.Match[str] | None = None
        track = None
        for a in attribute_parts(html, m.start(3), m.end(3)):
            attribute = a.group(1).lower()
            if attribute == "href":
                href = href or a
            elif attribute == "data-track" and track is None:
                track = _attribute_text(a)
        if href is None:
            continue
        if name == "base":
            if base_href is None and not resume:
                base_href = _decode(_attribute_text(href))
            continue
        if track is not None and _decode(track).strip(_URL_TRIM).lower() == "off":
            continue
        for group, quote in ((2, '"'), (3, "'"), (4, "")):
            if href.start(group) >= 0:
                found.append((href.start(group), href.end(group), href.group(group), quote))
                break
    base = _base_url(base_href)
    links = []
    for start, stop, raw, quote in found:
        url = _destination(raw, base)
        if url is not None:
            links.append(LinkSpot(start, stop, url, quote))
    pixel_at = body_end if body_end >= 0 else plaintext_at if plaintext_at >= 0 else len(html)
    return Extraction(tuple(links), pixel_at)


def render(html: str, extraction: Extraction, tracked_urls: Sequence[str],
           pixel_url: str) -> str:
    """`html` with tracked_urls[i] in place of link i's value and the pixel at its place."""
    links = extraction.links
    if len(tracked_urls) != len(links):
        raise ValueError(f"{len(links)} links, but {len(tracked_urls)} tracked URLs")
    pixel = PIXEL_TEMPLATE.format(url=_escape(pixel_url, '"'))
    pixel_at = extraction.pixel_at
    parts = []
    pos = 0
    for spot, url in zip(links, tracked_urls, strict=True):
        if pos <= pixel_at <= spot.start:  # the pixel comes before this link
            parts += (html[pos:pixel_at], pixel)
            pos, pixel = pixel_at, ""
        parts.append(html[pos:spot.start])
        # An unquoted value gets quotes: then no character of the URL can end the attribute.
        parts.append(_escape(url, spot.quote) if spot.quote else f'"{_escape(url, chr(34))}"')
        pos = spot.end
    parts += (html[pos:pixel_at], pixel, html[pixel_at:]) if pixel else (html[pos:],)
    return "".join(parts)


def _escape(url: str, quote: str) -> str:
    if "&" in url:
        url = url.replace("&", "&amp;")
    if quote in url:
        url = url.replace(quote, "&quot;" if quote == '"' else "&#39;")
    return url


def _attribute_text(match: re.Match[str]) -> str:
    return match.group(2) or match.group(3) or match.group(4) or ""


def _decode(value: str) -> str:
    """Character references decoded as the tokenizer does in an attribute value."""
    return _CHARREF.sub(_charref, value) if "&" in value else value


def _charref(match: re.Match[str]) -> str:
    ref = match.group(1)
    if ref[0] == "#":
        return _html.unescape(match.group(0))
    if ref in _ENTITIES:
        return _ENTITIES[ref]
    # The longest name that the standard lets stand without ";" (&copy, &not, &para, ...).
    # In an attribute it is only decoded when no letter, digit or "=" follows, so that
    # "?a=1&copy=2" and "&notify=1" keep their meaning.
    for length in range(len(ref) - 1, 1, -1):
        if ref[:length] in _ENTITIES:
            after = ref[length]
            if after == "=" or (after.isascii() and after.isalnum()):
                break
            return _ENTITIES[ref[:length]] + ref[length:]
    return match.group(0)


def _base_url(href: str | None) -> str | None:
    if href is None:
        return None
    href = href.strip(_URL_TRIM)
    return href if _is_destination(href) else None


def _destination(raw: str, base: str | None) -> str | None:
    value = _decode(raw).strip(_URL_TRIM)
    if not value or value[0] == "#" or _PLACEHOLDER.search(value):
        return None
    scheme = _SCHEME.match(value)
    if scheme is not None:
        url = value if scheme.group().lower() in ("http:", "https:") else None
    elif base is not None:
        url = urljoin(base, value)
    else:
        url = None
    return url if url is not None and _is_destination(url) else None


def _is_destination(url: str) -> bool:
    """True when tracker.registration.check_destination accepts `url` (a test keeps the two
    in step). Not imported from there: registration imports this module, and importing
    registration loads SQL files and asyncpg. Pure ASCII URLs, nearly all of them, take a
    pattern instead of a Unicode category lookup per character."""
    if not url or len(url) > MAX_URL_BYTES:
        return False
    if url.isascii():
        if _ASCII_REFUSED.search(url):
            return False
    else:
        for char in url:
            if char.isspace() or unicodedata.category(char) in _REFUSED_CATEGORIES:
                return False
        if len(url.encode()) > MAX_URL_BYTES:
            return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a malformed port
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
