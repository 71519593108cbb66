"""The management API's campaigns, messages and reports (README: Management API).

- `POST|GET /api/campaigns`, `GET|PATCH|DELETE /api/campaigns/{id}`;
- `POST /api/campaigns/{id}/messages` (and `.../messages/batch`): register messages;
- `GET /api/campaigns/{id}/messages`: who opened, who clicked, who did not (store/results.py),
  a page as JSON or every row as CSV or JSON Lines;
- `GET /api/campaigns/{id}/report` and `.../export`; `GET /api/messages/{id}`.

A change to a campaign's policy holds in every worker once the answer is given
(`Runtime.privacy_changed`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import asyncpg
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tracker.ingest.policy import DEFAULT, Policy, PolicyError
from tracker.mail.options import InvalidOptions, from_stored
from tracker.mail.registration import (
    InvalidBatch,
    InvalidInput,
    parse_batch,
    parse_message,
    registered_json,
)
from tracker.privacy import consent
from tracker.privacy.recipients import account_secret, identify
from tracker.store import campaigns, reports, results
from tracker.store.labels import InvalidLabel, check_metadata, check_tags
from tracker.store.queries import QUERIES
from tracker.web import export, filters
from tracker.web.http import (
    JSON,
    HttpError,
    authenticated,
    json_body,
    json_object,
    object_id,
    runtime_of,
)

_CAMPAIGN_FIELDS = {"name", "policy", "tags", "metadata", "options"}
_LIST_PARAMS = {"status", "link", "client", "country", "search", "cursor", "limit", "format",
                *filters.SELECTION}


async def own_campaign(conn: Any, account_id: int, campaign_id: int) -> asyncpg.Record:
    row = await campaigns.get(conn, account_id, campaign_id)
    if row is None:
        raise HttpError(404, "campaign not found")
    return row


async def _campaign_fields(request: Request, name: str | None, policy: Policy,
                           labels: campaigns.Labels
                           ) -> tuple[str, Policy, campaigns.Labels]:
    """The name, policy, tags, metadata and options a POST or PATCH body asks for, over
    the current ones."""
    body = await json_object(request, _CAMPAIGN_FIELDS)
    try:
        if "name" in body or name is None:
            name = campaigns.check_name(body.get("name"))
        if body.get("policy") is not None:
            policy = policy.updated(body["policy"])
        if "tags" in body:
            labels = replace(labels, tags=check_tags(body["tags"]))
        if "metadata" in body:
            labels = replace(labels, metadata=check_metadata(body["metadata"]))
        if body.get("options") is not None:
            options = from_stored(labels.options).updated(body["options"])
            labels = replace(labels, options=options.stored())
    except (ValueError, PolicyError, InvalidLabel, InvalidOptions) as exc:
        raise HttpError(422, str(exc)) from None
    return name, policy, labels


@authenticated
async def create_campaign(request: Request, account_id: int) -> Response:
    runtime = runtime_of(request)
    # A new campaign requires consent as the account's default says, unless its policy
    # says otherwise.
    default = await consent.account_default(runtime.pool, account_id)
    start = replace(DEFAULT, consent_opens=default["opens"], consent_clicks=default["clicks"])
    name, policy, labels = await _campaign_fields(request, None, start, campaigns.Labels())
    row = await campaigns.create(runtime.pool, account_id, name, policy, labels)
    runtime.remember_campaign(account_id, row["id"], policy, recording=True)
    # Every worker knows its policy before its links are handed out: one that did not
    # would store the strictest policy's fields only.
    await runtime.privacy_changed()
    return JSON(campaigns.campaign_json(row), status_code=201)


@authenticated(params=filters.SELECTION)
async def list_campaigns(request: Request, account_id: int) -> Response:
    """The account's campaigns, with a tag, created in a time range."""
    selection = filters.selection(request.query_params)
    rows = await campaigns.find(runtime_of(request).read_pool, account_id, *selection.args())
    return JSON([campaigns.campaign_json(r) for r in rows])


@authenticated
async def get_campaign(request: Request, account_id: int) -> Response:
    row = await own_campaign(runtime_of(request).read_pool, account_id, object_id(request))
    return JSON(campaigns.campaign_json(row))


@authenticated
async def patch_campaign(request: Request, account_id: int) -> Response:
    runtime = runtime_of(request)
    campaign_id = object_id(request)
    row = await own_campaign(runtime.pool, account_id, campaign_id)
    name, policy, labels = await _campaign_fields(request, row["name"],
                                                  campaigns.policy_of(row),
                                                  campaigns.labels_of(row))
    updated = await campaigns.update(runtime.pool, account_id, campaign_id, name, policy,
                                     labels)
    if updated is None:
        raise HttpError(404, "campaign not found")
    runtime.remember_campaign(account_id, campaign_id, policy, recording=True)
    await runtime.privacy_changed()
    return JSON(campaigns.campaign_json(updated))


@authenticated
async def delete_campaign(request: Request, account_id: int) -> Response:
    runtime = runtime_of(request)
    campaign_id = object_id(request)
    row = await runtime.pool.fetchrow(QUERIES.delete_campaign, account_id, campaign_id)
    if row is None:
        raise HttpError(404, "campaign not found")
    runtime.remember_campaign(account_id, campaign_id, campaigns.policy_of(row),
                              recording=False)
    await runtime.privacy_changed()
    return Response(status_code=204)


@authenticated(scope="register")
async def register_message(request: Request, account_id: int) -> Response:
    runtime = runtime_of(request)
    campaign_id = object_id(request)
    await own_campaign(runtime.pool, account_id, campaign_id)
    try:
        message = parse_message(await json_body(request))
    except InvalidInput as exc:
        raise HttpError(422, str(exc)) from None
    async with runtime.pool.acquire() as conn:
        (registered,) = await request.app.state.registrar.register(
            conn, account_id, campaign_id, [message])
    return JSON(registered_json(registered), status_code=201)


@authenticated(scope="register")
async def register_batch(request: Request, account_id: int) -> Response:
    runtime = runtime_of(request)
    campaign_id = object_id(request)
    await own_campaign(runtime.pool, account_id, campaign_id)
    try:
        messages = await parse_batch(await json_body(request))
    except InvalidBatch as exc:
        return JSON({"error": str(exc), "errors": [
            {"index": index, "error": error} for index, error in exc.errors]},
            status_code=422)
    except InvalidInput as exc:
        raise HttpError(422, str(exc)) from None
    async with runtime.pool.acquire() as conn:
        registered = await request.app.state.registrar.register(
            conn, account_id, campaign_id, messages)
    return JSON({"messages": [registered_json(r) for r in registered]}, status_code=201)


@authenticated(params={"tz", *filters.SELECTION})
async def campaign_report(request: Request, account_id: int) -> Response:
    """The report; with `tag`, `from`, `to`, the report of the messages with the tag, sent
    in that time (store/reports.py)."""
    campaign_id = object_id(request)
    tz = request.query_params.get("tz", "UTC")
    async with runtime_of(request).read_pool.acquire() as conn:
        await own_campaign(conn, account_id, campaign_id)
        selection = filters.selection(request.query_params)
        try:
            report = await reports.campaign_report(conn, account_id, campaign_id, tz,
                                                   selection)
        except reports.UnknownTimeZone as exc:
            raise HttpError(422, str(exc)) from None
    return JSON(report)


@authenticated(params=_LIST_PARAMS)
async def list_messages(request: Request, account_id: int) -> Response:
    """Who opened, who clicked, who did not: a page of the campaign's messages with their
    readers' counts (JSON, with the cursor of the next page), or every matching row from
    the cursor on as CSV or JSON Lines (`format`; at most `limit` when given)."""
    runtime = runtime_of(request)
    campaign_id = object_id(request)
    params = request.query_params
    async with runtime.read_pool.acquire() as conn:
        campaign = await own_campaign(conn, account_id, campaign_id)
        found = await message_filter(conn, account_id, campaign, params)
    after = filters.read_cursor(params, found)
    fmt_name = params.get("format", "json")
    if fmt_name == "json":
        limit = filters.limit(params)
        assert limit is not None
        page, last = await results.list_messages(runtime.read_pool, account_id, campaign_id, found,
                                                 after, limit)
        return JSON({"messages": page,
                     "next": filters.make_cursor(last, found) if last is not None else None})
    fmt = export.MESSAGE_FORMATS.get(fmt_name)
    if fmt is None:
        raise HttpError(422, f"format: must be one of json, {', '.join(export.MESSAGE_FORMATS)}")
    return await export.open_rows(
        runtime.read_pool, fmt, f"campaign-{campaign_id}-messages", QUERIES.list_messages,
        *found.args(account_id, campaign_id, after, filters.limit(params, None)))


async def message_filter(conn: asyncpg.Connection, account_id: int, campaign: asyncpg.Record,
                         params: Any) -> results.MessageFilter:
    """The filter the query parameters ask for. `link` names a destination as the report
    lists it, or as registered (before the campaign's UTM parameters were added)."""
    url_id = None
    link = filters.text_param(params, "link")
    if link is not None:
        options = from_stored(campaign["options"])
        candidates = list(dict.fromkeys((link, options.destination(link))))
        found = await conn.fetch(QUERIES.find_urls, account_id, campaign["id"], candidates)
        if not found:
            raise HttpError(422, "link: not a destination of this campaign (see its report's "
                                 "links)")
        url_id = min(found, key=lambda r: candidates.index(r["url"]))["id"]
    search = filters.text_param(params, "search")
    key = pattern = None
    if search is not None:
        # An address finds its messages by recipient key, in a pseudonymous campaign too;
        # any text also matches what is stored (the address, or the pseudonym).
        key = identify(await account_secret(conn, account_id), search).key
        pattern = results.search_pattern(search)
    return results.MessageFilter(
        selection=filters.selection(params), status=filters.status(params), url_id=url_id,
        client=filters.text_param(params, "client"), country=filters.country(params),
        recipient_key=key, recipient_pattern=pattern)


@authenticated(params={"format"})
async def export_events(request: Request, account_id: int) -> Response:
    pool = runtime_of(request).read_pool
    campaign_id = object_id(request)
    # The campaign first: another account's campaign is a 404 whatever the format, so a
    # bad format cannot tell whether it exists.
    await own_campaign(pool, account_id, campaign_id)
    fmt = export.FORMATS.get(request.query_params.get("format", "csv"))
    if fmt is None:
        raise HttpError(422, f"format: must be one of {', '.join(export.FORMATS)}")
    return await export.open_export(pool, account_id, campaign_id, fmt)


@authenticated
async def get_message(request: Request, account_id: int) -> Response:
    activity = await reports.message_activity(runtime_of(request).read_pool, account_id,
                                              object_id(request))
    if activity is None:
        raise HttpError(404, "message not found")
    return JSON(activity)


ROUTES = [
    Route("/api/campaigns", create_campaign, methods=["POST"]),
    Route("/api/campaigns", list_campaigns, methods=["GET"]),
    Route("/api/campaigns/{id}", get_campaign, methods=["GET"]),
    Route("/api/campaigns/{id}", patch_campaign, methods=["PATCH"]),
    Route("/api/campaigns/{id}", delete_campaign, methods=["DELETE"]),
    Route("/api/campaigns/{id}/messages", register_message, methods=["POST"]),
    Route("/api/campaigns/{id}/messages", list_messages, methods=["GET"]),
    Route("/api/campaigns/{id}/messages/batch", register_batch, methods=["POST"]),
    Route("/api/campaigns/{id}/report", campaign_report, methods=["GET"]),
    Route("/api/campaigns/{id}/export", export_events, methods=["GET"]),
    Route("/api/messages/{id}", get_message, methods=["GET"]),
]
