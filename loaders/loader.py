"""The loader: the one process that watches the source, loads and warms versions, publishes
them across the HTTP workers and answers what only it knows (admin, `/metrics`, readiness).
It serves no HTTP itself; this module imports no aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.fold import fold_endpoints
from engine.plan import batch_sql
from engine.responses import fingerprint
from engine.settings import Settings
from loaders import admin, status
from loaders.builder import Builder
from loaders.catalog import Catalog
from loaders.metrics import CONTENT_TYPE, render
from loaders.source import LocalSource, Source
from loaders.state import DataDir
from loaders.updater import Updater
from loaders.warm import Warmer, WarmPolicy
from loaders.workers import Workers

log = logging.getLogger("duckswap.loader")
STATUS_SECONDS = 0.2  # how often the workers are told the loader's status when it changed
STOP_SECONDS = 30.0  # the longest a stop waits for the loader's threads (a build ends at once)


def make_source(settings: Settings, staging: Path) -> Source:
    """The export source the URL names; gcsfs is imported only for `gs://`."""
    if settings.source_url.startswith("gs://"):
        from loaders.gcs import GcsSource

        return GcsSource(settings.source_url,
                         Path(settings.staging_dir) if settings.staging_dir else staging,
                         endpoint_url=settings.endpoint_url, token=settings.token,
                         concurrency=settings.concurrency, quiet_seconds=settings.quiet_seconds)
    root = settings.source_path
    if not root.is_dir():
        log.warning("source folder %s does not exist: nothing is served until it does (the "
                    "watcher waits for it; /readyz and the admin API say so too)", root)
    return LocalSource(root, settings.quiet_seconds)


class Loader:
    def __init__(self, settings: Settings, workers: Workers,
                 warm: WarmPolicy | None = None) -> None:
        self.settings = settings
        warm = warm or WarmPolicy()
        self.workers = workers
        self.data = DataDir.open(settings.data_dir, settings.source_url)
        self.catalog = Catalog(self.data.versions)
        folded = fold_endpoints(settings)
        batch = {n: batch_sql(replace(e, sql=folded[n].sql) if n in folded else e)
                 for n, e in settings.endpoints.items()}
        # A lower-priority process builds versions and computes their warm answers.
        self.builder = Builder(threads=settings.threads)
        self.warmer = Warmer(
            settings.endpoints, {n: fingerprint(e) for n, e in settings.endpoints.items()},
            batch, warm.seconds, warm.keys, self.builder, self.data.answers,
            int(settings.cache_mb * 2**20), settings.threads, warm.tail_seconds,
            warm.busy_seconds, folded, hot=workers)
        self.updater = Updater(
            make_source(settings, self.data.staging), self.catalog, settings.datasets,
            debounce_ms=settings.debounce_ms,
            before_publish=self.warmer, after_publish=self.warmer.after_publish,
            cut_after_publish=self.warmer.cut_short,
            builder=self.builder, poll_seconds=settings.poll_seconds, data=self.data,
            keep_versions=settings.keep_versions, groups=settings.groups.values(),
            publisher=workers,
        )

    def status(self) -> dict[str, Any]:
        """What a worker's `/readyz` needs from the loader."""
        u = self.updater
        return {
            # Folders with parts but no marker, each with when its first file was written
            # (not an age: the document changes only when they do).
            "pending": {n: [{"export_id": e, "since": round(t, 3)} for e, t in sorted(p.items())]
                        for n, p in list(u.source.pending.items()) if p},
            "source_problem": u.source_problem,
            "named": u.named_exports(),
            "settled": self.warmer.settled,
            "source_url": u.source.url,
            "source_errors": u.source_errors,
            "last_listed": u.last_listed,
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Load and publish until `stop` is set; the workers hear the status meanwhile."""
        self.workers.loop = asyncio.get_running_loop()
        teller = asyncio.create_task(self._tell(stop), name="duckswap-status")
        try:
            await self.updater.run(stop)
        finally:
            teller.cancel()
            await asyncio.gather(teller, return_exceptions=True)

    async def _tell(self, stop: asyncio.Event) -> None:
        last: dict[str, Any] | None = None
        while not stop.is_set():
            doc = self.status()
            if doc != last:
                self.workers.push_status(doc)
                last = doc
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STATUS_SECONDS)

    async def shutdown(self, stop: asyncio.Event, running: asyncio.Task[None]) -> None:
        """End `run` (its task `running`, started with `stop`): loads and warms in flight end
        now, nothing more is published; then close what the loader holds."""
        stop.set()
        self.updater.stop()
        try:
            await asyncio.wait_for(running, timeout=STOP_SECONDS)
        except TimeoutError:
            log.warning("the loader did not stop within %gs; closing anyway", STOP_SECONDS)
        self.close()

    def close(self) -> None:
        self.updater.close()
        self.data.close()

    def drained(self, worker: str, snap_ids: list[int]) -> None:
        for snap_id in snap_ids:
            self.catalog.release(snap_id, worker)

    def left(self, worker: str) -> None:
        """`worker` exited: it holds nothing any more."""
        self.workers.remove(worker)
        self.catalog.forget(worker)

    async def admin(self, method: str, path: str, body: bytes | None,
                    remote: str | None) -> tuple[int, Any]:
        return await admin.handle(self.updater, method, path, body, remote)

    async def page(self, admin: bool) -> bytes:
        """The status page (`loaders.status`); `admin`: with what only admins see."""
        counts = await self.workers.counters()
        return status.render(self.updater, self.warmer, self.settings, counts,
                             self.workers.restarts, self.workers.pids(), admin)

    async def metrics(self) -> tuple[bytes, str]:
        counts = await self.workers.counters()
        return (render(self.updater, self.warmer, counts, list(self.settings.endpoints),
                       self.workers.restarts), CONTENT_TYPE)
