"""Register messages: validate, store recipient, subject and links (never a body), sign URLs.

A link is stored without the recipient's address in it (privacy/link_redaction.py): the
report and the exports show `...?email={recipient}`, and the click token carries the
destination as registered.

The recipient is stored as given, or only as its pseudonym when the campaign's policy
says `"recipient": "pseudonym"`; either way each message stores, and each of its
tokens carries, the recipient key (privacy/recipients.py) by which erasure, opt-out and export
find it and the hot path refuses to record a suppressed recipient.

Registration is batch-shaped even for one message: ids are reserved in one
round trip, distinct destinations upserted in one, and the messages, each with its links
(messages.url_ids), COPYed.
With `html`, the links are those the instrumentation engine finds in the document
(each occurrence a link of its own, in document order), followed by any `links`
given as well; the answer carries the instrumented document, which is never stored
and never logged.

What is tracked of each message (privacy/consent.py, mail/options.py): no pixel when its
recipient opted out, refused consent to opens, or gave none where the campaign requires
it (`pixel_url: null`), and no tracked link likewise for clicks (`tracked_url: null`, the
HTML keeps its links); a link whose visible text is a URL stays as it is unless the
campaign's options say to track it. Only tracked links are stored. A tracked destination
gets the campaign's UTM parameters it lacks; the answer gives each link's `url` as
registered and its `destination`, where a click on it lands.
"""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg

from tracker.ingest.tokens import FLAG_CONSENT, FLAG_HONEYPOT, MAX_LINK_POSITION, Signer
from tracker.mail import destinations
from tracker.mail.instrument import Extraction, extract, looks_like_url, render
from tracker.mail.options import LinkOptions, from_stored
from tracker.privacy import consent
from tracker.privacy.link_redaction import Redactor
from tracker.privacy.recipients import (
    InvalidAddress,
    Recipient,
    check_address,
    identify,
    stored_recipient,
)
from tracker.store.labels import InvalidLabel, check_metadata, check_tags, encode_metadata
from tracker.store.queries import QUERIES

MAX_SUBJECT_CHARS = 998  # the longest header line RFC 5322 allows
MAX_LINKS = 1000
HONEYPOT_POSITION = MAX_LINK_POSITION
MAX_HTML_CHARS = 2_000_000
MAX_BATCH = 5000
# Messages handled between two turns of the event loop while a batch is registered.
_SLICE = 50
_T = TypeVar("_T")
_FIELDS = {"recipient", "subject", "sent_at", "links", "html", "tags", "metadata"}
_LINK_FIELDS = {"url", "text"}
MAX_LINK_TEXT_CHARS = 2048
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
    link_texts: tuple[str | None, ...] = ()  # each link's visible text, where known
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] | None = None

    def link_text(self, position: int) -> str | None:
        return self.link_texts[position] if position < len(self.link_texts) else None


@dataclass(frozen=True)
class RegisteredLink:
    url: str  # as registered
    destination: str  # where a click lands: `url` with the campaign's UTM parameters
    tracked_url: str | None  # None: left as it is (no consent, or its text is a URL)


@dataclass(frozen=True)
class Registered:
    id: int
    pixel_url: str | None  # None: no pixel (no consent, or the recipient opted out)
    links: list[RegisteredLink]
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
        tags = tuple(check_tags(body.get("tags"), f"{where}.tags"))
        metadata = check_metadata(body.get("metadata"), f"{where}.metadata")
    except (InvalidAddress, InvalidLabel) as exc:
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
    given = [_link(item, f"{where}.links[{i}]") for i, item in enumerate(links)]
    checked = tuple(url for url, _ in given)
    texts = tuple(text for _, text in given)
    html = body.get("html")
    if html is None:
        return MessageInput(recipient, subject, sent_at, checked, link_texts=texts, tags=tags,
                            metadata=metadata)
    if not isinstance(html, str):
        raise InvalidInput(f"{where}.html: must be a string")
    if len(html) > MAX_HTML_CHARS:
        raise InvalidInput(f"{where}.html: longer than {MAX_HTML_CHARS} characters")
    extraction = extract(html)
    found = tuple(spot.url for spot in extraction.links)
    if len(found) + len(checked) > MAX_LINKS:
        raise InvalidInput(f"{where}: at most {MAX_LINKS} links per message "
                           f"(the html has {len(found)})")
    return MessageInput(recipient, subject, sent_at, found + checked, html, extraction,
                        tuple(spot.text for spot in extraction.links) + texts, tags, metadata)


def _link(item: object, where: str) -> tuple[str, str | None]:
    """A link of `links`: its URL, or `{"url": ..., "text": ...}` with the text a reader
    sees (so that a link whose text is a URL can be left untracked)."""
    if not isinstance(item, dict):
        return check_destination(item, where), None
    unknown = set(item) - _LINK_FIELDS
    if unknown:
        raise InvalidInput(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    text = item.get("text")
    if text is not None and (not isinstance(text, str) or len(text) > MAX_LINK_TEXT_CHARS):
        raise InvalidInput(f"{where}.text: must be null or a string of at most "
                           f"{MAX_LINK_TEXT_CHARS} characters")
    return check_destination(item.get("url"), f"{where}.url"), text


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


@dataclass(frozen=True, slots=True)
class _Plan:
    """What is tracked of one message: its pixel, and each link's destination (None: the
    link stays as it is); the token flags that say consent was on record."""
    opens: bool
    clicks: bool
    destinations: tuple[str | None, ...]
    open_flags: int
    click_flags: int


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
            options = from_stored(context["options"])
            recipients = [identify(secret, m.recipient)
                          async for _, m in _cooperatively(messages)]
            states = await consent.for_registration(conn, account_id,
                                                    [r.key for r in recipients])
            plans = [_plan(m, states.get(r.key, consent.NOTHING_ON_RECORD),
                           context["policy_consent_opens"], context["policy_consent_clicks"],
                           options)
                     for m, r in zip(messages, recipients, strict=True)]
            # What each tracked link is stored as: its destination, without the recipient's
            # address.
            stored = [_stored_links(m, p) async for _, (m, p) in _cooperatively(
                list(zip(messages, plans, strict=True)))]
            ids = [r["id"] for r in await conn.fetch(QUERIES.reserve_message_ids, len(messages))]
            destinations = sorted({url for links in stored for url in links.values()})
            url_ids: dict[str, int] = {}
            if destinations:
                url_ids = await _url_ids(conn, account_id, campaign_id, destinations)
            await conn.copy_records_to_table(
                "messages", columns=("account_id", "id", "campaign_id", "recipient", "subject",
                                     "sent_at", "recipient_key", "tags", "metadata",
                                     "opens_tracked", "clicks_tracked", "url_ids"),
                records=[(account_id, mid, campaign_id,
                          stored_recipient(mode, m.recipient, r), m.subject, m.sent_at, r.key,
                          list(m.tags), encode_metadata(m.metadata or {}), p.opens, p.clicks,
                          _by_position(links, url_ids))
                         for mid, m, r, p, links in zip(ids, messages, recipients, plans, stored,
                                                        strict=True)])
        return [self._urls(account_id, campaign_id, mid, m, p,
                           {pos: url_ids[url] for pos, url in links.items()}, r, options)
                async for _, (mid, m, p, links, r) in _cooperatively(
                    list(zip(ids, messages, plans, stored, recipients, strict=True)))]

    def _urls(self, account_id: int, campaign_id: int, message_id: int, message: MessageInput,
              plan: _Plan, url_ids: dict[int, int], recipient: Recipient,
              options: LinkOptions) -> Registered:
        sent_at = int(message.sent_at.timestamp())
        key = recipient.key
        pixel_url = None
        if plan.opens:
            pixel_url = (f"{self._base}/o/"
                         + self._signer.open_token(account_id, campaign_id, message_id, sent_at,
                                                   recipient_key=key, flags=plan.open_flags)
                         + ".gif")
        links = [RegisteredLink(url, destination or url, None if destination is None else (
                     f"{self._base}/c/" + self._signer.click_token(
                         account_id, campaign_id, message_id, sent_at, pos, url_ids[pos],
                         destination, flags=plan.click_flags, recipient_key=key)))
                 for pos, (url, destination) in enumerate(
                     zip(message.links, plan.destinations, strict=True))]
        html = None
        if message.html is not None and message.extraction is not None:
            in_html = len(message.extraction.links)
            # The honeypot is no link of the message: no row, no url id, a position past
            # every real one; the flag in its token makes any hit on it a machine's.
            honeypot = None
            if plan.clicks:
                honeypot = f"{self._base}/c/" + self._signer.click_token(
                    account_id, campaign_id, message_id, sent_at, HONEYPOT_POSITION, 0,
                    f"{self._base}/", flags=FLAG_HONEYPOT | plan.click_flags,
                    recipient_key=key)
            html = render(message.html, message.extraction,
                          [link.tracked_url for link in links[:in_html]], pixel_url, honeypot,
                          pixel_at_top=options.pixel == "top")
        return Registered(message_id, pixel_url, links, html)


def _plan(message: MessageInput, state: consent.RecipientState, opens_need_consent: bool,
          clicks_need_consent: bool, options: LinkOptions) -> _Plan:
    opens = not (state.opted_out or state.refused_opens
                 or (opens_need_consent and not state.consented_opens))
    clicks = not (state.opted_out or state.refused_clicks
                  or (clicks_need_consent and not state.consented_clicks))
    destinations = tuple(
        options.destination(url) if clicks and (
            options.track_url_text or not looks_like_url(message.link_text(pos))) else None
        for pos, url in enumerate(message.links))
    return _Plan(opens, clicks, destinations,
                 FLAG_CONSENT if state.consented_opens else 0,
                 FLAG_CONSENT if state.consented_clicks else 0)


def _stored_links(message: MessageInput, plan: _Plan) -> dict[int, str]:
    """The message's tracked links as stored, by position: a destination that names the
    recipient has the address replaced by a placeholder (privacy/link_redaction.py); its
    token keeps it."""
    redactor = Redactor(message.recipient)
    return {pos: redactor.redact(destination)
            for pos, destination in enumerate(plan.destinations) if destination is not None}


def _by_position(links: dict[int, str], url_ids: dict[str, int]) -> list[int | None] | None:
    """A message's stored links as messages.url_ids: the url id of the link at position p
    at index p, None where that link is not tracked; None for a message with none."""
    if not links:
        return None
    by_position: list[int | None] = [None] * (max(links) + 1)
    for pos, url in links.items():
        by_position[pos] = url_ids[url]
    return by_position


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
        "links": [{"url": link.url, "destination": link.destination,
                   "tracked_url": link.tracked_url} for link in item.links]}
    if item.html is not None:
        answer["html"] = item.html
    return answer
