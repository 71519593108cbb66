"""Small MaxMind-format databases for tests, built with mmdb-writer.

Records follow MaxMind's GeoLite2-City and GeoLite2-Country layouts field for field
(including the integer widths MaxMind uses), so ``geoip2.database.Reader`` reads
them as it reads the real databases; that is what makes them a fair stand-in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdb_writer import MmdbU16, MmdbU32, MMDBWriter
from netaddr import IPSet


@dataclass(frozen=True)
class _Place:
    network: str
    continent: tuple[str, int, str]  # code, geoname_id, English name
    country: tuple[str, int, str, bool] | None  # iso, geoname_id, name, in EU
    subdivision: tuple[str, int, str] | None  # iso, geoname_id, English name
    city: tuple[int, str] | None  # geoname_id, English name
    location: tuple[float, float, int, str]  # latitude, longitude, accuracy km, tz
    postal: str | None = None
    registered_country: tuple[str, int, str, bool] | None = None


_EUROPE = ("EU", 6255148, "Europe")
_ASIA = ("AS", 6255147, "Asia")

PLACES: tuple[_Place, ...] = (
    _Place(
        "81.2.69.0/24",
        _EUROPE,
        ("DE", 2921044, "Germany", True),
        ("HE", 2905330, "Hesse"),
        (2925533, "Frankfurt am Main"),
        (50.1188, 8.6843, 20, "Europe/Berlin"),
        postal="60311",
    ),
    _Place(
        "2.125.160.0/24",
        _EUROPE,
        ("GB", 2635167, "United Kingdom", False),
        ("ENG", 6269131, "England"),
        (2655045, "Boxford"),
        (51.75, -1.25, 100, "Europe/London"),
        postal="OX1",
    ),
    _Place(
        "89.160.20.0/24",
        _EUROPE,
        ("SE", 2661886, "Sweden", True),
        ("E", 2685867, "Östergötland County"),
        (2694762, "Linköping"),
        (58.4167, 15.6167, 76, "Europe/Stockholm"),
    ),
    _Place(
        "2001:db8:1::/48",
        _EUROPE,
        ("FR", 3017382, "France", True),
        ("IDF", 3012874, "Île-de-France"),
        (2988507, "Paris"),
        (48.8582, 2.3387, 50, "Europe/Paris"),
        postal="75001",
    ),
    _Place(
        "175.16.199.0/24",
        _ASIA,
        ("CN", 1814991, "China", False),
        None,
        None,
        (34.7732, 113.722, 1000, "Asia/Shanghai"),
    ),
    # Like MaxMind's anonymous-proxy ranges: a registered country but no country.
    _Place(
        "67.43.156.0/24",
        _ASIA,
        None,
        None,
        None,
        (27.5, 90.5, 534, "Asia/Thimphu"),
        registered_country=("BT", 1252634, "Bhutan", False),
    ),
)

#: What ``GeoLookup.lookup`` must return for an address inside each network.
EXPECTED_CITY: dict[str, tuple[str | None, str | None, str | None] | None] = {
    "81.2.69.142": ("DE", "Hesse", "Frankfurt am Main"),
    "2.125.160.216": ("GB", "England", "Boxford"),
    "89.160.20.112": ("SE", "Östergötland County", "Linköping"),
    "2001:db8:1::1": ("FR", "Île-de-France", "Paris"),
    "175.16.199.7": ("CN", None, None),
    "67.43.156.1": None,
}


def _named(geoname_id: int, name: str) -> dict[str, Any]:
    return {"geoname_id": MmdbU32(geoname_id), "names": {"en": name}}


def _country(country: tuple[str, int, str, bool]) -> dict[str, Any]:
    iso, geoname_id, name, in_eu = country
    record = _named(geoname_id, name)
    record["iso_code"] = iso
    if in_eu:
        # MaxMind omits the key rather than storing false.
        record["is_in_european_union"] = True
    return record


def _country_record(place: _Place) -> dict[str, Any]:
    code, geoname_id, name = place.continent
    record: dict[str, Any] = {"continent": {"code": code, **_named(geoname_id, name)}}
    if place.country is not None:
        record["country"] = _country(place.country)
    registered = place.registered_country or place.country
    if registered is not None:
        record["registered_country"] = _country(registered)
    return record


def _city_record(place: _Place) -> dict[str, Any]:
    record = _country_record(place)
    latitude, longitude, accuracy, time_zone = place.location
    record["location"] = {
        "accuracy_radius": MmdbU16(accuracy),
        "latitude": latitude,
        "longitude": longitude,
        "time_zone": time_zone,
    }
    if place.city is not None:
        record["city"] = _named(*place.city)
    if place.subdivision is not None:
        iso, geoname_id, name = place.subdivision
        record["subdivisions"] = [{"iso_code": iso, **_named(geoname_id, name)}]
    if place.postal is not None:
        record["postal"] = {"code": place.postal}
    return record


def _write(path: Path, database_type: str, records: list[tuple[str, dict[str, Any]]]) -> Path:
    writer = MMDBWriter(
        ip_version=6,
        ipv4_compatible=True,
        database_type=database_type,
        languages=["en"],
        description={"en": f"tracker test {database_type} database"},
    )
    for network, record in records:
        writer.insert_network(IPSet([network]), record)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.to_db_file(str(path))
    return path


def build_test_city_db(path: Path) -> Path:
    """Write a GeoLite2-City-layout database of ``PLACES`` to ``path``."""
    return _write(path, "GeoLite2-City", [(p.network, _city_record(p)) for p in PLACES])


def build_test_country_db(path: Path) -> Path:
    """Write a GeoLite2-Country-layout database of ``PLACES`` to ``path``."""
    return _write(path, "GeoLite2-Country", [(p.network, _country_record(p)) for p in PLACES])
