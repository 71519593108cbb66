"""Campaigns: create, list, read, change, delete, and a campaign's report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from tracker.ingest.policy import Policy
from tracker.mail.client.calls import Call, Id, Op, path_id, selection
from tracker.mail.client.results import Campaign, Report
from tracker.mail.client.transport import operation


class Campaigns:
    """The calls on campaigns, for Client and AsyncClient."""

    @operation
    def create_campaign(self, name: str,
                        policy: Policy | Mapping[str, Any] | None = None, *,
                        tags: Sequence[str] | None = None,
                        metadata: Mapping[str, Any] | None = None,
                        options: Mapping[str, Any] | None = None) -> Op[Campaign]:
        """A new campaign; `options` are its link options (`{"utm": {"source": ...},
        "track_url_text": False, "pixel": "top"}`)."""
        body: dict[str, Any] = {"name": name}
        if policy is not None:
            body["policy"] = _policy_json(policy)
        body = _labels_json(body, tags, metadata, options)
        return _campaign((yield Call("POST", "/api/campaigns", body)))

    @operation
    def list_campaigns(self, *, tag: str | None = None, since: datetime | None = None,
                       until: datetime | None = None) -> Op[list[Campaign]]:
        """The account's campaigns, with `tag`, created in [since, until)."""
        params = selection(tag, since, until) or None
        return [_campaign(item) for item in (yield Call("GET", "/api/campaigns",
                                                        params=params))]

    @operation
    def get_campaign(self, campaign_id: Id) -> Op[Campaign]:
        return _campaign((yield Call("GET", f"/api/campaigns/{path_id(campaign_id)}")))

    @operation
    def update_campaign(self, campaign_id: Id, *, name: str | None = None,
                        policy: Policy | Mapping[str, Any] | None = None,
                        tags: Sequence[str] | None = None,
                        metadata: Mapping[str, Any] | None = None,
                        options: Mapping[str, Any] | None = None) -> Op[Campaign]:
        """Change what is given (a policy or options mapping changes only the fields it
        has; tags and metadata are replaced)."""
        body: dict[str, Any] = {}
        if name is not None:
            body["name"] = name
        if policy is not None:
            body["policy"] = _policy_json(policy)
        body = _labels_json(body, tags, metadata, options)
        return _campaign((yield Call("PATCH", f"/api/campaigns/{path_id(campaign_id)}", body)))

    @operation
    def delete_campaign(self, campaign_id: Id) -> Op[None]:
        yield Call("DELETE", f"/api/campaigns/{path_id(campaign_id)}")

    @operation
    def report(self, campaign_id: Id, tz: str | None = None, *, tag: str | None = None,
               since: datetime | None = None, until: datetime | None = None) -> Op[Report]:
        """The campaign's report; the timeline's hours in `tz` (an IANA name; UTC if None).
        With `tag`, `since`, `until`: the report of its messages with the tag, sent in
        [since, until)."""
        params = {**({"tz": tz} if tz is not None else {}), **selection(tag, since, until)}
        report: Report = yield Call("GET", f"/api/campaigns/{path_id(campaign_id)}/report",
                                    params=params or None)
        return report


def _policy_json(policy: Policy | Mapping[str, Any]) -> dict[str, Any]:
    return policy.as_json() if isinstance(policy, Policy) else dict(policy)


def _labels_json(body: dict[str, Any], tags: Sequence[str] | None,
                 metadata: Mapping[str, Any] | None,
                 options: Mapping[str, Any] | None) -> dict[str, Any]:
    if tags is not None:
        body["tags"] = list(tags)
    if metadata is not None:
        body["metadata"] = dict(metadata)
    if options is not None:
        body["options"] = dict(options)
    return body


def _policy(data: Mapping[str, Any]) -> Policy:
    consent = data.get("consent") or {}
    return Policy(location=data["location"], device=data["device"], ip=data["ip"],
                  retention_days=data["retention_days"],
                  recipient=data.get("recipient", "address"),
                  consent_opens=consent.get("opens", False),
                  consent_clicks=consent.get("clicks", False))


def _campaign(data: Mapping[str, Any]) -> Campaign:
    return Campaign(str(data["id"]), data["name"], _policy(data["policy"]),
                    datetime.fromisoformat(data["created_at"]), tuple(data.get("tags", ())),
                    data.get("metadata"), data.get("options"))
