"""`tracker rules update`: refresh the address lists from their publishers.

Each list is downloaded from where its publisher puts it (or from a mirror: see
`MIRROR_ENV`), parsed in the publisher's format, checked, and written atomically into
DATA_DIR/rules/lists/ with a header naming the source and the dates. A list that cannot
be fetched, parsed or trusted keeps the copy in use: nothing is half-written, and a
running server is untouched (it reads the lists at start).

Checks before a list replaces the one in use: HTTP 200, not an HTML page where data was
expected, the format parses whole (a truncated JSON document does not), every prefix is
a valid global network, and the new list has at least half the prefixes of the current
one (a publisher's hiccup that empties a list must not empty ours).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import ipaddress
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from tracker.ingest.rules.lists import (
    LIST_NAMES,
    PACKAGED_DIR,
    AddressList,
    ListError,
    Network,
    collapse,
    data_dir_lists,
    format_list,
    list_file,
    read_list,
)

# A base URL (or a local directory) holding the publishers' files under the names in
# `Download.mirror_name`: for mirrors and installs without access to the publishers.
MIRROR_ENV = "TRACKER_LISTS_MIRROR"
MAX_DOWNLOAD_BYTES = 64 << 20
_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
_USER_AGENT = "tracker-rules-update (+https://github.com/tracker)"
# A new list with fewer than this share of the current list's prefixes is refused.
MIN_SHARE = 0.5


class UpdateError(Exception):
    """One list could not be updated; the message says why, in a few words."""


class _NotFound(UpdateError):
    """HTTP 404."""


class _NoFeed(Exception):
    """The list has no feed to fetch from here: it stays as packaged."""


@dataclass(frozen=True)
class Parsed:
    networks: list[Network]
    published: str | None = None  # YYYY-MM-DD, when the data says


Parser = Callable[[bytes, str], Parsed]


@dataclass(frozen=True)
class Download:
    url: str
    parse: Parser
    mirror_name: str  # the file's name under a mirror base URL or directory
    resolve: Callable[[bytes, str], str] | None = None  # a landing page -> the data's URL


@dataclass(frozen=True)
class ListSource:
    name: str
    title: str
    source: str  # the publisher's page, for the header
    license: str
    downloads: tuple[Download, ...]
    extra: tuple[str, ...] = ()  # networks always added (e.g. Apple's own /8)


# --- the publishers' formats ------------------------------------------------------------

def _networks(values: Iterable[Any], where: str) -> list[Network]:
    found: list[Network] = []
    for value in values:
        if not isinstance(value, str):
            raise UpdateError(f"{where}: a prefix is not a string: {value!r}"[:120])
        try:
            net = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise UpdateError(f"{where}: {value[:60]!r} is not an IP network") from None
        if net.is_private or net.is_loopback or net.is_unspecified or net.is_multicast:
            raise UpdateError(f"{where}: {net} is not a public network")
        found.append(net)
    return found


def _json(body: bytes, where: str) -> Any:
    _not_html(body, where)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise UpdateError(f"{where}: not valid JSON (truncated?): {exc}") from None


def _not_html(body: bytes, where: str) -> None:
    head = body[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        raise UpdateError(f"{where}: an HTML page, not the data")


def _iso_date(value: Any) -> str | None:
    """YYYY-MM-DD from the publishers' timestamps ("2026-11-30-21-13-09",
    "2026-11-30T12:00:00.000", ...)."""
    if isinstance(value, str) and re.match(r"\d{4}-\d{2}-\d{2}", value):
        return value[:10]
    return None


def parse_apple_csv(body: bytes, where: str) -> Parsed:
    """Apple's egress-ip-ranges.csv: `prefix,country,region,city,` rows, no header."""
    _not_html(body, where)
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise UpdateError(f"{where}: not Apple's CSV (not ASCII text)") from None
    rows = [line.split(",") for line in text.splitlines() if line.strip()]
    # Every row ends with a comma (`...,city,`): a last row with fewer fields than the
    # first, or no final newline, is a download cut short.
    if rows and (len(rows[-1]) < len(rows[0]) or not text.endswith("\n")):
        raise UpdateError(f"{where}: the last row is cut short (truncated?)")
    if any(len(row) < 4 for row in rows):
        raise UpdateError(f"{where}: not Apple's CSV (rows of prefix,country,region,city)")
    return Parsed(_networks((row[0] for row in rows), where))


def parse_aws_json(body: bytes, where: str) -> Parsed:
    """AWS ip-ranges.json: prefixes[].ip_prefix and ipv6_prefixes[].ipv6_prefix."""
    data = _json(body, where)
    if not isinstance(data, dict) or not isinstance(data.get("prefixes"), list):
        raise UpdateError(f"{where}: not AWS's ip-ranges.json (no prefixes)")
    v4 = [p.get("ip_prefix") for p in data["prefixes"] if isinstance(p, dict)]
    v6 = [p.get("ipv6_prefix") for p in data.get("ipv6_prefixes") or []
          if isinstance(p, dict)]
    return Parsed(_networks([*v4, *v6], where), _iso_date(data.get("createDate")))


def parse_google_json(body: bytes, where: str) -> Parsed:
    """Google's cloud.json: prefixes[].ipv4Prefix / ipv6Prefix, creationTime."""
    data = _json(body, where)
    if not isinstance(data, dict) or not isinstance(data.get("prefixes"), list):
        raise UpdateError(f"{where}: not Google's cloud.json (no prefixes)")
    values = [p.get("ipv4Prefix") or p.get("ipv6Prefix") for p in data["prefixes"]
              if isinstance(p, dict)]
    return Parsed(_networks(values, where), _iso_date(data.get("creationTime")))


def parse_azure_service_tags(body: bytes, where: str) -> Parsed:
    """Azure's ServiceTags_Public JSON: the AzureCloud tag (every Azure public-cloud
    address; the regional and service tags are parts of it)."""
    data = _json(body, where)
    values = data.get("values") if isinstance(data, dict) else None
    if not isinstance(values, list):
        raise UpdateError(f"{where}: not Azure's service tags (no values)")
    for tag in values:
        if isinstance(tag, dict) and tag.get("name") == "AzureCloud":
            prefixes = (tag.get("properties") or {}).get("addressPrefixes")
            if isinstance(prefixes, list):
                return Parsed(_networks(prefixes, where))
    raise UpdateError(f"{where}: no AzureCloud tag in the service tags")


def parse_m365_endpoints(body: bytes, where: str) -> Parsed:
    """The Microsoft 365 endpoints web service: a JSON array of endpoint sets, each
    with `ips` (Exchange Online Protection, SharePoint, Teams, common)."""
    data = _json(body, where)
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise UpdateError(f"{where}: not the Microsoft 365 endpoints list")
    return Parsed(_networks((ip for entry in data for ip in entry.get("ips") or []), where))


def parse_cidr_text(body: bytes, where: str) -> Parsed:
    """A plain list, one CIDR a line (`#` comments): our own format, and vendors'."""
    _not_html(body, where)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise UpdateError(f"{where}: not a text list") from None
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return Parsed(_networks([line for line in lines if line], where))


def parse_msft_public_ips(body: bytes, where: str) -> Parsed:
    """Microsoft's Public IP Space CSV (msft-public-ips.csv): the prefix first in each
    row, after an optional header row."""
    _not_html(body, where)
    rows = [line.split(",", 1)[0].strip() for line in body.decode("utf-8", "replace")
            .lstrip("\ufeff").splitlines() if line.strip()]
    if rows and "/" not in rows[0]:
        rows = rows[1:]  # the header
    return Parsed(_networks(rows, where))


def _download_link(pattern: bytes) -> Callable[[bytes, str], str]:
    """Microsoft's download pages name the current file; this finds its link."""
    def resolve(body: bytes, where: str) -> str:
        match = re.search(rb"https://download\.microsoft\.com/download/[\w/.-]*" + pattern,
                          body)
        if match is None:
            raise UpdateError(f"{where}: no link to the data on the download page")
        return match.group(0).decode()
    return resolve


# --- the lists ----------------------------------------------------------------------

SOURCES: dict[str, ListSource] = {source.name: source for source in (
    ListSource(
        "apple_mpp", "Apple: iCloud Private Relay and Mail Privacy Protection egress, "
        "and Apple's own networks",
        "https://developer.apple.com/support/prepare-your-network-for-icloud-private-relay",
        "published by Apple for use by network operators",
        (Download("https://mask-api.icloud.com/egress-ip-ranges.csv", parse_apple_csv,
                  "egress-ip-ranges.csv"),),
        # Apple Inc.'s own allocations (AS714, AS6185; ARIN, APNIC, RIPE): MPP's
        # proxies also egress from them, and the CSV does not list them.
        extra=("17.0.0.0/8", "2620:149::/32", "2403:300::/32", "2a01:b740::/32")),
    ListSource(
        "microsoft", "Microsoft: Azure public cloud (service tag AzureCloud), Microsoft's "
        "public IP space, and Microsoft 365 (Exchange Online Protection and the other "
        "endpoints)",
        "https://www.microsoft.com/en-us/download/details.aspx?id=56519",
        "published by Microsoft (service tags: Microsoft's download terms)",
        (Download("https://www.microsoft.com/en-us/download/details.aspx?id=56519",
                  parse_azure_service_tags, "ServiceTags_Public.json",
                  resolve=_download_link(rb"ServiceTags_Public_\d{8}\.json")),
         Download("https://www.microsoft.com/en-us/download/details.aspx?id=53602",
                  parse_msft_public_ips, "msft-public-ips.csv",
                  resolve=_download_link(rb"msft-public-ips\.csv")),
         Download("https://endpoints.office.com/endpoints/worldwide?clientrequestid="
                  + str(uuid.uuid4()), parse_m365_endpoints, "endpoints-worldwide.json"))),
    ListSource(
        "google_cloud", "Google Cloud: customer-usable external addresses",
        "https://www.gstatic.com/ipranges/cloud.json",
        "published by Google",
        (Download("https://www.gstatic.com/ipranges/cloud.json", parse_google_json,
                  "cloud.json"),)),
    ListSource(
        "aws", "Amazon Web Services: every published range",
        "https://ip-ranges.amazonaws.com/ip-ranges.json",
        "published by Amazon",
        (Download("https://ip-ranges.amazonaws.com/ip-ranges.json", parse_aws_json,
                  "ip-ranges.json"),)),
    ListSource(
        "mail_security", "Mail-security gateways that publish their addresses",
        "vendor documentation (see the packaged list's header)",
        "facts from vendors' public documentation",
        # No vendor publishes a machine-readable feed: the packaged list is curated from
        # their documentation pages. A mirror (or your own server) may serve a plain
        # CIDR list as mail_security.txt.
        (Download("", parse_cidr_text, "mail_security.txt"),)),
)}


# --- fetching ---------------------------------------------------------------------

@dataclass
class Result:
    name: str
    status: str  # "updated", "unchanged", "skipped" or "failed"
    detail: str

    @property
    def line(self) -> str:
        separator = ": " if self.status == "failed" else " "
        return f"{self.name}: {self.status}{separator}{self.detail}"


class _Fetcher:
    def __init__(self, mirror: str | None, client: httpx.Client) -> None:
        self.mirror = mirror.rstrip("/") if mirror else None
        self.client = client

    def get(self, download: Download) -> tuple[bytes, str, str | None]:
        """The body, where it came from, and its Last-Modified date (YYYY-MM-DD)."""
        if self.mirror is not None:
            where = f"{self.mirror}/{download.mirror_name}"
            if not re.match(r"https?://", self.mirror):
                path = Path(where)
                if not download.url and not path.exists():
                    raise _NoFeed(f"(packaged only; the mirror has no {download.mirror_name})")
                try:
                    if path.stat().st_size > MAX_DOWNLOAD_BYTES:
                        raise UpdateError(f"{where}: larger than {MAX_DOWNLOAD_BYTES >> 20} MB")
                    return path.read_bytes(), where, None
                except OSError as exc:
                    raise UpdateError(f"{where}: cannot read: {exc.strerror or exc}") from None
            if not download.url:
                try:
                    return self._http(where)
                except _NotFound:
                    raise _NoFeed(f"(packaged only; the mirror has no "
                                  f"{download.mirror_name})") from None
            return self._http(where)
        if not download.url:
            raise _NoFeed(f"(no publisher feed; the packaged list stays; a mirror may serve "
                          f"{download.mirror_name})")
        body, where, modified = self._http(download.url)
        if download.resolve is not None:
            return self._http(download.resolve(body, where))
        return body, where, modified

    def _http(self, url: str) -> tuple[bytes, str, str | None]:
        try:
            with self.client.stream("GET", url) as response:
                if response.status_code == 404:
                    raise _NotFound(f"HTTP 404 from {url}")
                if response.status_code != 200:
                    raise UpdateError(f"HTTP {response.status_code} from {url}")
                chunks: list[bytes] = []
                size = 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > MAX_DOWNLOAD_BYTES:
                        raise UpdateError(f"{url}: larger than {MAX_DOWNLOAD_BYTES >> 20} MB")
                    chunks.append(chunk)
                modified = response.headers.get("last-modified")
        except httpx.HTTPError as exc:
            raise UpdateError(f"{url}: {type(exc).__name__}: {exc}"[:200]) from None
        return b"".join(chunks), url, _http_date(modified)


def _http_date(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).date().isoformat()
    except (TypeError, ValueError):
        return None


def current_list(name: str, data_dir: Path) -> AddressList | None:
    """The copy in use now: the data dir's when valid, else the packaged one."""
    for directory in (data_dir_lists(data_dir), PACKAGED_DIR):
        path = list_file(directory, name)
        if path is not None:
            try:
                return read_list(path, name)
            except ListError:
                continue
    return None


def update_lists(data_dir: Path, only: Sequence[str] | None = None,
                 mirror: str | None = None, today: dt.date | None = None,
                 client: httpx.Client | None = None) -> list[Result]:
    """Refresh the lists (all, or `only`), one Result each; never raises for a list."""
    names = list(only) if only else list(LIST_NAMES)
    own_client = client is None
    http = client or httpx.Client(timeout=_TIMEOUT, follow_redirects=True,
                                  headers={"User-Agent": _USER_AGENT})
    fetcher = _Fetcher(mirror, http)
    fetched = (today or dt.datetime.now(dt.UTC).date()).isoformat()
    try:
        return [_update_one(SOURCES[name], data_dir, fetcher, fetched) for name in names]
    finally:
        if own_client:
            http.close()


def _update_one(source: ListSource, data_dir: Path, fetcher: _Fetcher,
                fetched: str) -> Result:
    try:
        networks: list[Network] = []
        published: list[str] = []
        urls: list[str] = []
        for download in source.downloads:
            body, where, modified = fetcher.get(download)
            parsed = download.parse(body, where)
            if not parsed.networks:
                raise UpdateError(f"{where}: no prefixes")
            networks += parsed.networks
            published += [d for d in (parsed.published or modified,) if d]
            urls.append(where)
        networks += [ipaddress.ip_network(extra) for extra in source.extra]
        collapsed = collapse(networks)
        current = current_list(source.name, data_dir)
        if current is not None and len(collapsed) < MIN_SHARE * current.prefixes:
            raise UpdateError(f"refused: {len(collapsed)} prefixes, fewer than half of the "
                              f"{current.prefixes} in use ({current.path})")
        if current is not None and list(current.networks) == collapsed and (
                current.path.parent == data_dir_lists(data_dir)):
            return Result(source.name, "unchanged", f"({len(collapsed)} prefixes)")
        headers = {"title": source.title, "source": source.source,
                   "taken-from": " ".join(urls),
                   "published": min(published) if published else fetched,
                   "fetched": fetched, "license": source.license}
        if not published:
            headers["published"] += " (the publisher gives no date: the day it was fetched)"
        _write_atomically(data_dir_lists(data_dir) / f"{source.name}.txt",
                          format_list(source.name, headers, collapsed))
        was = f", was {current.prefixes}" if current is not None else ""
        return Result(source.name, "updated", f"{len(collapsed)} prefixes{was}")
    except _NoFeed as exc:
        return Result(source.name, "skipped", str(exc))
    except UpdateError as exc:
        return Result(source.name, "failed", str(exc))
    except OSError as exc:
        return Result(source.name, "failed", f"cannot write: {exc}")


def _write_atomically(path: Path, text: str) -> None:
    """Temp file in the same directory, fsync, rename, fsync the directory: a reader
    sees the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; the lists are public data
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
