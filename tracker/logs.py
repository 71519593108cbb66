"""Logging for tracker's own loggers, the same in the CLI and in every worker process.

Workers are separate interpreters started by the HTTP server, so they configure
logging themselves. Nothing logged anywhere in tracker carries a raw address or
user agent: the hot path logs only counts and reasons.

Two formats (TRACKER_LOG_FORMAT): `text`, a line a person reads, and `json`, one JSON
object per line for a log shipper (`time`, `level`, `logger`, `message`, and
`exception` with the traceback when there is one). Both carry the same words: the JSON
form adds structure, never fields the text form does not have, so the rule above holds
for both. uvicorn's own lines (start-up, shutdown, worker supervision) take the same
format, so that a JSON log has nothing else on its lines.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a newline in a message is escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def formatter(log_format: str = "text") -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(_FORMAT)


def configure(level: str = "info", log_format: str = "text") -> None:
    logger = logging.getLogger("tracker")
    logger.setLevel(level.upper())
    handler = next((h for h in logger.handlers if getattr(h, "_tracker", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._tracker = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    handler.setFormatter(formatter(log_format))
    # The server's own logging config must not make tracker's lines appear twice.
    logger.propagate = False


def uvicorn_config(log_format: str) -> dict[str, Any] | None:
    """uvicorn's `log_config` for a format: None keeps uvicorn's own (text) lines."""
    if log_format != "json":
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json",
                                "stream": "ext://sys.stderr"}},
        "loggers": {name: {"handlers": ["stderr"], "level": "INFO", "propagate": False}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }
