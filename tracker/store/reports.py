"""The read side: campaign reports and message activity as plain dicts, no HTTP.

Definitions follow the contract: `total` and `unique` count human events only,
`machine` the rest; a click proves an open, so `opens.unique` counts messages
with a human open or a human click; rates divide by the number of messages.

A campaign report reads only the rollups the writer keeps (store/rollups.py), so it costs
the same for ten events as for ten million: a few thousand 15-minute buckets, the
campaign's urls, and its distinct dimension values per day. Message activity is the
one read of raw events (one message's, by index).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg

from tracker.store.labels import decode_metadata
from tracker.store.queries import QUERIES
from tracker.store.results import Selection

DIMENSIONS = ("country", "region", "browser", "os", "device", "client")
ESTIMATE_METHOD = (
    "mpp_adjusted: messages opened by a reader, plus the messages whose opens Apple Mail "
    "Privacy Protection hides (an MPP prefetch, no reader's open or click) times the open "
    "rate of the messages MPP did not prefetch; divided by messages. An estimate, not a count.")


class UnknownTimeZone(ValueError):
    pass


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long for a file
        raise UnknownTimeZone(f"tz: unknown time zone {name!r}") from None


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 0.0


async def campaign_report(conn: asyncpg.Connection, account_id: int, campaign_id: int,
                          tz: str = "UTC", selection: Selection | None = None
                          ) -> dict[str, Any]:
    """The campaign's report; with a `selection` (a tag, a time range of sending), the
    report of those of its messages (`_selection_parts`)."""
    zone_info = zone(tz)
    breakdown: dict[str, dict[str, dict[str, int]]] = {
        kind: {dim: {} for dim in DIMENSIONS} for kind in ("opens", "clicks")}
    by_reason: dict[str, dict[str, int]] = {"opens": {}, "clicks": {}}
    try:
        if selection is None or selection.everything:
            totals, links, timeline = await _campaign_parts(conn, account_id, campaign_id,
                                                            tz, breakdown, by_reason)
        else:
            totals, links, timeline = await _selection_parts(conn, account_id, campaign_id,
                                                             tz, selection, breakdown,
                                                             by_reason)
    except asyncpg.InvalidParameterValueError:
        # Python and PostgreSQL ship different zone databases ("posixrules", "right/...").
        raise UnknownTimeZone(f"tz: unknown time zone {tz!r}") from None
    report = _assembled(campaign_id, totals, links, timeline, breakdown, by_reason, zone_info)
    if selection is not None and not selection.everything:
        report["selection"] = {
            "tag": selection.tag, "from": _iso(selection.since), "to": _iso(selection.until),
            "from_stored_events": ["timeline", "breakdown", "machine_by_reason"]}
    return report


async def _campaign_parts(conn: asyncpg.Connection, account_id: int, campaign_id: int,
                          tz: str, breakdown: dict[str, dict[str, dict[str, int]]],
                          by_reason: dict[str, dict[str, int]]) -> tuple[Any, Any, Any]:
    """The whole campaign, from its rollups only."""
    totals = await conn.fetchrow(QUERIES.report_totals, account_id, campaign_id)
    links = await conn.fetch(QUERIES.report_links, account_id, campaign_id)
    timeline = await conn.fetch(QUERIES.report_timeline, account_id, campaign_id, tz)
    for row in await conn.fetch(QUERIES.report_breakdown, account_id, campaign_id):
        kind = "opens" if row["type"] == "open" else "clicks"
        if row["dimension"] == "reason":
            by_reason[kind][row["key"]] = row["n"]
        else:
            breakdown[kind][row["dimension"]][row["key"]] = row["n"]
    return totals, links, timeline


async def _selection_parts(conn: asyncpg.Connection, account_id: int, campaign_id: int,
                           tz: str, selection: Selection,
                           breakdown: dict[str, dict[str, dict[str, int]]],
                           by_reason: dict[str, dict[str, int]]) -> tuple[Any, Any, Any]:
    """Some of the campaign's messages. The counts (totals, unique counts, machine counts,
    links, the MPP estimate's inputs) come from the per-message rollups and survive
    retention; the campaign-wide rollups cannot be split by message, so the timeline, the
    breakdown and the machine counts by reason come from the stored events, and what
    retention has deleted of them is "unknown" (each dimension still sums to its total)."""
    args = (account_id, campaign_id, *selection.args())
    totals = await conn.fetchrow(QUERIES.selection_totals, *args)
    links = await conn.fetch(QUERIES.selection_links, *args)
    timeline = await conn.fetch(QUERIES.selection_timeline, *args, tz)
    for row in await conn.fetch(QUERIES.selection_breakdown, *args):
        kind = "opens" if row["type"] == "open" else "clicks"
        if row["dimension"] == "reason":
            if row["machines"]:
                by_reason[kind][row["key"]] = row["machines"]
        elif row["humans"]:
            breakdown[kind][row["dimension"]][row["key"]] = row["humans"]
    for kind, total in (("opens", totals["opens"]), ("clicks", totals["clicks"])):
        for counts in breakdown[kind].values():
            rest = total - sum(counts.values())
            if rest > 0:
                counts["unknown"] = counts.get("unknown", 0) + rest
    return totals, links, timeline


def _assembled(campaign_id: int, totals: Any, links: Any, timeline: Any,
               breakdown: dict[str, dict[str, dict[str, int]]],
               by_reason: dict[str, dict[str, int]], zone_info: ZoneInfo) -> dict[str, Any]:
    messages = totals["messages"]
    unique_opens, unique_clicks = totals["unique_opens"], totals["unique_clicks"]
    return {
        "campaign_id": str(campaign_id),
        "messages": messages,
        "opens": {"total": totals["opens"], "unique": unique_opens,
                  "machine": totals["machine_opens"],
                  "machine_by_reason": _summing_to(by_reason["opens"], totals["machine_opens"])},
        "clicks": {"total": totals["clicks"], "unique": unique_clicks,
                   "machine": totals["machine_clicks"],
                   "machine_by_reason": _summing_to(by_reason["clicks"],
                                                    totals["machine_clicks"])},
        "open_rate": _rate(unique_opens, messages),
        "estimated_open_rate": estimated_open_rate(messages, unique_opens, totals["mpp"],
                                                   totals["mpp_opened"]),
        "estimate_method": ESTIMATE_METHOD,
        "click_rate": _rate(unique_clicks, messages),
        "click_to_open_rate": _rate(unique_clicks, unique_opens),
        "links": [{"url": r["url"], "clicks": r["clicks"], "unique_clicks": r["unique_clicks"]}
                  for r in links],
        "timeline": [{"at": _hour(r["hour"], zone_info), "opens": r["opens"],
                      "clicks": r["clicks"]} for r in timeline],
        "breakdown": breakdown,
    }


def estimated_open_rate(messages: int, opened: int, prefetched: int,
                        prefetched_opened: int) -> float | None:
    """The open rate with the opens MPP hides estimated: the messages MPP prefetched that
    no reader is seen to open are taken to be opened at the rate of the messages it did
    not prefetch. None when there is nothing to estimate from (no messages, or every
    message prefetched)."""
    if messages <= 0:
        return None
    if prefetched <= 0:
        return _rate(opened, messages)
    observable = messages - prefetched
    if observable <= 0:
        return None
    rate_seen = (opened - prefetched_opened) / observable
    hidden = prefetched - prefetched_opened
    return round(min(1.0, (opened + rate_seen * hidden) / messages), 6)


def _summing_to(counts: dict[str, int], total: int) -> dict[str, int]:
    """Machine counts by reason, with what retention left without one as "unknown", so
    they sum to the report's machine count."""
    rest = total - sum(counts.values())
    if rest > 0:
        counts["unknown"] = counts.get("unknown", 0) + rest
    return counts


def _hour(at: datetime, zone_info: ZoneInfo) -> str:
    return at.astimezone(zone_info).isoformat()


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


async def message_activity(conn: asyncpg.Connection | asyncpg.Pool, account_id: int,
                           message_id: int) -> dict[str, Any] | None:
    message = await conn.fetchrow(QUERIES.get_message, account_id, message_id)
    if message is None:
        return None
    events = await conn.fetch(QUERIES.message_events, account_id, message_id)
    return {
        "id": str(message["id"]),
        "campaign_id": str(message["campaign_id"]),
        "recipient": message["recipient"],
        "subject": message["subject"],
        "sent_at": message["sent_at"].isoformat(),
        "tags": list(message["tags"]),
        "metadata": decode_metadata(message["metadata"]),
        "events": [{
            "type": e["type"], "at": e["occurred_at"].isoformat(), "url": e["url"],
            "country": e["country"], "region": e["region"], "city": e["city"],
            "browser": e["browser"], "os": e["os"], "device": e["device"],
            "client": e["client"], "machine": e["machine"], "reason": e["reason"],
        } for e in events],
    }
