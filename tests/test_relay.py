"""`tracker relay` over real SMTP on loopback: a real tracker server and PostgreSQL behind it,
a real upstream (aiosmtpd) in front of which the relay sits, mail sent with smtplib and what
the upstream received read back with the email package."""

from __future__ import annotations

import asyncio
import base64
import binascii
import email
import email.policy
import logging
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tracker.ingest.tokens import Signer
from tracker.mail.client import Client
from tracker.mail.instrument import extract, render
from tracker.mail.mime import Mail
from tracker.mail.relay import RelayConfig, RelayHandler, Upstream

from .support import SECRET, Server, free_port, new_account, wait_for

CORPUS = Path(__file__).parent / "corpus"
PNG = base64.b64decode(  # a 1x1 PNG: the inline logo
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n" * 40
SENDER = "news@example.com"


# --- the upstream and the relay -----------------------------------------------------------

@dataclass
class Sink:
    """An upstream SMTP server's handler: keeps what it is given, answers `reply`."""
    reply: str = "250 OK"
    received: list[tuple[str, list[str], bytes]] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.reply.startswith("250"):
            self.received.append((str(envelope.mail_from), list(envelope.rcpt_tos),
                                  envelope.original_content or b""))
        return self.reply


@contextmanager
def upstream(**kwargs: Any) -> Iterator[tuple[Sink, int]]:
    sink, port = Sink(), free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port,
                            server_hostname="upstream.test", **kwargs)
    controller.start()
    try:
        yield sink, port
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def sink() -> Iterator[tuple[Sink, int]]:
    with upstream() as running:
        yield running


@contextmanager
def relay(api_url: str, api_key: str, upstream_port: int,
          **options: Any) -> Iterator[tuple[int, RelayHandler]]:
    """The relay in-process: its handler in aiosmtpd's threaded controller."""
    port = free_port()
    config = RelayConfig(("127.0.0.1", port), Upstream("127.0.0.1", upstream_port, **options),
                         api_url, api_key, api_timeout=5.0, hostname="relay.test")
    handler = RelayHandler(config)
    controller = Controller(handler, hostname="127.0.0.1", port=port,
                            server_hostname="relay.test")
    controller.start()
    try:
        yield port, handler
    finally:
        asyncio.run_coroutine_threadsafe(handler.close(), controller.loop).result(10)
        controller.stop()


@pytest.fixture(scope="module")
def key(module_dsn: str) -> str:
    return new_account(module_dsn)


@pytest.fixture(scope="module")
def api(server: Server, key: str) -> Iterator[Client]:
    with Client(server.url, key) as client:
        yield client


@pytest.fixture(scope="module")
def campaign(api: Client) -> str:
    return api.create_campaign("Relay").id


def send(port: int, message: bytes, recipients: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="sender.test", timeout=30) as smtp:
        smtp.sendmail(SENDER, recipients, message)


@contextmanager
def relay_log() -> Iterator[list[logging.LogRecord]]:
    """The relay's log records (tracker's loggers may not propagate to pytest's handler)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger = logging.getLogger("tracker.mail.relay")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# --- messages -----------------------------------------------------------------------------

def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def qp(data: bytes) -> bytes:
    return binascii.b2a_qp(data, istext=True)


def b64(data: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return b"\r\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))


# Text in MIME has CRLF line endings, also inside an encoded part.
NEWSLETTER = (CORPUS / "newsletter.html").read_bytes().decode().replace("\n", "\r\n")


def newsletter(campaign: str | None) -> bytes:
    """A mail program's multipart message: text and HTML alternatives, the HTML with an
    inline image (multipart/related), and a PDF attached."""
    tracker_headers = (f"X-Tracker-Campaign: {campaign}\nX-Tracker-Note: internal\n"
                       if campaign else "")
    return b"".join([
        crlf("From: Newsletter <news@example.com>\n"
             "To: undisclosed-recipients:;\n"
             "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=\n"
             "Date: Tue, 12 Nov 2024 10:00:00 +0100\n"
             "Message-ID: <n-1@example.com>\n"
             f"{tracker_headers}"
             "List-Unsubscribe: <https://example.com/unsubscribe?u=1>,\n"
             "\t<mailto:unsubscribe@example.com>\n"
             "MIME-Version: 1.0\n"
             'Content-Type: multipart/mixed; boundary="mixed-b"\n'
             "\n"
             "This is a multi-part message in MIME format.\n"
             "--mixed-b\n"
             'Content-Type: multipart/alternative; boundary="alt-b"\n'
             "\n"
             "--alt-b\n"
             "Content-Type: text/plain; charset=utf-8\n"
             "Content-Transfer-Encoding: quoted-printable\n"
             "\n"
             "Gr=C3=BC=C3=9Fe! Read it online: https://example.com/online\n"
             "--alt-b\n"
             'Content-Type: multipart/related; boundary="rel-b"; type="text/html"\n'
             "\n"
             "--rel-b\n"
             "Content-Type: text/html; charset=utf-8\n"
             "Content-Transfer-Encoding: quoted-printable\n"
             "\n"),
        qp(NEWSLETTER.encode()),
        crlf("\n--rel-b\n"
             "Content-Type: image/png\n"
             "Content-Transfer-Encoding: base64\n"
             "Content-ID: <logo@example.com>\n"
             'Content-Disposition: inline; filename="logo.png"\n'
             "\n"),
        b64(PNG),
        crlf("\n--rel-b--\n"
             "\n"
             "--alt-b--\n"
             "\n"
             "--mixed-b\n"
             'Content-Type: application/pdf; name="invoice.pdf"\n'
             "Content-Transfer-Encoding: base64\n"
             'Content-Disposition: attachment; filename="invoice.pdf"\n'
             "\n"),
        b64(PDF),
        crlf("\n--mixed-b--\n"
             "An epilogue nobody reads.\n"),
    ])


def without_tracker_headers(message: bytes) -> bytes:
    head, blank, body = message.partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n") if not line.startswith(b"X-Tracker-")]
    return b"\r\n".join(lines) + blank + body


def parse(message: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def html_part(message: EmailMessage) -> EmailMessage:
    (part,) = [p for p in message.walk() if p.get_content_type() == "text/html"]
    assert isinstance(part, EmailMessage)
    return part


def tracked_urls(html: str, server: Server) -> tuple[list[str], str, str | None]:
    """An instrumented document's tracked links in order, its pixel URL and its honeypot
    link's URL (the server adds one; it is no link of the message)."""
    honeypot = re.search(r'<a href="([^"]+)" tabindex="-1"', html)
    links = [spot.url for spot in extract(html).links
             if honeypot is None or spot.url != honeypot.group(1)]
    assert links and all(url.startswith(server.url + "/c/") for url in links), links[:3]
    pixel = re.search(re.escape(server.url) + r"/o/[^\"]+\.gif", html)
    assert pixel is not None
    return links, pixel.group(), honeypot.group(1) if honeypot else None


def expected_html(original: str, instrumented: str, server: Server) -> str:
    """The original document with the instrumented one's tracked URLs, pixel and honeypot
    spliced in by the engine: anything else that changed would make it differ."""
    links, pixel, honeypot = tracked_urls(instrumented, server)
    assert honeypot is not None
    return render(original, extract(original), links, pixel, honeypot)


def message_id(pixel_url: str) -> int:
    token = Signer([SECRET]).verify_open(pixel_url.rsplit("/", 1)[1].removesuffix(".gif"))
    assert token is not None
    return token.message_id


def assert_redirects_to_originals(original: str, instrumented: str, server: Server) -> None:
    links, _, _ = tracked_urls(instrumented, server)
    destinations = [spot.url for spot in extract(original).links]
    assert len(links) == len(destinations)
    for tracked, destination in zip(links, destinations, strict=True):
        answer = httpx.get(tracked)
        assert answer.status_code == 302
        assert answer.headers.raw[0] == (b"location", destination.encode())


# --- tests --------------------------------------------------------------------------------

@pytest.mark.slow
def test_each_recipient_gets_an_instrumented_copy_of_their_own(
        server: Server, key: str, api: Client, campaign: str,
        sink: tuple[Sink, int]) -> None:
    upstream_sink, upstream_port = sink
    upstream_sink.received.clear()
    original = newsletter(campaign)
    readers = ["ada@example.com", "grace@example.org"]
    with relay(server.url, key, upstream_port) as (port, handler):
        send(port, original, readers)
    assert handler.stats.instrumented == 1

    assert sorted(r for _, rcpts, _ in upstream_sink.received for r in rcpts) == readers
    pixels = set()
    for mail_from, (reader,), copy in upstream_sink.received:
        assert mail_from == SENDER
        assert b"X-Tracker-" not in copy
        message = parse(copy)
        assert [p.get_content_type() for p in message.walk()] == [
            "multipart/mixed", "multipart/alternative", "text/plain", "multipart/related",
            "text/html", "image/png", "application/pdf"]
        # Everything but the HTML part's body is byte for byte what was sent.
        sent_pieces = without_tracker_headers(original).split(b"--rel-b")
        copy_pieces = copy.split(b"--rel-b")
        assert copy_pieces[:1] + copy_pieces[2:] == sent_pieces[:1] + sent_pieces[2:]
        sent_head = sent_pieces[1].partition(b"\r\n\r\n")[0]
        assert copy_pieces[1].partition(b"\r\n\r\n")[0] == sent_head
        # The HTML part: still quoted-printable UTF-8, the original with only tracked URLs
        # and the pixel spliced in.
        part = html_part(message)
        assert part["content-transfer-encoding"] == "quoted-printable"
        assert part.get_content_charset() == "utf-8"
        assert max(map(len, copy_pieces[1].split(b"\r\n"))) <= 76
        html = part.get_content()
        assert html == expected_html(NEWSLETTER, html, server)
        _, pixel, _ = tracked_urls(html, server)
        pixels.add(pixel)
        registered = api.get_message(message_id(pixel))
        assert (registered.recipient, registered.subject) == (reader, "Grüße aus Köln")
        assert_redirects_to_originals(NEWSLETTER, html, server)
    assert len(pixels) == 2


def test_a_windows_1252_part_in_base64_keeps_its_charset_and_encoding(
        server: Server, key: str, campaign: str, sink: tuple[Sink, int]) -> None:
    upstream_sink, upstream_port = sink
    upstream_sink.received.clear()
    document = (CORPUS / "windows1252.bin").read_bytes()
    original = crlf(f"From: news@example.com\nTo: helene@example.fr\nSubject: Nouveaut=E9s\n"
                    f"X-Tracker-Campaign: {campaign}\nMIME-Version: 1.0\n"
                    "Content-Type: text/html; charset=windows-1252\n"
                    "Content-Transfer-Encoding: base64\n\n") + b64(document) + b"\r\n"
    with relay(server.url, key, upstream_port) as (port, _):
        send(port, original, ["helene@example.fr"])

    ((_, _, copy),) = upstream_sink.received
    message = parse(copy)
    assert message["content-transfer-encoding"] == "base64"
    assert message.get_content_charset() == "windows-1252"
    body = copy.partition(b"\r\n\r\n")[2]
    assert {len(line) for line in body.split(b"\r\n")[:-2]} == {76}
    assert copy.partition(b"\r\n\r\n")[0] + b"\r\n\r\n" == without_tracker_headers(
        original).partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    payload = message.get_payload(decode=True)
    assert isinstance(payload, bytes)
    source = document.decode("windows-1252")
    instrumented = payload.decode("windows-1252")
    assert payload == expected_html(source, instrumented, server).encode("windows-1252")
    assert_redirects_to_originals(source, instrumented, server)


def test_an_8bit_part_whose_lines_grow_too_long_becomes_quoted_printable(
        server: Server, key: str, campaign: str, sink: tuple[Sink, int]) -> None:
    upstream_sink, upstream_port = sink
    upstream_sink.received.clear()
    links = "".join(f'<a href="https://example.com/{i}">Straße {i}</a> ' for i in range(20))
    html = f"<html><body><p>{links}</p></body></html>\r\n"
    assert len(html.encode()) < 998
    original = crlf(f"From: news@example.com\nSubject: Long\nX-Tracker-Campaign: {campaign}\n"
                    "Content-Type: text/html; charset=utf-8\n"
                    "Content-Transfer-Encoding: 8bit\n\n") + html.encode()
    with relay(server.url, key, upstream_port) as (port, _):
        send(port, original, ["ada@example.com"])

    ((_, _, copy),) = upstream_sink.received
    assert max(map(len, copy.split(b"\r\n"))) <= 76
    message = parse(copy)
    assert message.get_all("content-transfer-encoding") == ["quoted-printable"]
    instrumented = message.get_content()
    assert instrumented == expected_html(html, instrumented, server)


def test_a_message_without_the_header_arrives_byte_for_byte(
        server: Server, key: str, sink: tuple[Sink, int]) -> None:
    upstream_sink, upstream_port = sink
    upstream_sink.received.clear()
    original = newsletter(None) + b"".join([
        b".a line that starts with a dot\r\n",
        b"trailing spaces   \r\n",
        "8-bit text: Grüße\r\n".encode(),
        b"..\r\n",
    ])
    readers = ["a@example.com", "b@example.com", "c@example.net"]
    with relay(server.url, key, upstream_port) as (port, handler):
        send(port, original, readers)
    assert upstream_sink.received == [(SENDER, readers, original)]
    assert handler.stats.passed_through == 1


@pytest.mark.slow
def test_with_the_tracker_stopped_mail_goes_on_uninstrumented_and_is_logged_once(
        module_dsn: str, key: str, campaign: str, sink: tuple[Sink, int],
        tmp_path: Path) -> None:
    upstream_sink, upstream_port = sink
    upstream_sink.received.clear()
    stopped = Server(module_dsn, tmp_path).start()
    stopped.stop()
    original = newsletter(campaign)
    readers = ["ada@example.com", "grace@example.org"]
    with relay_log() as records, relay(stopped.url, key, upstream_port) as (port, handler):
        send(port, original, readers)
    # One transaction for all recipients, as it came but for the X-Tracker-* headers.
    assert upstream_sink.received == [(SENDER, readers, without_tracker_headers(original))]
    assert handler.stats.uninstrumented == 1
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "uninstrumented" in warnings[0] and "cannot reach" in warnings[0]
    assert not any(reader in warnings[0] for reader in readers)


def test_an_unknown_campaign_goes_on_uninstrumented(
        server: Server, key: str, sink: tuple[Sink, int]) -> None:
    upstream_sink, upstream_port = sink
    upstream_sink.received.clear()
    original = newsletter("999999")
    with relay(server.url, key, upstream_port) as (port, handler):
        send(port, original, ["ada@example.com"])
    assert upstream_sink.received == [(SENDER, ["ada@example.com"],
                                       without_tracker_headers(original))]
    assert handler.stats.uninstrumented == 1


def test_an_unreachable_upstream_gets_the_client_a_451_to_retry(
        server: Server, key: str, campaign: str) -> None:
    with relay(server.url, key, free_port()) as (port, handler), \
            pytest.raises(smtplib.SMTPDataError) as deferred:
        send(port, newsletter(campaign), ["ada@example.com"])
    assert deferred.value.smtp_code == 451
    assert handler.stats.deferred == 1


def test_an_upstream_refusal_is_passed_on(server: Server, key: str) -> None:
    with upstream() as (refusing, upstream_port), \
            relay(server.url, key, upstream_port) as (port, handler), \
            pytest.raises(smtplib.SMTPDataError) as refused:
        refusing.reply = "554 5.7.1 Message rejected as spam"
        send(port, newsletter(None), ["ada@example.com"])
    assert refused.value.smtp_code == 554
    assert refused.value.smtp_error == b"5.7.1 upstream: Message rejected as spam"
    assert handler.stats.refused == 1


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl program (apt-get install openssl)")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.mark.slow
def test_starttls_and_auth_to_the_upstream(server: Server, key: str, campaign: str,
                                           certificate: tuple[Path, Path]) -> None:
    cert, cert_key = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, cert_key)
    logins: list[bytes] = []

    def authenticate(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                     data: LoginPassword) -> AuthResult:
        logins.append(data.login)
        # handled=False: aiosmtpd itself answers a failure (535).
        return AuthResult(success=(data.login, data.password) == (b"relay", b"s3cret"),
                          handled=False)

    with upstream(tls_context=tls, require_starttls=True, auth_required=True,
                  authenticator=authenticate) as (secure, upstream_port):
        with relay(server.url, key, upstream_port, starttls=True, cafile=str(cert),
                   user="relay", password="s3cret") as (port, _):
            send(port, newsletter(campaign), ["ada@example.com"])
        assert len(secure.received) == 1
        assert b"/o/" in secure.received[0][2]
        with relay(server.url, key, upstream_port, starttls=True, cafile=str(cert),
                   user="relay", password="wrong") as (port, _), \
                pytest.raises(smtplib.SMTPDataError) as refused:
            send(port, newsletter(campaign), ["ada@example.com"])
        # A refused login is the relay's configuration, not the mail: the sender retries.
        assert refused.value.smtp_code == 451
        assert set(logins) == {b"relay"}  # aiosmtplib tries each mechanism: 2 logins or more
        # Without STARTTLS the upstream refuses to go on: never sent in the clear.
        with relay(server.url, key, upstream_port, user="relay", password="s3cret") as (
                port, _), pytest.raises(smtplib.SMTPDataError):
            send(port, newsletter(campaign), ["ada@example.com"])
        assert len(secure.received) == 1


def test_html_attachments_and_forwarded_messages_are_left_alone() -> None:
    original = crlf(
        "Subject: Fwd\nX-Tracker-Campaign: 1\n"
        'Content-Type: multipart/mixed; boundary="b"\n\n'
        "--b\nContent-Type: text/html\n\n"
        '<a href="https://example.com/read">read</a>\n'
        "--b\nContent-Type: text/html\nContent-Disposition: attachment; filename=a.html\n\n"
        '<a href="https://example.com/attached">a file</a>\n'
        "--b\nContent-Type: message/rfc822\n\n"
        "Subject: old\nContent-Type: text/html\n\n"
        '<a href="https://example.com/forwarded">old mail</a>\n'
        "--b--\n")
    mail = Mail.parse(original)
    assert mail.campaign == "1"
    assert mail.links == ["https://example.com/read"]
    assert mail.stripped == without_tracker_headers(original)


def test_only_the_x_tracker_fields_leave_the_header() -> None:
    head = (b"Received: from a\r\n\tby b; Tue, 12 Nov 2024 10:00:00 +0100\r\n"
            b"x-tracker-campaign:\r\n 7\r\n"  # folded, lower case
            b"Subject: odd\rbyte\r\n"  # a stray CR inside a field
            b"X-TRACKER-NOTE: a\r\n"
            b"Content-Type: text/html; charset=utf-8\r\n")
    body = b"\r\n<p>X-Tracker-Campaign: 8 in the body stays</p>\r\n"
    mail = Mail.parse(head + body)
    assert mail.campaign == "7"
    assert mail.stripped == (b"Received: from a\r\n\tby b; Tue, 12 Nov 2024 10:00:00 +0100\r\n"
                             b"Subject: odd\rbyte\r\n"
                             b"Content-Type: text/html; charset=utf-8\r\n") + body
    assert Mail.parse(b"Subject: no campaign\r\n\r\nbody\r\n").campaign is None


@pytest.mark.slow
def test_the_relay_command_serves_until_sigterm(server: Server, key: str, campaign: str,
                                                sink: tuple[Sink, int]) -> None:
    upstream_sink, upstream_port = sink
    upstream_sink.received.clear()
    port = free_port()
    env = {**os.environ, "TRACKER_API_KEY": key, "TRACKER_RELAY_UPSTREAM":
           f"127.0.0.1:{upstream_port}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tracker", "relay", "--listen", f"127.0.0.1:{port}",
         "--api-url", server.url, "--hostname", "relay.test"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_listening(process, port)
        send(port, newsletter(campaign), ["ada@example.com"])
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr.decode()
    ((_, _, copy),) = upstream_sink.received
    assert b"X-Tracker-" not in copy and b"/o/" in copy
    assert re.search(r"\binstrumented=1\b", stderr.decode()), stderr.decode()
    assert "ada@example.com" not in stderr.decode()


def _relay_command(port: int, api_url: str, upstream_port: int,
                   *flags: str, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tracker", "relay", "--listen", f"127.0.0.1:{port}",
         "--api-url", api_url, "--upstream", f"127.0.0.1:{upstream_port}",
         "--hostname", "relay.test", *flags],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_listening(process: subprocess.Popen[bytes], port: int) -> None:
    def listening() -> bool:
        assert process.poll() is None, process.communicate()[1].decode()
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0
    wait_for(listening, timeout=30, message="the relay to listen")


def _ended(process: subprocess.Popen[bytes], timeout: float = 30) -> str:
    try:
        _, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return stderr.decode()


@pytest.mark.parametrize("given", ["variable", "flag"])
@pytest.mark.slow
def test_a_relay_whose_key_the_api_refuses_stops_at_start_in_one_line(
        server: Server, sink: tuple[Sink, int], given: str) -> None:
    wrong = "tk_1_deadbeef_" + "x" * 43
    port = free_port()
    process = (_relay_command(port, server.url, sink[1], TRACKER_API_KEY=wrong)
               if given == "variable" else
               _relay_command(port, server.url, sink[1], "--api-key", wrong))
    stderr = _ended(process)
    assert process.returncode == 1, stderr
    (line,) = stderr.strip().splitlines()
    name = "TRACKER_API_KEY" if given == "variable" else "--api-key"
    assert line.startswith(f"tracker: error: {name}: the tracker API at {server.url} refuses "
                           "this key"), line
    assert wrong not in line
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "it listened for mail"


@pytest.mark.slow
def test_a_relay_pointed_at_something_else_than_the_api_names_the_url(
        server: Server, key: str, sink: tuple[Sink, int]) -> None:
    process = _relay_command(free_port(), server.url + "/elsewhere", sink[1],
                             TRACKER_API_KEY=key)
    stderr = _ended(process)
    assert process.returncode == 1, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"tracker: error: --api-url: {server.url}/elsewhere is not a "
                           "tracker API"), line


@pytest.mark.slow
def test_a_relay_started_while_the_api_is_down_relays_and_checks_the_key_once_it_answers(
        module_dsn: str, tmp_path: Path, sink: tuple[Sink, int]) -> None:
    # Down at start (the relay and the server started together, say): mail must not wait
    # for the tracker, so the relay runs; once the API answers, a key it refuses stops the
    # relay as it would have at start.
    later = Server(module_dsn, tmp_path)
    port = free_port()
    process = _relay_command(port, later.url, sink[1], TRACKER_API_KEY="tk_1_deadbeef_wrong")
    try:
        _wait_listening(process, port)
        later.start()
        stderr = _ended(process, timeout=90)
    finally:
        later.stop()
    assert process.returncode == 1, stderr
    assert re.search(r"WARNING tracker\.mail\.relay: the tracker API at \S+ does not answer",
                     stderr)
    assert stderr.strip().splitlines()[-1].startswith(
        "tracker: error: TRACKER_API_KEY: the tracker API at "), stderr
    assert "Traceback" not in stderr
