"""The runtime of one worker process: it owns the pool, the writer and the caches,
starts them in order and stops them in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from pathlib import Path

import asyncpg

from tracker.delivery.loop import EndpointStats
from tracker.ingest import geo
from tracker.ingest.addresses import ClientAddress
from tracker.ingest.capture import Capture
from tracker.ingest.classify import Classifier
from tracker.ingest.pipeline import Pipeline
from tracker.ingest.policy import Policy, PolicyBook
from tracker.ingest.rules import load_rules
from tracker.ingest.suppression import SuppressionBook
from tracker.ingest.tokens import Signer
from tracker.ingest.useragent import parse_agent, prepare
from tracker.privacy.books import read_policies, read_suppressions
from tracker.privacy.jobs import Jobs
from tracker.privacy.sync import PrivacySync
from tracker.settings import Settings
from tracker.store.database import connect, create_pool
from tracker.store.journal import Journal
from tracker.store.queries import QUERIES
from tracker.store.replica import ReadReplica
from tracker.store.rollups import relabel_windows
from tracker.store.writer import BatchWriter
from tracker.web.metrics import Metrics, MetricsCollector, SharedSnapshots, observe_flushes
from tracker.web.throttle import AuthThrottle

log = logging.getLogger("tracker.lifespan")

_GEO_WATCH_S = 5.0
_SHUTDOWN_FLUSH_TIMEOUT_S = 10.0
# How long the API waits, after a privacy change, for the read replica to replay it
# before answering; a replica that takes longer is not read until it has.
_REPLICA_CATCH_UP_S = 5.0


class Runtime:
    def __init__(self, settings: Settings, signer: Signer, dsn: str, *,
                 freeze_heap: bool = False) -> None:
        self.settings = settings
        # A worker process of `tracker serve` (the process is the server's alone): the
        # collector leaves what start-up built out of its full collections (start).
        self.freeze_heap = freeze_heap
        self.signer = signer
        self.dsn = dsn
        self.policies = PolicyBook()
        # Opted-out and erased recipients, deleted accounts, GPC/DNT settings (privacy).
        self.suppressions = SuppressionBook()
        # Makes a privacy change hold in every worker before the API answers.
        self.privacy = PrivacySync(settings.data_dir, self._read_privacy_changes,
                                   self._write_out)
        self.jobs: Jobs | None = None
        # Plain counters on the hot path, turned into Prometheus metrics at scrape time.
        self.metrics = Metrics()
        # One reading of the rules serves the classifier, the writer's re-labelling and
        # /metrics, so a TRACKER_RULES override of the honeypot or burst window applies to all.
        self.rules = load_rules(settings.rules, settings.data_dir)
        self.collector = MetricsCollector(self.metrics, lambda: self.writer,
                                          settings.buffer_max_events, rules=self.rules)
        self.auth_throttle = AuthThrottle()
        self._publish: asyncio.Task[None] | None = None
        self._pool: asyncpg.Pool | None = None
        self.replica: ReadReplica | None = None
        self.collector.replica = lambda: self.replica
        self.writer: BatchWriter | None = None
        self.capture: Capture | None = None
        # Per webhook endpoint, for /metrics (the delivery process delivers: server.py).
        self.webhook_stats: EndpointStats | None = None
        self._geo_watch: asyncio.Task[None] | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the runtime is not started")
        return self._pool

    @property
    def read_pool(self) -> asyncpg.Pool:
        """Where reports, the dashboard, lists and exports read: the replica
        (TRACKER_READ_DATABASE_URL) while it is close enough to the primary, else the
        primary. Writes, authentication and privacy changes always use `pool`."""
        if self.replica is not None:
            return self.replica.pool_for_reading()
        return self.pool

    async def start(self) -> None:
        self._pool = await create_pool(self.dsn)
        if self.settings.read_database_url:
            self.replica = ReadReplica(self._pool, self.settings.read_database_url,
                                       max_lag_s=self.settings.read_max_lag_s)
            await self.replica.start()
        self.privacy.open()  # before the books are read: a change made meanwhile is seen
        await self._read_privacy_changes()
        journal = self._open_journal()
        durable = self.settings.durability == "journal"
        rules = self.rules
        self.writer = BatchWriter(
            lambda: connect(self.dsn),
            batch_size=self.settings.batch_size,
            connections=self.settings.writer_connections,
            interval_s=self.settings.flush_interval_ms / 1000,
            max_buffered=self.settings.buffer_max_events,
            on_drop=self.metrics.count_drop,
            journal=journal, durable=durable,
            relabel_windows=relabel_windows(rules.timing))
        observe_flushes(self.writer, self.metrics)
        self.writer.start()
        locate = _locator(self.settings)
        prepare(self.settings.resolved_cache_dir)  # the device rules, before the first hit
        pipeline = Pipeline(self.policies, parse_agent, locate,
                            Classifier(rules))
        if locate is geo.no_location and self.settings.geoip_fetch == "on":
            self._geo_watch = asyncio.create_task(self._adopt_fetched_geo_database(pipeline),
                                                  name="tracker-geo-watch")
        self.capture = Capture(
            self.signer, pipeline, ClientAddress(self.settings.trusted_proxies), self.writer,
            self.metrics, self.suppressions,
            self.privacy if self.privacy.shared is not None else None,
            durable=durable, max_held=self.settings.buffer_max_events)
        self.privacy.start(release=self.capture.release_held)
        self.jobs = Jobs(self.pool)
        self.jobs.start()
        self.webhook_stats = EndpointStats(self.pool)
        self.webhook_stats.start()
        self._share_metrics()
        if self.freeze_heap:
            # What start-up built (modules, rules, device and agent tables) lives as long as
            # the worker: frozen, a full collection walks only what came after (caches,
            # waiting events), 1.4-3.3 ms of CPU instead of 16-33 ms holding every answer.
            gc.freeze()

    async def stop(self) -> None:
        # The server has stopped accepting requests by now; in order: stop recording,
        # stop background work, write what is queued (bounded in time), close the pool.
        capture, self.capture = self.capture, None
        if capture is not None:
            capture.record_deferred()
            if capture.held and not await self.privacy.settle(_SHUTDOWN_FLUSH_TIMEOUT_S / 2):
                log.error("%d hits held for a privacy change this worker could not read "
                          "are not recorded", capture.held)
            capture.release_held()
        await self.privacy.stop()
        if self.webhook_stats is not None:
            await self.webhook_stats.stop()
        if self.jobs is not None:
            await self.jobs.stop()
        for task in (self._geo_watch, self._publish):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.writer is not None:
            await self.writer.close(_SHUTDOWN_FLUSH_TIMEOUT_S)
        if self.replica is not None:
            await self.replica.stop()
        if self._pool is not None:
            await self._pool.close()

    def _open_journal(self) -> Journal:
        """This worker's journal, and whatever dead workers (or the last run) left there:
        the writer replays it as soon as it runs. The workers share the cap: whichever
        needs the room gets it."""
        journal = Journal(self.settings.data_dir / "journal",
                          max_bytes=self.settings.journal_max_bytes)
        if journal.adopt_orphans():
            log.info("replaying %d events left in the journal", journal.pending_events)
        return journal

    async def ping_database(self) -> object:
        """Whether PostgreSQL answers (`/readyz`): raises if it does not."""
        return await self.pool.fetchval(QUERIES.ping)

    def remember_campaign(self, account_id: int, campaign_id: int, policy: Policy,
                          recording: bool) -> None:
        """A campaign changed in this process: the hit pipeline sees it at once."""
        self.policies.put(account_id, campaign_id, policy, recording)

    async def _read_privacy_changes(self) -> bool:
        """The policies and the suppressions changed since the last read; whether they
        hold an erasure this worker did not know of."""
        await read_policies(self.policies, self.pool)
        return await read_suppressions(self.suppressions, self.pool)

    async def _write_out(self) -> None:
        """An erasure: write everything captured so far into PostgreSQL, and leave none of
        it on the disk. A dead worker's journal segments are taken over to be written too;
        this worker's active segment is sealed, so it goes once written (a segment that
        keeps getting new records would otherwise keep the old ones until it fills up)."""
        if self.writer is None:
            return
        journal = self.writer.journal
        if journal is not None:
            await asyncio.to_thread(journal.adopt_orphans)
            journal.seal()
        await self.writer.flush()

    async def privacy_changed(self, erasure: bool = False) -> None:
        """A privacy change is committed (and applied here): every worker applies it
        before the API answers (privacy/sync.py); an erasure also has every worker write
        out what it captured before."""
        await self.privacy.changed(erasure)
        await self.readers_caught_up()

    async def readers_caught_up(self) -> None:
        """Before the API answers a privacy change: the read replica has replayed it, or
        is not read until it has."""
        if self.replica is not None:
            await self.replica.caught_up(_REPLICA_CATCH_UP_S)

    async def _adopt_fetched_geo_database(self, pipeline: Pipeline) -> None:
        """`tracker serve` may be fetching the geo database; start locating once it lands."""
        while True:
            await asyncio.sleep(_GEO_WATCH_S)
            path = geo.default_geoip_path(self.settings.data_dir)
            if path is not None and path.with_name(path.name + ".source").exists():
                try:
                    pipeline.use_locator(geo.GeoLookup(path).lookup)
                except geo.GeoDatabaseError as exc:
                    log.warning("cannot use the fetched geo database: %s", exc)
                    return
                log.info("locating hits with %s", path)
                return

    def _share_metrics(self) -> None:
        """With several workers, each publishes its numbers for whichever one is scraped."""
        if self.settings.workers < 2:
            return
        shared = SharedSnapshots.for_server(self.settings.data_dir, self.settings.port)
        try:
            shared.prepare()
        except OSError as exc:
            log.warning("metrics cover this worker only: cannot share them in %s: %s",
                        shared.dir, exc)
            return
        self.collector.shared = shared
        self._publish = asyncio.create_task(self.collector.publish_forever(),
                                            name="tracker-metrics-publish")


def _locator(settings: Settings) -> geo.Locate:
    path: Path | None = settings.geoip_db or geo.default_geoip_path(settings.data_dir)
    if path is None:
        log.info("no geo database yet: locations are not recorded (see `tracker geoip fetch`)")
        return geo.no_location
    return geo.GeoLookup(path).lookup
