"""A worker of `tracker serve` freezes what its start-up built, so that the collector's full
collections walk only what hits add later (they held the event loop 16-33 ms every ~40 s
under load: benchmarks/README.md, the suite). A Runtime built for anything else (tests,
tools in a process of their own) leaves the collector as it is."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracker.ingest.tokens import Signer
from tracker.lifespan import Runtime
from tracker.settings import load

from .support import SECRET


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process's objects go back to the collector


@pytest.mark.parametrize("freeze", [True, False])
async def test_a_runtime_freezes_the_heap_only_for_a_server_worker(
        dsn: str, tmp_path: Path, unfrozen: None, freeze: bool) -> None:
    settings = load({"TRACKER_DATABASE_URL": dsn, "TRACKER_SECRET_KEY": SECRET,
                     "TRACKER_DATA_DIR": str(tmp_path), "TRACKER_GEOIP_FETCH": "off"})
    runtime = Runtime(settings, Signer.from_setting(SECRET), dsn, freeze_heap=freeze)
    assert gc.get_freeze_count() == 0
    await runtime.start()
    try:
        # Start-up's objects (modules, rules, tables) are out of the collector's way.
        assert (gc.get_freeze_count() > 10_000) is freeze
    finally:
        await runtime.stop()

