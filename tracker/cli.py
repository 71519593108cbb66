"""The `tracker` command: serve, migrate, accounts, geoip.

Every failure a user can cause or meet (bad setting, database unreachable, port
taken) ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import orjson

from tracker import accounts, geo, logs
from tracker.database import connect, database_url, wait_until_reachable
from tracker.embedded_db import EmbeddedDatabaseError
from tracker.keys import signing_keys
from tracker.migrations import MigrationError, migrate
from tracker.settings import SETTINGS, Settings, SettingsError, load

log = logging.getLogger("tracker")

# How long serve and migrate wait for an external database to answer at start.
_DATABASE_WAIT_S = 30.0


class CommandError(Exception):
    """A failure to report as one line."""


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {s.env: getattr(args, s.field, None) for s in SETTINGS}
    settings = load(overrides={k: v for k, v in overrides.items() if v is not None})
    logs.configure(settings.log_level)
    return settings


def _add_setting_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    for setting in SETTINGS:
        if names is None or setting.field in names:
            parser.add_argument(setting.flag, dest=setting.field, metavar=setting.field.upper(),
                                help=f"{setting.help} [{setting.env}]")


async def _migrate(dsn: str) -> list[str]:
    await wait_until_reachable(dsn, _DATABASE_WAIT_S)
    conn = await connect(dsn)
    try:
        return [f"{m.version:04d}_{m.name}" for m in await migrate(conn)]
    finally:
        await conn.close()


def cmd_serve(args: argparse.Namespace) -> int:
    from tracker import server

    settings = _settings(args)
    keys = signing_keys(settings)
    geo_path = settings.geoip_db or geo.default_geoip_path(settings.data_dir)
    if geo_path is not None:
        try:
            geo.GeoLookup(geo_path)  # fail now, not in every worker
        except geo.GeoDatabaseError as exc:
            if settings.geoip_db is None:
                raise
            raise SettingsError(f"TRACKER_GEOIP_DB: {exc}") from None
    elif settings.geoip_fetch == "on":
        _fetch_geo_database_in_background(settings)
    with database_url(settings, owner=True) as dsn:
        for name in asyncio.run(_migrate(dsn)):
            log.info("applied migration %s", name)
        env = {**settings.as_env(), "TRACKER_DATABASE_URL": dsn, "TRACKER_SECRET_KEY": keys}
        log.info("tracker on %s (%s, %d worker%s, %s database)", settings.base_url,
                 settings.server, settings.workers, "" if settings.workers == 1 else "s",
                 "embedded" if settings.embedded else "external")
        server.run(settings, env)
    return 0


def _fetch_geo_database_in_background(settings: Settings) -> None:
    """Give a fresh install locations without an extra step. A separate process, not a
    thread: the server forks its workers, and forking with a busy thread is unsafe.
    Workers pick the database up when it lands; a failure is one log line."""
    log.info("no geo database: fetching DB-IP City Lite into %s in the background "
             "(TRACKER_GEOIP_FETCH=off to skip)", settings.data_dir / "geoip")
    subprocess.Popen([sys.executable, "-m", "tracker", "geoip", "fetch", "--data-dir",
                      str(settings.data_dir)], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, start_new_session=True)


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with database_url(settings) as dsn:
        applied = asyncio.run(_migrate(dsn))
    print("\n".join(f"applied {name}" for name in applied) or "already up to date")
    return 0


def cmd_accounts_create(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def create(dsn: str) -> accounts.NewAccount:
        await _migrate(dsn)
        conn = await connect(dsn)
        try:
            return await accounts.create_account(conn, args.name)
        finally:
            await conn.close()

    with database_url(settings) as dsn:
        try:
            account = asyncio.run(create(dsn))
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    if args.json:
        sys.stdout.write(orjson.dumps({"id": str(account.id), "name": account.name,
                                       "api_key": account.api_key}).decode() + "\n")
    else:
        print(f"account {account.id} ({account.name}) created")
        print(f"API key (shown once, keep it secret): {account.api_key}")
    return 0


def cmd_geoip_fetch(args: argparse.Namespace) -> int:
    from tracker.geoip_fetch import fetch_dbip_city_lite

    settings = _settings(args)
    path = fetch_dbip_city_lite(settings.data_dir / "geoip")
    print(f"installed {path}; tracker serve uses it unless TRACKER_GEOIP_DB is set")
    print("IP geolocation by DB-IP.com (https://db-ip.com), licensed CC BY 4.0")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracker", description="Email open and click analytics.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server (embedded PostgreSQL by default)")
    _add_setting_flags(serve)
    serve.set_defaults(run=cmd_serve)

    migrate_cmd = commands.add_parser("migrate", help="apply pending database migrations")
    _add_setting_flags(migrate_cmd, ("database_url", "data_dir"))
    migrate_cmd.set_defaults(run=cmd_migrate)

    account_cmd = commands.add_parser("accounts", help="manage accounts")
    account_sub = account_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = account_sub.add_parser("create", help="create an account and print its API key")
    create.add_argument("name")
    create.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _add_setting_flags(create, ("database_url", "data_dir"))
    create.set_defaults(run=cmd_accounts_create)

    geoip_cmd = commands.add_parser("geoip", help="manage the IP location database")
    geoip_sub = geoip_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    fetch = geoip_sub.add_parser("fetch", help="download and verify DB-IP City Lite into the "
                                 "data dir")
    _add_setting_flags(fetch, ("data_dir",))
    fetch.set_defaults(run=cmd_geoip_fetch)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from tracker.geoip_fetch import GeoFetchError

    return (CommandError, SettingsError, EmbeddedDatabaseError, MigrationError, OSError,
            asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, geo.GeoDatabaseError,
            GeoFetchError)


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
