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

Each copy is made by tracker.mime_rewrite, which edits the message's HTML parts in place
and leaves every other byte as it was; the API is sent the links only, never a body.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from tracker.mail.client import (
    AsyncClient,
    AuthenticationError,
    NewMessage,
    NotFound,
    Registered,
    TrackerError,
)
from tracker.mail.mime import Mail

log = logging.getLogger("tracker.mail.relay")

# How long shutdown waits for messages in flight before it drops their connections (their
# senders then retry: nothing was accepted).
_DRAIN_S = 30.0
# While the API has not answered since start, its key is checked again this often (doubling).
_CHECK_FIRST_S = 1.0
_CHECK_MAX_S = 30.0


class ApiRefused(Exception):
    """The tracker API refuses the relay's key, or the URL is not a tracker API: every
    message would go out untracked. `setting` is the one to fix: "key" or "url"."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


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
        # campaign -> (when to look again, whether its pixel goes at the top of the body)
        self._pixel_top: dict[str, tuple[float, bool]] = {}
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
        # The links only (with the text a reader sees, so that the server can leave a link
        # whose text is a URL as it is), never a body; the empty document brings back what
        # the server adds to every document: the pixel and its honeypot link.
        links = [{"url": spot.url, "text": spot.text} if spot.text is not None else spot.url
                 for spot in mail.link_spots]
        try:
            pixel_top = await self._pixel_at_top(mail.campaign)
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
        return self._instrumented(mail, recipients, registered, pixel_top)

    async def _pixel_at_top(self, campaign: str) -> bool:
        """The campaign's pixel option, looked up at most once a minute per campaign."""
        now = asyncio.get_running_loop().time()
        known = self._pixel_top.get(campaign)
        if known is not None and known[0] > now:
            return known[1]
        options = (await self._api.get_campaign(campaign)).options or {}
        top = options.get("pixel") == "top"
        if len(self._pixel_top) > 10_000:
            self._pixel_top.clear()
        self._pixel_top[campaign] = (now + 60, top)
        return top

    def _instrumented(self, mail: Mail, recipients: list[str], registered: list[Registered],
                      pixel_top: bool) -> Iterator[tuple[list[str], bytes]]:
        for recipient, item in zip(recipients, registered, strict=True):
            try:
                copy = mail.copy_for(item, pixel_at_top=pixel_top)
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


async def check_api(config: RelayConfig) -> bool:
    """Ask the tracker API whether it takes the relay's key. True: it does. False: it did
    not answer (down, starting, its database unreachable), which is logged. Raises
    ApiRefused when it answers no: a wrong key, or a URL that is not a tracker API."""
    silence = await _ask(config)
    if silence is not None:
        log.warning("the tracker API at %s does not answer (%s): relaying anyway, mail goes "
                    "out untracked until it does; the API key is checked then",
                    config.api_url, silence)
    return silence is None


async def _ask(config: RelayConfig) -> str | None:
    """None when the API takes the key; why it gave no answer otherwise."""
    async with AsyncClient(config.api_url, config.api_key, timeout=config.api_timeout) as api:
        try:
            await api.list_campaigns()
        except AuthenticationError as exc:
            raise ApiRefused("key", f"the tracker API at {config.api_url} refuses this key "
                             f"({exc.error}); with it every message would go out "
                             "untracked") from None
        except NotFound:
            raise ApiRefused("url", f"{config.api_url} is not a tracker API (404 on "
                             "/api/campaigns)") from None
        except TrackerError as exc:  # Unavailable, or an answer that is not the API's
            return str(exc)
    return None


async def _check_until_answered(config: RelayConfig, refused: list[ApiRefused],
                                stop: asyncio.Event) -> None:
    """The API did not answer at start: check the key once it does. A refusal then stops
    the relay, as it would have at start: a relay whose every message goes out untracked
    is a mistake to fix, not a state to run in."""
    delay = _CHECK_FIRST_S
    while True:
        await asyncio.sleep(delay)
        delay = min(delay * 2, _CHECK_MAX_S)
        try:
            silence = await _ask(config)
        except ApiRefused as exc:
            log.error("%s: stopping", exc)
            refused.append(exc)
            stop.set()
            return
        if silence is None:
            log.info("the tracker API at %s answers and takes the key", config.api_url)
            return


async def serve(config: RelayConfig) -> RelayStats:
    """Runs the relay until SIGTERM or SIGINT; returns its counts. Raises ApiRefused, before
    it takes any mail, if the tracker API refuses its key (or later, if the API was not
    answering at start and refuses it once it does)."""
    # aiosmtpd logs each sender and recipient at INFO; the relay logs no addresses.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    answered = await check_api(config)
    handler = RelayHandler(config)
    loop = asyncio.get_running_loop()
    host, port = config.listen
    server = await loop.create_server(lambda: smtp_server(handler), host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    refused: list[ApiRefused] = []
    checking = (None if answered else asyncio.create_task(
        _check_until_answered(config, refused, stop), name="tracker-relay-api-check"))
    up = config.upstream
    log.info("relay on %s:%d -> %s:%d%s, tracker API %s", host, port, up.host, up.port,
             " (STARTTLS)" if up.starttls else "", config.api_url)
    try:
        await stop.wait()
    finally:
        if checking is not None:
            checking.cancel()
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
    if refused:
        raise refused[0]
    return handler.stats
