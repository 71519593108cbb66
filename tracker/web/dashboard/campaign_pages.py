"""The campaign and message pages: the campaign list, a campaign's report, its message
list with the API's filters and its export, and one message's activity."""

from __future__ import annotations

from datetime import datetime
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response

from tracker.store import campaigns, reports
from tracker.store.queries import QUERIES
from tracker.web import export, filters
from tracker.web.campaigns_api import message_filter
from tracker.web.charts import campaign_view
from tracker.web.dashboard.inputs import object_id, own_campaign, zone_of
from tracker.web.dashboard.signing_in import SignedInPages
from tracker.web.http import HttpError

RECENT_MESSAGES = 20
MESSAGES_PER_PAGE = 100
# The message list's filters, as the API names them (GET /api/campaigns/{id}/messages).
FILTERS = ("search", "status", "link", "tag", "from", "to", "client", "country")
STATUS_LABELS = {"opened": "Opened", "clicked": "Clicked",
                 "not_opened": "Not opened",
                 "machine_only": "Machine activity only", "untracked": "Sent without a pixel"}
MAIL_CLIENTS = ("Apple Mail", "Gmail", "Outlook", "Yahoo Mail", "Thunderbird", "webmail",
                "other")


class CampaignPages(SignedInPages):
    async def _campaigns(self, request: Request) -> Response:
        visit = await self._signed_in(request)
        rows = await campaigns.find(self._runtime.read_pool, visit.account_id)
        return self._render("campaigns.html", visit, campaigns=[
            {"id": r["id"], "name": r["name"], "created_at": r["created_at"],
             "policy": campaigns.policy_of(r)} for r in rows])

    async def _campaign(self, request: Request) -> Response:
        visit = await self._signed_in(request)
        campaign_id = object_id(request)
        tz, zone = zone_of(request)
        async with self._runtime.read_pool.acquire() as conn:
            row = await own_campaign(conn, visit.account_id, campaign_id)
            report = await reports.campaign_report(conn, visit.account_id, campaign_id, tz)
            recent = await conn.fetch(QUERIES.campaign_messages, visit.account_id, campaign_id,
                                      None, RECENT_MESSAGES)
        policy = campaigns.policy_of(row)
        return self._render("campaign.html", visit, campaign=row, policy=policy, report=report,
                            view=campaign_view(report, policy, zone), messages=recent,
                            tz=tz, zone=zone)

    async def _messages(self, request: Request) -> Response:
        """Who opened, who clicked, who did not: the API's message list with its filters, a
        page at a time, in the order the messages were registered."""
        visit = await self._signed_in(request)
        campaign_id = object_id(request)
        tz, zone = zone_of(request)
        chosen = _chosen_filters(request, zone)
        error, rows, next_cursor = None, [], None
        async with self._runtime.read_pool.acquire() as conn:
            row = await own_campaign(conn, visit.account_id, campaign_id)
            links = [r["url"] for r in await conn.fetch(QUERIES.report_links, visit.account_id,
                                                        campaign_id)]
            try:
                found = await message_filter(conn, visit.account_id, row, QueryParams(chosen))
                after = filters.read_cursor(request.query_params, found)
            except HttpError as exc:
                if exc.status != 422:
                    raise
                error = exc.message
            else:
                rows = await conn.fetch(QUERIES.list_messages, *found.args(
                    visit.account_id, campaign_id, after, MESSAGES_PER_PAGE + 1))
                if len(rows) > MESSAGES_PER_PAGE:
                    rows = rows[:MESSAGES_PER_PAGE]
                    next_cursor = filters.make_cursor(rows[-1]["id"], found)
        kept = {**chosen, **({"tz": tz} if tz != "UTC" else {})}
        return self._render(
            "messages.html", visit, status=422 if error else 200, campaign=row,
            messages=rows, tz=tz, zone=zone, error=error, links=links,
            shown={name: request.query_params.get(name, "") for name in FILTERS},
            statuses=STATUS_LABELS, clients=MAIL_CLIENTS, filtered=bool(chosen),
            next=f"?{urlencode({**kept, 'cursor': next_cursor})}" if next_cursor else None,
            export={fmt: f"messages/export?{urlencode({**chosen, 'format': fmt})}"
                    for fmt in export.MESSAGE_FORMATS})

    async def _export_messages(self, request: Request) -> Response:
        """The list's matching messages, every one, as CSV or JSON Lines (the API's rows)."""
        visit = await self._signed_in(request)
        campaign_id = object_id(request)
        _, zone = zone_of(request)
        fmt = export.MESSAGE_FORMATS.get(request.query_params.get("format", "csv"))
        if fmt is None:
            raise HttpError(404, "There is no such export.")
        async with self._runtime.read_pool.acquire() as conn:
            row = await own_campaign(conn, visit.account_id, campaign_id)
            found = await message_filter(conn, visit.account_id, row,
                                         QueryParams(_chosen_filters(request, zone)))
        return await export.open_rows(
            self._runtime.read_pool, fmt, f"campaign-{campaign_id}-messages", QUERIES.list_messages,
            *found.args(visit.account_id, campaign_id, None, None))

    async def _message(self, request: Request) -> Response:
        visit = await self._signed_in(request)
        tz, zone = zone_of(request)
        activity = await reports.message_activity(self._runtime.read_pool, visit.account_id,
                                                  object_id(request))
        if activity is None:
            raise HttpError(404, "There is no such message.")
        events = [{**e, "at": datetime.fromisoformat(e["at"])} for e in activity["events"]]
        human = [e["type"] for e in events if not e["machine"]]
        return self._render("message.html", visit, message=activity, events=events,
                            sent_at=datetime.fromisoformat(activity["sent_at"]),
                            opens=human.count("open"), clicks=human.count("click"),
                            machine=len(events) - len(human), tz=tz, zone=zone)


def _chosen_filters(request: Request, zone: ZoneInfo) -> dict[str, str]:
    """The message list's filters the form filled in (an empty field is no filter). A time
    without a zone, as a datetime-local field sends it, is in the page's time zone."""
    chosen = {}
    for name in FILTERS:
        value = request.query_params.get(name, "").strip()
        if not value:
            continue
        if name in ("from", "to"):
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                pass  # the filter says what is wrong with it
            else:
                value = (moment if moment.tzinfo else moment.replace(tzinfo=zone)).isoformat()
        chosen[name] = value
    return chosen

