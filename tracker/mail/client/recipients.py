"""A recipient's consent: record it, read it."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from tracker.mail.client.calls import Call, Op, path_id
from tracker.mail.client.errors import NotFound
from tracker.mail.client.results import Consent
from tracker.mail.client.transport import operation


class Recipients:
    """The calls on recipients, for Client and AsyncClient."""

    @operation
    def set_consent(self, address: str, *, opens: bool, clicks: bool, method: str,
                    wording: str | None = None, at: datetime | None = None) -> Op[Consent]:
        """Record the recipient's consent: given (True) or refused / withdrawn (False) for
        opens and for clicks, how it was asked for, the wording shown; it holds in every
        worker of the server when this returns."""
        body: dict[str, Any] = {"opens": opens, "clicks": clicks, "method": method}
        if wording is not None:
            body["wording"] = wording
        if at is not None:
            body["at"] = at.isoformat()
        return _consent((yield Call("PUT", f"/api/recipients/{path_id(address)}/consent",
                                    body)))

    @operation
    def get_consent(self, address: str) -> Op[Consent | None]:
        """The recipient's consent on record, None if there is none."""
        try:
            data = yield Call("GET", f"/api/recipients/{path_id(address)}/consent")
        except NotFound:
            return None
        return _consent(data)


def _consent(data: Mapping[str, Any]) -> Consent:
    return Consent(data["address"], data["opens"], data["clicks"], data["method"],
                   data["wording"], datetime.fromisoformat(data["at"]),
                   datetime.fromisoformat(data["recorded_at"]), tuple(data.get("history", ())))
