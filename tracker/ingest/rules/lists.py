"""Published address lists: which network a client address belongs to.

The networks machines fetch mail content from publish their addresses: Apple's Mail
Privacy Protection (its egress ranges), Microsoft 365 and Azure, Google Cloud, AWS, and
some mail-security vendors. Each list is a text file, a header of `# key: value` lines
(list, title, source, published, ...) and then one CIDR a line:

    # list: aws
    # source: https://ip-ranges.amazonaws.com/ip-ranges.json
    # published: 2026-11-30
    3.0.0.0/15
    ...

The packaged copies live in `lists/` next to this module; `tracker rules update` writes
newer ones into DATA_DIR/rules/lists/. A data-dir copy is used when it is valid and not
older than the packaged one; a corrupt or unreadable one falls back to the packaged copy
with one warning line.

`AddressLists.lookup` answers with one bisect over merged, non-overlapping intervals, each
tagged with the list it came from (IPv4 and IPv6 apart). Where lists overlap, the one
earlier in `LIST_NAMES` wins: Apple's egress is the most specific fact, a vendor's mail
gateway next, the clouds last.
"""

from __future__ import annotations

import gzip
import ipaddress
import logging
import re
import socket
from bisect import bisect_right as _bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tracker.ingest.addresses import packed

log = logging.getLogger("tracker.ingest.rules")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# In order of precedence where two lists hold the same address.
LIST_NAMES = ("apple_mpp", "mail_security", "microsoft", "google_cloud", "aws")
PACKAGED_DIR = Path(__file__).with_name("lists")
_inet_pton = socket.inet_pton
_AF_INET = socket.AF_INET
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_HEADER = re.compile(r"#\s*([a-z][a-z-]*)\s*:\s*(.*?)\s*$")
# A list file larger than this is refused rather than read into memory.
MAX_LIST_BYTES = 64 << 20


class ListError(ValueError):
    """A list file cannot be used; the message names the file and the line."""


@dataclass(frozen=True, slots=True)
class AddressList:
    """One list: its header and its networks (collapsed, IPv4 then IPv6)."""

    name: str
    path: Path
    networks: tuple[Network, ...] = field(repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def title(self) -> str:
        return self.headers.get("title", self.name)

    @property
    def source(self) -> str | None:
        return self.headers.get("source")

    @property
    def published(self) -> str | None:
        """The data's own date (YYYY-MM-DD), as its header gives it."""
        return _date(self.headers.get("published"))

    @property
    def fetched(self) -> str | None:
        """When `tracker rules update` downloaded it (absent in packaged copies)."""
        return _date(self.headers.get("fetched"))

    @property
    def as_of(self) -> str:
        """The later of the two dates, for choosing between copies ("" if neither)."""
        return max(self.published or "", self.fetched or "")

    @property
    def prefixes(self) -> int:
        return len(self.networks)


def _date(value: str | None) -> str | None:
    match = _DATE.match(value or "")
    return match.group(0) if match else None


def parse_list(text: str, where: str) -> tuple[dict[str, str], list[Network]]:
    """A list file's header and networks. Header lines come first; `#` lines after
    them are comments. Raises ListError naming `where` and the line."""
    headers: dict[str, str] = {}
    networks: list[Network] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            match = _HEADER.match(line)
            if match and not networks:
                headers.setdefault(match.group(1), match.group(2))
            continue
        try:
            networks.append(ipaddress.ip_network(line.split("#", 1)[0].strip(), strict=False))
        except ValueError:
            raise ListError(f"{where}:{number}: {line[:60]!r} is not an IP network (CIDR)"
                            ) from None
    return headers, networks


def read_list(path: Path, name: str | None = None) -> AddressList:
    """A list file (`.txt`, or `.txt.gz`), checked: it must parse, name itself `name`
    when given, and hold at least one network."""
    try:
        if path.stat().st_size > MAX_LIST_BYTES:
            raise ListError(f"{path}: larger than {MAX_LIST_BYTES >> 20} MB")
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        text = data.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        raise ListError(f"{path}: cannot read: {exc}") from None
    headers, networks = parse_list(text, str(path))
    own = headers.get("list")
    if name is not None and own != name:
        raise ListError(f"{path}: its header names list {own!r}, not {name!r}")
    if not networks:
        raise ListError(f"{path}: no networks")
    return AddressList(own or path.name.split(".", 1)[0], path, tuple(networks), headers)


def format_list(name: str, headers: dict[str, str], networks: Iterable[Network]) -> str:
    """The file text for a list: `# list: NAME`, the other headers, the networks
    collapsed (IPv4 then IPv6, each in address order)."""
    collapsed = collapse(networks)
    lines = [f"# list: {name}"]
    lines += [f"# {key}: {value}" for key, value in headers.items() if key != "list"]
    lines.append(f"# prefixes: {len(collapsed)}")
    lines += [str(net) for net in collapsed]
    return "\n".join(lines) + "\n"


def collapse(networks: Iterable[Network]) -> list[Network]:
    """The fewest networks covering the same addresses, IPv4 then IPv6."""
    given = list(networks)
    v4 = [n for n in given if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in given if isinstance(n, ipaddress.IPv6Network)]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


class AddressLists:
    """Several lists merged for lookups: `lookup(address)` names the list holding it."""

    def __init__(self, lists: Sequence[AddressList]) -> None:
        rank = {name: i for i, name in enumerate(LIST_NAMES)}
        self.lists = tuple(sorted(lists, key=lambda lst: rank.get(lst.name, len(rank))))
        names = [lst.name for lst in self.lists]
        self._bounds: dict[int, list[int]] = {}
        self._named: dict[int, list[str | None]] = {}  # per segment: its list, or None
        for version in (4, 6):
            spans = [(int(net.network_address), int(net.broadcast_address), tag)
                     for tag, lst in enumerate(self.lists)
                     for net in lst.networks if net.version == version]
            bounds, tags = _tagged_segments(spans, len(self.lists))
            self._bounds[version] = bounds
            self._named[version] = [names[tag] if tag >= 0 else None for tag in tags]
        # IPv4 (nearly every hit) gets its own attributes: ~100 ns less a lookup.
        self._v4_bounds, self._v4_named = self._bounds[4], self._named[4]

    def lookup(self, address: str) -> str | None:
        """The name of the list that holds `address`, or None (also for a non-address)."""
        if ":" not in address:
            try:
                value = int.from_bytes(_inet_pton(_AF_INET, address))
            except (OSError, ValueError):
                return None
            at = _bisect(self._v4_bounds, value) - 1
            return self._v4_named[at] if at >= 0 else None
        raw = packed(address)  # IPv6, or IPv4-mapped IPv6
        if raw is None:
            return None
        version = 4 if len(raw) == 4 else 6
        at = _bisect(self._bounds[version], int.from_bytes(raw)) - 1
        return self._named[version][at] if at >= 0 else None

    def get(self, name: str) -> AddressList | None:
        for lst in self.lists:
            if lst.name == name:
                return lst
        return None

    def segments(self) -> int:
        """How many intervals the lookups search (for /metrics and benchmarks)."""
        return sum(len(bounds) for bounds in self._bounds.values())


def _tagged_segments(spans: list[tuple[int, int, int]], tags: int
                     ) -> tuple[list[int], list[int]]:
    """Overlapping (start, end, tag) spans as sorted segment starts, each with the
    smallest tag covering it (-1: a gap). Adjacent segments of one tag are merged."""
    events: list[tuple[int, int, int]] = []
    for start, end, tag in spans:
        events.append((start, 1, tag))
        events.append((end + 1, -1, tag))
    events.sort()
    depth = [0] * tags
    bounds: list[int] = []
    values: list[int] = []
    i = 0
    while i < len(events):
        position = events[i][0]
        while i < len(events) and events[i][0] == position:
            depth[events[i][2]] += events[i][1]
            i += 1
        tag = next((t for t in range(tags) if depth[t] > 0), -1)
        if values and values[-1] == tag:
            continue
        bounds.append(position)
        values.append(tag)
    return bounds, values


def data_dir_lists(data_dir: Path) -> Path:
    return data_dir / "rules" / "lists"


def list_file(directory: Path, name: str) -> Path | None:
    """The list's file in `directory` (`NAME.txt` or `NAME.txt.gz`), if there."""
    for candidate in (directory / f"{name}.txt", directory / f"{name}.txt.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_address_lists(data_dir: Path | None = None,
                       warn: Callable[[str], None] | None = None,
                       packaged_dir: Path = PACKAGED_DIR) -> AddressLists:
    """Every list: the data dir's copy where valid and not older, else the packaged
    one; a list with neither is left out. Never raises for a bad data-dir copy: it
    says why in one line (`warn`, else the log) and uses the packaged one."""
    say = warn or log.warning
    chosen: list[AddressList] = []
    for name in LIST_NAMES:
        packaged: AddressList | None = None
        path = list_file(packaged_dir, name)
        if path is not None:
            try:
                packaged = read_list(path, name)
            except ListError as exc:
                say(f"address list {name}: packaged copy unusable: {exc}")
        local: AddressList | None = None
        path = list_file(data_dir_lists(data_dir), name) if data_dir is not None else None
        if path is not None:
            try:
                local = read_list(path, name)
            except ListError as exc:
                say(f"address list {name}: {exc}; using the packaged copy")
        if local is not None and (packaged is None or local.as_of >= packaged.as_of):
            chosen.append(local)
        elif packaged is not None:
            chosen.append(packaged)
        else:  # not packaged and never fetched: nothing to say at every start
            log.debug("address list %s: no copy; its addresses match nothing", name)
    return AddressLists(chosen)
