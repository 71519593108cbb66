"""`tracker relay`: an SMTP relay that instruments outgoing mail on its way to the real server.

Senders hand their mail to the relay instead of their SMTP server. A message with an
`X-Tracker-Campaign: <id>` header is registered once per recipient (one batch call for
all its recipients), and each recipient is sent a copy of their own: every trackable link
of every `text/html` part replaced by that copy's tracked URL, the open pixel added, the
`X-Tracker-*` headers removed. A message without the header goes on byte for byte. Mail
goes upstream with the original envelope sender, and the relay answers its client only
once the upstream has accepted it: the relay keeps no queue, the sender's MTA does.

Mail is never delayed or lost for the tracker's sake: when the API is unreachable, slower
than --api-timeout or refuses the registration, the message goes on uninstrumented (without
its X-Tracker-* headers), counted and logged in one line. When the upstream fails, the
client gets a 451 and retries.

The message is edited in place, not re-serialized: the MIME tree is walked over the raw
bytes (header blocks, boundary lines), and only the body of each `text/html` part is
replaced, decoded from and re-encoded to its transfer encoding and charset. Every other
byte stays as it was: other parts, headers, folding, boundaries, preamble and epilogue.
Links are found and replaced by tracker.instrument, the engine the API uses; the API is
sent the links only, never a body.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import email.policy
import logging
import re
import signal
import socket
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from tracker.client import AsyncClient, NewMessage, Registered, TrackerError
from tracker.instrument import Extraction, extract, render

__all__ = ["Mail", "RelayConfig", "RelayHandler", "RelayStats", "Upstream", "html_charset",
           "parse_address", "serve"]

log = logging.getLogger("tracker.relay")

CAMPAIGN_HEADER = b"x-tracker-campaign"
_TRACKER_PREFIX = b"x-tracker-"
# Nesting deeper than any mail program writes; parts below it are left as they are.
_MAX_DEPTH = 32
# RFC 5321 4.5.3.1.6: a line is at most 998 octets before its CRLF. Tracked URLs are longer
# than most originals and the pixel adds ~300 characters, so a part sent as it is (7bit,
# 8bit) can outgrow it; such a part is re-encoded as quoted-printable.
_MAX_LINE = 998
_SUBJECT_CHARS = 998
# How long shutdown waits for messages in flight before it drops their connections (their
# senders then retry: nothing was accepted).
_DRAIN_S = 30.0

_HEADERS = BytesHeaderParser(policy=email.policy.default)
_BLANK_LINE = re.compile(rb"\n\r?\n")
# One header field: its first line and any folded continuation lines, each with its line
# break. Lines end at LF: a stray CR is part of the line, as for Postfix.
_FIELD = re.compile(rb"(?!\r?\n|\Z)[^\n]*+\n?(?:[ \t][^\n]*+\n?)*+")
_LONG_LINE = re.compile(rb"[^\r\n]{%d}" % (_MAX_LINE + 1))
_META_CHARSET = re.compile(
    rb"""<meta\b[^>]*?\bcharset\s*=\s*["']?\s*([a-zA-Z0-9._:+-]+)""", re.IGNORECASE)
# Every character a tracked URL, the pixel tag or ordinary markup uses.
_ASCII = "".join(map(chr, range(0x20, 0x7F)))
# Mail programs and browsers read these labels as windows-1252 (WHATWG Encoding); decoding
# them so keeps € and curly quotes in URLs right. The bytes come back the same either way.
_AS_WINDOWS_1252 = frozenset({"ascii", "iso8859-1"})


# --- charsets -----------------------------------------------------------------------------

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


# --- the message --------------------------------------------------------------------------

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
        return [spot.url for part in self.parts for spot in part.extraction.links]

    def copy_for(self, registered: Registered) -> bytes:
        """The message as `registered`'s recipient gets it."""
        tracked = [link.tracked_url for link in registered.links]
        if len(tracked) != len(self.links):
            raise ValueError(f"{len(self.links)} links registered, {len(tracked)} came back")
        honeypot = _honeypot(registered.html)
        out: list[bytes] = []
        pos = first = 0
        for part in self.parts:
            count = len(part.extraction.links)
            html = render(part.text, part.extraction, tracked[first:first + count],
                          registered.pixel_url, honeypot)
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


# --- the relay ----------------------------------------------------------------------------

def parse_address(value: str, what: str) -> tuple[str, int]:
    """"HOST:PORT" (an IPv6 host in brackets) -> (host, port); ValueError saying what is wrong."""
    host, colon, port = value.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what}: expected HOST:PORT, got {value!r}")
    return host, int(port)


@dataclass(frozen=True, slots=True)
class Upstream:
    host: str
    port: int
    starttls: bool = False
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    cafile: str | None = None  # CA bundle to verify the upstream's certificate (system's if None)
    timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class RelayConfig:
    listen: tuple[str, int]
    upstream: Upstream
    api_url: str
    api_key: str = field(repr=False)
    api_timeout: float = 10.0
    hostname: str | None = None  # greeting and EHLO name; the machine's FQDN if None


@dataclass(slots=True)
class RelayStats:
    received: int = 0
    passed_through: int = 0  # no X-Tracker-Campaign header: forwarded byte for byte
    instrumented: int = 0  # messages sent as one instrumented copy per recipient
    no_html: int = 0  # had the header but no HTML part to instrument
    uninstrumented: int = 0  # the tracker API failed: forwarded without tracking
    deferred: int = 0  # the upstream failed: the client was answered 451
    refused: int = 0  # the upstream refused every recipient: its 5xx was passed on


class _Failure(Exception):
    """An upstream failure, as the reply to give the client."""

    def __init__(self, reply: str, permanent: bool) -> None:
        super().__init__(reply)
        self.reply = reply
        self.permanent = permanent


class RelayHandler:
    """The aiosmtpd handler: one call of handle_DATA per message."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        # Looked up once: getfqdn may wait on DNS, and aiosmtpd and aiosmtplib would look it
        # up for every connection.
        self.hostname = config.hostname or socket.getfqdn()
        self.stats = RelayStats()
        self._api = AsyncClient(config.api_url, config.api_key, timeout=config.api_timeout)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.stats.received += 1
        self._in_flight += 1
        self._idle.clear()
        raw = envelope.original_content or b""
        recipients = [str(r) for r in envelope.rcpt_tos]
        try:
            try:
                copies = await self._copies(raw, recipients)
            except Exception:
                # Never lose mail to a bug or a shape nobody foresaw: it goes on as it came.
                log.exception("cannot instrument a message; forwarding it unchanged")
                self.stats.uninstrumented += 1
                copies = iter([(recipients, raw)])
            try:
                return await self._forward(str(envelope.mail_from or ""), copies,
                                           [str(o) for o in envelope.mail_options])
            except Exception:
                # aiosmtpd would answer a 500 and the sender bounce the mail; a 451 keeps it
                # in the sender's queue.
                log.exception("cannot relay a message")
                return self._defer("451 4.3.0 relay error")
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _copies(self, raw: bytes,
                      recipients: list[str]) -> Iterator[tuple[list[str], bytes]]:
        """What to send: (recipients, message) pairs, made one at a time as they are sent."""
        mail = Mail.parse(raw)
        if mail.campaign is None:
            self.stats.passed_through += 1
            return iter([(recipients, raw)])
        if mail.unreadable:
            log.error("campaign %r: cannot read the message's MIME structure; sent uninstrumented",
                      mail.campaign)
            self.stats.uninstrumented += 1
            return iter([(recipients, mail.stripped)])
        if not mail.parts:
            self.stats.no_html += 1
            return iter([(recipients, mail.stripped)])
        links = mail.links
        try:
            # The links only, never a body; the empty document brings back what the server
            # adds to every document: the pixel and its honeypot link.
            registered = await self._api.register_batch(
                mail.campaign, [NewMessage(r, mail.subject, links=links, html="")
                                for r in recipients])
        except TrackerError as exc:
            self.stats.uninstrumented += 1
            # One line per message, without addresses or body: the campaign and the reason.
            log.warning("campaign %r: %s; %d recipient(s) sent uninstrumented (%d so far)",
                        mail.campaign, exc, len(recipients), self.stats.uninstrumented)
            return iter([(recipients, mail.stripped)])
        self.stats.instrumented += 1
        return self._instrumented(mail, recipients, registered)

    def _instrumented(self, mail: Mail, recipients: list[str],
                      registered: list[Registered]) -> Iterator[tuple[list[str], bytes]]:
        for recipient, item in zip(recipients, registered, strict=True):
            try:
                copy = mail.copy_for(item)
            except Exception:  # a bug must cost the tracking, not the mail
                log.exception("cannot instrument a copy; sending it uninstrumented")
                copy = mail.stripped
            yield [recipient], copy

    async def _forward(self, mail_from: str, copies: Iterator[tuple[list[str], bytes]],
                       options: Sequence[str]) -> str:
        upstream = self.config.upstream
        smtp = aiosmtplib.SMTP(
            hostname=upstream.host, port=upstream.port, timeout=upstream.timeout,
            # Only when asked: opportunistic STARTTLS with a certificate that fails to verify
            # would turn a working plain connection into deferred mail.
            start_tls=upstream.starttls, cert_bundle=upstream.cafile,
            username=upstream.user, password=upstream.password,
            local_hostname=self.hostname)
        delivered = 0
        permanent: list[_Failure] = []
        try:
            await smtp.connect()
            # Options the client gave that the upstream understands; SIZE is recomputed.
            wanted = [o for o in options
                      if o.upper().partition("=")[0] in ("BODY", "SMTPUTF8")
                      and smtp.supports_extension("8bitmime" if o.upper().startswith("BODY")
                                                  else "smtputf8")]
            for recipients, content in copies:
                try:
                    refused, _ = await smtp.sendmail(mail_from, recipients, content,
                                                     mail_options=wanted)
                except _REFUSED as exc:
                    failure = _failure(exc)
                    if not failure.permanent:
                        raise failure from exc
                    permanent.append(failure)
                    continue
                for response in refused.values():
                    failure = _refusal(response.code, response.message)
                    if not failure.permanent:
                        raise failure
                    permanent.append(failure)
                delivered += 1
        except _Failure as failure:
            return self._defer(failure.reply)
        except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
            return self._defer(f"451 4.4.1 upstream unavailable ({type(exc).__name__})")
        finally:
            await _quit(smtp)
        if permanent and not delivered:
            self.stats.refused += 1
            return permanent[0].reply
        if permanent:
            # One reply covers all recipients (SMTP has no other way): the refused ones
            # cannot be bounced from here; the upstream's log has them.
            log.warning("upstream refused %d recipient(s) of a message it accepted for others",
                        len(permanent))
        return "250 2.0.0 OK"

    def _defer(self, reply: str) -> str:
        self.stats.deferred += 1
        log.warning("upstream %s:%d failed; answered %r so that the sender retries",
                    self.config.upstream.host, self.config.upstream.port, reply)
        return reply

    async def wait_idle(self) -> None:
        """Returns once no message is being relayed."""
        await self._idle.wait()

    async def close(self) -> None:
        await self._api.aclose()


_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_REFUSED = (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused,
            aiosmtplib.SMTPNotSupported)


def _failure(exc: Exception) -> _Failure:
    """The reply for an upstream refusal of a mail transaction."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        exc = exc.recipients[0]
    if isinstance(exc, aiosmtplib.SMTPNotSupported):  # SMTPUTF8, which the upstream lacks
        return _Failure("553 5.6.7 the upstream does not support SMTPUTF8", permanent=True)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _refusal(exc.code, exc.message)
    return _Failure(f"451 4.4.1 upstream unavailable ({type(exc).__name__})", permanent=False)


def _refusal(code: int, message: str) -> _Failure:
    """A 5xx is passed on, so that the sender bounces the mail; anything else is a 451."""
    if 500 <= code < 600:
        text = " ".join(message.split())[:200] or "refused"
        # An enhanced status code (RFC 3463) must come right after the reply code.
        enhanced, _, rest = text.partition(" ")
        if _ENHANCED.fullmatch(enhanced):
            return _Failure(f"{code} {enhanced} upstream: {rest}", permanent=True)
        return _Failure(f"{code} upstream: {text}", permanent=True)
    return _Failure(f"451 4.4.1 upstream unavailable ({code})", permanent=False)


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    if smtp.is_connected:
        try:
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()


def smtp_server(handler: RelayHandler) -> SMTP:
    """One SMTP session of the relay (aiosmtpd makes one per connection)."""
    return SMTP(handler, hostname=handler.hostname,
                # UTF-8 addresses are taken and passed on when the upstream takes them.
                enable_SMTPUTF8=True)


async def serve(config: RelayConfig) -> RelayStats:
    """Runs the relay until SIGTERM or SIGINT; returns its counts."""
    # aiosmtpd logs each sender and recipient at INFO; the relay logs no addresses.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    handler = RelayHandler(config)
    loop = asyncio.get_running_loop()
    host, port = config.listen
    server = await loop.create_server(lambda: smtp_server(handler), host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    up = config.upstream
    log.info("relay on %s:%d -> %s:%d%s, tracker API %s", host, port, up.host, up.port,
             " (STARTTLS)" if up.starttls else "", config.api_url)
    try:
        await stop.wait()
    finally:
        # Stop taking connections, let the messages in flight finish, then close.
        server.close()
        try:
            async with asyncio.timeout(_DRAIN_S):
                await handler.wait_idle()
        except TimeoutError:
            log.warning("stopping with messages in flight; their senders will retry")
        await handler.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("relay stopped: %s", handler.stats)
    return handler.stats
