"""`tracker retention run` and `tracker policy describe`: the privacy lifecycle's jobs and
a campaign's policy in words."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from tracker.cli.common import CommandError, add_setting_flags, object_id
from tracker.cli.database import on_database
from tracker.store.queries import QUERIES

if TYPE_CHECKING:
    from tracker.cli.common import Commands


def cmd_retention_run(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from tracker.privacy.jobs import Maintenance, maintain
    from tracker.privacy.retention import InGrace, still_in_grace

    real_now = datetime.now(UTC)
    now = real_now
    if args.now is not None:
        try:
            now = datetime.fromisoformat(args.now)
        except ValueError:
            raise CommandError(f"--now: {args.now!r} is not an ISO 8601 date-time") from None
        now = now if now.tzinfo else now.replace(tzinfo=UTC)

    async def run(conn: asyncpg.Connection) -> tuple[Maintenance | None, list[InGrace]]:
        # A --now in the future must not purge, unasked, what can still be restored.
        early = await still_in_grace(conn, real_now, now)
        if early and args.purge_within_grace:
            _say_in_grace("purging within the grace period, as --purge-within-grace asks "
                          "(it cannot be restored afterwards):", early)
        elif early:
            _say_in_grace("not purged, still in the 30-day grace period (add "
                          "--purge-within-grace to purge it now):", early)
        purge_at = now if args.purge_within_grace else min(now, real_now)
        return await maintain(conn, now, purge_at), [] if args.purge_within_grace else early

    result, skipped = on_database(args, run)
    if result is None:
        raise CommandError("another tracker process is running retention right now; "
                           "try again in a minute")
    summary = {**result.as_json(), "skipped_in_grace": [s.as_json() for s in skipped]}
    if args.json:
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
        return 0
    print(f"retention: {len(summary['partitions_dropped'])} day partition(s) dropped, "
          f"{summary['expired_events_deleted']} expired event(s) deleted")
    print(f"purge: {len(summary['campaigns_purged'])} campaign(s) and "
          f"{len(summary['accounts_purged'])} account(s) past their grace period, "
          f"{summary['purged_events_deleted']} event(s) deleted")
    print(f"erasure sweep: {summary['erasure_sweep']} late row(s) removed")
    return 0


def _say_in_grace(heading: str, items: list[Any]) -> None:
    print(heading, file=sys.stderr)
    for item in items:
        print(f"  {item.describe()}", file=sys.stderr)


def cmd_policy_describe(args: argparse.Namespace) -> int:
    from tracker.privacy.notice import campaign_summary

    row = on_database(args, lambda conn: conn.fetchrow(QUERIES.campaign_privacy, None,
                                                       args.campaign))
    if row is None:
        raise CommandError(f"no campaign {args.campaign} (or it is deleted)")
    summary = campaign_summary(row)
    if args.json:
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    else:
        print(summary["text"])
    return 0


def add_retention(commands: Commands) -> None:
    retention_cmd = commands.add_parser("retention", help="privacy retention and purge")
    retention_sub = retention_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    retention_run = retention_sub.add_parser(
        "run", help="delete expired events and purge deleted campaigns and accounts now",
        description="What the server does hourly: removes events older than their campaign's "
        "retention (dropping whole day partitions where it can), purges campaigns and "
        "accounts deleted more than 30 days ago, and sweeps recent erasures.")
    retention_run.add_argument("--now", metavar="ISO8601",
                               help="the time to apply retention at (default: now)")
    retention_run.add_argument("--json", action="store_true",
                               help="print one JSON object on stdout")
    retention_run.add_argument(
        "--purge-within-grace", action="store_true",
        help="with a --now in the future, also purge what was deleted less than 30 days ago "
        "(the list is printed first); without it such campaigns and accounts are left for "
        "their grace period and listed")
    add_setting_flags(retention_run, ("database_url", "data_dir"))
    retention_run.set_defaults(run=cmd_retention_run)


def add_policy(commands: Commands) -> None:
    policy_cmd = commands.add_parser("policy", help="campaign privacy policies")
    policy_sub = policy_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    describe = policy_sub.add_parser(
        "describe", help="print what a campaign collects, as a paragraph for a privacy notice")
    describe.add_argument("--campaign", required=True, type=object_id, metavar="ID")
    describe.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_setting_flags(describe, ("database_url", "data_dir"))
    describe.set_defaults(run=cmd_policy_describe)
