"""`python -m tracker.ingest.devices CACHE RULES_DIR`: build the device index into the
file CACHE (devices.load runs this in a process of its own)."""

import sys
from pathlib import Path

from tracker.ingest.devices.cache import build_into

if __name__ == "__main__":
    sys.exit(build_into(Path(sys.argv[1]), Path(sys.argv[2])))
