"""Register messages: validate, store recipient, subject and links (never a body), sign URLs.

A link is stored without the recipient's address in it (privacy/link_redaction.py): the
report and the exports show `...?email={recipient}`, and the click token carries the
destination as registered.

The recipient is stored as given, or only as its pseudonym when the campaign's policy
says `"recipient": "pseudonym"`; either way each message stores, and each of its
tokens carries, the recipient key (privacy/recipients.py) by which erasure, opt-out and export
find it and the hot path refuses to record a suppressed recipient.

Registration is batch-shaped even for one message: ids are reserved in one
round trip, distinct destinations upserted in one, and messages and links COPYed.
With `html`, the links are those the instrumentation engine finds in the document
(each occurrence a link of its own, in document order), followed by any `links`
given as well; the answer carries the instrumented document, which is never stored
and never logged.
"""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg

from tracker.ingest.tokens import FLAG_HONEYPOT, MAX_LINK_POSITION, Signer
from tracker.mail import destinations
from tracker.mail.instrument import Extraction, extract, render
from tracker.privacy.link_redaction import Redactor
from tracker.privacy.recipients import (
    InvalidAddress,
    Recipient,
    check_address,
    identify,
    stored_recipient,
)
from tracker.store.queries import QUERIES

MAX_SUBJECT_CHARS = 998  # the longest header line RFC 5322 allows
MAX_LINKS = 1000
HONEYPOT_POSITION = MAX_LINK_POSITION
MAX_HTML_CHARS = 2_000_000
MAX_BATCH = 5000
# Messages handled between two turns of the event loop while a batch is registered.
_SLICE = 50
_T = TypeVar("_T")
_FIELDS = {"recipient", "subject", "sent_at", "links", "html"}
# Tokens carry sent_at as unsigned 32-bit Unix seconds.
_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime(2106, 1, 1, tzinfo=UTC)

assert MAX_LINKS <= MAX_LINK_POSITION + 1


class InvalidInput(ValueError):
    """Input the API must refuse with 422; the message says what and where."""


@dataclass(frozen=True)
class MessageInput:
    recipient: str
    subject: str | None
    sent_at: datetime
    links: tuple[str, ...]  # the html's links first, in document order, then `links`
    html: str | None = None
    extraction: Extraction | None = None


@dataclass(frozen=True)
class Registered:
    id: int
    pixel_url: str
    links: list[tuple[str, str]]  # (destination, tracked URL)
    html: str | None = None


def check_destination(url: object, where: str = "link") -> str:
    """An absolute http(s) URL without whitespace or control characters, of bounded length
    (tracker.destinations). It comes back unchanged: the redirect sends exactly these bytes."""
    if not isinstance(url, str):
        raise InvalidInput(f"{where}: must be a non-empty string")
    problem = destinations.problem(url)
    if problem is not None:
        raise InvalidInput(f"{where}: {problem}")
    return url


def _subject(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{where}: must be a string or null")
    if len(value) > MAX_SUBJECT_CHARS:
        raise InvalidInput(f"{where}: longer than {MAX_SUBJECT_CHARS} characters")
    if any(unicodedata.category(c) == "Cc" and c != "\t" for c in value):
        raise InvalidInput(f"{where}: contains a control character")
    return value


def parse_time(value: object, where: str) -> datetime:
    if not isinstance(value, str):
        raise InvalidInput(f"{where}: must be an ISO 8601 date-time string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"{where}: {value!r} is not an ISO 8601 date-time") from None
    # A time without a zone is taken as UTC rather than refused: senders' systems often drop it.
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    try:
        utc = parsed.astimezone(UTC)
    except OverflowError:
        utc = None
    if utc is None or not _EARLIEST <= utc <= _LATEST:
        raise InvalidInput(f"{where}: must lie between {_EARLIEST.year} and {_LATEST.year}")
    return utc


def parse_message(body: object, where: str = "message") -> MessageInput:
    if not isinstance(body, dict):
        raise InvalidInput(f"{where}: must be a JSON object")
    unknown = set(body) - _FIELDS
    if unknown:
        raise InvalidInput(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    try:
        recipient = check_address(body.get("recipient"), f"{where}.recipient")
    except InvalidAddress as exc:
        raise InvalidInput(str(exc)) from None
    subject = _subject(body.get("subject"), f"{where}.subject")
    sent_at = (parse_time(body["sent_at"], f"{where}.sent_at")
               if body.get("sent_at") is not None else datetime.now(UTC))
    links = body.get("links")
    if links is None:
        links = []
    if not isinstance(links, list):  # {}, "" and false too: only null means "no links"
        raise InvalidInput(f"{where}.links: must be a list of URLs")
    if len(links) > MAX_LINKS:
        raise InvalidInput(f"{where}.links: at most {MAX_LINKS} links per message")
    checked = tuple(check_destination(url, f"{where}.links[{i}]") for i, url in enumerate(links))
    html = body.get("html")
    if html is None:
        return MessageInput(recipient, subject, sent_at, checked)
    if not isinstance(html, str):
        raise InvalidInput(f"{where}.html: must be a string")
    if len(html) > MAX_HTML_CHARS:
        raise InvalidInput(f"{where}.html: longer than {MAX_HTML_CHARS} characters")
    extraction = extract(html)
    found = tuple(spot.url for spot in extraction.links)
    if len(found) + len(checked) > MAX_LINKS:
        raise InvalidInput(f"{where}: at most {MAX_LINKS} links per message "
                           f"(the html has {len(found)})")
    return MessageInput(recipient, subject, sent_at, found + checked, html, extraction)


async def parse_batch(body: object) -> list[MessageInput]:
    """All the messages of a batch, or InvalidBatch listing every bad one: all or nothing.

    A batch of 1,000 messages with their html is ~100 ms of parsing, and the event loop
    that does it also answers the tracking hits: it is parsed a slice at a time, the
    loop answering hits in between (`_cooperatively`)."""
    if not isinstance(body, dict) or set(body) != {"messages"}:
        raise InvalidInput('the body must be {"messages": [...]}')
    items = body["messages"]
    if not isinstance(items, list) or not items:
        raise InvalidInput("messages: must be a non-empty list")
    if len(items) > MAX_BATCH:
        raise InvalidInput(f"messages: at most {MAX_BATCH} per batch, got {len(items)}")
    parsed: list[MessageInput] = []
    errors: list[tuple[int, str]] = []
    async for index, item in _cooperatively(items):
        try:
            parsed.append(parse_message(item, f"messages[{index}]"))
        except InvalidInput as exc:
            errors.append((index, str(exc)))
    if errors:
        raise InvalidBatch(errors, len(items))
    return parsed


async def _cooperatively(items: list[_T]) -> AsyncIterator[tuple[int, _T]]:
    """(index, item), handing the event loop back every `_SLICE` items (a few ms of work
    here), so a big batch does not hold the tracking hits' answers."""
    for index, item in enumerate(items):
        if index and not index % _SLICE:
            await asyncio.sleep(0)
        yield index, item


class InvalidBatch(InvalidInput):
    def __init__(self, errors: list[tuple[int, str]], total: int) -> None:
        super().__init__(f"{len(errors)} of {total} messages are invalid; none was registered")
        self.errors = errors


class Registrar:
    def __init__(self, signer: Signer, base_url: str) -> None:
        self._signer = signer
        self._base = base_url

    async def register(self, conn: asyncpg.Connection, account_id: int, campaign_id: int,
                       messages: list[MessageInput]) -> list[Registered]:
        """Store the messages and their links in one transaction; all or nothing."""
        async with conn.transaction():
            context = await conn.fetchrow(QUERIES.registration_context, account_id,
                                          campaign_id)
            if context is None:
                raise LookupError(f"campaign {campaign_id} of account {account_id} not found")
            secret, mode = context["recipient_secret"], context["policy_recipient"]
            recipients = [identify(secret, m.recipient)
                          async for _, m in _cooperatively(messages)]
            # What each link is stored as: its destination, without the recipient's address.
            stored = [_stored_links(m) async for _, m in _cooperatively(messages)]
            ids = [r["id"] for r in await conn.fetch(QUERIES.reserve_message_ids, len(messages))]
            destinations = sorted({url for links in stored for url in links})
            url_ids: dict[str, int] = {}
            if destinations:
                url_ids = await _url_ids(conn, account_id, campaign_id, destinations)
            await conn.copy_records_to_table(
                "messages", columns=("account_id", "id", "campaign_id", "recipient", "subject",
                                     "sent_at", "recipient_key"),
                records=[(account_id, mid, campaign_id,
                          stored_recipient(mode, m.recipient, r), m.subject, m.sent_at, r.key)
                         for mid, m, r in zip(ids, messages, recipients, strict=True)])
            await conn.copy_records_to_table(
                "links", columns=("account_id", "message_id", "position", "url_id"),
                records=[(account_id, mid, pos, url_ids[url])
                         for mid, links in zip(ids, stored, strict=True)
                         for pos, url in enumerate(links)])
        return [self._urls(account_id, campaign_id, mid, m,
                           [url_ids[url] for url in links], r)
                async for _, (mid, m, links, r) in _cooperatively(
                    list(zip(ids, messages, stored, recipients, strict=True)))]

    def _urls(self, account_id: int, campaign_id: int, message_id: int, message: MessageInput,
              url_ids: list[int], recipient: Recipient) -> Registered:
        sent_at = int(message.sent_at.timestamp())
        key = recipient.key
        pixel_url = (f"{self._base}/o/"
                     + self._signer.open_token(account_id, campaign_id, message_id, sent_at,
                                               recipient_key=key) + ".gif")
        links = [(url, f"{self._base}/c/"
                  + self._signer.click_token(account_id, campaign_id, message_id, sent_at, pos,
                                             url_ids[pos], url, recipient_key=key))
                 for pos, url in enumerate(message.links)]
        html = None
        if message.html is not None and message.extraction is not None:
            in_html = len(message.extraction.links)
            # The honeypot is no link of the message: no row, no url id, a position past
            # every real one; the flag in its token makes any hit on it a machine's.
            honeypot = f"{self._base}/c/" + self._signer.click_token(
                account_id, campaign_id, message_id, sent_at, HONEYPOT_POSITION, 0,
                f"{self._base}/", flags=FLAG_HONEYPOT, recipient_key=key)
            html = render(message.html, message.extraction,
                          [tracked for _, tracked in links[:in_html]], pixel_url, honeypot)
        return Registered(message_id, pixel_url, links, html)


def _stored_links(message: MessageInput) -> tuple[str, ...]:
    """The message's links as stored: a destination that names the recipient has the
    address replaced by a placeholder (privacy/link_redaction.py); its token keeps it."""
    redactor = Redactor(message.recipient)
    return tuple(redactor.redact(url) for url in message.links)


async def _url_ids(conn: asyncpg.Connection, account_id: int, campaign_id: int,
                   urls: list[str]) -> dict[str, int]:
    """Ids of a campaign's destinations, made for those that are new."""
    found = {r["url"]: r["id"] for r in await conn.fetch(QUERIES.find_urls, account_id,
                                                         campaign_id, urls)}
    missing = [url for url in urls if url not in found]
    if missing:
        added = await conn.fetch(QUERIES.add_urls, account_id, campaign_id, missing)
        found.update((r["url"], r["id"]) for r in added)
        still = [url for url in missing if url not in found]
        if still:  # added meanwhile by a concurrent registration, committed by now
            found.update((r["url"], r["id"]) for r in await conn.fetch(
                QUERIES.find_urls, account_id, campaign_id, still))
    return found


def registered_json(item: Registered) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "id": str(item.id), "pixel_url": item.pixel_url,
        "links": [{"url": url, "tracked_url": tracked} for url, tracked in item.links]}
    if item.html is not None:
        answer["html"] = item.html
    return answer
