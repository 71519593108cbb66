"""What the commands share: the one-line error, their settings and flags, the API's
address, tables."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

from tracker import logs
from tracker.ingest.rules import RulesError, load_rules
from tracker.settings import SETTINGS, Settings, SettingsError, load, retired_settings

if TYPE_CHECKING:
    # What an area's add_* function adds its commands to (generic only for the type checker).
    Commands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

log = logging.getLogger("tracker")


class CommandError(Exception):
    """A failure to report as one line."""


def load_settings(args: argparse.Namespace) -> Settings:
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


def add_setting_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    for setting in SETTINGS:
        if names is None or setting.field in names:
            parser.add_argument(setting.flag, dest=setting.field, metavar=setting.field.upper(),
                                help=f"{setting.help} [{setting.env}]")


def object_id(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 0 < int(value) < 2**63:
        raise argparse.ArgumentTypeError(f"{value!r} is not an id")
    return int(value)


def print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


def add_api_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-url", metavar="URL",
                        help="the tracker server [TRACKER_API_URL, else http://127.0.0.1:8000]")
    parser.add_argument("--api-key", metavar="KEY", help="an API key; the environment variable "
                        "keeps it out of the process list [TRACKER_API_KEY]")


def api_address(args: argparse.Namespace) -> tuple[str, str]:
    from tracker.mail.client import DEFAULT_URL

    url = args.api_url or os.environ.get("TRACKER_API_URL") or DEFAULT_URL
    key = args.api_key or os.environ.get("TRACKER_API_KEY")
    if not key:
        raise CommandError("an API key is required: --api-key or TRACKER_API_KEY")
    return url, key
