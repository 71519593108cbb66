"""Address lists: lookups, the data-dir copies, and `tracker rules update` against a real
HTTP server on loopback serving the publishers' formats (and their failures)."""

from __future__ import annotations

import gzip
import ipaddress
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest

from tracker.cli import main
from tracker.ingest.classify import Classifier
from tracker.ingest.rules import load_rules
from tracker.ingest.rules.lists import (
    LIST_NAMES,
    PACKAGED_DIR,
    AddressList,
    AddressLists,
    format_list,
    load_address_lists,
    read_list,
)


def _list(name: str, *cidrs: str, published: str = "2026-01-01") -> AddressList:
    return AddressList(name, Path(f"{name}.txt"),
                       tuple(ipaddress.ip_network(c) for c in cidrs), {"published": published})


def test_lookup_names_the_list_and_the_earlier_list_wins_an_overlap() -> None:
    lists = AddressLists([
        _list("aws", "3.0.0.0/8", "2600:1f00::/24"),
        _list("apple_mpp", "3.5.0.0/16", "17.0.0.0/8", "2a04:4e41::/32"),
        _list("microsoft", "40.64.0.0/10"),
    ])
    assert lists.lookup("3.4.255.255") == "aws"
    assert lists.lookup("3.5.0.0") == "apple_mpp"  # inside both: apple_mpp comes first
    assert lists.lookup("3.5.255.255") == "apple_mpp"
    assert lists.lookup("3.6.0.0") == "aws"
    assert lists.lookup("16.255.255.255") is None
    assert lists.lookup("17.58.1.2") == "apple_mpp"
    assert lists.lookup("40.94.89.23") == "microsoft"
    assert lists.lookup("40.128.0.0") is None
    assert lists.lookup("2a04:4e41:1301:8000::1") == "apple_mpp"
    assert lists.lookup("2600:1f18::1") == "aws"
    assert lists.lookup("::ffff:17.0.0.1") == "apple_mpp"  # IPv4-mapped: its IPv4
    assert lists.lookup("1.2.3.4") is None
    for junk in ("", "not an address", "17.0.0.256", "17.0.0.0/8"):
        assert lists.lookup(junk) is None


def test_packaged_lists_load_and_the_apple_rule_reads_the_same_file() -> None:
    lists = load_address_lists(None)
    apple = lists.get("apple_mpp")
    assert apple is not None and apple.published is not None and apple.source
    # Apple's Fastly-hosted egress, named in issue 14.
    for address in ("146.75.154.1", "140.248.8.36", "17.58.0.1", "2a04:4e41::1"):
        assert lists.lookup(address) == "apple_mpp"
        assert Classifier(load_rules()).is_apple_proxy(address)
    assert lists.lookup("8.8.8.8") is None


def test_the_scanner_networks_are_packaged_with_their_provenance() -> None:
    lists = load_address_lists(None)
    assert [lst.name for lst in lists.lists] == [
        "apple_mpp", "mail_security", "microsoft", "google_cloud", "aws"]
    for lst in lists.lists:
        assert lst.source and lst.published and lst.headers.get("license"), lst.name
        assert lst.path.stat().st_size < 1 << 20, lst.path  # small enough for the package
    for name in ("microsoft", "google_cloud", "aws"):
        assert "@" in lists.lists[LIST_NAMES.index(name)].headers["taken-from"]
    # Azure addresses security scanners fetched from (gophish's issues, issue 14).
    for address in ("40.94.89.23", "40.94.16.1", "20.72.100.79"):
        assert lists.lookup(address) == "microsoft", address
    assert lists.lookup("104.47.1.1") == "microsoft"  # Exchange Online Protection
    assert lists.lookup("34.1.208.9") == "google_cloud"  # cloud.json's africa-south1
    assert lists.lookup("2600:1900:4000::1") == "google_cloud"
    # Gmail's own servers are not Google Cloud: they are Google's mail gateway.
    assert lists.lookup("209.85.128.5") == "mail_security"
    assert lists.lookup("3.5.0.1") == lists.lookup("2600:1f18::1") == "aws"
    assert lists.lookup("67.231.144.1") == "mail_security"  # Proofpoint
    assert lists.lookup("94.100.130.1") == "mail_security"  # Hornetsecurity
    # Avanan's published addresses lie inside AWS: the vendor's list names them first.
    assert lists.lookup("44.211.178.100") == "mail_security"


def test_a_newer_data_dir_copy_wins_and_a_corrupt_one_falls_back_with_one_warning(
        tmp_path: Path) -> None:
    packaged = tmp_path / "packaged"
    packaged.mkdir()
    (packaged / "aws.txt").write_text(format_list("aws", {"published": "2026-01-01"},
                                                  [ipaddress.ip_network("3.0.0.0/15")]))
    local = tmp_path / "data" / "rules" / "lists"
    local.mkdir(parents=True)
    (local / "aws.txt.gz").write_bytes(gzip.compress(format_list(
        "aws", {"published": "2026-02-01"}, [ipaddress.ip_network("52.0.0.0/11")]).encode()))
    warnings: list[str] = []
    lists = load_address_lists(tmp_path / "data", warnings.append, packaged_dir=packaged)
    assert (lists.lookup("52.1.2.3"), lists.lookup("3.0.0.1")) == ("aws", None)
    assert warnings == []

    (local / "aws.txt.gz").write_bytes(b"\x1f\x8b truncated")
    lists = load_address_lists(tmp_path / "data", warnings.append, packaged_dir=packaged)
    assert (lists.lookup("52.1.2.3"), lists.lookup("3.0.0.1")) == (None, "aws")
    assert len(warnings) == 1 and "aws" in warnings[0] and "packaged" in warnings[0]

    # An older data-dir copy (the package was upgraded since) loses to the packaged one.
    (local / "aws.txt.gz").unlink()
    (local / "aws.txt").write_text(format_list("aws", {"published": "2025-12-01"},
                                               [ipaddress.ip_network("52.0.0.0/11")]))
    lists = load_address_lists(tmp_path / "data", warnings.append, packaged_dir=packaged)
    assert lists.lookup("3.0.0.1") == "aws"


# --- tracker rules update against a loopback server -----------------------------------

# The publishers' files served below hold more than half the prefixes of every packaged
# list: a new list with fewer than half the prefixes of the copy in use (the packaged
# one, at first) is refused as a publisher's hiccup.
SCALE = max(read_list(path).prefixes for path in PACKAGED_DIR.iterdir()) // 2 + 1


def _v4(first: int, count: int) -> list[str]:
    """`count` distinct public /24s (non-adjacent, so that they do not collapse)."""
    return [f"{first}.{i // 128}.{i % 128 * 2}.0/24" for i in range(count)]


def _publisher_files(scale: int) -> dict[str, bytes]:
    """The publishers' files, in their formats, with `scale` prefixes or so each."""
    apple = "".join(f"{p},US,US-CA,Los Angeles,\n" for p in _v4(146, scale))
    apple += "2a04:4e41:1301:8000::/52,GB,GB-LND,London,\n"
    service_tags = {"changeNumber": 1, "cloud": "Public", "values": [
        {"name": "ActionGroup", "id": "ActionGroup",
         "properties": {"addressPrefixes": ["13.66.60.119/32"]}},
        {"name": "AzureCloud", "id": "AzureCloud",
         "properties": {"changeNumber": 1, "addressPrefixes": [*_v4(20, scale),
                                                              "2603:1000::/25"]}}]}
    msft = "Prefix,Type\n" + "".join(f"{p},IPv4\n" for p in _v4(40, scale))
    endpoints = [{"id": 9, "serviceArea": "Exchange", "ips": ["40.92.0.0/15", "104.47.0.0/17"]},
                 {"id": 56, "serviceArea": "Common", "urls": ["*.msftidentity.com"]}]
    google = {"syncToken": "1", "creationTime": "2026-11-30T12:00:00.000000", "prefixes": [
        *({"ipv4Prefix": p, "service": "Google Cloud", "scope": "us-east1"}
          for p in _v4(34, scale)),
        {"ipv6Prefix": "2600:1900:4000::/44", "service": "Google Cloud", "scope": "us-east1"}]}
    aws = {"syncToken": "1", "createDate": "2026-11-29-21-13-09",
           "prefixes": [{"ip_prefix": p, "region": "us-east-1", "service": "AMAZON",
                         "network_border_group": "us-east-1"} for p in _v4(52, scale)],
           "ipv6_prefixes": [{"ipv6_prefix": "2600:1f18::/33", "region": "us-east-1",
                              "service": "AMAZON"}]}
    return {"egress-ip-ranges.csv": apple.encode(),
            "ServiceTags_Public.json": orjson.dumps(service_tags),
            "msft-public-ips.csv": msft.encode(),
            "endpoints-worldwide.json": orjson.dumps(endpoints),
            "cloud.json": orjson.dumps(google), "ip-ranges.json": orjson.dumps(aws)}


class _Publisher:
    """A real HTTP server on loopback; `answers[name]` is (status, content type, body)."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, str, bytes]] = {}
        answers = self.answers

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, kind, body = answers.get(self.path.lstrip("/"),
                                                 (404, "text/plain", b"not found"))
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, files: dict[str, bytes]) -> None:
        self.answers.clear()
        self.answers.update({name: (200, "application/octet-stream", body)
                             for name, body in files.items()})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def publisher() -> Iterator[_Publisher]:
    server = _Publisher()
    yield server
    server.close()


def _update(capsys: pytest.CaptureFixture[str], data_dir: Path, mirror: str,
            *only: str) -> tuple[int, dict[str, str]]:
    args = ["rules", "update", "--data-dir", str(data_dir), "--mirror", mirror]
    for name in only:
        args += ["--only", name]
    status = main(args)
    lines = capsys.readouterr().out.splitlines()
    return status, {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines}


def _lists_dir(data_dir: Path) -> Path:
    return data_dir / "rules" / "lists"


@pytest.mark.slow
def test_update_writes_every_list_with_its_header_then_reports_unchanged(
        publisher: _Publisher, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    publisher.serve(_publisher_files(SCALE))
    status, lines = _update(capsys, tmp_path, publisher.url)
    assert status == 0, lines
    assert lines["apple_mpp"].startswith("updated ")
    assert lines["mail_security"].startswith("skipped")  # no feed: the packaged list stays
    for name in ("apple_mpp", "microsoft", "google_cloud", "aws"):
        assert lines[name].startswith("updated "), lines
        written = read_list(_lists_dir(tmp_path) / f"{name}.txt", name)
        assert written.source and written.fetched and written.headers["taken-from"]
    aws = read_list(_lists_dir(tmp_path) / "aws.txt", "aws")
    assert aws.published == "2026-11-29" and aws.prefixes == SCALE + 1
    apple = read_list(_lists_dir(tmp_path) / "apple_mpp.txt", "apple_mpp")
    assert ipaddress.ip_network("17.0.0.0/8") in apple.networks  # Apple's own, always added
    microsoft = read_list(_lists_dir(tmp_path) / "microsoft.txt", "microsoft")
    assert ipaddress.ip_network("104.47.0.0/17") in microsoft.networks
    assert ipaddress.ip_network("13.66.60.119/32") not in microsoft.networks  # not AzureCloud
    lists = load_address_lists(tmp_path)
    assert lists.lookup("146.0.2.9") == "apple_mpp" and lists.lookup("52.0.4.1") == "aws"

    status, lines = _update(capsys, tmp_path, publisher.url, "aws")
    assert (status, lines) == (0, {"aws": f"unchanged ({SCALE + 1} prefixes)"})


@pytest.mark.parametrize(("broken", "answer", "why"), [
    ("ip-ranges.json", (500, "text/plain", b"oops"), "HTTP 500"),
    ("cloud.json", (200, "text/html", b"<!DOCTYPE html><html><body>Sign in</body></html>"),
     "HTML page"),
    ("ServiceTags_Public.json", None, "not valid JSON"),  # truncated in transit
    ("egress-ip-ranges.csv", None, "cut short"),  # truncated in the middle of a row
    ("endpoints-worldwide.json", (200, "application/json", b'[{"ips": ["10.0.0.0/8"]}]'),
     "not a public network"),
])
@pytest.mark.slow
def test_a_failed_list_keeps_the_copy_in_use_and_the_exit_status_says_so(
        publisher: _Publisher, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        broken: str, answer: tuple[int, str, bytes] | None, why: str) -> None:
    files = _publisher_files(SCALE)
    publisher.serve(files)
    assert _update(capsys, tmp_path, publisher.url)[0] == 0
    before = {p.name: p.read_bytes() for p in _lists_dir(tmp_path).iterdir()}

    grown = _publisher_files(SCALE + 20)
    publisher.serve(grown)
    if answer is None:
        body = grown[broken]  # cut just after a comma half-way: mid-row, mid-object
        answer = (200, "application/octet-stream", body[: body.index(b",", len(body) // 2) + 3])
    publisher.answers[broken] = answer
    status, lines = _update(capsys, tmp_path, publisher.url)

    assert status == 1
    failed = {name for name, line in lines.items() if line.startswith("failed")}
    assert len(failed) == 1 and why in lines[failed.pop()], lines
    after = {p.name: p.read_bytes() for p in _lists_dir(tmp_path).iterdir()}
    assert set(after) == set(before)  # no temporary file left behind
    changed = {name for name in after if after[name] != before[name]}
    assert len(changed) == 3  # the other lists were updated; the failed one is as it was


@pytest.mark.slow
def test_a_list_that_shrank_by_half_is_refused(
        publisher: _Publisher, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    publisher.serve(_publisher_files(SCALE))
    assert _update(capsys, tmp_path, publisher.url, "aws")[0] == 0
    before = (_lists_dir(tmp_path) / "aws.txt").read_bytes()
    publisher.serve(_publisher_files(SCALE // 3))
    status, lines = _update(capsys, tmp_path, publisher.url, "aws")
    assert status == 1, lines
    assert f"refused: {SCALE // 3 + 1} prefixes, fewer than half of the {SCALE + 1}" in lines["aws"]
    assert (_lists_dir(tmp_path) / "aws.txt").read_bytes() == before


@pytest.mark.slow
def test_an_unreachable_publisher_fails_every_list_without_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = _Publisher()
    url = server.url
    server.close()  # nothing listens there now
    status, lines = _update(capsys, tmp_path, url, "aws", "google_cloud")
    assert status == 1 and set(lines) == {"aws", "google_cloud"}
    assert all(line.startswith("failed: ") and "ConnectError" in line for line in lines.values())
    assert not _lists_dir(tmp_path).exists() or not any(_lists_dir(tmp_path).iterdir())


@pytest.mark.slow
def test_a_mirror_directory_serves_air_gapped_installs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, body in _publisher_files(SCALE).items():
        (mirror / name).write_bytes(body)
    packaged = read_list(PACKAGED_DIR / "mail_security.txt", "mail_security")
    (mirror / "mail_security.txt").write_text(
        "# ours\n" + "".join(f"{net}\n" for net in packaged.networks) + "148.163.128.0/19\n")
    status, lines = _update(capsys, tmp_path / "data", str(mirror))
    assert status == 0 and all(line.startswith("updated") for line in lines.values()), lines
    assert load_address_lists(tmp_path / "data").lookup("148.163.130.1") == "mail_security"


def test_the_packaged_lists_are_well_formed() -> None:
    for path in sorted(PACKAGED_DIR.iterdir()):
        name = path.name.split(".", 1)[0]
        lst = read_list(path, name)
        assert lst.source and lst.published and lst.headers.get("license"), path
        text = path.read_text()
        assert text == format_list(name, {k: v for k, v in lst.headers.items()
                                          if k not in ("list", "prefixes")}, lst.networks)
