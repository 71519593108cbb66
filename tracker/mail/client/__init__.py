"""A typed Python client for tracker's management API: `Client` (sync) and `AsyncClient`.

    from tracker.mail.client import Client, NewMessage

    with Client("http://127.0.0.1:8000", api_key) as tracker:   # or Client.from_env()
        campaign = tracker.create_campaign("November newsletter", policy={"location": "country"})
        sent = tracker.register_message(campaign.id, "ada@example.com", html=html)
        send_mail(to="ada@example.com", html=sent.html)
        tracker.register_batch(campaign.id, [NewMessage(r, html=html) for r in readers])
        print(tracker.report(campaign.id, tz="Europe/Berlin")["open_rate"])
        for row in tracker.iter_messages(campaign.id, status="not_opened"):
            print(row.recipient)                          # who did not open
        tracker.set_consent("ada@example.com", opens=True, clicks=True, method="signup form")

One request/response layer serves both: each call is written once, as an operation that
yields the HTTP calls it needs and receives their decoded JSON answers, then returns a
typed result (calls.py; one module per area of the API: campaigns.py, messages.py,
recipients.py, keys.py, webhooks.py). `Client` and `AsyncClient` only drive those
operations over httpx's sync or async transport, and map every failure to a
`TrackerError` the same way (transport.py).

Nothing is retried: a registration whose answer was lost may have been stored, and
sending it again would register the messages twice. `Unavailable` says when to retry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from tracker.ingest.policy import Policy
from tracker.mail.client.calls import Id as Id
from tracker.mail.client.campaigns import Campaigns
from tracker.mail.client.errors import (
    AuthenticationError,
    Forbidden,
    InvalidRequest,
    ItemError,
    NotFound,
    TrackerError,
    Unavailable,
)
from tracker.mail.client.keys import Keys
from tracker.mail.client.messages import BATCH_SIZE as BATCH_SIZE
from tracker.mail.client.messages import Messages
from tracker.mail.client.recipients import Recipients
from tracker.mail.client.results import (
    ApiKey,
    Campaign,
    Consent,
    Event,
    EventPage,
    Link,
    Message,
    MessagePage,
    MessageResult,
    NewApiKey,
    NewMessage,
    Registered,
    Report,
    Webhook,
)
from tracker.mail.client.results import (
    Counts as Counts,
)
from tracker.mail.client.results import (
    Hour as Hour,
)
from tracker.mail.client.results import (
    LinkCounts as LinkCounts,
)
from tracker.mail.client.transport import (
    DEFAULT_TIMEOUT as DEFAULT_TIMEOUT,
)
from tracker.mail.client.transport import (
    DEFAULT_URL as DEFAULT_URL,
)
from tracker.mail.client.transport import (
    AsyncTransport,
    SyncTransport,
)
from tracker.mail.client.transport import (
    _answer as _answer,  # the answer decoder, which the tests hold to the error mapping
)
from tracker.mail.client.webhooks import Webhooks

__all__ = [
    "ApiKey", "AsyncClient", "AuthenticationError", "Campaign", "Client", "Consent", "Event",
    "EventPage", "Forbidden", "InvalidRequest", "ItemError", "Link", "Message", "MessagePage",
    "MessageResult", "NewApiKey", "NewMessage", "NotFound", "Policy", "Registered", "Report",
    "TrackerError", "Unavailable", "Webhook",
]



class Client(SyncTransport, Campaigns, Messages, Recipients, Keys, Webhooks):
    """The management API over a synchronous connection pool. Use as a context manager or
    call close(). Every method raises a TrackerError subclass on failure."""

    def iter_messages(self, campaign_id: Id, **filters: Any) -> Iterator[MessageResult]:
        """Every matching message, page after page (the filters of list_messages)."""
        cursor = None
        while True:
            page = self.list_messages(campaign_id, cursor=cursor, **filters)
            yield from page.messages
            if page.next is None:
                return
            cursor = page.next


class AsyncClient(AsyncTransport, Campaigns, Messages, Recipients, Keys, Webhooks):
    """The same API as Client, with coroutines. Use as an async context manager or await
    aclose()."""

    async def iter_messages(self, campaign_id: Id, **filters: Any
                            ) -> AsyncIterator[MessageResult]:
        """Every matching message, page after page (the filters of list_messages)."""
        cursor = None
        while True:
            page = await self.list_messages(campaign_id, cursor=cursor, **filters)
            for message in page.messages:
                yield message
            if page.next is None:
                return
            cursor = page.next
