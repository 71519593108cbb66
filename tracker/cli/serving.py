"""`tracker serve`, `tracker migrate` and `tracker geoip fetch`: the server and what it
needs in place before it starts."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import TYPE_CHECKING

from tracker.cli.common import add_setting_flags, load_settings, log
from tracker.cli.database import apply_migrations, command_database
from tracker.ingest import geo
from tracker.ingest.signing_keys import signing_keys
from tracker.settings import Settings, SettingsError
from tracker.store import datadir
from tracker.store.database import use_database

if TYPE_CHECKING:
    from tracker.cli.common import Commands


def cmd_serve(args: argparse.Namespace) -> int:
    from tracker import server

    settings = load_settings(args)
    # First the checks that need nothing started: the data dir is ours, the address free.
    # Only the embedded database makes a data dir one server's own: with an external one
    # it holds nothing two servers cannot share (journal segments are each locked by their
    # writer), and a second server on it is how a release is switched over on one host.
    owned = (datadir.held(settings.data_dir, server.listen_url(settings),
                          settings.named("TRACKER_DATA_DIR"))
             if settings.embedded else contextlib.nullcontext())
    with owned:
        server.check_listen(settings)
        server.warn_about_public_url(settings)
        keys = signing_keys(settings)
        geo_path = settings.geoip_db or geo.default_geoip_path(settings.data_dir)
        if geo_path is not None:
            try:
                geo.GeoLookup(geo_path)  # fail now, not in every worker
            except geo.GeoDatabaseError as exc:
                if settings.geoip_db is None:
                    raise
                raise SettingsError(f"{settings.named('TRACKER_GEOIP_DB')}: {exc}") from None
        elif settings.geoip_fetch == "on":
            _fetch_geo_database_in_background(settings)
        if settings.workers > 1:
            from tracker.ingest.devices import ensure_cached

            ensure_cached(settings.resolved_cache_dir)  # once here, not once per worker
        with use_database(settings) as database:
            for name in asyncio.run(apply_migrations(database.dsn)):
                log.info("applied migration %s", name)
            env = {**settings.as_env(), "TRACKER_DATABASE_URL": database.dsn,
                   "TRACKER_SECRET_KEY": keys}
            log.info("tracker on %s (uvicorn, %d worker%s, %s database)", settings.base_url,
                     settings.workers, "" if settings.workers == 1 else "s",
                     "embedded" if settings.embedded else "external")
            server.run(settings, env)
    return 0


def _fetch_geo_database_in_background(settings: Settings) -> None:
    """Give a fresh install locations without an extra step. Workers pick the database up
    when it lands; a failure is one log line."""
    from tracker.ingest.geoip_fetch import fetch_in_background

    log.info("no geo database: fetching DB-IP City Lite into %s in the background "
             "(TRACKER_GEOIP_FETCH=off to skip)", settings.data_dir / "geoip")
    fetch_in_background(settings.data_dir)


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    with command_database(settings, create=True) as dsn:
        applied = asyncio.run(apply_migrations(dsn))
    print("\n".join(f"applied {name}" for name in applied) or "already up to date")
    return 0


def cmd_geoip_fetch(args: argparse.Namespace) -> int:
    from tracker.ingest.geoip_fetch import fetch_dbip_city_lite

    settings = load_settings(args)
    path = fetch_dbip_city_lite(settings.data_dir / "geoip")
    print(f"installed {path}; tracker serve uses it unless TRACKER_GEOIP_DB is set")
    print("IP geolocation by DB-IP.com (https://db-ip.com), licensed CC BY 4.0")
    return 0


def add_serve(commands: Commands) -> None:
    serve = commands.add_parser("serve", help="run the server (embedded PostgreSQL by default)")
    add_setting_flags(serve)
    serve.set_defaults(run=cmd_serve)


def add_migrate(commands: Commands) -> None:
    migrate_cmd = commands.add_parser("migrate", help="apply pending database migrations")
    add_setting_flags(migrate_cmd, ("database_url", "data_dir"))
    migrate_cmd.set_defaults(run=cmd_migrate)


def add_geoip(commands: Commands) -> None:
    geoip_cmd = commands.add_parser("geoip", help="manage the IP location database")
    geoip_sub = geoip_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    fetch = geoip_sub.add_parser("fetch", help="download and verify DB-IP City Lite into the "
                                 "data dir")
    add_setting_flags(fetch, ("data_dir",))
    fetch.set_defaults(run=cmd_geoip_fetch)
