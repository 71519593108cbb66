"""What a call of the client raises: `TrackerError` and its kinds, one per way a call fails."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tracker.mail.client.results import Registered


class TrackerError(Exception):
    """Any failure of a call. `status` is the HTTP status (None when there was no answer),
    `error` the server's error text. After a batch split over several calls fails, the
    messages of the calls that had succeeded are in `registered` (they are stored)."""

    def __init__(self, error: str, status: int | None = None) -> None:
        super().__init__(f"{error} (HTTP {status})" if status is not None else error)
        self.error = error
        self.status = status
        self.registered: tuple[Registered, ...] = ()


class AuthenticationError(TrackerError):
    """401: the API key is missing or wrong."""


class NotFound(TrackerError):
    """404: no such object in this account (another account's objects are not found either)."""


class Forbidden(TrackerError):
    """403: the API key's scope does not allow this (a read key makes no changes)."""


@dataclass(frozen=True, slots=True)
class ItemError:
    index: int  # in the list given to register_batch
    error: str


class InvalidRequest(TrackerError):
    """400, 413 or 422: the server refused the input. For a batch, `errors` names each bad
    message; none of the messages of that call was registered."""

    def __init__(self, error: str, status: int | None = None,
                 errors: Sequence[ItemError] = ()) -> None:
        super().__init__(error, status)
        self.errors = tuple(errors)


class Unavailable(TrackerError):
    """The server could not be reached, timed out, or answered 502/503/504 (its database is
    down). Worth retrying later; `retry_after` is the server's hint in seconds, if any."""

    def __init__(self, error: str, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(error, status)
        self.retry_after = retry_after
