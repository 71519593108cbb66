"""Every TRACKER_* setting, read once, typed and validated.

The table below is the single source of truth: it feeds `Settings`, the
`tracker serve --help` flags and the settings section of the README. A bad
value stops start-up with one line naming the variable, never a traceback.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class SettingsError(ValueError):
    """A setting has a value tracker cannot use; the message names the variable."""


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _text(raw: str) -> str:
    return raw.strip()


def _optional_text(raw: str) -> str | None:
    return raw.strip() or None


def _port(raw: str) -> int:
    value = _positive_int(raw)
    if value > 65535:
        raise ValueError("must be a port number between 1 and 65535")
    return value


def _positive_int(raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"must be a whole number, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


_BYTE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _byte_size(raw: str) -> int:
    """Bytes, optionally with a binary unit: 1073741824, 512M, 1G."""
    text = raw.strip().lower().removesuffix("b").removesuffix("i")
    unit = text[-1:] if text[-1:] in _BYTE_UNITS else ""
    number = text[: len(text) - len(unit)].strip()
    if not number.isascii() or not number.isdigit():
        raise ValueError(f"must be a size in bytes such as 1073741824, 512M or 1G, got {raw!r}")
    value = int(number) * _BYTE_UNITS[unit]
    if value < 1 << 20:
        raise ValueError(f"must be at least 1M, got {raw!r}")
    return value


def _path(raw: str) -> Path:
    if not raw.strip():
        raise ValueError("must not be empty")
    return Path(raw.strip()).expanduser()


def _optional_path(raw: str) -> Path | None:
    return Path(raw.strip()).expanduser() if raw.strip() else None


def _rules_file(raw: str) -> Path | None:
    """A user rules file. Its contents are checked where the rules are loaded, before
    anything starts (tracker.cli), so that a bad one also stops start-up naming the setting."""
    path = _optional_path(raw)
    if path is not None and not path.is_file():
        raise ValueError(f"{path}: not a file")
    return path


def _database_url(raw: str) -> str | None:
    raw = raw.strip()
    if not raw:
        return None
    if urlsplit(raw).scheme not in ("postgres", "postgresql"):
        raise ValueError("must be a postgresql:// URL")
    return raw


def _public_url(raw: str) -> str | None:
    raw = raw.strip().rstrip("/")
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an absolute http(s) URL, got {raw!r}")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query string or fragment")
    return raw


def _networks(raw: str) -> tuple[IPNetwork, ...]:
    networks = []
    for item in raw.split(","):
        if item.strip():
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ValueError(f"{item.strip()!r} is not an IP network (CIDR)") from None
    return tuple(networks)


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {raw!r}")
        return value

    return parse


@dataclass(frozen=True)
class Setting:
    env: str
    default: str
    help: str
    parse: Callable[[str], Any]

    @property
    def field(self) -> str:
        return self.env.removeprefix("TRACKER_").lower()

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("TRACKER_DATABASE_URL", "", "external PostgreSQL DSN; unset: embedded PostgreSQL",
            _database_url),
    Setting("TRACKER_READ_DATABASE_URL", "", "a streaming replica of the database for reading: "
            "reports, the dashboard, lists and exports; unset: everything reads the primary",
            _database_url),
    Setting("TRACKER_READ_MAX_LAG_S", "10", "seconds a replica may be behind the primary and "
            "still be read; past it reads go to the primary until it catches up",
            _positive_int),
    Setting("TRACKER_DATA_DIR", "./tracker-data",
            "embedded database, generated secret, local journal", _path),
    Setting("TRACKER_CACHE_DIR", "", "data tracker derives from its dependencies and "
            "rebuilds when missing (the device-type index, a few MB); default: DATA_DIR/cache",
            _optional_path),
    Setting("TRACKER_SECRET_KEY", "",
            "comma-separated signing keys for tracking URLs (first signs, all verify); "
            "generated into the data dir when the database is embedded", _optional_text),
    Setting("TRACKER_PUBLIC_URL", "", "base of the pixel and link URLs handed out "
            "(default http://HOST:PORT)", _public_url),
    Setting("TRACKER_HOST", "127.0.0.1", "bind address", _text),
    Setting("TRACKER_PORT", "8000", "bind port", _port),
    Setting("TRACKER_WORKERS", "1", "worker processes", _positive_int),
    Setting("TRACKER_GEOIP_DB", "", "MaxMind-format City or Country database "
            "(default: the DB-IP City Lite fetched by `tracker geoip fetch`, if any)",
            _optional_path),
    Setting("TRACKER_GEOIP_FETCH", "on", "on: when no geo database is configured or installed, "
            "`tracker serve` fetches DB-IP City Lite into the data dir in the background; off: "
            "never download", _choice("on", "off")),
    Setting("TRACKER_TRUSTED_PROXIES", "127.0.0.1/32,::1/128",
            "comma-separated CIDRs whose X-Forwarded-For is believed", _networks),
    Setting("TRACKER_FLUSH_INTERVAL_MS", "200", "longest time an event waits in memory "
            "before the writer flushes it", _positive_int),
    Setting("TRACKER_BATCH_SIZE", "5000", "events per COPY batch", _positive_int),
    Setting("TRACKER_WRITER_CONNECTIONS", "2", "batches each worker writes at once, each on "
            "its own connection; about the cores PostgreSQL has", _positive_int),
    Setting("TRACKER_BUFFER_MAX_EVENTS", "100000", "events held in memory; past it they "
            "spill to the journal, and only with the journal full too are new ones dropped",
            _positive_int),
    Setting("TRACKER_JOURNAL_MAX_BYTES", "1G", "disk cap of the journal in the data dir "
            "(one cap for all the workers), e.g. 512M or 1G", _byte_size),
    Setting("TRACKER_DURABILITY", "memory", "memory: a hit is answered once its event is in "
            "memory (a kill -9 loses up to one flush interval); journal: once it is fsynced "
            "to the journal (group commit; a kill -9 loses nothing)",
            _choice("memory", "journal")),
    Setting("TRACKER_LOG_LEVEL", "info", "debug, info, warning or error",
            _choice("debug", "info", "warning", "error")),
    Setting("TRACKER_WEBHOOK_TIMEOUT_MS", "10000", "how long a webhook receiver has to "
            "answer a delivery before it counts as failed", _positive_int),
    Setting("TRACKER_WEBHOOK_RETRY_MS", "5000", "wait before the first retry of a failed "
            "delivery; each further retry waits twice as long (with jitter)", _positive_int),
    Setting("TRACKER_WEBHOOK_RETRY_MAX_MS", "3600000", "longest wait between two retries",
            _positive_int),
    Setting("TRACKER_WEBHOOK_DISABLE_AFTER_S", "86400", "an endpoint whose deliveries have "
            "failed for this long is disabled, with the reason shown", _positive_int),
    Setting("TRACKER_WEBHOOK_BATCH", "100", "most events in one delivery", _positive_int),
    Setting("TRACKER_WEBHOOK_POLL_MS", "1000", "how often each worker looks for events to "
            "deliver", _positive_int),
    Setting("TRACKER_WEBHOOK_SENDS", "8", "deliveries each worker has in flight at most "
            "(what bounds its memory for them)", _positive_int),
    Setting("TRACKER_LOG_FORMAT", "text", "text: a line a person reads; json: one JSON object "
            "per line (time, level, logger, message), for a log shipper", _choice("text", "json")),
    Setting("TRACKER_RULES", "", "TOML file laid over the packaged classification rules "
            "(thresholds, patterns, Apple proxy ranges; see tracker/ingest/rules/README.md)",
            _rules_file),
)


_BY_ENV = {setting.env: setting for setting in SETTINGS}

# Variables tracker does not read that an older deployment may still set, each with the one
# value that asks for what tracker does anyway, and what it does. That value is accepted with
# a warning (`retired_settings`); any other stops start-up, since it asked for something else.
_RETIRED: dict[str, tuple[str, str]] = {
    "TRACKER_SERVER": ("uvicorn", "tracker serves on uvicorn only"),
}


def retired_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per retired variable that is set to its accepted value."""
    environ = os.environ if environ is None else environ
    return [f"{env}={environ[env].strip()} is ignored ({what}): remove it from the environment"
            for env, (accepted, what) in _RETIRED.items()
            if environ.get(env, "").strip().lower() == accepted]


def _check_retired(environ: Mapping[str, str]) -> None:
    for env, (accepted, what) in _RETIRED.items():
        value = environ.get(env, "").strip()
        if value and value.lower() != accepted:
            raise SettingsError(f"{env}: {value!r} is not available ({what}): remove it from "
                                "the environment")


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    read_database_url: str | None
    read_max_lag_s: int
    data_dir: Path
    cache_dir: Path | None
    secret_key: str | None
    public_url: str | None
    host: str
    port: int
    workers: int
    geoip_db: Path | None
    geoip_fetch: str
    trusted_proxies: tuple[IPNetwork, ...]
    flush_interval_ms: int
    batch_size: int
    writer_connections: int
    buffer_max_events: int
    journal_max_bytes: int
    durability: str
    log_level: str
    webhook_timeout_ms: int
    webhook_retry_ms: int
    webhook_retry_max_ms: int
    webhook_disable_after_s: int
    webhook_batch: int
    webhook_poll_ms: int
    webhook_sends: int
    log_format: str
    rules: Path | None
    # The variables given as CLI flags: messages name a setting as the user gave it.
    flags: frozenset[str] = frozenset()

    def named(self, env: str) -> str:
        """How the user gave a setting: its flag (`--port`) or its variable (`TRACKER_PORT`)."""
        return _BY_ENV[env].flag if env in self.flags else env

    @property
    def resolved_cache_dir(self) -> Path:
        """Where derived data is cached (TRACKER_CACHE_DIR, else DATA_DIR/cache)."""
        return self.cache_dir or self.data_dir / "cache"

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def as_env(self) -> dict[str, str]:
        """The settings as TRACKER_* variables, for worker processes and subprocesses."""
        env: dict[str, str] = {}
        for setting in SETTINGS:
            value = getattr(self, setting.field)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            env[setting.env] = str(value)
        return env


def load(environ: Mapping[str, str] | None = None,
         overrides: Mapping[str, str | None] | None = None) -> Settings:
    """Read every setting from `environ` (default os.environ); `overrides` (CLI flags,
    keyed by variable name) win. Raises SettingsError naming the first bad variable."""
    environ = os.environ if environ is None else environ
    _check_retired(environ)
    flags = frozenset(env for env, raw in (overrides or {}).items() if raw is not None)
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = (overrides or {}).get(setting.env)
        if raw is None:
            raw = environ.get(setting.env, setting.default)
        try:
            values[setting.field] = setting.parse(raw)
        except ValueError as exc:
            name = setting.flag if setting.env in flags else setting.env
            raise SettingsError(f"{name}: {exc}") from None
    assert {f.name for f in fields(Settings)} == {*values, "flags"}
    return Settings(**values, flags=flags)
