"""`tracker accounts` and `tracker keys`: accounts and their API keys, straight on the
database (the operator's side of the API's keys endpoints)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from tracker.cli.common import (
    CommandError,
    add_setting_flags,
    load_settings,
    log,
    object_id,
    print_table,
)
from tracker.cli.database import on_database
from tracker.store import accounts
from tracker.store.queries import QUERIES

if TYPE_CHECKING:
    from tracker.cli.common import Commands


def cmd_accounts_create(args: argparse.Namespace) -> int:
    if not 1 <= len(args.name.strip()) <= accounts.MAX_NAME_CHARS:  # before any database work
        raise CommandError(f"an account name must be 1 to {accounts.MAX_NAME_CHARS} characters")
    try:
        account = on_database(args, lambda conn: accounts.create_account(conn, args.name))
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
    listed = on_database(args, accounts.list_accounts)
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
    print_table(rows)
    return 0


def cmd_accounts_delete(args: argparse.Namespace) -> int:
    from tracker.privacy.retention import GRACE

    row = on_database(args, lambda conn: conn.fetchrow(QUERIES.delete_account, args.id))
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

    data_dir = load_settings(args).data_dir
    try:
        if announce_from_outside(data_dir):
            return ("at once in the server on this data dir (within a second in servers of "
                    "other data dirs or nodes)")
    except OSError as exc:
        log.debug("cannot tell the workers on %s: %s", data_dir, exc)
    return "within a second"


def cmd_accounts_restore(args: argparse.Namespace) -> int:
    row = on_database(args, lambda conn: conn.fetchrow(QUERIES.restore_account, args.id))
    if row is None:
        raise CommandError(f"account {args.id} is not deleted, or its grace period is over "
                           "and it was purged")
    print(f"account {args.id} restored: recording resumes {_privacy_change_holds(args)}")
    return 0


async def _check_account(conn: asyncpg.Connection, account_id: int) -> None:
    """The account exists and is not deleted: checked before its keys are touched."""
    if await conn.fetchrow(QUERIES.account_settings, account_id) is None:
        raise CommandError(f"no account {account_id} (or it is deleted)")


def cmd_keys_create(args: argparse.Namespace) -> int:
    async def work(conn: asyncpg.Connection) -> accounts.NewKey:
        await _check_account(conn, args.account)
        return await accounts.create_key(conn, args.account, args.name, args.scope)

    try:
        key = on_database(args, work)
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

    keys = on_database(args, work)
    if args.json:
        sys.stdout.write(orjson.dumps(keys).decode() + "\n")
        return 0
    print_table([("ID", "NAME", "SCOPE", "CREATED", "LAST USED")] + [
        (k["id"], k["name"], k["scope"], k["created_at"][:19].replace("T", " "),
         (k["last_used_at"] or "never")[:19].replace("T", " ")) for k in keys])
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    async def work(conn: asyncpg.Connection) -> accounts.NewKey | None:
        await _check_account(conn, args.account)
        return await accounts.rotate_key(conn, args.account, args.key)

    key = on_database(args, work)
    if key is None:
        raise CommandError(f"account {args.account} has no live key {args.key}")
    _print_new_key(args, key, f"replaces key {args.key} (revoked now)")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    async def work(conn: asyncpg.Connection) -> dict[str, Any] | None:
        await _check_account(conn, args.account)
        # The operator may revoke the last full key (the CLI can always make another).
        return await accounts.revoke_key(conn, args.account, args.key, keep_a_full_key=False)

    revoked = on_database(args, work)
    if revoked is None:
        raise CommandError(f"account {args.account} has no live key {args.key}")
    print(f"key {args.key} ({revoked['name']}) revoked: refused from now on, its dashboard "
          "sessions ended")
    return 0


def add_accounts(commands: Commands) -> None:
    account_cmd = commands.add_parser("accounts", help="manage accounts")
    account_sub = account_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = account_sub.add_parser("create", help="create an account and print its API key")
    create.add_argument("name")
    create.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_setting_flags(create, ("database_url", "data_dir"))
    create.set_defaults(run=cmd_accounts_create)
    listing = account_sub.add_parser("list", help="list the accounts, with their state, keys "
                                     "and campaigns")
    listing.add_argument("--json", action="store_true", help="print one JSON array on stdout")
    add_setting_flags(listing, ("database_url", "data_dir"))
    listing.set_defaults(run=cmd_accounts_list)
    for name, run, text in (
            ("delete", cmd_accounts_delete, "stop recording for an account now and purge its "
             "data after the 30-day grace period"),
            ("restore", cmd_accounts_restore, "undo an account's deletion within its grace "
             "period")):
        action = account_sub.add_parser(name, help=text)
        action.add_argument("id", type=object_id, metavar="ID")
        add_setting_flags(action, ("database_url", "data_dir"))
        action.set_defaults(run=run)


def add_keys(commands: Commands) -> None:
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
        action.add_argument("--account", required=True, type=object_id, metavar="ID")
        if action is not key_revoke:
            action.add_argument("--json", action="store_true",
                                help="print JSON on stdout")
        add_setting_flags(action, ("database_url", "data_dir"))
        action.set_defaults(run=run)
