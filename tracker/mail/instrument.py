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
inside a comment or raw text), else at the end of the document; or, placed at the top,
just after the first `<body ...>` start tag, else after `</head>`, else after what leads
the document (a doctype, `<html>`, comments), else at its start.

Each `<a>` link also has its visible text (`LinkSpot.text`: the markup up to its `</a>`
without tags, character references decoded, white space collapsed), so that a link whose
text is itself a URL can be told apart (`looks_like_url`): mail filters flag a visible
URL that differs from the link's real target.

How: a tokenizer that follows the WHATWG HTML tokenizer's states for the tokens
that matter here (start and end tags with their attributes in any quoting, comments,
bogus comments and declarations, raw-text elements), stepping from token to token
with patterns anchored at the current position, never searching the document.
Tokens that cannot hold a link (text, other tags, ordinary comments, raw text) are
consumed inside one compiled pattern, so Python code runs only for the few tokens
that matter: link elements, `<base>`, `</body>`, conditional comments.

Why this engine: it is an order of magnitude faster than tree-sitter-html and the
standard library's html.parser on real mail (benchmarks/README.md, "Decided"; `python -m
benchmarks instrument` measures it), and its floor is sre itself, one pass over the
text. tree-sitter builds a whole tree and is no HTML tokenizer: an unquoted
`href=https://x/?a=1&b=2` is an error node to it, `<textarea>` content is markup, a
`</body>` in a textarea ends the body (5 of the 13 corpus documents come out wrong).
html.parser calls back into Python for every token and reads `<!-->` as an unfinished
comment (1 document wrong). Against html5lib, a complete HTML5 parser, the tokenizer
finds the same links on generated tag soup (tests/test_instrument.py).

Limits, accepted: `<script>` ends at the first `</script>` (the spec's
script-data-escaped states for `<!--<script>` inside scripts are not followed);
`<![CDATA[` inside `<svg>`/`<math>` is read as a bogus comment ending at the first `>`.
"""

from __future__ import annotations

import html as _html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from html.entities import html5 as _ENTITIES
from urllib.parse import urljoin

from tracker.ingest.tokens import MAX_URL_BYTES
from tracker.mail import destinations

__all__ = ["PIXEL_TEMPLATE", "Extraction", "LinkSpot", "extract", "looks_like_url", "render"]

# Screen readers skip it, layout does not see it; width/height attributes as well as
# CSS because Outlook's Word engine reads only the attributes.
PIXEL_TEMPLATE = (
    '<img src="{url}" width="1" height="1" alt="" border="0" '
    'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0;overflow:hidden" '
    'aria-hidden="true" role="presentation">'
)


# A link no reader can see or reach: hidden from layout in every client (mso-hide for
# Outlook's Word engine), from screen readers and from keyboard focus, with no text.
# Security scanners that fetch every href in a message follow it; people never do.
HONEYPOT_TEMPLATE = (
    '<div style="display:none;max-height:0;overflow:hidden;mso-hide:all" aria-hidden="true">'
    '<a href="{url}" tabindex="-1" style="display:none;font-size:0;line-height:0">&#8203;</a>'
    '</div>'
)


@dataclass(frozen=True, slots=True)
class LinkSpot:
    start: int  # str offsets of the raw attribute value (inside the quotes, if quoted)
    end: int
    url: str  # the destination: decoded, resolved against <base href> when relative
    quote: str  # '"', "'" or "" (unquoted)
    text: str | None = None  # an <a>'s visible text (None: not an <a>, or no </a> near)


@dataclass(frozen=True, slots=True)
class Extraction:
    links: tuple[LinkSpot, ...]  # document order; position in the message = index
    pixel_at: int  # just before the last </body>, else len(html)
    top_at: int = 0  # just after the first <body ...>, else after </head>, else ...


# --- the tokenizer ------------------------------------------------------------------------
# The patterns are case-sensitive, with names matched in (?i:...) groups: sre's
# case-insensitive operations cost extra on every character of the document.
# CR is whitespace here: the HTML input stream turns it into LF before tokenizing.
_WS = r"\t\n\f\r "
# The attribute states: a name runs to whitespace, "/", ">" or "=" (its first character
# may be "="); "=" (after optional whitespace) starts the value: double-, single- or
# unquoted (to whitespace or ">"). An unclosed quote runs to the end of input, where
# the tag is dropped. "/" between attributes is a separator, like whitespace.
_VALUE = rf"""(?:"[^"]*+"?|'[^']*+'?|[^{_WS}>]*+)"""
_ATTRIBUTE = rf"[^{_WS}/>][^{_WS}/>=]*+(?:[{_WS}]*+=[{_WS}]*+{_VALUE})?"
# sre's cost is per operation more than per character: the usual ` name="value"` pairs go
# through a loop of few operations first, anything else through the general one.
_ATTRIBUTES = (rf"""(?:[{_WS}]++[^{_WS}/>="']++=(?:"[^"]*+"|'[^']*+'))*+"""
               rf"(?:[{_WS}/]*+{_ATTRIBUTE})*+[{_WS}/]*+")
_TAG_NAME = rf"[a-zA-Z][^{_WS}/>]*+"
_NAME_END = rf"(?=[{_WS}/>])"
_RAW_TEXT = ("script", "style", "textarea", "title", "xmp", "iframe", "noembed", "noframes")
# Start tags that Python code must see (link elements, <base>, <plaintext>); every other
# token is consumed by _SKIP.
_WANTED = rf"(?i:a|area|base|body|plaintext){_NAME_END}|[vV]:"

# Everything up to the next token that Python code must see: text, and the token after
# each "<", the most frequent kinds first. No group in here: Python 3.11's re raises
# SystemError for a group inside a possessive repeat that goes on after it
# (re.match(r"(?:(x)y|b)*+", "xyb")), hence one alternative per raw-text name.
_SKIP = rf"""(?:[^<]*+<(?:
        /(?!(?i:body|head){_NAME_END}){_TAG_NAME}{_ATTRIBUTES}>?  # end tag, but </body>, </head>
      | (?!{_WANTED}|(?i:{"|".join(_RAW_TEXT)}){_NAME_END})
        {_TAG_NAME}{_ATTRIBUTES}>?                              # start tag
      | {"|".join(rf"(?i:{name}){_NAME_END}{_ATTRIBUTES}>(?:[^<]++|<(?!/(?i:{name}){_NAME_END}))*+"
                  for name in _RAW_TEXT)}                       # raw-text element, to its end tag
      | !--(?!\[(?i:if))(?:>|->|(?:[^-]++|-(?!-!?>))*+(?:--!?>)?)  # comment, unless conditional
      | /(?![a-zA-Z])[^>]*+>?                                   # </> or a bogus comment
      | !(?!--)[^>]*+>? | \?[^>]*+>?                            # doctype, <![endif]>, <?xml?>
      | (?![a-zA-Z!/?])                                         # a "<" that is text
    ))*+[^<]*+"""


def _first(name: str) -> str:
    """Pattern: the attributes before the first one called `name`, then that one, its value
    in three groups (double-, single-, unquoted). Matches without it too."""
    return (rf"(?:[{_WS}/]*+(?!(?i:{name})[{_WS}/>=]){_ATTRIBUTE})*+"
            rf"(?:[{_WS}/]*+(?i:{name})(?=[{_WS}/>=])"
            rf"(?:[{_WS}]*+=[{_WS}]*+(?:\"([^\"]*+)\"?|'([^']*+)'?|([^{_WS}>]*+)))?)?")


# One call per token that Python code must see (sre does the rest): _SKIP, then a
# conditional comment's "<!--" (group 1) or a tag: "/" (2), name (3), the value of its
# first href (4, 5 or 6: double-, single-, unquoted) and ">" (7, empty when the input
# ends inside the tag). Neither: the end.
_NEXT = re.compile(
    rf"{_SKIP}(?:(<!--)|<(/?)({_TAG_NAME}){_first('href')}{_ATTRIBUTES}(>?))?",
    re.ASCII | re.VERBOSE,
)
_DATA_TRACK = re.compile(rf"<{_TAG_NAME}{_first('data-track')}", re.ASCII)
# A cheap first look (a search with a literal first character); _DATA_TRACK decides.
_MAYBE_DATA_TRACK = re.compile("-[tT][rR][aA][cC][kK]")
# A comment's data is group 1; a downlevel-hidden conditional comment's markup follows
# its "[if ...]>" header.
_COMMENT = re.compile(r"<!--(?:>|->|((?:[^-]++|-(?!-!?>))*+)(?:--!?>)?)")
_CONDITION = re.compile(r"\[if[^\]]*+\]>", re.IGNORECASE | re.ASCII)

# --- destinations -------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"\{\{.*?\}\}|\*\|.*?\|\*|%%.*?%%", re.DOTALL)
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*:", re.IGNORECASE | re.ASCII)
_CHARREF = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")
_URL_TRIM = "".join(map(chr, range(0x21)))  # C0 controls and space: the URL parser trims them


def extract(html: str) -> Extraction:
    """The trackable links of `html`, in document order, and where the pixel goes."""
    found: list[tuple[int, int, str, str, str | None]] = []  # start, end, raw, quote, text
    base_href: str | None = None
    body_end = plaintext_at = body_start = head_end = -1
    pos, end = 0, len(html)
    resume: list[tuple[int, int]] = []  # (pos, end) to go back to after a conditional comment
    step = _NEXT.match
    while True:
        m = step(html, pos, end)
        assert m is not None  # matches the empty string
        pos = m.end()
        comment, slash, name, double, single, unquoted, closed = m.groups()
        if name is None:
            if comment is None:  # the end of the document, or of a conditional comment
                if not resume:
                    break
                pos, end = resume.pop()
                continue
            # A conditional comment: its markup is scanned too.
            c = _COMMENT.match(html, m.start(1), end)
            assert c is not None
            data_start, data_end = c.span(1)
            condition = _CONDITION.match(html, data_start, data_end)
            if condition is not None:
                resume.append((c.end(), end))
                pos, end = condition.end(), data_end
            else:
                pos = c.end()
            continue
        if not closed:  # cut off by the end of input (or of a conditional comment)
            continue
        tag_start = m.start(2) - 1
        name = name.lower()
        if slash:  # </body> or </head>, the only end tags _SKIP stops at
            if not resume:
                if name == "body":
                    body_end = tag_start
                elif head_end < 0:
                    head_end = pos
            continue
        if name == "body":
            if body_start < 0 and not resume:
                body_start = pos
            continue
        if name == "plaintext":  # the rest is text
            if not resume:
                plaintext_at = tag_start
                break
            pos = end
            continue
        if double is not None:
            raw, quote, start = double, '"', m.start(4)
        elif single is not None:
            raw, quote, start = single, "'", m.start(5)
        elif unquoted is not None:
            raw, quote, start = unquoted, "", m.start(6)
        else:
            continue  # no href
        if name == "base":
            if base_href is None and not resume:
                base_href = _decode(raw)
        elif not (_MAYBE_DATA_TRACK.search(html, tag_start, pos)
                  and _tracking_off(html, tag_start)):
            text = _link_text(html, pos, end) if name == "a" else None
            found.append((start, start + len(raw), raw, quote, text))
    base = _base_url(base_href)
    links = []
    for start, stop, raw, quote, text in found:
        url = _destination(raw, base)
        if url is not None:
            links.append(LinkSpot(start, stop, url, quote, text))
    pixel_at = body_end if body_end >= 0 else plaintext_at if plaintext_at >= 0 else len(html)
    leading = _LEADING.match(html)
    top_at = (body_start if body_start >= 0 else head_end if head_end >= 0
              else leading.end() if leading else 0)
    return Extraction(tuple(links), pixel_at, min(top_at, pixel_at))


# What may come before the content when there is no <body> or </head>: white space,
# comments, a doctype, an XML declaration, <html>. The pixel goes after it: before a doctype
# it would put the document in quirks mode.
_LEADING = re.compile(r"(?:[\t\n\f\r ]++|<!--.*?-->|<![dD][oO][cC][tT][yY][pP][eE][^>]*+>"
                      r"|<\?[^>]*+>|<(?i:html)(?=[\t\n\f\r />])[^>]*+>)*+", re.DOTALL)
# How far after an <a ...> its </a> is looked for: visible link text is short, and a link
# never closed must not make every link cost a scan to the end of the document.
_TEXT_WINDOW = 4096
_END_A = re.compile(r"</[aA](?=[\t\n\f\r />])")
_TAG = re.compile(r"<[^>]*+>?")
_SPACES = re.compile(r"\s+")
# A URL as people write one in text: with its scheme, from www., or a bare host name with a
# top-level domain of letters (example.com/path), and nothing else around it.
_URL_TEXT = re.compile(
    r"(?:https?://|www\.)\S+"
    r"|(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,63}\.?(?::\d{1,5})?(?:[/?#]\S*)?",
    re.IGNORECASE)


def _link_text(html: str, start: int, end: int) -> str | None:
    """The visible text of the <a> whose start tag ends at `start`: up to its </a>, without
    tags, character references decoded, white space collapsed."""
    close = _END_A.search(html, start, min(end, start + _TEXT_WINDOW))
    if close is None:
        return None
    text = _TAG.sub("", html[start:close.start()])
    if "&" in text:
        text = _html.unescape(text)
    return _SPACES.sub(" ", text).strip()


def looks_like_url(text: str | None) -> bool:
    """Whether a link's visible text is itself a URL (`https://shop.example/sale`,
    `www.example.com`, `example.com/offer`)."""
    return text is not None and _URL_TEXT.fullmatch(text) is not None


def _tracking_off(html: str, tag_start: int) -> bool:
    m = _DATA_TRACK.match(html, tag_start)
    assert m is not None
    value = m.group(1) or m.group(2) or m.group(3) or ""
    return _decode(value).strip(_URL_TRIM).lower() == "off"


def render(html: str, extraction: Extraction, tracked_urls: Sequence[str | None],
           pixel_url: str | None, honeypot_url: str | None = None, *,
           pixel_at_top: bool = False) -> str:
    """`html` with tracked_urls[i] in place of link i's value (None: link i stays as it is)
    and the pixel at its place (at the top with `pixel_at_top`), preceded by the honeypot
    link when one is given; without a pixel URL, no pixel."""
    links = extraction.links
    if len(tracked_urls) != len(links):
        raise ValueError(f"{len(links)} links, but {len(tracked_urls)} tracked URLs")
    pixel = PIXEL_TEMPLATE.format(url=_escape(pixel_url, '"')) if pixel_url is not None else ""
    if honeypot_url is not None:
        pixel = HONEYPOT_TEMPLATE.format(url=_escape(honeypot_url, '"')) + pixel
    pixel_at = extraction.top_at if pixel_at_top else extraction.pixel_at
    parts: list[str] = []
    pos = 0
    for spot, url in zip(links, tracked_urls, strict=True):
        if pixel and pos <= pixel_at <= spot.start:  # the pixel comes before this link
            parts += (html[pos:pixel_at], pixel)
            pos, pixel = pixel_at, ""
        if url is None:
            continue
        value = _escape(url, spot.quote or '"')
        # An unquoted value gets quotes: then no character of the URL can end the attribute.
        parts += (html[pos:spot.start], value if spot.quote else f'"{value}"')
        pos = spot.end
    parts += (html[pos:pixel_at], pixel, html[pixel_at:]) if pixel else (html[pos:],)
    return "".join(parts)


def _escape(url: str, quote: str) -> str:
    if "&" in url:
        url = url.replace("&", "&amp;")
    if quote in url:
        url = url.replace(quote, "&quot;" if quote == '"' else "&#39;")
    return url


def _decode(value: str) -> str:
    """Character references decoded as the tokenizer does in an attribute value."""
    if "&" not in value:
        return value
    if value.count("&") == value.count("&amp;"):  # the usual query string: a fifth of the cost
        return value.replace("&amp;", "&")
    return _CHARREF.sub(_charref, value)


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
    return href if destinations.problem(href) is None and not _has_placeholder(href) else None


def _has_placeholder(value: str) -> bool:
    return ("{{" in value or "*|" in value or "%%" in value) and bool(_PLACEHOLDER.search(value))


def _destination(raw: str, base: str | None) -> str | None:
    """The destination of a link whose attribute value is `raw`, or None: left alone."""
    # The messages of a campaign share most of their links: the same raw values come back
    # thousands of times. The cache holds at most 1024 keys of at most 2048 characters.
    if len(raw) <= MAX_URL_BYTES:
        return _cached_destination(raw, base)
    return _find_destination(raw, base)


def _find_destination(raw: str, base: str | None) -> str | None:
    value = _decode(raw).strip(_URL_TRIM)
    if not value or value[0] == "#" or _has_placeholder(value):
        return None
    if value.startswith(("https://", "http://")):
        url: str | None = value
    elif (scheme := _SCHEME.match(value)) is not None:
        url = value if scheme.group().lower() in ("http:", "https:") else None
    else:
        url = urljoin(base, value) if base is not None else None
    return url if url is not None and destinations.problem(url) is None else None


_cached_destination = lru_cache(maxsize=1024)(_find_destination)


