"""Logging for tracker's own loggers, the same in the CLI and in every worker process.

Workers are separate interpreters started by the HTTP server, so they configure
logging themselves. Nothing logged anywhere in tracker carries a raw address or
user agent: the hot path logs only counts and reasons.
"""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str = "info") -> None:
    logger = logging.getLogger("tracker")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_tracker", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._tracker = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    # The server's own logging config must not make tracker's lines appear twice.
    logger.propagate = False
