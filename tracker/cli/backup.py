"""`tracker backup` and `tracker restore`: the database in one archive, and back."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tracker.cli.common import add_setting_flags, load_settings
from tracker.cli.database import apply_migrations, command_database
from tracker.ingest.signing_keys import KEY_FILE
from tracker.settings import Settings

if TYPE_CHECKING:
    from tracker.cli.common import Commands


def cmd_backup(args: argparse.Namespace) -> int:
    from tracker.store.backup import dump

    settings = load_settings(args)
    archive = Path(args.file).resolve()
    with command_database(settings) as dsn:
        dump(dsn, archive)
    print(f"backed up the database to {archive} ({archive.stat().st_size:,} bytes)")
    print(f"the signing keys are not in it: keep {_keys_named(settings)} with it; without "
          "them every pixel and link already sent stops working", file=sys.stderr)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from tracker.store.backup import restore

    settings = load_settings(args)
    with command_database(settings, create=True) as dsn:
        restore(dsn, Path(args.file))
        applied = asyncio.run(apply_migrations(dsn))
    print(f"restored {args.file}" + (f"; applied {', '.join(applied)}" if applied else ""))
    if not settings.secret_key and not (settings.data_dir / KEY_FILE).exists():
        print(f"tracker: put the backed-up signing keys in place before serving: "
              f"{_keys_named(settings)}; a new key would leave every pixel and link already "
              "sent dead", file=sys.stderr)
    return 0


def _keys_named(settings: Settings) -> str:
    if settings.secret_key or settings.database_url:
        return "TRACKER_SECRET_KEY"
    return str(settings.data_dir.resolve() / KEY_FILE)


def add_backup(commands: Commands) -> None:
    backup_cmd = commands.add_parser(
        "backup", help="dump the database into one archive (pg_dump's custom format); the "
        "signing keys are not in it: keep them with it (docs/operations.md)")
    backup_cmd.add_argument("file", help="the archive to write")
    add_setting_flags(backup_cmd, ("database_url", "data_dir"))
    backup_cmd.set_defaults(run=cmd_backup)


def add_restore(commands: Commands) -> None:
    restore_cmd = commands.add_parser(
        "restore", help="restore an archive of tracker backup into an empty database (a new "
        "data dir, or a new external database), then migrate it")
    restore_cmd.add_argument("file", help="the archive to read")
    add_setting_flags(restore_cmd, ("database_url", "data_dir"))
    restore_cmd.set_defaults(run=cmd_restore)
