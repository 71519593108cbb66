"""`tracker instrument`, `consent`, `messages` and `webhooks`: commands that go through a
running server's API with an API key, as any other client of it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from tracker.cli.common import CommandError, add_api_flags, api_address, print_table

if TYPE_CHECKING:
    from tracker.cli.common import Commands


def cmd_instrument(args: argparse.Namespace) -> int:
    from tracker.mail.charsets import html_charset, text_codec
    from tracker.mail.client import Client, TrackerError

    url, key = api_address(args)
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
    from tracker.mail.client import Client, TrackerError

    url, key = api_address(args)
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

    url, key = api_address(args)
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
    print_table([("ID", "RECIPIENT", "SENT", "OPENS", "CLICKS", "MACHINE")] + [
        (m.id, m.recipient, m.sent_at.isoformat()[:19].replace("T", " "), str(m.opens),
         str(m.clicks), str(m.machine)) for m in rows])
    print(f"{len(rows)} message(s)", file=sys.stderr)
    return 0


def cmd_webhooks(args: argparse.Namespace) -> int:
    """`tracker webhooks ACTION`: an account's webhook endpoints, through the API."""
    from datetime import datetime

    from tracker.mail.client import Client, TrackerError

    url, key = api_address(args)
    try:
        with Client(url, key) as client:
            if args.action == "list":
                hooks = client.list_webhooks()
            elif args.action == "create":
                hooks = [client.create_webhook(
                    args.url, events=args.events and args.events.split(","),
                    campaign_id=args.campaign, machine=False if args.humans_only else None,
                    concurrency=args.concurrency)]
            elif args.action in ("enable", "disable"):
                hooks = [client.update_webhook(args.id, enabled=args.action == "enable")]
            elif args.action == "rotate-secret":
                hooks = [client.rotate_webhook_secret(args.id)]
            elif args.action == "delete":
                client.delete_webhook(args.id)
                return 0
            else:  # replay
                try:
                    since, until = (datetime.fromisoformat(args.since),
                                    datetime.fromisoformat(args.until))
                except ValueError as exc:
                    raise CommandError(f"--from/--to: {exc}") from None
                answer = client.replay_webhook(args.id, since, until)
                print(orjson.dumps(answer).decode() if args.json else
                      f"replaying {answer['from']} to {answer['to']}")
                return 0
    except TrackerError as exc:
        raise CommandError(str(exc)) from None
    for hook in hooks:
        fields = {"id": hook.id, "url": hook.url, "events": list(hook.events),
                  "campaign_id": hook.campaign_id, "machine": hook.machine,
                  "concurrency": hook.concurrency, "enabled": hook.enabled,
                  "disabled_reason": hook.disabled_reason, "stats": hook.stats}
        if hook.secret is not None:
            fields["secret"] = hook.secret
        if args.json:
            print(orjson.dumps(fields).decode())
            continue
        state = "enabled" if hook.enabled else f"disabled: {hook.disabled_reason}"
        print(f"{hook.id}\t{hook.url}\t{','.join(hook.events)}\t{state}")
        if hook.secret is not None:
            print(f"secret (shown once): {hook.secret}")
    return 0


def add_instrument(commands: Commands) -> None:
    instrument = commands.add_parser(
        "instrument", help="register an HTML message and print it instrumented",
        description="Registers the HTML document FILE as a message of campaign ID to ADDR "
        "through the API and prints it with tracked links and the open pixel, in the "
        "document's encoding (UTF-8, or its <meta charset>).")
    instrument.add_argument("file", metavar="FILE", help="the HTML document; - reads stdin")
    instrument.add_argument("--campaign", required=True, metavar="ID")
    instrument.add_argument("--recipient", required=True, metavar="ADDR")
    instrument.add_argument("--subject", metavar="S")
    add_api_flags(instrument)
    instrument.set_defaults(run=cmd_instrument)


def add_consent(commands: Commands) -> None:
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
        add_api_flags(action)
        action.set_defaults(run=cmd_consent)


def add_messages(commands: Commands) -> None:
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
    add_api_flags(messages_cmd)
    messages_cmd.set_defaults(run=cmd_messages)


def add_webhooks(commands: Commands) -> None:
    webhooks_cmd = commands.add_parser(
        "webhooks", help="webhook endpoints: where events are sent as they are stored",
        description="Manage the account's webhook endpoints through the API (README: Events "
        "out).")
    webhooks_sub = webhooks_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    hook_actions = {
        "list": "list the endpoints with their delivery stats",
        "create": "add an endpoint and print its signing secret (shown once)",
        "enable": "resume deliveries where they stopped", "disable": "pause deliveries",
        "rotate-secret": "a new signing secret (the old one signs too for 24 h)",
        "delete": "remove an endpoint and its queue",
        "replay": "send an endpoint's events of a time range again"}
    for name, text in hook_actions.items():
        action = webhooks_sub.add_parser(name, help=text)
        if name == "create":
            action.add_argument("url", metavar="URL")
            action.add_argument("--events", metavar="TYPES",
                                help="comma-separated: open,click,relabel [all]")
            action.add_argument("--campaign", metavar="ID", help="this campaign's events only")
            action.add_argument("--humans-only", action="store_true",
                                help="leave out events a rule judged machine")
            action.add_argument("--concurrency", type=int, metavar="N",
                                help="deliveries to it at once [1]")
        elif name != "list":
            action.add_argument("id", metavar="ID")
        if name == "replay":
            action.add_argument("--from", dest="since", required=True, metavar="ISO8601")
            action.add_argument("--to", dest="until", required=True, metavar="ISO8601")
        action.add_argument("--json", action="store_true", help="print JSON lines on stdout")
        add_api_flags(action)
        action.set_defaults(run=cmd_webhooks)
