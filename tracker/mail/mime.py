"""Rewriting a message's HTML parts in place, for one recipient's copy.

The message is edited in place, not re-serialized: the MIME tree is walked over the raw
bytes (header blocks, boundary lines), and only the body of each `text/html` part is
replaced, decoded from and re-encoded to its transfer encoding and charset. Every other
byte stays as it was: other parts, headers, folding, boundaries, preamble and epilogue.
The `X-Tracker-*` headers are taken out of every copy. Links are found and replaced by
tracker.instrument, the engine the API uses.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser

from tracker.mail.charsets import html_charset, text_codec
from tracker.mail.client import Registered
from tracker.mail.instrument import Extraction, LinkSpot, extract, render

__all__ = ["CAMPAIGN_HEADER", "Mail"]

CAMPAIGN_HEADER = b"x-tracker-campaign"
_TRACKER_PREFIX = b"x-tracker-"
# Nesting deeper than any mail program writes; parts below it are left as they are.
_MAX_DEPTH = 32
# RFC 5321 4.5.3.1.6: a line is at most 998 octets before its CRLF. Tracked URLs are longer
# than most originals and the pixel adds ~300 characters, so a part sent as it is (7bit,
# 8bit) can outgrow it; such a part is re-encoded as quoted-printable.
_MAX_LINE = 998
_SUBJECT_CHARS = 998

_HEADERS = BytesHeaderParser(policy=email.policy.default)
_BLANK_LINE = re.compile(rb"\n\r?\n")
# One header field: its first line and any folded continuation lines, each with its line
# break. Lines end at LF: a stray CR is part of the line, as for Postfix.
_FIELD = re.compile(rb"(?!\r?\n|\Z)[^\n]*+\n?(?:[ \t][^\n]*+\n?)*+")
_LONG_LINE = re.compile(rb"[^\r\n]{%d}" % (_MAX_LINE + 1))


@dataclass(frozen=True, slots=True)
class _HtmlPart:
    head_start: int  # offsets into Mail.stripped: the part's header block,
    body_start: int  # its body,
    end: int  # and the end of the body
    text: str  # the decoded body (undecodable bytes as surrogate escapes: they come back)
    codec: str
    transfer: str  # "quoted-printable", "base64", or "" when sent as it is (7bit/8bit/binary)
    eol: bytes
    base64_width: int
    extraction: Extraction

    def encode(self, mail: bytes, html: str) -> tuple[bytes, bytes]:
        """The part's header block and body for the instrumented `html`."""
        head = mail[self.head_start:self.body_start]
        data = html.encode(self.codec, "surrogateescape")
        transfer = self.transfer
        if not transfer and _LONG_LINE.search(data):
            transfer = "quoted-printable"
            head = _set_header(head, b"Content-Transfer-Encoding", b"quoted-printable", self.eol)
        if transfer == "quoted-printable":
            # b2a_qp writes the line ending it met first; the message's must be used throughout.
            body = re.sub(rb"\r?\n", self.eol, binascii.b2a_qp(data, istext=True))
        elif transfer == "base64":
            original = mail[self.body_start:self.end]
            encoded = base64.b64encode(data)
            body = self.eol.join(encoded[i:i + self.base64_width]
                                 for i in range(0, len(encoded), self.base64_width))
            body += original[len(original.rstrip()):]  # the line break(s) it ended with
        else:
            body = data
        return head, body


@dataclass(frozen=True, slots=True)
class Mail:
    """A message as the relay sees it: its campaign, and the places of its HTML parts."""
    campaign: str | None  # the X-Tracker-Campaign header's value; None: not to be tracked
    stripped: bytes  # the message without its X-Tracker-* headers
    subject: str | None
    parts: tuple[_HtmlPart, ...]
    unreadable: bool = False  # the MIME walk failed: nothing can be instrumented

    @classmethod
    def parse(cls, raw: bytes) -> Mail:
        body_start = _body_start(raw, 0, len(raw))
        campaign: str | None = None
        kept: list[bytes] = []
        for name, value, whole in _fields(raw[:_fields_end(raw, body_start)]):
            if name.startswith(_TRACKER_PREFIX):
                if name == CAMPAIGN_HEADER and campaign is None:
                    campaign = re.sub(rb"\r?\n", b"", value).strip().decode("ascii", "replace")
            else:
                kept.append(whole)
        if campaign is None:
            return cls(None, raw, None, ())
        stripped = b"".join(kept) + raw[_fields_end(raw, body_start):]
        parts: list[_HtmlPart] = []
        try:
            _walk(stripped, 0, len(stripped), 0, parts)
        except Exception:  # whatever the cause, the mail must still go out
            return cls(campaign, stripped, _subject(stripped), (), unreadable=True)
        return cls(campaign, stripped, _subject(stripped), tuple(parts))

    @property
    def links(self) -> list[str]:
        """The destinations to register, every HTML part's in order."""
        return [spot.url for spot in self.link_spots]

    @property
    def link_spots(self) -> list[LinkSpot]:
        """The links of every HTML part, in order, with their visible text."""
        return [spot for part in self.parts for spot in part.extraction.links]

    def copy_for(self, registered: Registered, *, pixel_at_top: bool = False) -> bytes:
        """The message as `registered`'s recipient gets it (links the server left untracked
        stay as they are; no pixel when it gave none)."""
        tracked = [link.tracked_url for link in registered.links]
        if len(tracked) != len(self.links):
            raise ValueError(f"{len(self.links)} links registered, {len(tracked)} came back")
        honeypot = _honeypot(registered.html)
        out: list[bytes] = []
        pos = first = 0
        for part in self.parts:
            count = len(part.extraction.links)
            html = render(part.text, part.extraction, tracked[first:first + count],
                          registered.pixel_url, honeypot, pixel_at_top=pixel_at_top)
            first += count
            head, body = part.encode(self.stripped, html)
            out += (self.stripped[pos:part.head_start], head, body)
            pos = part.end
        out.append(self.stripped[pos:])
        return b"".join(out)


def _honeypot(markup: str | None) -> str | None:
    """The honeypot link's URL in what the API made of an empty document (the pixel and the
    honeypot link, signed with the server's key, which the relay does not have)."""
    links = extract(markup).links if markup else ()
    return links[0].url if links else None


def _body_start(raw: bytes, start: int, end: int) -> int:
    """Where the body of the entity raw[start:end] starts: after the empty line that ends its
    header block (an entity that starts with an empty line has no headers)."""
    for eol in (b"\r\n", b"\n"):
        if raw.startswith(eol, start):
            return start + len(eol)
    m = _BLANK_LINE.search(raw, start, end)
    return m.end() if m else end


def _fields_end(raw: bytes, body_start: int) -> int:
    """Where the empty line before `body_start` starts (the end of the header fields of the
    entity starting at 0); `body_start` when there is none (the entity is all headers)."""
    for eol in (b"\r\n", b"\n"):
        blank = body_start - len(eol)
        if blank >= 0 and raw.startswith(eol, blank) and (
                blank == 0 or raw.endswith(b"\n", 0, blank)):
            return blank
    return body_start


def _fields(head: bytes) -> Iterator[tuple[bytes, bytes, bytes]]:
    """(lower-case name, raw value, whole field with its line break) of each header field of
    the header fields `head`; whatever is not a field (a stray CR) comes as a nameless one,
    so that joining the wholes always gives `head` back."""
    pos = 0
    while (m := _FIELD.match(head, pos)) is not None:
        whole = m.group()
        name, _, value = whole.partition(b":")
        yield name.strip().lower(), value, whole
        pos = m.end()
    if pos < len(head):
        yield b"", b"", head[pos:]


def _set_header(head: bytes, name: bytes, value: bytes, eol: bytes) -> bytes:
    """A header block (ending with its empty line) with field `name` set to `value`."""
    wanted = name.lower()
    fields = head[:_fields_end(head, len(head))]
    kept = b"".join(whole for n, _, whole in _fields(fields) if n != wanted)
    if kept and not kept.endswith(b"\n"):
        kept += eol
    return kept + name + b": " + value + eol + head[len(fields):]


def _subject(raw: bytes) -> str | None:
    """The decoded Subject, as registration takes it: no control characters, at most 998."""
    try:
        value = _HEADERS.parsebytes(raw[:_body_start(raw, 0, len(raw))]).get("subject")
    except Exception:  # a header the email package cannot make sense of: no subject then
        return None
    if value is None:
        return None
    subject = "".join(c if c == "\t" or unicodedata.category(c) not in ("Cc", "Cs") else " "
                      for c in str(value)).strip()
    return subject[:_SUBJECT_CHARS] or None


def _walk(raw: bytes, start: int, end: int, depth: int, found: list[_HtmlPart]) -> None:
    """Collects the HTML parts of the entity raw[start:end], in order."""
    body_start = _body_start(raw, start, end)
    headers = _HEADERS.parsebytes(raw[start:body_start])
    kind = headers.get_content_type()
    if kind.startswith("multipart/"):
        boundary = headers.get_boundary()
        if boundary and depth < _MAX_DEPTH:
            try:
                delimiter = boundary.encode("ascii", "surrogateescape")
            except UnicodeEncodeError:
                return
            for part_start, part_end in _parts(raw, body_start, end, delimiter):
                _walk(raw, part_start, part_end, depth + 1, found)
    # An HTML attachment is a file the reader saves, not the message they read; a forwarded
    # message (message/rfc822) is someone else's mail: both stay as they are.
    elif kind == "text/html" and headers.get_content_disposition() != "attachment":
        part = _html_part(raw, start, body_start, end, headers)
        if part is not None:
            found.append(part)


def _parts(raw: bytes, start: int, end: int, boundary: bytes) -> Iterator[tuple[int, int]]:
    """The spans of the body parts of a multipart body raw[start:end]. A part ends before the
    line break that precedes the next delimiter line (RFC 2046 5.1.1: it belongs to it)."""
    delimiter = re.compile(rb"(?m)^--" + re.escape(boundary) + rb"(--)?[ \t]*+(?:\r?\n|\Z)")
    part_start: int | None = None
    for m in delimiter.finditer(raw, start, end):
        if part_start is not None:
            part_end = m.start()
            part_end -= 2 if raw.endswith(b"\r\n", 0, part_end) else 1
            if part_end > part_start:
                yield part_start, part_end
        if m.group(1):  # the close delimiter; the epilogue is not a part
            return
        part_start = m.end()
    if part_start is not None and part_start < end:  # no close delimiter: runs to the end
        yield part_start, end


def _html_part(raw: bytes, start: int, body_start: int, end: int,
               headers: Message) -> _HtmlPart | None:
    body = raw[body_start:end]
    transfer = str(headers.get("content-transfer-encoding", "")).strip().lower()
    width = 76
    try:
        if transfer == "quoted-printable":
            data = binascii.a2b_qp(body)
        elif transfer == "base64":
            data = binascii.a2b_base64(body)
            first_line = len(body.split(b"\n", 1)[0].rstrip())
            if 4 <= first_line <= 76 and first_line % 4 == 0:
                width = first_line
        elif transfer in ("", "7bit", "8bit", "binary"):
            data, transfer = body, ""
        else:  # x-uuencode and the like: it could not be written back the same way
            return None
    except binascii.Error:
        return None
    codec = text_codec(headers.get_content_charset() or html_charset(data), data)
    if codec is None:
        return None
    text = data.decode(codec, "surrogateescape")
    extraction = extract(text)
    eol = b"\r\n" if raw.endswith(b"\r\n", 0, body_start) else b"\n"
    return _HtmlPart(start, body_start, end, text, codec, transfer, eol, width, extraction)

