"""The `tracker` command: serve, migrate, accounts, geoip.

Every failure a user can cause or meet (bad setting, database unreachable, port
taken) ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from tracker import __version__, logs
from tracker.ingest import geo
from tracker.ingest.rules import RulesError, load_rules
from tracker.ingest.rules.lists import LIST_NAMES
from tracker.ingest.signing_keys import KEY_FILE, signing_keys
from tracker.settings import SETTINGS, Settings, SettingsError, load, retired_settings
from tracker.store import accounts, datadir
from tracker.store.database import connect, use_database, wait_until_reachable
from tracker.store.embedded_db import EmbeddedDatabaseError
from tracker.store.migrations import MigrationError, migrate
from tracker.store.queries import QUERIES

log = logging.getLogger("tracker")

# How long serve and migrate wait for an external database to answer at start.
_DATABASE_WAIT_S = 30.0


class CommandError(Exception):
    """A failure to report as one line."""


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {s.env: getattr(args, s.field, None) for s in SETTINGS}
    settings = load(overrides={k: v for k, v in overrides.items() if v is not None})
    logs.configure(settings.log_level, settings.log_format)
    for warning in retired_settings():
        log.warning("%s", warning)
    if settings.rules is not None:
        try:  # now, so that a bad rules file stops the command naming the setting
            load_rules(settings.rules)
        except RulesError as exc:
            raise SettingsError(f"{settings.named('TRACKER_RULES')}: {exc}") from None
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
            for name in asyncio.run(_migrate(database.dsn)):
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


@contextlib.contextmanager
def _database(settings: Settings, *, create: bool = False) -> Iterator[str]:
    """The DSN of the database a command works on, said on stderr (stdout may be the
    command's JSON): an operator sees at once a command that went to the wrong place."""
    with use_database(settings, create=create) as database:
        print(f"tracker: database: {database.where}", file=sys.stderr)
        yield database.dsn


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with _database(settings, create=True) as dsn:
        applied = asyncio.run(_migrate(dsn))
    print("\n".join(f"applied {name}" for name in applied) or "already up to date")
    return 0


def cmd_accounts_create(args: argparse.Namespace) -> int:
    if not 1 <= len(args.name.strip()) <= accounts.MAX_NAME_CHARS:  # before any database work
        raise CommandError(f"an account name must be 1 to {accounts.MAX_NAME_CHARS} characters")
    try:
        account = _on_database(args, lambda conn: accounts.create_account(conn, args.name))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        sys.stdout.write(orjson.dumps({"id": str(account.id), "name": account.name,
                                       "api_key": account.api_key}).decode() + "\n")
    else:
        print(f"account {account.id} ({account.name}) created")
        print(f"API key (shown once, keep it secret): {account.api_key}")
    return 0


def cmd_accounts_list(args: argparse.Namespace) -> int:
    listed = _on_database(args, accounts.list_accounts)
    if args.json:
        sys.stdout.write(orjson.dumps(listed).decode() + "\n")
        return 0
    if not listed:
        print("no accounts (tracker accounts create NAME makes one)")
        return 0
    rows = [("ID", "NAME", "STATE", "KEYS", "CAMPAIGNS", "CREATED", "LAST USED")] + [
        (a["id"], a["name"], a["state"], str(a["keys"]), str(a["campaigns"]),
         a["created_at"][:19].replace("T", " "),
         (a["last_used_at"] or "never")[:19].replace("T", " ")) for a in listed]
    _print_table(rows)
    return 0


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


async def _check_account(conn: asyncpg.Connection, account_id: int) -> None:
    """The account exists and is not deleted: checked before its keys are touched."""
    from tracker.store.queries import QUERIES

    if await conn.fetchrow(QUERIES.account_settings, account_id) is None:
        raise CommandError(f"no account {account_id} (or it is deleted)")


def cmd_keys_create(args: argparse.Namespace) -> int:
    async def work(conn: asyncpg.Connection) -> accounts.NewKey:
        await _check_account(conn, args.account)
        return await accounts.create_key(conn, args.account, args.name, args.scope)

    try:
        key = _on_database(args, work)
    except accounts.KeyRequestError as exc:
        raise CommandError(str(exc)) from None
    _print_new_key(args, key, "created")
    return 0


def _print_new_key(args: argparse.Namespace, key: accounts.NewKey, what: str) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(key.as_json()).decode() + "\n")
        return
    print(f"key {key.id} ({key.name}, scope {key.scope}) {what} for account {args.account}")
    print(f"API key (shown once, keep it secret): {key.api_key}")


def cmd_keys_list(args: argparse.Namespace) -> int:
    async def work(conn: asyncpg.Connection) -> list[dict[str, Any]]:
        await _check_account(conn, args.account)
        return await accounts.list_keys(conn, args.account)

    keys = _on_database(args, work)
    if args.json:
        sys.stdout.write(orjson.dumps(keys).decode() + "\n")
        return 0
    _print_table([("ID", "NAME", "SCOPE", "CREATED", "LAST USED")] + [
        (k["id"], k["name"], k["scope"], k["created_at"][:19].replace("T", " "),
         (k["last_used_at"] or "never")[:19].replace("T", " ")) for k in keys])
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    async def work(conn: asyncpg.Connection) -> accounts.NewKey | None:
        await _check_account(conn, args.account)
        return await accounts.rotate_key(conn, args.account, args.key)

    key = _on_database(args, work)
    if key is None:
        raise CommandError(f"account {args.account} has no live key {args.key}")
    _print_new_key(args, key, f"replaces key {args.key} (revoked now)")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    async def work(conn: asyncpg.Connection) -> dict[str, Any] | None:
        await _check_account(conn, args.account)
        # The operator may revoke the last full key (the CLI can always make another).
        return await accounts.revoke_key(conn, args.account, args.key, keep_a_full_key=False)

    revoked = _on_database(args, work)
    if revoked is None:
        raise CommandError(f"account {args.account} has no live key {args.key}")
    print(f"key {args.key} ({revoked['name']}) revoked: refused from now on, its dashboard "
          "sessions ended")
    return 0


def _on_database(args: argparse.Namespace,
                 work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    """Run `work` on a connection to the configured (migrated) database, which must exist:
    only serve and migrate make a new embedded one."""
    settings = _settings(args)

    async def run(dsn: str) -> Any:
        await _migrate(dsn)
        conn = await connect(dsn)
        try:
            return await work(conn)
        finally:
            await conn.close()

    with _database(settings) as dsn:
        return asyncio.run(run(dsn))


def _object_id(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 0 < int(value) < 2**63:
        raise argparse.ArgumentTypeError(f"{value!r} is not an id")
    return int(value)


def cmd_accounts_delete(args: argparse.Namespace) -> int:
    from tracker.privacy.retention import GRACE

    row = _on_database(args, lambda conn: conn.fetchrow(QUERIES.delete_account,
                                                        args.id))
    if row is None:
        raise CommandError(f"no account {args.id} (or it is already purged)")
    print(f"account {args.id} deleted at {row['deleted_at'].isoformat()}: nothing is recorded "
          f"for it {_privacy_change_holds(args)}; its data is purged after "
          f"{(row['deleted_at'] + GRACE).isoformat()} unless restored "
          f"(tracker accounts restore {args.id})")
    return 0


def _privacy_change_holds(args: argparse.Namespace) -> str:
    """Tell the workers of a server on this data dir at once (privacy/sync.py); say when
    the change holds."""
    from tracker.privacy.sync import announce_from_outside

    data_dir = _settings(args).data_dir
    try:
        if announce_from_outside(data_dir):
            return ("at once in the server on this data dir (within a second in servers of "
                    "other data dirs or nodes)")
    except OSError as exc:
        log.debug("cannot tell the workers on %s: %s", data_dir, exc)
    return "within a second"


def cmd_accounts_restore(args: argparse.Namespace) -> int:

    row = _on_database(args, lambda conn: conn.fetchrow(QUERIES.restore_account,
                                                        args.id))
    if row is None:
        raise CommandError(f"account {args.id} is not deleted, or its grace period is over "
                           "and it was purged")
    print(f"account {args.id} restored: recording resumes {_privacy_change_holds(args)}")
    return 0


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

    result, skipped = _on_database(args, run)
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

    row = _on_database(args, lambda conn: conn.fetchrow(QUERIES.campaign_privacy,
                                                        None, args.campaign))
    if row is None:
        raise CommandError(f"no campaign {args.campaign} (or it is deleted)")
    summary = campaign_summary(row)
    if args.json:
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    else:
        print(summary["text"])
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from tracker.store.backup import dump

    settings = _settings(args)
    archive = Path(args.file).resolve()
    with _database(settings) as dsn:
        dump(dsn, archive)
    print(f"backed up the database to {archive} ({archive.stat().st_size:,} bytes)")
    print(f"the signing keys are not in it: keep {_keys_named(settings)} with it; without "
          "them every pixel and link already sent stops working", file=sys.stderr)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from tracker.store.backup import restore

    settings = _settings(args)
    with _database(settings, create=True) as dsn:
        restore(dsn, Path(args.file))
        applied = asyncio.run(_migrate(dsn))
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


def cmd_geoip_fetch(args: argparse.Namespace) -> int:
    from tracker.ingest.geoip_fetch import fetch_dbip_city_lite

    settings = _settings(args)
    path = fetch_dbip_city_lite(settings.data_dir / "geoip")
    print(f"installed {path}; tracker serve uses it unless TRACKER_GEOIP_DB is set")
    print("IP geolocation by DB-IP.com (https://db-ip.com), licensed CC BY 4.0")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from tracker.ingest import useragent
    from tracker.ingest.classify import Classifier
    from tracker.ingest.rules import load_rules

    settings = _settings(args)
    # A fresh classifier: no earlier clicks, so no burst; the rules the server would load.
    classifier = Classifier(load_rules(settings.rules, settings.data_dir))
    # A look-up creates no data dir: without one, the device index is built in memory.
    useragent.prepare(settings.resolved_cache_dir
                      if settings.cache_dir or settings.data_dir.is_dir() else None)
    if args.jsonl:
        return _classify_lines(classifier)
    if args.user_agent is None:
        raise CommandError("--user-agent is required (or --jsonl to read requests from stdin)")
    try:
        fields = _classified(classifier, {
            "user_agent": args.user_agent, "ip": args.ip, "method": args.method,
            "kind": args.kind, "seconds_after_send": args.seconds_after_send})
    except ValueError as exc:  # only --ip can be wrong here: argparse checked the rest
        raise CommandError(f"--{exc}") from None
    if args.json:
        sys.stdout.write(orjson.dumps(fields).decode() + "\n")
        return 0
    who = "machine" if fields["machine"] else "human"
    print(f"{fields['kind']}: {who}" + (f" ({fields['reason']})" if fields["reason"] else ""))
    if not fields["recorded"]:
        print("recorded: no (a HEAD on the pixel records nothing)")
    print(f"rule: {fields['rule'] or 'no rule matched: a reader'}")
    if fields["list"]:
        print(f"address list: {fields['list']}"
              + (f" (data of {fields['list_date']})" if fields["list_date"] else ""))
    print(f"location: {'recorded as the policy allows' if fields['location_recorded'] else 'none'}")
    print(f"mail client: {fields['client'] or 'unknown'}; browser: {fields['browser'] or 'unknown'}"
          f"; os: {fields['os'] or 'unknown'}; device: {fields['device']}")
    print(f"rules: {fields['rules_version']}")
    return 0


def cmd_rules_update(args: argparse.Namespace) -> int:
    from tracker.ingest.rules.update import MIRROR_ENV, update_lists

    settings = _settings(args)
    mirror = args.mirror or os.environ.get(MIRROR_ENV) or None
    results = update_lists(settings.data_dir, only=args.only, mirror=mirror)
    for result in results:
        print(result.line)
    return 1 if any(result.status == "failed" for result in results) else 0


def _classify_lines(classifier: Any) -> int:
    """`classify --jsonl`: one request a line on stdin, one verdict a line on stdout, in
    order. A line that is not a valid request gets `{"error": ...}` in its place (and a
    note on stderr), so the output still lines up with the input."""
    failed = 0
    for number, line in enumerate(sys.stdin.buffer, 1):
        try:
            request = orjson.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not a JSON object")
            fields = _classified(classifier, request)
        except (orjson.JSONDecodeError, ValueError) as exc:
            failed += 1
            print(f"tracker: line {number}: {exc}", file=sys.stderr)
            fields = {"error": f"line {number}: {exc}"}
        sys.stdout.write(orjson.dumps(fields).decode() + "\n")
    return 1 if failed else 0


def _classified(classifier: Any, request: dict[str, Any]) -> dict[str, Any]:
    """How one request would be classified, as the fields of `classify --json`; a
    ValueError names what is wrong with the request."""
    from tracker.ingest.addresses import canonical
    from tracker.ingest.useragent import parse_agent

    user_agent = request.get("user_agent")
    if not isinstance(user_agent, str):
        raise ValueError("user_agent: must be a string (\"\" for none)")
    ip = request.get("ip")
    client_ip = None
    if ip is not None:
        client_ip = canonical(ip.strip()) if isinstance(ip, str) else None
        if client_ip is None:
            raise ValueError(f"ip: {ip!r} is not an IP address")
    method = request.get("method", "GET")
    if not isinstance(method, str) or method.upper() not in ("GET", "HEAD"):
        raise ValueError(f"method: must be GET or HEAD, not {method!r}")
    kind = request.get("kind", "open")
    if kind not in ("open", "click"):
        raise ValueError(f"kind: must be open or click, not {kind!r}")
    after = request.get("seconds_after_send")
    if after is not None and (isinstance(after, bool) or not isinstance(after, (int, float))):
        raise ValueError(f"seconds_after_send: must be a number or null, not {after!r}")
    agent = parse_agent(user_agent)
    result = classifier.explain(kind, method.upper(), user_agent, agent, client_ip,
                                None if after is None else float(after))
    return {"kind": result.kind, "machine": result.machine, "reason": result.reason,
            "rule": result.rule, "recorded": result.recorded,
            "location_recorded": result.location_recorded,
            "rules_version": result.rules_version, "browser": agent.browser, "os": agent.os,
            "device": agent.device, "client": result.client, "list": result.address_list,
            "list_date": result.address_list_date}


def _api_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-url", metavar="URL",
                        help="the tracker server [TRACKER_API_URL, else http://127.0.0.1:8000]")
    parser.add_argument("--api-key", metavar="KEY", help="an API key; the environment variable "
                        "keeps it out of the process list [TRACKER_API_KEY]")


def _api(args: argparse.Namespace) -> tuple[str, str]:
    import os

    from tracker.mail.client import DEFAULT_URL

    url = args.api_url or os.environ.get("TRACKER_API_URL") or DEFAULT_URL
    key = args.api_key or os.environ.get("TRACKER_API_KEY")
    if not key:
        raise CommandError("an API key is required: --api-key or TRACKER_API_KEY")
    return url, key


def cmd_instrument(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tracker.mail.charsets import html_charset, text_codec
    from tracker.mail.client import Client, TrackerError

    url, key = _api(args)
    name = "stdin" if args.file == "-" else args.file
    try:
        data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {name}: {exc.strerror or exc}") from None
    label = html_charset(data)
    codec = text_codec(label, data) if label else "utf-8"
    if codec is None:
        raise CommandError(f"{name} declares charset {label!r}, which cannot be instrumented")
    try:
        html = data.decode(codec)
    except UnicodeDecodeError as exc:
        raise CommandError(f"{name} is not valid {codec}: byte 0x{data[exc.start]:02x} at "
                           f"offset {exc.start} (declare its charset with <meta charset>)"
                           ) from None
    try:
        with Client(url, key) as client:
            registered = client.register_message(args.campaign, args.recipient,
                                                 subject=args.subject, html=html)
    except TrackerError as exc:
        raise CommandError(str(exc)) from None
    assert registered.html is not None
    # In the document's own encoding: the tracked URLs and the pixel are ASCII.
    sys.stdout.buffer.write(registered.html.encode(codec))
    sys.stdout.flush()
    return 0


def _yes_no(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("yes", "true", "given", "1"):
        return True
    if lowered in ("no", "false", "refused", "withdrawn", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r}: say yes or no")


def _iso_time(value: str) -> Any:
    from datetime import datetime

    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an ISO 8601 date-time") from None


def _print_consent(args: argparse.Namespace, record: Any) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps({
            "address": record.address, "opens": record.opens, "clicks": record.clicks,
            "method": record.method, "wording": record.wording, "at": record.at.isoformat(),
            "recorded_at": record.recorded_at.isoformat(),
            "history": list(record.history)}).decode() + "\n")
        return
    def word(given: bool) -> str:
        return "given" if given else "refused"
    print(f"{record.address}: opens {word(record.opens)}, clicks {word(record.clicks)} "
          f"({record.method}, {record.at.isoformat()})")


def cmd_consent(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tracker.mail.client import Client, TrackerError

    url, key = _api(args)
    try:
        with Client(url, key) as client:
            if args.action == "show":
                record = client.get_consent(args.address)
                if record is None:
                    raise CommandError(f"no consent is on record for {args.address}")
            else:
                opens, clicks = (args.opens, args.clicks) if args.action == "set" else (
                    _withdrawn(client, args))
                wording = args.wording
                if args.wording_file is not None:
                    try:
                        wording = Path(args.wording_file).read_text(encoding="utf-8")
                    except (OSError, UnicodeDecodeError) as exc:
                        raise CommandError(f"cannot read {args.wording_file}: {exc}") from None
                record = client.set_consent(args.address, opens=opens, clicks=clicks,
                                            method=args.method, wording=wording, at=args.at)
    except TrackerError as exc:
        raise CommandError(str(exc)) from None
    _print_consent(args, record)
    return 0


def _withdrawn(client: Any, args: argparse.Namespace) -> tuple[bool, bool]:
    """What stays given when the kinds named (both, unless --only) are withdrawn."""
    current = client.get_consent(args.address)
    opens = bool(current and current.opens) and args.only == "clicks"
    clicks = bool(current and current.clicks) and args.only == "opens"
    return opens, clicks


def cmd_messages(args: argparse.Namespace) -> int:
    from tracker.mail.client import Client, TrackerError

    url, key = _api(args)
    filters = {"status": args.status, "link": args.link, "tag": args.tag, "since": args.since,
               "until": args.until, "client": args.client, "country": args.country,
               "search": args.search}
    try:
        with Client(url, key) as client:
            if args.format in ("csv", "jsonl"):
                sys.stdout.buffer.write(client.export_messages(args.campaign, args.format,
                                                               **filters))
                sys.stdout.flush()
                return 0
            rows = list(client.iter_messages(args.campaign, **filters))
    except TrackerError as exc:
        raise CommandError(str(exc)) from None
    _print_table([("ID", "RECIPIENT", "SENT", "OPENS", "CLICKS", "MACHINE")] + [
        (m.id, m.recipient, m.sent_at.isoformat()[:19].replace("T", " "), str(m.opens),
         str(m.clicks), str(m.machine)) for m in rows])
    print(f"{len(rows)} message(s)", file=sys.stderr)
    return 0


def cmd_relay(args: argparse.Namespace) -> int:
    import os

    from tracker.mail import relay

    url, key = _api(args)
    user = args.upstream_user or os.environ.get("TRACKER_RELAY_UPSTREAM_USER")
    password = args.upstream_password or os.environ.get("TRACKER_RELAY_UPSTREAM_PASSWORD")
    if bool(user) != bool(password):
        raise CommandError("upstream AUTH needs both a user and a password "
                           "(--upstream-user/--upstream-password)")
    upstream = args.upstream or os.environ.get("TRACKER_RELAY_UPSTREAM")
    if not upstream:
        raise CommandError("an upstream SMTP server is required: --upstream HOST:PORT or "
                           "TRACKER_RELAY_UPSTREAM")
    listen = args.listen or os.environ.get("TRACKER_RELAY_LISTEN") or "127.0.0.1:2525"
    try:
        config = relay.RelayConfig(
            relay.parse_address(listen, "--listen"),
            relay.Upstream(*relay.parse_address(upstream, "--upstream"), starttls=args.starttls,
                           user=user, password=password, cafile=args.upstream_cafile),
            url, key, api_timeout=args.api_timeout, hostname=args.hostname)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    try:
        asyncio.run(relay.serve(config))
    except relay.ApiRefused as exc:
        flag = args.api_key if exc.setting == "key" else args.api_url
        name = f"--api-{exc.setting}" if flag else f"TRACKER_API_{exc.setting.upper()}"
        raise CommandError(f"{name}: {exc}") from None
    except OSError as exc:  # the listening socket: address in use, not permitted
        raise CommandError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracker", description="Email open and click analytics.")
    parser.add_argument("--version", action="version", version=f"tracker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server (embedded PostgreSQL by default)")
    _add_setting_flags(serve)
    serve.set_defaults(run=cmd_serve)

    migrate_cmd = commands.add_parser("migrate", help="apply pending database migrations")
    _add_setting_flags(migrate_cmd, ("database_url", "data_dir"))
    migrate_cmd.set_defaults(run=cmd_migrate)

    backup_cmd = commands.add_parser(
        "backup", help="dump the database into one archive (pg_dump's custom format); the "
        "signing keys are not in it: keep them with it (docs/operations.md)")
    backup_cmd.add_argument("file", help="the archive to write")
    _add_setting_flags(backup_cmd, ("database_url", "data_dir"))
    backup_cmd.set_defaults(run=cmd_backup)
    restore_cmd = commands.add_parser(
        "restore", help="restore an archive of tracker backup into an empty database (a new "
        "data dir, or a new external database), then migrate it")
    restore_cmd.add_argument("file", help="the archive to read")
    _add_setting_flags(restore_cmd, ("database_url", "data_dir"))
    restore_cmd.set_defaults(run=cmd_restore)

    account_cmd = commands.add_parser("accounts", help="manage accounts")
    account_sub = account_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = account_sub.add_parser("create", help="create an account and print its API key")
    create.add_argument("name")
    create.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _add_setting_flags(create, ("database_url", "data_dir"))
    create.set_defaults(run=cmd_accounts_create)
    listing = account_sub.add_parser("list", help="list the accounts, with their state, keys "
                                     "and campaigns")
    listing.add_argument("--json", action="store_true", help="print one JSON array on stdout")
    _add_setting_flags(listing, ("database_url", "data_dir"))
    listing.set_defaults(run=cmd_accounts_list)
    for name, run, text in (
            ("delete", cmd_accounts_delete, "stop recording for an account now and purge its "
             "data after the 30-day grace period"),
            ("restore", cmd_accounts_restore, "undo an account's deletion within its grace "
             "period")):
        action = account_sub.add_parser(name, help=text)
        action.add_argument("id", type=_object_id, metavar="ID")
        _add_setting_flags(action, ("database_url", "data_dir"))
        action.set_defaults(run=run)

    keys_cmd = commands.add_parser(
        "keys", help="an account's API keys (read, register or full)",
        description="Named API keys with a scope: read (reports, lists, exports, the "
        "dashboard), register (that, and registering messages), full (everything). A key is "
        "shown once; revoking or rotating one refuses it at once, everywhere.")
    keys_sub = keys_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    key_create = keys_sub.add_parser("create", help="create a key and print it (shown once)")
    key_create.add_argument("name", metavar="NAME")
    key_create.add_argument("--scope", required=True, choices=accounts.SCOPES)
    key_list = keys_sub.add_parser("list", help="list the live keys (never their secrets)")
    key_rotate = keys_sub.add_parser("rotate", help="replace a key by a new one with its name "
                                     "and scope; the old one is refused at once")
    key_revoke = keys_sub.add_parser("revoke", help="refuse a key from now on")
    for action, run in ((key_create, cmd_keys_create), (key_list, cmd_keys_list),
                        (key_rotate, cmd_keys_rotate), (key_revoke, cmd_keys_revoke)):
        if action in (key_rotate, key_revoke):
            action.add_argument("key", metavar="KEY_ID", help="the key's id (keys list)")
        action.add_argument("--account", required=True, type=_object_id, metavar="ID")
        if action is not key_revoke:
            action.add_argument("--json", action="store_true",
                                help="print JSON on stdout")
        _add_setting_flags(action, ("database_url", "data_dir"))
        action.set_defaults(run=run)

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
    _add_setting_flags(retention_run, ("database_url", "data_dir"))
    retention_run.set_defaults(run=cmd_retention_run)

    policy_cmd = commands.add_parser("policy", help="campaign privacy policies")
    policy_sub = policy_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    describe = policy_sub.add_parser(
        "describe", help="print what a campaign collects, as a paragraph for a privacy notice")
    describe.add_argument("--campaign", required=True, type=_object_id, metavar="ID")
    describe.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _add_setting_flags(describe, ("database_url", "data_dir"))
    describe.set_defaults(run=cmd_policy_describe)

    geoip_cmd = commands.add_parser("geoip", help="manage the IP location database")
    geoip_sub = geoip_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    fetch = geoip_sub.add_parser("fetch", help="download and verify DB-IP City Lite into the "
                                 "data dir")
    _add_setting_flags(fetch, ("data_dir",))
    fetch.set_defaults(run=cmd_geoip_fetch)

    classify = commands.add_parser(
        "classify", help="show how a request would be classified (reader or machine, and why)")
    classify.add_argument("--user-agent", metavar="UA",
                          help="the User-Agent header (\"\" for none)")
    classify.add_argument("--ip", metavar="IP", help="the client address")
    classify.add_argument("--method", choices=("GET", "HEAD"), default="GET",
                          type=str.upper)
    classify.add_argument("--kind", choices=("open", "click"), default="open")
    classify.add_argument("--seconds-after-send", type=float, metavar="N",
                          help="when the hit came, in seconds after the message's sent_at "
                               "(default: a day later, so no timing rule applies)")
    classify.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    classify.add_argument("--explain", action="store_true",
                          help="say which rule and which address list decided, in words (the "
                               "default without --json)")
    classify.add_argument("--jsonl", action="store_true",
                          help="read requests as JSON lines on stdin ({\"user_agent\", \"ip\", "
                          "\"method\", \"kind\", \"seconds_after_send\"}) and print one verdict "
                          "a line, in order")
    _add_setting_flags(classify, ("rules", "cache_dir"))
    classify.set_defaults(run=cmd_classify)

    rules_cmd = commands.add_parser("rules", help="classification rules and address lists")
    rules_sub = rules_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    rules_update = rules_sub.add_parser(
        "update", help="refresh the address lists (Apple MPP, clouds) from their publishers",
        description="Downloads each address list from its publisher, checks it and writes "
        "it atomically into DATA_DIR/rules/lists/ (used from the next start). A list that "
        "fails keeps the copy in use. See tracker/ingest/rules/README.md.")
    rules_update.add_argument("--only", action="append", metavar="NAME",
                              choices=LIST_NAMES, help="only this list (repeatable)")
    rules_update.add_argument("--mirror", metavar="URL|DIR",
                              help="fetch the publishers' files from this base URL or "
                              "directory instead [TRACKER_LISTS_MIRROR]")
    _add_setting_flags(rules_update, ("data_dir",))
    rules_update.set_defaults(run=cmd_rules_update)

    instrument = commands.add_parser(
        "instrument", help="register an HTML message and print it instrumented",
        description="Registers the HTML document FILE as a message of campaign ID to ADDR "
        "through the API and prints it with tracked links and the open pixel, in the "
        "document's encoding (UTF-8, or its <meta charset>).")
    instrument.add_argument("file", metavar="FILE", help="the HTML document; - reads stdin")
    instrument.add_argument("--campaign", required=True, metavar="ID")
    instrument.add_argument("--recipient", required=True, metavar="ADDR")
    instrument.add_argument("--subject", metavar="S")
    _api_flags(instrument)
    instrument.set_defaults(run=cmd_instrument)

    consent_cmd = commands.add_parser(
        "consent", help="a recipient's consent to tracking, through the API",
        description="Record, withdraw or show a recipient's consent to the recording of opens "
        "and clicks. A campaign whose policy requires consent tracks only those who gave it; "
        "a refusal or withdrawal holds in every campaign, also for mail sent before, from the "
        "moment the command returns.")
    consent_sub = consent_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    consent_set = consent_sub.add_parser("set", help="record consent given or refused")
    consent_set.add_argument("--opens", type=_yes_no, required=True, metavar="yes|no")
    consent_set.add_argument("--clicks", type=_yes_no, required=True, metavar="yes|no")
    consent_withdraw = consent_sub.add_parser(
        "withdraw", help="withdraw consent (to both kinds, unless --only)")
    consent_withdraw.add_argument("--only", choices=("opens", "clicks"))
    consent_show = consent_sub.add_parser("show", help="the consent on record")
    for action in (consent_set, consent_withdraw, consent_show):
        action.add_argument("address", metavar="ADDR")
        if action is not consent_show:
            action.add_argument("--method", required=action is consent_set,
                                default="tracker consent withdraw",
                                help="how it was asked for or given (\"signup form\", "
                                "\"import\", ...)")
            action.add_argument("--wording", help="the text the recipient was shown")
            action.add_argument("--wording-file", metavar="FILE",
                                help="... read from a UTF-8 file")
            action.add_argument("--at", type=_iso_time, metavar="ISO8601",
                                help="when the recipient gave or refused it (default: now)")
        action.add_argument("--json", action="store_true", help="print one JSON object")
        _api_flags(action)
        action.set_defaults(run=cmd_consent)

    messages_cmd = commands.add_parser(
        "messages", help="who opened, who clicked, who did not: a campaign's messages",
        description="A campaign's messages with their readers' opens and clicks (counts kept "
        "after retention), filtered, through the API. Without --format, a table; csv and "
        "jsonl stream every row as the API sends it.")
    messages_cmd.add_argument("--campaign", required=True, metavar="ID")
    messages_cmd.add_argument("--status", choices=("opened", "clicked", "not_opened",
                                                   "machine_only", "untracked"))
    messages_cmd.add_argument("--link", metavar="URL", help="its reader clicked this link")
    messages_cmd.add_argument("--tag", metavar="T")
    messages_cmd.add_argument("--from", dest="since", type=_iso_time, metavar="ISO8601",
                              help="sent at or after")
    messages_cmd.add_argument("--to", dest="until", type=_iso_time, metavar="ISO8601",
                              help="sent before")
    messages_cmd.add_argument("--client", metavar="NAME", help="a reader's mail client "
                              "(while the events are stored)")
    messages_cmd.add_argument("--country", metavar="CC", help="a reader's country (while the "
                              "events are stored)")
    messages_cmd.add_argument("--search", metavar="TEXT", help="an address, or a part of the "
                              "recipient")
    messages_cmd.add_argument("--format", choices=("table", "csv", "jsonl"), default="table")
    _api_flags(messages_cmd)
    messages_cmd.set_defaults(run=cmd_messages)

    relay_cmd = commands.add_parser(
        "relay", help="run an SMTP relay that instruments mail with an X-Tracker-Campaign header",
        description="An SMTP relay: mail with an X-Tracker-Campaign: ID header is sent as one "
        "instrumented copy per recipient, other mail passes through unchanged. See "
        "docs/relay.md.")
    relay_cmd.add_argument("--listen", metavar="HOST:PORT",
                           help="where to take mail [TRACKER_RELAY_LISTEN, else 127.0.0.1:2525]")
    relay_cmd.add_argument("--upstream", metavar="HOST:PORT",
                           help="the SMTP server to forward to [TRACKER_RELAY_UPSTREAM]")
    relay_cmd.add_argument("--starttls", action="store_true",
                           help="require STARTTLS to the upstream, its certificate verified")
    relay_cmd.add_argument("--upstream-cafile", metavar="FILE",
                           help="CA certificates to verify the upstream with (else the system's)")
    relay_cmd.add_argument("--upstream-user", metavar="USER",
                           help="AUTH to the upstream as USER [TRACKER_RELAY_UPSTREAM_USER]")
    relay_cmd.add_argument("--upstream-password", metavar="PASSWORD",
                           help="its password (the variable keeps it out of the process "
                           "list) [TRACKER_RELAY_UPSTREAM_PASSWORD]")
    relay_cmd.add_argument("--api-timeout", type=float, default=10.0, metavar="SECONDS",
                           help="longest wait for the tracker API before a message is sent "
                           "uninstrumented [10]")
    relay_cmd.add_argument("--hostname", help="the name the relay greets with [this host's]")
    _api_flags(relay_cmd)
    relay_cmd.set_defaults(run=cmd_relay)
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
