"""Coarse IP geolocation (country, region, city) from a MaxMind-format database.

Works with MaxMind GeoIP2/GeoLite2 City and Country databases and with DB-IP's
City Lite (see ``tracker.geoip_fetch``), which shares the GeoIP2 City layout.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from socket import inet_aton
from types import TracebackType
from typing import Any, Self, TypeAlias

import maxminddb

from tracker.ingest.addresses import locatable

GEOIP_SUBDIR = "geoip"
DBIP_CITY_LITE_FILENAME = "dbip-city-lite.mmdb"
DEFAULT_CACHE_SIZE = 65536

# An IPv6 address is at most 45 characters ("ffff:...:255.255.255.255"); longer
# strings are rejected before the cache so it cannot be filled with large junk keys.
# The slack leaves room for a short zone id ("fe80::1%eth0").
_MAX_IP_TEXT = 64
# The C reader parses with getaddrinfo(AI_NUMERICHOST), which also takes inet_aton's
# legacy forms ("134744072", "0x8.8.8.8", "8.8.2056") and would geolocate garbage
# from a header as some real address. Only the dotted quad is accepted for IPv4, by a
# regex (a fifth of what ipaddress.IPv4Address costs). IPv6 text is left to
# the C parser, which is strict (inet_pton).
_DOTTED_QUAD = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}", re.ASCII)


class GeoDatabaseError(Exception):
    """The geolocation database cannot be opened or is not usable."""


@dataclass(frozen=True, slots=True)
class Location:
    country: str | None
    """ISO 3166-1 alpha-2 code."""
    region: str | None
    """English name of the first (largest) subdivision."""
    city: str | None
    """English name of the city."""


Locate: TypeAlias = Callable[[str], Location | None]


class _Unknown:
    """A network the database holds no location for (kept as such: None means not met)."""


UNKNOWN = _Unknown()


def no_location(ip: str) -> Location | None:
    """The ``Locate`` used when no database is configured: nothing is ever located."""
    return None


def default_geoip_path(data_dir: Path) -> Path | None:
    """Where ``fetch_dbip_city_lite(data_dir / "geoip")`` leaves the database, if it is there."""
    path = data_dir / GEOIP_SUBDIR / DBIP_CITY_LITE_FILENAME
    return path if path.is_file() else None


def _english_name(record: Any) -> str | None:
    if not isinstance(record, Mapping):
        return None
    names = record.get("names")
    if not isinstance(names, Mapping):
        return None
    name = names.get("en")
    return name if isinstance(name, str) else None


def _location_from_record(record: Any) -> Location | None:
    if not isinstance(record, Mapping):
        return None
    country = record.get("country")
    iso_code = country.get("iso_code") if isinstance(country, Mapping) else None
    subdivisions = record.get("subdivisions")
    region = (
        _english_name(subdivisions[0]) if isinstance(subdivisions, list) and subdivisions else None
    )
    location = Location(
        country=iso_code if isinstance(iso_code, str) else None,
        region=region,
        city=_english_name(record.get("city")),
    )
    # Some databases carry records with only a continent or a registered country for
    # anycast or satellite ranges; for the tracker that is the same as "unknown".
    if location.country is None and location.region is None and location.city is None:
        return None
    return location


class GeoLookup:
    """IP address → ``Location``, with a bounded LRU cache in front of the database.

    The raw ``maxminddb`` C reader is used rather than ``geoip2.database.Reader``,
    whose ``city()`` model costs about twice as much as decoding the record, building
    objects for every field and locale (benchmarks/README.md, "Decided"). geoip2 would
    also have to know in advance whether to call ``city()`` or ``country()``; the raw
    record reads the same for both.

    Private, reserved and unknown addresses are left to the database, which holds no
    record for them (MaxMind's and DB-IP's do not): an explicit ``ipaddress``
    ``is_global`` check costs about as much as the lookup itself.
    """

    def __init__(self, path: str | os.PathLike[str], cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        path = Path(path)
        if not path.is_file():
            raise GeoDatabaseError(f"GeoIP database {path} does not exist or is not a file")
        try:
            self._reader = maxminddb.open_database(path, maxminddb.MODE_MMAP_EXT)
        except ValueError as exc:
            if "extension" not in str(exc):
                raise GeoDatabaseError(f"{path} is not a valid MaxMind DB file: {exc}") from exc
            raise GeoDatabaseError(
                "maxminddb's C extension is required to read the GeoIP database, but "
                "maxminddb.extension could not be imported; reinstall maxminddb from a "
                "binary wheel (or build it with a C compiler)"
            ) from exc
        except maxminddb.InvalidDatabaseError as exc:
            raise GeoDatabaseError(f"{path} is not a valid MaxMind DB file: {exc}") from exc
        except OSError as exc:
            raise GeoDatabaseError(f"cannot read GeoIP database {path}: {exc}") from exc
        self.path = path
        self.database_type: str = self._reader.metadata().database_type
        self._get: Callable[[str], Any] = self._reader.get
        self._get_network: Callable[[str], tuple[Any, int]] = self._reader.get_with_prefix_len
        # IPv4 networks met so far: prefix length -> {network number: location}. The
        # database's networks partition the address space, so an address inside one that
        # was looked up has its location: a campaign's readers come from hundreds of
        # thousands of addresses but far fewer of the database's networks (a city's block
        # of a provider), and a probe per prefix length met (about a dozen) costs a tenth
        # of the lookup, which decodes the whole record, names in ten languages included.
        self._networks: dict[int, dict[int, Location | _Unknown]] = {}
        self._network_count = 0
        self._max_networks = cache_size // 2  # ~9 MB at most
        self._cached: functools._lru_cache_wrapper[Location | None] = functools.lru_cache(
            maxsize=cache_size
        )(self._lookup_uncached)

    def lookup(self, ip: str) -> Location | None:
        """Location of ``ip``, or None for invalid, private or unknown addresses."""
        if len(ip) > _MAX_IP_TEXT:
            return None
        return self._cached(ip)

    def _lookup_uncached(self, ip: str) -> Location | None:
        # An IPv6 address that carries an IPv4 one (IPv4-mapped: how dual-stack sockets
        # report IPv4 peers; 6to4, Teredo, NAT64) is looked up by that IPv4 address:
        # MaxMind's own databases alias some of these ranges but databases built by other
        # tools may not, and MaxMind's Teredo alias gives the relay's place, not the host's.
        ip = locatable(ip)
        if ":" in ip:
            try:
                record = self._get(ip)
            except (ValueError, TypeError):
                # ValueError: not an address, or IPv6 asked of an IPv4-only database.
                # TypeError: an embedded NUL character.
                return None
            return _location_from_record(record)
        if _DOTTED_QUAD.fullmatch(ip) is None:
            return None
        try:
            value = int.from_bytes(inet_aton(ip))
        except OSError:  # a part above 255
            return None
        for length, networks in self._networks.items():
            known = networks.get(value >> (32 - length))
            if known is not None:
                return known if isinstance(known, Location) else None
        try:
            record, length = self._get_network(ip)
        except (ValueError, TypeError):
            return None
        location = _location_from_record(record)
        if self._network_count >= self._max_networks:
            self._networks.clear()  # countless networks must not grow memory
            self._network_count = 0
        # (An IPv4 address in an IPv6 database: the length is given in IPv4's terms.)
        length = min(max(length, 0), 32)
        self._networks.setdefault(length, {})[value >> (32 - length)] = (
            UNKNOWN if location is None else location)
        self._network_count += 1
        return location

    def cache_info(self) -> functools._CacheInfo:
        return self._cached.cache_info()

    def close(self) -> None:
        self._cached.cache_clear()
        self._reader.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
