"""tracker.client (sync and async) and `tracker instrument`, against a real server."""

from __future__ import annotations

import inspect
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tracker.ingest.tokens import Signer
from tracker.mail.client import (
    AsyncClient,
    AuthenticationError,
    Campaign,
    Client,
    InvalidRequest,
    ItemError,
    Message,
    NewMessage,
    NotFound,
    Policy,
    Report,
    TrackerError,
    Unavailable,
    _answer,
)
from tracker.mail.instrument import extract, render

from .support import SECRET, Server, db_value, free_port, new_account, wait_for

CORPUS = Path(__file__).parent / "corpus"
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"


@pytest.fixture(scope="module")
def key(module_dsn: str) -> str:
    return new_account(module_dsn)


@pytest.fixture
def client(server: Server, key: str) -> Iterator[Client]:
    with Client(server.url, key) as tracker:
        yield tracker


def _messages_in(dsn: str, campaign_id: str) -> int:
    return int(db_value(dsn, "select count(*) from messages where campaign_id = $1",
                        int(campaign_id)))


def test_campaigns_are_created_listed_read_updated_and_deleted(client: Client) -> None:
    spring = client.create_campaign("Spring", policy={"location": "country", "ip": "truncated"})
    assert isinstance(spring, Campaign)
    assert spring.name == "Spring"
    assert spring.policy == Policy(location="country", device=True, ip="truncated")
    assert spring.created_at.tzinfo is not None
    strict = client.create_campaign("Strict", policy=Policy(location="none", device=False))
    assert strict.policy == Policy(location="none", device=False)
    assert {spring.id, strict.id} <= {c.id for c in client.list_campaigns()}
    assert client.get_campaign(spring.id) == spring
    assert client.get_campaign(int(spring.id)) == spring

    # A mapping changes only the fields it names.
    renamed = client.update_campaign(spring.id, name="Spring sale", policy={"retention_days": 30})
    assert renamed.name == "Spring sale"
    assert renamed.policy == Policy(location="country", ip="truncated", retention_days=30)
    with pytest.raises(FrozenInstanceError):
        renamed.name = "changed"  # type: ignore[misc]

    client.delete_campaign(spring.id)
    with pytest.raises(NotFound) as missing:
        client.get_campaign(spring.id)
    assert missing.value.status == 404
    assert missing.value.error == "campaign not found"


def test_a_message_registered_with_links_and_html_comes_back_with_its_events(
        client: Client) -> None:
    campaign = client.create_campaign("Links and HTML")
    html = '<p><a href="https://example.com/a?x=1&amp;y=2">a</a></p></body>'
    sent = client.register_message(campaign.id, "ada@example.com", subject="Hello",
                                   links=["https://example.com/extra"], html=html)
    assert [link.url for link in sent.links] == ["https://example.com/a?x=1&y=2",
                                                 "https://example.com/extra"]
    assert sent.html is not None and sent.pixel_url in sent.html
    assert sent.links[0].tracked_url in sent.html
    redirect = httpx.get(sent.links[1].tracked_url, headers={"user-agent": FIREFOX})
    assert redirect.status_code == 302
    assert redirect.headers["location"] == "https://example.com/extra"

    def clicked() -> Message | None:
        message = client.get_message(sent.id)
        return message if message.events else None

    message = wait_for(clicked, message="the click to be recorded")
    assert message is not None
    assert (message.id, message.recipient, message.subject) == (sent.id, "ada@example.com",
                                                                "Hello")
    assert isinstance(message.sent_at, datetime)
    (event,) = message.events
    assert (event.type, event.url) == ("click", "https://example.com/extra")
    assert event.browser == "Firefox"


def test_the_report_reads_the_timeline_in_the_zone_asked_for(client: Client) -> None:
    campaign = client.create_campaign("Report")
    sent = client.register_message(campaign.id, "ada@example.com",
                                   sent_at=datetime.now(UTC) - timedelta(hours=2))
    assert httpx.get(sent.pixel_url, headers={"user-agent": FIREFOX}).status_code == 200

    def counted() -> Report | None:
        report = client.report(campaign.id)
        return report if report["opens"]["total"] else None

    report = wait_for(counted, message="the open to be counted")
    assert report is not None
    assert report["campaign_id"] == campaign.id
    assert report["messages"] == 1
    assert report["opens"] == {"total": 1, "unique": 1, "machine": 0, "machine_by_reason": {}}
    assert report["open_rate"] == 1.0
    assert report["timeline"][0]["at"].endswith("+00:00")
    india = client.report(campaign.id, tz="Asia/Kolkata")
    assert india["timeline"][0]["at"].endswith("+05:30")
    with pytest.raises(InvalidRequest, match="time zone"):
        client.report(campaign.id, tz="Mars/Olympus_Mons")


@pytest.mark.slow
def test_a_batch_beyond_the_servers_limit_is_split_and_comes_back_in_order(
        client: Client, module_dsn: str) -> None:
    campaign = client.create_campaign("Big batch")
    count = 5001  # one more than the server takes in one call
    registered = client.register_batch(campaign.id, [
        NewMessage(f"reader{i}@example.com", links=[f"https://example.com/{i}"])
        for i in range(count)])
    assert [r.links[0].url for r in registered] == [f"https://example.com/{i}"
                                                    for i in range(count)]
    assert len({r.id for r in registered}) == count
    assert _messages_in(module_dsn, campaign.id) == count
    assert client.register_batch(campaign.id, []) == []


def test_a_bad_message_in_a_later_call_is_named_by_its_place_in_the_whole_list(
        client: Client, module_dsn: str) -> None:
    campaign = client.create_campaign("Bad batch")
    messages = [NewMessage(f"reader{i}@example.com", links=["https://example.com/"])
                for i in range(8)]
    messages[4] = NewMessage("reader4@example.com", links=["ftp://example.com/file"])
    messages[7] = NewMessage("")
    with pytest.raises(InvalidRequest) as refused:
        client.register_batch(campaign.id, messages, batch_size=3)
    error = refused.value
    assert error.status == 422
    # Calls of 3: the first went through; the second (4 is its index 1) was refused whole;
    # the third (with 7) was never sent.
    assert [e.index for e in error.errors] == [4]
    assert error.errors[0] == ItemError(4, error.errors[0].error)
    assert error.errors[0].error.startswith("messages[4].links[0]")
    assert [r.links[0].url for r in error.registered] == ["https://example.com/"] * 3
    assert _messages_in(module_dsn, campaign.id) == 3


def test_bad_input_is_an_invalid_request_with_the_servers_text(client: Client) -> None:
    with pytest.raises(InvalidRequest) as refused:
        client.create_campaign("x", policy={"location": "galaxy"})
    assert refused.value.status == 422
    assert "policy.location" in refused.value.error
    assert refused.value.errors == ()
    campaign = client.create_campaign("Bad link")
    with pytest.raises(InvalidRequest, match="absolute http or https"):
        client.register_message(campaign.id, "ada@example.com", links=["mailto:x@example.com"])


def test_a_wrong_key_is_an_authentication_error(server: Server) -> None:
    with Client(server.url, "not-a-key") as stranger, \
            pytest.raises(AuthenticationError) as refused:
        stranger.list_campaigns()
    assert refused.value.status == 401
    assert refused.value.error == "missing or invalid API key"


def test_another_accounts_objects_are_not_found(server: Server, client: Client,
                                                module_dsn: str) -> None:
    campaign = client.create_campaign("Mine")
    sent = client.register_message(campaign.id, "ada@example.com")
    with Client(server.url, new_account(module_dsn, "other")) as other:
        with pytest.raises(NotFound):
            other.get_campaign(campaign.id)
        with pytest.raises(NotFound):
            other.get_message(sent.id)
        with pytest.raises(NotFound):
            other.register_batch(campaign.id, [NewMessage("x@example.com")])
        with pytest.raises(NotFound):  # not an id at all: names nothing, not another endpoint
            other.get_campaign("../campaigns")


@pytest.mark.slow
def test_a_stopped_server_is_unavailable(module_dsn: str, key: str, tmp_path: Path) -> None:
    server = Server(module_dsn, tmp_path).start()
    with Client(server.url, key) as tracker:
        assert tracker.list_campaigns() is not None
        server.stop()
        with pytest.raises(Unavailable) as down:
            tracker.list_campaigns()
    assert down.value.status is None
    assert "cannot reach" in down.value.error


def test_a_server_that_does_not_answer_in_time_is_unavailable(key: str) -> None:
    # Connections complete in the kernel's backlog; nothing ever answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with Client(url, key, timeout=0.3) as tracker, pytest.raises(Unavailable) as late:
            tracker.list_campaigns()
    assert "timed out" in late.value.error


@pytest.mark.parametrize(("status", "body", "headers", "kind"), [
    (503, b'{"error": "the database is unavailable"}', {"retry-after": "5"}, Unavailable),
    (502, b"<html>Bad Gateway</html>", {}, Unavailable),
    (504, b"", {}, Unavailable),
    (400, b'{"error": "the body is not valid JSON"}', {}, InvalidRequest),
    (413, b'{"error": "too large"}', {}, InvalidRequest),
    (500, b'{"error": "internal error"}', {}, TrackerError),
    (405, b"Method Not Allowed", {}, TrackerError),
])
def test_each_error_status_has_its_exception(status: int, body: bytes,
                                             headers: dict[str, str],
                                             kind: type[TrackerError]) -> None:
    with pytest.raises(TrackerError) as raised:
        _answer(httpx.Response(status, content=body, headers=headers))
    assert type(raised.value) is kind
    assert raised.value.status == status
    if body.startswith(b"{"):
        assert raised.value.error in body.decode()
    if headers:
        assert isinstance(raised.value, Unavailable) and raised.value.retry_after == 5.0


def test_from_env_reads_url_and_key(server: Server, key: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACKER_API_URL", server.url + "/")
    monkeypatch.setenv("TRACKER_API_KEY", key)
    with Client.from_env() as tracker:
        assert isinstance(tracker.list_campaigns(), list)
    monkeypatch.delenv("TRACKER_API_URL")
    monkeypatch.delenv("TRACKER_API_KEY")
    with pytest.raises(TrackerError, match="TRACKER_API_KEY"):
        Client.from_env()


async def test_the_async_client_does_the_same(server: Server, key: str,
                                              module_dsn: str) -> None:
    async with AsyncClient(server.url, key) as tracker:
        campaign = await tracker.create_campaign("Async", policy={"device": False})
        assert campaign.policy == Policy(device=False)
        assert campaign in await tracker.list_campaigns()
        assert await tracker.get_campaign(campaign.id) == campaign
        assert (await tracker.update_campaign(campaign.id, name="Async 2")).name == "Async 2"
        sent = await tracker.register_message(campaign.id, "ada@example.com",
                                              html='<a href="https://example.com/">x</a>')
        assert sent.html is not None and sent.links[0].tracked_url in sent.html
        batch = await tracker.register_batch(
            campaign.id, [NewMessage(f"r{i}@example.com", subject=str(i)) for i in range(5)],
            batch_size=2)
        assert [(await tracker.get_message(r.id)).subject for r in batch] == [
            str(i) for i in range(5)]
        assert (await tracker.report(campaign.id, tz="Europe/Berlin"))["messages"] == 6
        with pytest.raises(InvalidRequest) as refused:
            await tracker.register_batch(campaign.id, [NewMessage("a@example.com"),
                                                       NewMessage("")], batch_size=1)
        assert [e.index for e in refused.value.errors] == [1]
        assert len(refused.value.registered) == 1
        await tracker.delete_campaign(campaign.id)
        with pytest.raises(NotFound):
            await tracker.get_campaign(campaign.id)
    async with AsyncClient(server.url, "wrong") as stranger:
        with pytest.raises(AuthenticationError):
            await stranger.list_campaigns()
    async with AsyncClient(f"http://127.0.0.1:{free_port()}", key) as nowhere:
        with pytest.raises(Unavailable):
            await nowhere.list_campaigns()



def test_every_call_has_its_async_twin_with_the_same_parameters() -> None:
    def public(cls: type) -> set[str]:
        return {name for name in dir(cls) if not name.startswith("_")}

    assert public(Client) - {"close"} == public(AsyncClient) - {"aclose"}
    calls = public(Client) - {"close", "from_env"}
    assert {"create_campaign", "iter_messages", "set_consent", "create_key",
            "pull_events"} <= calls
    sync, async_ = Client("http://127.0.0.1:1", "key"), AsyncClient("http://127.0.0.1:1", "key")
    for name in calls:
        plain, twin = getattr(sync, name), getattr(async_, name)
        assert inspect.signature(plain).parameters == inspect.signature(twin).parameters, name
        assert plain.__doc__ == twin.__doc__, name
        assert not inspect.iscoroutinefunction(plain), name
        assert (inspect.isasyncgenfunction(twin) if name == "iter_messages"
                else inspect.iscoroutinefunction(twin)), name
    sync.close()

# --- tracker instrument -------------------------------------------------------------------

def _instrument(server: Server, key: str, *args: str,
                stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "TRACKER_API_URL": server.url, "TRACKER_API_KEY": key}
    return subprocess.run([sys.executable, "-m", "tracker", "instrument", *args], env=env,
                          input=stdin, capture_output=True, timeout=60, check=False)


def _tracked(output: str, server: Server) -> tuple[list[str], str, str]:
    """An instrumented document's tracked links in order, its pixel URL and its honeypot
    link's URL (a hidden link the server adds; it is no link of the message)."""
    honeypot = re.search(r'<a href="([^"]+)" tabindex="-1"', output)
    assert honeypot is not None
    links = [spot.url for spot in extract(output).links if spot.url != honeypot.group(1)]
    assert all(url.startswith(server.url + "/c/") for url in links)
    pixel = re.search(re.escape(server.url) + r"/o/[^\"]+\.gif", output)
    assert pixel is not None
    return links, pixel.group(), honeypot.group(1)


@pytest.mark.slow
def test_instrument_prints_the_document_in_its_declared_charset(
        server: Server, client: Client, key: str) -> None:
    campaign = client.create_campaign("CLI")
    path = CORPUS / "windows1252.bin"
    result = _instrument(server, key, str(path), "--campaign", campaign.id,
                         "--recipient", "hélène@example.com", "--subject", "Nouveautés")
    assert result.returncode == 0, result.stderr.decode()
    original = path.read_bytes().decode("windows-1252")
    output = result.stdout.decode("windows-1252")
    tracked, pixel, honeypot = _tracked(output, server)
    extraction = extract(original)
    # Byte for byte the original with the tracked URLs spliced in and the pixel added.
    assert result.stdout == render(original, extraction, tracked, pixel, honeypot).encode(
        "windows-1252")
    for spot, url in zip(extraction.links, tracked, strict=True):
        redirect = httpx.get(url)
        assert redirect.status_code == 302
        assert redirect.headers.raw[0] == (b"location", spot.url.encode())
    assert "crème-brûlée" in extraction.links[0].url


@pytest.mark.slow
def test_instrument_reads_stdin_as_utf8(server: Server, client: Client, key: str) -> None:
    campaign = client.create_campaign("CLI stdin")
    html = '<p>Grüße — <a href="https://example.com/ü">hier</a></p>\n'
    result = _instrument(server, key, "-", "--campaign", campaign.id, "--recipient",
                         "ada@example.com", "--subject", "Grüße", stdin=html.encode())
    assert result.returncode == 0, result.stderr.decode()
    tracked, pixel, honeypot = _tracked(result.stdout.decode(), server)
    assert result.stdout == render(html, extract(html), tracked, pixel, honeypot).encode()
    assert client.get_message(_message_id(pixel)).subject == "Grüße"


def _message_id(pixel_url: str) -> int:
    token = Signer([SECRET]).verify_open(pixel_url.rsplit("/", 1)[1].removesuffix(".gif"))
    assert token is not None
    return token.message_id


@pytest.mark.parametrize(("args", "expected"), [
    (["--campaign", "999999"], "campaign not found"),
    (["--campaign", "1", "--api-key", "wrong"], "missing or invalid API key"),
    (["--campaign", "1", "--api-url", "http://127.0.0.1:9"], "cannot reach the tracker API"),
])
def test_instrument_errors_are_one_line(server: Server, key: str, args: list[str],
                                        expected: str) -> None:
    result = _instrument(server, key, "-", "--recipient", "ada@example.com", *args,
                         stdin=b"<a href='https://example.com/'>x</a>")
    assert result.returncode == 1
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tracker: error:"), lines
    assert expected in lines[0]


@pytest.mark.slow
def test_instrument_refuses_a_document_that_is_not_in_its_charset(
        server: Server, key: str, tmp_path: Path) -> None:
    path = tmp_path / "latin.html"
    path.write_bytes("<p>caf\xe9</p>".encode("latin-1"))  # no <meta charset>: UTF-8 expected
    result = _instrument(server, key, str(path), "--campaign", "1", "--recipient", "a@b.c")
    assert result.returncode == 1
    assert "not valid utf-8" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()
