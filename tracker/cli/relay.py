"""`tracker relay`: the SMTP relay that instruments mail on its way out."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import TYPE_CHECKING

from tracker.cli.common import CommandError, add_api_flags, api_address

if TYPE_CHECKING:
    from tracker.cli.common import Commands


def cmd_relay(args: argparse.Namespace) -> int:
    from tracker.mail import relay

    url, key = api_address(args)
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


def add_relay(commands: Commands) -> None:
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
    add_api_flags(relay_cmd)
    relay_cmd.set_defaults(run=cmd_relay)
