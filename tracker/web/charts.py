"""A campaign report as the dashboard shows it: chart specs for dashboard.js, table rows.

Pure functions over the contract's report object, no I/O. The specs are plain data
(labels, series with a colour role); the browser only draws them.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from tracker.ingest.policy import Policy

TOP = 10  # bars per breakdown chart; the rest is summed into "Other"
_MAX_HOURLY_POINTS = 14 * 24  # past two weeks the timeline is drawn by day
_MIN_HOURLY_POINTS = 12  # a lone bar on an empty axis says little: show the hours before it
_UTC_ZONE = ZoneInfo("UTC")


def timeline_series(points: list[dict[str, Any]], zone: ZoneInfo
                    ) -> tuple[str, list[str], list[int], list[int]]:
    """(unit, labels, opens, clicks) with empty hours (or days) filled in, oldest first."""
    if not points:
        return "hour", [], [], []
    stamps = [(datetime.fromisoformat(p["at"]).astimezone(UTC), p) for p in points]
    first, last = min(s for s, _ in stamps), max(s for s, _ in stamps)
    if last - first <= timedelta(hours=_MAX_HOURLY_POINTS):
        first = min(first, last - timedelta(hours=_MIN_HOURLY_POINTS - 1))
        size = round((last - first) / timedelta(hours=1)) + 1
        hours = [(first + timedelta(hours=i)).astimezone(zone) for i in range(size)]
        labels = [f"{h:%b} {h.day}, {h:%H}:00" for h in hours]
        position = [round((s - first) / timedelta(hours=1)) for s, _ in stamps]
        unit = "hour"
    else:
        day0 = first.astimezone(zone).date()
        size = (last.astimezone(zone).date() - day0).days + 1
        days = [day0 + timedelta(days=i) for i in range(size)]
        labels = [f"{d:%b} {d.day}" for d in days]
        position = [(s.astimezone(zone).date() - day0).days for s, _ in stamps]
        unit = "day"
    opens, clicks = [0] * size, [0] * size
    for at, (_, point) in zip(position, stamps, strict=True):
        opens[at] += point["opens"]
        clicks[at] += point["clicks"]
    return unit, labels, opens, clicks


def breakdown_rows(breakdown: Mapping[str, Mapping[str, Mapping[str, int]]], dimension: str
                   ) -> list[tuple[str, int, int]]:
    """(key, opens, clicks) for one dimension, most opens first."""
    opens = breakdown.get("opens", {}).get(dimension, {})
    clicks = breakdown.get("clicks", {}).get(dimension, {})
    keys = set(opens) | set(clicks)
    return sorted(((k, opens.get(k, 0), clicks.get(k, 0)) for k in keys),
                  key=lambda row: (-row[1], -row[2], row[0] == "unknown", row[0]))


def _top(rows: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    if len(rows) <= TOP:
        return rows
    rest = rows[TOP - 1:]
    return [*rows[:TOP - 1], ("Other", sum(r[1] for r in rest), sum(r[2] for r in rest))]


def short_url(url: str, width: int = 48) -> str:
    text = url.split("://", 1)[-1]
    return text if len(text) <= width else text[:width - 1] + "…"


def when(value: datetime, zone: ZoneInfo = _UTC_ZONE, seconds: bool = False) -> str:
    local = value.astimezone(zone)
    return local.strftime("%Y-%m-%d %H:%M:%S %Z" if seconds else "%Y-%m-%d %H:%M %Z")


def _label(key: str) -> str:
    return "Unknown" if key == "unknown" else key


def _size(bars: int) -> str:
    """The height class of a horizontal bar chart: a few bars need little room."""
    return "medium" if bars <= 3 else "" if bars <= 7 else "tall"


# The breakdowns, each with what the policy must allow for it to hold anything.
_DIMENSIONS = (
    ("client", "Mail clients", lambda p: p.device),
    ("country", "Countries", lambda p: p.location != "none"),
    ("region", "Regions", lambda p: p.location in ("region", "city")),
    ("browser", "Browsers", lambda p: p.device),
    ("os", "Operating systems", lambda p: p.device),
    ("device", "Devices", lambda p: p.device),
)


# Why machines were told apart, in words (the reasons are tracker/ingest/rules/README.md's).
REASON_LABELS = {
    "apple_mpp": "Apple Mail Privacy Protection",
    "scanner_ua": "Link scanner or preview",
    "scanner_network": "Scanner network, on delivery",
    "bot_ua": "Bot or crawler",
    "empty_ua": "No user agent",
    "head": "HEAD request",
    "too_soon": "Clicked on sending",
    "burst": "Links clicked all at once",
    "honeypot": "Hidden honeypot link",
    "unknown": "Not known (older counts)",
}


def reason_rows(report: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(reason in words, machine opens, machine clicks), most first."""
    opens = report["opens"].get("machine_by_reason", {})
    clicks = report["clicks"].get("machine_by_reason", {})
    rows = [(REASON_LABELS.get(k, k), opens.get(k, 0), clicks.get(k, 0))
            for k in set(opens) | set(clicks)]
    return sorted(rows, key=lambda row: (-row[1] - row[2], row[0]))


def campaign_view(report: dict[str, Any], policy: Policy, zone: ZoneInfo) -> dict[str, Any]:
    """The report as the campaign page shows it: chart specs for dashboard.js, tables."""
    unit, labels, opens, clicks = timeline_series(report["timeline"], zone)
    charts: list[dict[str, Any]] = []
    if labels:
        charts.append({"id": "timeline", "type": "line" if len(labels) > 60 else "bar",
                       "size": "tall",
                       "labels": labels, "series": [
                           {"label": "Opens", "role": "opens", "values": opens},
                           {"label": "Clicks", "role": "clicks", "values": clicks}]})
    o, c = report["opens"], report["clicks"]
    if o["total"] + o["machine"] + c["total"] + c["machine"]:
        charts.append({"id": "machines", "type": "bar", "horizontal": True, "stacked": True,
                       "size": "short",
                       "labels": ["Opens", "Clicks"], "series": [
                           {"label": "Readers", "role": "human",
                            "values": [o["total"], c["total"]]},
                           {"label": "Machines", "role": "machine",
                            "values": [o["machine"], c["machine"]]}]})
    top_links = [link for link in report["links"] if link["clicks"]][:TOP]
    if top_links:
        charts.append({"id": "links", "type": "bar", "horizontal": True,
                       "size": _size(len(top_links)),
                       "labels": [short_url(link["url"]) for link in top_links], "series": [
                           {"label": "Clicks", "role": "clicks",
                            "values": [link["clicks"] for link in top_links]},
                           {"label": "Unique clicks", "role": "unique",
                            "values": [link["unique_clicks"] for link in top_links]}]})
    dimensions = []
    for name, title, allowed in _DIMENSIONS:
        rows = breakdown_rows(report["breakdown"], name)
        if name == "client":
            # A click is made in a browser, which says nothing of the mail client: opens only.
            rows = [(k, n, 0) for k, n, _ in rows if n]
        dimensions.append({"name": name, "title": title, "allowed": allowed(policy),
                           "rows": [(_label(k), n, m) for k, n, m in rows]})
        if not allowed(policy) or not rows:
            continue
        shown = _top(rows)
        if name == "device":
            slices = [(_label(k).capitalize(), n) for k, n, _ in shown if n]
            if slices:
                charts.append({"id": name, "type": "doughnut", "size": "",
                               "labels": [k for k, _ in slices],
                               "series": [{"label": "Opens", "role": "palette",
                                           "values": [n for _, n in slices]}]})
        else:
            series = [{"label": "Opens", "role": "opens", "values": [n for _, n, _ in shown]}]
            if name != "client":
                series.append({"label": "Clicks", "role": "clicks",
                               "values": [m for _, _, m in shown]})
            charts.append({"id": name, "type": "bar", "horizontal": True,
                           "countries": name == "country", "size": _size(len(shown)),
                           "labels": [_label(k) for k, _, _ in shown], "series": series})
    return {"unit": unit, "timeline": list(zip(labels, opens, clicks, strict=True)),
            "charts": charts, "chart_ids": {chart["id"] for chart in charts},
            "sizes": {chart["id"]: chart["size"] for chart in charts},
            "dimensions": dimensions, "reasons": reason_rows(report)}
