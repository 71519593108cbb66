"""The classification rules, as data: `default.toml` and the Apple ranges next to this file,
with a user's file (TRACKER_RULES) laid over them.

A user file overrides key by key. A number or true/false replaces the packaged value; a
list replaces the packaged list when given as a list, and is edited when given as
`{add = [...], remove = [...]}`, `remove` naming entries exactly as the packaged file
writes them (a name that is not there is an error: it is nearly always a typo). Paths in
`range_files` are relative to the file that names them.

Everything is checked when the rules load, once at start: TOML syntax, unknown sections
and keys, types, every regular expression, every CIDR. A bad file raises `RulesError`
with one line naming the file and the key; the settings turn it into a start-up error
naming TRACKER_RULES.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracker.ingest.addresses import packed
from tracker.ingest.rules.lists import LIST_NAMES, AddressLists, data_dir_lists, load_address_lists

PACKAGED = Path(__file__).with_name("default.toml")
# [client] keys and the mail-client names events and reports carry (CONTRACT.md).
CLIENT_KEYS = {"apple_mail": "Apple Mail", "gmail": "Gmail", "outlook": "Outlook",
               "yahoo_mail": "Yahoo Mail", "thunderbird": "Thunderbird"}

# section -> key -> kind. Every key must be in the packaged file; a user file may give any.
_SCHEMA: dict[str, dict[str, str]] = {
    "timing": {"too_soon_seconds": "int", "apple_mpp_seconds": "int", "burst_links": "int",
               "burst_seconds": "int", "honeypot_seconds": "int", "recent_messages": "int",
               "scanner_network_seconds": "int"},
    "apple_mpp": {"user_agents": "patterns", "bare_agents": "patterns", "lists": "names",
                  "range_files": "files", "ranges": "networks"},
    "image_proxy": {"patterns": "patterns"},
    "scanner": {"patterns": "patterns", "lists": "names", "range_files": "files",
                "ranges": "networks"},
    "mail_client": {"patterns": "patterns", "click_patterns": "patterns"},
    "bot": {"patterns": "patterns", "contact_patterns": "patterns", "near_empty": "patterns",
            "crawlerdetect": "bool"},
    "client": {name: "patterns" for name in CLIENT_KEYS},
}
_LIST_KINDS = ("patterns", "files", "networks", "names")


class RulesError(ValueError):
    """The rules cannot be used; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class Timing:
    too_soon_seconds: int
    apple_mpp_seconds: int
    burst_links: int
    burst_seconds: int
    honeypot_seconds: int
    recent_messages: int
    scanner_network_seconds: int


class Patterns:
    """Regular expressions tried in order; `first` names the one that matched."""

    def __init__(self, patterns: Iterable[tuple[str, re.Pattern[str]]]) -> None:
        self._patterns = tuple(patterns)
        self.sources = tuple(text for text, _ in self._patterns)

    def first(self, text: str) -> str | None:
        for source, regex in self._patterns:
            if regex.search(text):
                return source
        return None

    def __len__(self) -> int:
        return len(self._patterns)


class AddressRanges:
    """A set of IP networks as sorted, merged integer intervals: one bisect per lookup,
    however many networks (Apple's egress list has hundreds of thousands)."""

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self.networks = 0
        spans: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for net in networks:
            spans[net.version].append((int(net.network_address), int(net.broadcast_address)))
            self.networks += 1
        self._starts: dict[int, list[int]] = {}
        self._ends: dict[int, list[int]] = {}
        for version, found in spans.items():
            starts: list[int] = []
            ends: list[int] = []
            for start, end in sorted(found):
                if ends and start <= ends[-1] + 1:
                    ends[-1] = max(ends[-1], end)
                else:
                    starts.append(start)
                    ends.append(end)
            self._starts[version], self._ends[version] = starts, ends

    def __contains__(self, address: object) -> bool:
        raw = packed(address) if isinstance(address, str) else None
        if raw is None:
            return False
        version = 4 if len(raw) == 4 else 6
        value = int.from_bytes(raw)
        at = bisect.bisect_right(self._starts[version], value) - 1
        return at >= 0 and value <= self._ends[version][at]


@dataclass(frozen=True)
class Rules:
    version: str
    sources: tuple[str, ...]  # the files laid over each other, packaged first
    timing: Timing
    apple_mail: Patterns
    apple_bare: Patterns  # apple_mpp.bare_agents: MPP's prefetch, from any address
    # Addresses: the published lists (lookup names the list), and each section's own
    # files and inline CIDRs on top.
    address_lists: AddressLists
    apple_lists: frozenset[str]
    apple_ranges: AddressRanges
    image_proxy: Patterns
    scanner: Patterns
    scanner_lists: frozenset[str]  # the lists of networks security scanners fetch from
    scanner_ranges: AddressRanges
    mail_client: Patterns
    mail_client_fetch: Patterns  # mail_client.click_patterns
    bot: Patterns
    bot_contact: Patterns  # bot.contact_patterns
    near_empty: Patterns
    crawlerdetect: bool
    clients: tuple[tuple[str, Patterns], ...]  # (mail-client name, its agents), in order


_loaded: dict[tuple[Any, ...], Rules] = {}


def load_rules(path: Path | None = None, data_dir: Path | None = None) -> Rules:
    """The packaged rules with the user file at `path` laid over them, and the address
    lists `tracker rules update` left in `data_dir` where they are newer than the packaged
    ones. Loaded once per process and version of the files: settings validation and the
    worker share one load."""
    key: tuple[Any, ...] = (None,)
    if path is not None:
        try:
            stat = path.stat()
        except OSError as exc:
            raise RulesError(f"{path}: cannot read: {exc.strerror or exc}") from None
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if data_dir is not None:
        key += (str(data_dir), *_files_state(data_dir_lists(data_dir)))
    rules = _loaded.get(key)
    if rules is None:
        rules = _loaded[key] = _load(path, data_dir)
    return rules


def _files_state(directory: Path) -> list[tuple[str, int, int]]:
    try:
        return sorted((entry.name, entry.stat().st_mtime_ns, entry.stat().st_size)
                      for entry in directory.iterdir())
    except OSError:
        return []


def _load(path: Path | None, data_dir: Path | None) -> Rules:
    raw, _ = _read(PACKAGED)
    values: dict[str, Any] = {}
    version = _version(raw, PACKAGED)
    if version is None:
        raise RulesError(f"{PACKAGED}: version: missing")
    _apply(values, raw, PACKAGED, base=True)
    missing = [f"{s}.{k}" for s, keys in _SCHEMA.items() for k in keys if f"{s}.{k}" not in values]
    if missing:
        raise RulesError(f"{PACKAGED}: missing {', '.join(missing)}")
    sources = [str(PACKAGED)]
    if path is not None:
        user, digest = _read(path)
        own = _version(user, path)
        version = f"{version}+{own or 'local.' + digest[:12]}"
        _apply(values, user, path, base=False)
        sources.append(str(path))
    return _build(version, tuple(sources), values, load_address_lists(data_dir))


def _read(path: Path) -> tuple[dict[str, Any], str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RulesError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(data.decode("utf-8")), hashlib.sha256(data).hexdigest()
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RulesError(f"{path}: not a valid TOML file: {exc}") from None


def _version(raw: dict[str, Any], path: Path) -> str | None:
    version = raw.get("version")
    if version is not None and (not isinstance(version, str) or not version.strip()
                                or not version.isprintable() or len(version) > 64):
        raise RulesError(f"{path}: version: must be a short non-empty string")
    return version.strip() if version else None


def _apply(values: dict[str, Any], raw: dict[str, Any], path: Path, base: bool) -> None:
    for section, table in raw.items():
        if section == "version":
            continue
        keys = _SCHEMA.get(section)
        if keys is None:
            raise RulesError(f"{path}: unknown section [{section}] "
                             f"(known: {', '.join(_SCHEMA)})")
        if not isinstance(table, dict):
            raise RulesError(f"{path}: {section}: must be a table ([{section}])")
        for key, value in table.items():
            where = f"{section}.{key}"
            kind = keys.get(key)
            if kind is None:
                raise RulesError(f"{path}: unknown key {where} (known in [{section}]: "
                                 f"{', '.join(keys)})")
            if kind in _LIST_KINDS:
                values[where] = _edited_list(values.get(where, []), value, kind, path, where, base)
            elif kind == "bool":
                if not isinstance(value, bool):
                    raise RulesError(f"{path}: {where}: must be true or false")
                values[where] = value
            else:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise RulesError(f"{path}: {where}: must be a whole number of 0 or more")
                values[where] = value


def _edited_list(current: list[tuple[str, Any]], value: Any, kind: str, path: Path,
                 where: str, base: bool) -> list[tuple[str, Any]]:
    """A list of (text as written, parsed value) after this layer's replace or add/remove."""
    if isinstance(value, list):
        return [_entry(item, kind, path, where) for item in value]
    if base or not isinstance(value, dict) or not value or set(value) - {"add", "remove"}:
        raise RulesError(f"{path}: {where}: must be a list"
                         + ("" if base else ", or {add = [...], remove = [...]}"))
    edited = list(current)
    remove = value.get("remove", [])
    if not isinstance(remove, list) or not all(isinstance(item, str) for item in remove):
        raise RulesError(f"{path}: {where}.remove: must be a list of strings")
    for item in remove:
        kept = [entry for entry in edited if entry[0] != item]
        if len(kept) == len(edited):
            raise RulesError(f"{path}: {where}.remove: {item!r} is not in the rules")
        edited = kept
    add = value.get("add", [])
    if not isinstance(add, list):
        raise RulesError(f"{path}: {where}.add: must be a list")
    return edited + [_entry(item, kind, path, f"{where}.add") for item in add]


def _entry(item: Any, kind: str, path: Path, where: str) -> tuple[str, Any]:
    if not isinstance(item, str) or not item.strip():
        raise RulesError(f"{path}: {where}: entries must be non-empty strings, got {item!r}")
    if kind == "names":
        if item not in LIST_NAMES:
            raise RulesError(f"{path}: {where}: {item!r} is not an address list (known: "
                             f"{', '.join(LIST_NAMES)})")
        return item, item
    if kind == "patterns":
        try:
            return item, re.compile(item, re.IGNORECASE)
        except re.error as exc:
            raise RulesError(f"{path}: {where}: {item!r} is not a valid regular expression "
                             f"({exc})") from None
    if kind == "networks":
        try:
            return item, ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            raise RulesError(f"{path}: {where}: {item!r} is not an IP network (CIDR)") from None
    file = (path.parent / item).expanduser()
    if not file.is_file():
        raise RulesError(f"{path}: {where}: {item!r} is not a file ({file})")
    return item, file


def _build(version: str, sources: tuple[str, ...], values: dict[str, Any],
           lists: AddressLists) -> Rules:
    timing = Timing(**{key: values[f"timing.{key}"] for key in _SCHEMA["timing"]})
    if timing.burst_links == 1:
        raise RulesError(f"{sources[-1]}: timing.burst_links: must be 0 (off) or 2 or more")
    if timing.recent_messages < 1:
        raise RulesError(f"{sources[-1]}: timing.recent_messages: must be 1 or more")
    def patterns(where: str) -> Patterns:
        return Patterns(values[where])

    def ranges(section: str) -> AddressRanges:
        networks = [net for _, net in values[f"{section}.ranges"]]
        for _, file in values[f"{section}.range_files"]:
            networks.extend(read_ranges(file))
        return AddressRanges(networks)

    return Rules(
        version=version, sources=sources, timing=timing,
        apple_mail=patterns("apple_mpp.user_agents"),
        apple_bare=patterns("apple_mpp.bare_agents"),
        address_lists=lists,
        apple_lists=frozenset(name for name, _ in values["apple_mpp.lists"]),
        apple_ranges=ranges("apple_mpp"),
        image_proxy=patterns("image_proxy.patterns"),
        scanner=patterns("scanner.patterns"),
        scanner_lists=frozenset(name for name, _ in values["scanner.lists"]),
        scanner_ranges=ranges("scanner"),
        mail_client=patterns("mail_client.patterns"),
        mail_client_fetch=patterns("mail_client.click_patterns"),
        bot=patterns("bot.patterns"),
        bot_contact=patterns("bot.contact_patterns"),
        near_empty=patterns("bot.near_empty"),
        crawlerdetect=values["bot.crawlerdetect"],
        clients=tuple((name, patterns(f"client.{key}")) for key, name in CLIENT_KEYS.items()))


def read_ranges(path: Path) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """A CIDR list: one network a line, `#` comments, or rows of Apple's egress CSV
    (`prefix,country,region,city,`: the first field is the network)."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(f"{path}: cannot read: {exc}") from None
    networks = []
    for number, line in enumerate(text.splitlines(), 1):
        field = line.split("#", 1)[0].split(",", 1)[0].strip()
        if field:
            try:
                networks.append(ipaddress.ip_network(field, strict=False))
            except ValueError:
                raise RulesError(f"{path}:{number}: {field!r} is not an IP network (CIDR)"
                                 ) from None
    return networks
