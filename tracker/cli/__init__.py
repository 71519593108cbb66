"""The `tracker` command: serve, migrate, accounts, geoip, webhooks and the rest.

Every failure a user can cause or meet (bad setting, database unreachable, port
taken) ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from tracker import __version__, logs
from tracker.cli import accounts, api, backup, classify, privacy, relay, serving
from tracker.cli.common import CommandError
from tracker.ingest import geo
from tracker.settings import SettingsError
from tracker.store import datadir
from tracker.store.embedded_db import EmbeddedDatabaseError
from tracker.store.migrations import MigrationError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracker", description="Email open and click analytics.")
    parser.add_argument("--version", action="version", version=f"tracker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In the order `tracker --help` lists them.
    for add in (serving.add_serve, serving.add_migrate, backup.add_backup, backup.add_restore,
                accounts.add_accounts, accounts.add_keys, privacy.add_retention,
                privacy.add_policy, serving.add_geoip, classify.add_classify, classify.add_rules,
                api.add_instrument, api.add_consent, api.add_messages, api.add_webhooks,
                relay.add_relay):
        add(commands)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from tracker.ingest.geoip_fetch import GeoFetchError
    from tracker.store.backup import BackupError

    return (CommandError, SettingsError, EmbeddedDatabaseError, MigrationError, OSError,
            datadir.DataDirInUse,
            asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, geo.GeoDatabaseError,
            GeoFetchError, BackupError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure("info")
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except _known_errors() as exc:
        print(f"tracker: error: {_describe(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, SettingsError) else 1


def _describe(exc: BaseException) -> Any:
    if isinstance(exc, OSError | TimeoutError) and not isinstance(exc, asyncpg.PostgresError):
        return f"cannot reach the database or a file: {exc}" if str(exc) else type(exc).__name__
    return exc
