"""One assembly point: create_app(settings) wires the store, the query pool and the updater."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from engine.query import QueryRunner
from engine.settings import Settings
from engine.store import Store
from loaders.builder import Builder
from loaders.source import LocalSource, Source
from loaders.state import DataDir
from loaders.updater import Updater
from serving.admin import add_routes
from serving.handlers import (
    endpoint_handler,
    error_middleware,
    healthz,
    metrics,
    readyz,
    version_pointer,
)
from serving.metrics import CollectorRegistry, LoopLag, Metrics
from serving.remote import QueryProcess
from serving.state import (
    DATA,
    LOOP_LAG,
    REGISTRY,
    RUNNER,
    SERVING,
    SETTINGS,
    STORE,
    UPDATER,
    WARMER,
    Serving,
)
from serving.warm import Warmer

log = logging.getLogger("duckswap.server")
# What the forkserver imports once, for the build process and the query process alike.
PRELOAD = ("loaders.build", "engine.precompute", "serving.qworker")
# The longest the event loop waits for the GIL while another thread of this process runs
# Python (picking hot keys, reading warm answers back, freeing a replaced version's answers).
# At CPython's default 5 ms, the loop stalled 3-6 ms at a time while a warm picked its keys
# (2000 req/s); the threads that want it otherwise are paced or waiting on I/O.
SWITCH_INTERVAL = 0.0005


STOP_SECONDS = 30.0  # the longest a stop waits for the loader's threads (a build ends at once)
_switch = {"apps": 0, "before": 0.0}  # apps serving in this process; the interval before


def _short_switch(step: int) -> None:
    """The first app to start sets `SWITCH_INTERVAL`; the last to stop restores the one before
    (several serve in one process in tests)."""
    if step > 0 and _switch["apps"] == 0:
        _switch["before"] = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
    _switch["apps"] += step
    if _switch["apps"] == 0:
        sys.setswitchinterval(_switch["before"])


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = app[STORE]
    stop = asyncio.Event()
    app[WARMER].loop = asyncio.get_running_loop()
    _short_switch(+1)
    process = app[SERVING].process
    if process is not None:
        await process.start()
    task = asyncio.create_task(app[UPDATER].run(stop), name="duckswap-updater")
    probe = (asyncio.create_task(app[LOOP_LAG].run(), name="duckswap-loop-lag")
             if settings.metrics else None)
    yield
    if probe is not None:
        probe.cancel()
    stop.set()
    app[UPDATER].stop()  # loads and warms in flight end now
    try:
        await asyncio.wait_for(task, timeout=STOP_SECONDS)
    except TimeoutError:
        log.warning("the loader did not stop within %gs; closing anyway", STOP_SECONDS)
    if process is not None:
        await process.close()
    app[RUNNER].close()
    app[UPDATER].close()
    app[SERVING].cache.close()
    store.close()
    app[DATA].close()
    _short_switch(-1)


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


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    data = DataDir.open(settings.data_dir, settings.source_url)
    # Each query runs on one DuckDB thread and the pool runs `threads` of them at once: point
    # lookups and small aggregates gain nothing from intra-query parallelism, and two queries
    # each fanning out over both cores measured ~45% fewer queries per second on the demo mix.
    store = Store(threads=1, data_dir=data.versions)
    runner = QueryRunner(store, settings.threads, settings.query_timeout)
    serving = Serving(settings, store, runner)
    if settings.query_process:
        serving.use(QueryProcess(runner, settings.endpoints, serving.batch_sql,
                                 serving.constants.folded, settings.threads, PRELOAD))
    # Lower-priority processes build versions and compute their warm answers.
    builder = Builder(nice=settings.build_nice, threads=settings.threads,
                      preload=PRELOAD, idle=settings.build_idle,
                      processes=settings.build_processes)
    warmer = Warmer(store, serving.cache, serving.popularity, settings.endpoints,
                    serving.fingerprints, serving.batch_sql, settings.warm_seconds,
                    settings.warm_keys, builder, data.answers, settings.threads,
                    settings.warm_tail_seconds, settings.warm_busy_seconds,
                    serving.constants.folded)
    app[SETTINGS] = settings
    app[STORE] = store
    app[SERVING] = serving
    app[WARMER] = warmer
    app[RUNNER] = runner
    app[DATA] = data
    app[UPDATER] = Updater(
        make_source(settings, data.staging), store, settings.datasets,
        debounce_ms=settings.debounce_ms,
        before_publish=warmer, after_publish=warmer.after_publish,
        cut_after_publish=warmer.cut_short,
        builder=builder, poll_seconds=settings.poll_seconds, data=data,
        keep_versions=settings.keep_versions, groups=settings.groups.values(),
    )
    app[REGISTRY] = CollectorRegistry()
    app[REGISTRY].register(Metrics(store, serving.cache, app[UPDATER], warmer,
                                   serving.process, serving.query_errors))
    app[LOOP_LAG] = LoopLag(app[REGISTRY])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/version", version_pointer)
    if settings.metrics:
        app.router.add_get("/metrics", metrics)
    if settings.admin_token:
        add_routes(app, settings.admin_token, app[UPDATER])
    for spec in settings.endpoints.values():
        app.router.add_get(spec.path, endpoint_handler(spec), name=spec.name)
    app.cleanup_ctx.append(_lifecycle)
    return app
