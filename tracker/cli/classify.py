"""`tracker classify` and `tracker rules update`: how a request would be classified, and
the address lists the rules use."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

import orjson

from tracker.cli.common import CommandError, add_setting_flags, load_settings
from tracker.ingest.rules.lists import LIST_NAMES

if TYPE_CHECKING:
    from tracker.cli.common import Commands


def cmd_classify(args: argparse.Namespace) -> int:
    from tracker.ingest import useragent
    from tracker.ingest.classify import Classifier
    from tracker.ingest.rules import load_rules

    settings = load_settings(args)
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


def cmd_rules_update(args: argparse.Namespace) -> int:
    from tracker.ingest.rules.update import MIRROR_ENV, update_lists

    settings = load_settings(args)
    mirror = args.mirror or os.environ.get(MIRROR_ENV) or None
    results = update_lists(settings.data_dir, only=args.only, mirror=mirror)
    for result in results:
        print(result.line)
    return 1 if any(result.status == "failed" for result in results) else 0


def add_classify(commands: Commands) -> None:
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
    add_setting_flags(classify, ("rules", "cache_dir"))
    classify.set_defaults(run=cmd_classify)


def add_rules(commands: Commands) -> None:
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
    add_setting_flags(rules_update, ("data_dir",))
    rules_update.set_defaults(run=cmd_rules_update)
