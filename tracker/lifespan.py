"""The runtime of one worker process: it owns the pool, the writer and the caches,
starts them in order and stops them in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from tracker import geo
from tracker.campaigns import policy_of
from tracker.classify import Classifier
from tracker.database import connect, create_pool
from tracker.fastpath import Capture, ClientAddress
from tracker.hits import Pipeline
from tracker.jobs import Jobs
from tracker.journal import Journal
from tracker.metrics import Metrics, MetricsCollector, SharedSnapshots, observe_flushes
from tracker.policy import Policy, PolicyBook
from tracker.queries import QUERIES
from tracker.rollups import relabel_windows
from tracker.rules import load_rules
from tracker.settings import Settings
from tracker.suppression import SuppressionBook
from tracker.throttle import AuthThrottle
from tracker.tokens import Signer
from tracker.useragent import parse_agent, prepare
from tracker.writer import BatchWriter

log = logging.getLogger("tracker.lifespan")

_POLICY_REFRESH_S = 1.0
_GEO_WATCH_S = 5.0
_SHUTDOWN_FLUSH_TIMEOUT_S = 10.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Runtime:
    def __init__(self, settings: Settings, signer: Signer, dsn: str) -> None:
        self.settings = settings
        self.signer = signer
        self.dsn = dsn
        self.policies = PolicyBook()
        # Opted-out and erased recipients, deleted accounts, GPC/DNT settings (privacy).
        self.suppressions = SuppressionBook()
        self.jobs: Jobs | None = None
        # Plain counters on the hot path, turned into Prometheus metrics at scrape time.
        self.metrics = Metrics()
        self.collector = MetricsCollector(self.metrics, lambda: self.writer,
                                          settings.buffer_max_events)
        self.auth_throttle = AuthThrottle()
        self._publish: asyncio.Task[None] | None = None
        self._pool: asyncpg.Pool | None = None
        self.writer: BatchWriter | None = None
        self.capture: Capture | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._geo_watch: asyncio.Task[None] | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the runtime is not started")
        return self._pool

    async def start(self) -> None:
        self._pool = await create_pool(self.dsn)
        await self.refresh_policies()
        await self.suppressions.refresh(self.pool)
        journal = self._open_journal()
        durable = self.settings.durability == "journal"
        # One reading of the rules serves the classifier and the writer's re-labelling, so a
        # TRACKER_RULES override of the honeypot or burst window applies to both.
        rules = load_rules(self.settings.rules, self.settings.data_dir)
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
        self._refresh = asyncio.create_task(self._refresh_policies_forever(),
                                            name="tracker-policy-refresh")
        locate = _locator(self.settings)
        prepare(self.settings.resolved_cache_dir)  # the device rules, before the first hit
        pipeline = Pipeline(self.policies, parse_agent, locate,
                            Classifier(rules))
        if locate is geo.no_location and self.settings.geoip_fetch == "on":
            self._geo_watch = asyncio.create_task(self._adopt_fetched_geo_database(pipeline),
                                                  name="tracker-geo-watch")
        self.capture = Capture(self.signer, pipeline, ClientAddress(self.settings.trusted_proxies),
                               self.writer.add, self.metrics.count_drop,
                               self.metrics.count_hit,
                               sync=self.writer.synced if durable else None)
        self.capture.screen = self.suppressions.screen
        self.jobs = Jobs(self.pool, self.suppressions)
        self.jobs.start()
        self._share_metrics()

    async def stop(self) -> None:
        # The server has stopped accepting requests by now; in order: stop recording,
        # stop background work, write what is queued (bounded in time), close the pool.
        if self.capture is not None:
            self.capture.record_deferred()
        self.capture = None
        if self.jobs is not None:
            await self.jobs.stop()
        for task in (self._refresh, self._geo_watch, self._publish):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.writer is not None:
            await self.writer.close(_SHUTDOWN_FLUSH_TIMEOUT_S)
        if self._pool is not None:
            await self._pool.close()

    def _open_journal(self) -> Journal:
        """This worker's journal, and whatever dead workers (or the last run) left there:
        the writer replays it as soon as it runs. Each worker gets an equal share of the cap."""
        journal = Journal(self.settings.data_dir / "journal",
                          max_bytes=self.settings.journal_max_bytes // self.settings.workers)
        if journal.adopt_orphans():
            log.info("replaying %d events left in the journal", journal.pending_events)
        return journal

    def remember_campaign(self, account_id: int, campaign_id: int, policy: Policy,
                          recording: bool) -> None:
        """A campaign changed in this process: the hit pipeline sees it at once."""
        self.policies.put(account_id, campaign_id, policy, recording)

    async def refresh_policies(self) -> None:
        since = self.policies.loaded_until or _EPOCH
        rows = await self.pool.fetch(QUERIES.campaign_policies_since, since)
        for row in rows:
            self.policies.put(row["account_id"], row["id"], policy_of(row),
                              row["deleted_at"] is None)
            if self.policies.loaded_until is None or row["updated_at"] > self.policies.loaded_until:
                self.policies.loaded_until = row["updated_at"]

    async def _refresh_policies_forever(self) -> None:
        while True:
            await asyncio.sleep(_POLICY_REFRESH_S)
            try:
                await self.refresh_policies()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Keep the policies we have; the database may be down for a while.
                log.debug("policy refresh failed: %s", exc)

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
