"""One assembly point: create_app(settings) wires the store, the query pool and the updater."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from loaders.builder import Builder
from loaders.snapshot import Snapshot, Store
from loaders.source import LocalSource, Source
from loaders.state import DataDir
from loaders.updater import Updater
from serving.admin import add_routes
from serving.batcher import Batcher
from serving.cache import Popularity, ResponseCache
from serving.endpoints import EndpointSpec
from serving.errors import ApiError, BadParameter, MethodNotAllowed, NotFound, NotReady
from serving.fold import Constants, fold_endpoints
from serving.metrics import CONTENT_TYPE, CollectorRegistry, LoopLag, Metrics, render
from serving.params import ParamError, bind_params, cache_key
from serving.plan import batch_sql
from serving.query import QueryRunner
from serving.responses import (
    IMMUTABLE,
    NO_STORE,
    TOKEN_LENGTH,
    Entry,
    dumps,
    encode_body,
    endpoint_tokens,
    etag,
    fingerprint,
    if_none_match,
    versions_header,
)
from serving.settings import Settings
from serving.warm import Warmer

log = logging.getLogger("duckswap.server")

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
RUNNER = web.AppKey("runner", QueryRunner)
UPDATER = web.AppKey("updater", Updater)
WARMER = web.AppKey("warmer", Warmer)
DATA = web.AppKey("data", DataDir)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=dumps(body), status=status, content_type="application/json", headers=headers
    )


def error_response(err: ApiError) -> web.Response:
    """Errors are never cached: a CDN must not pin a 404 or a 503 under a data URL."""
    return json_response(err.body(), err.status, {"Cache-Control": NO_STORE, **err.headers})


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc)
    except web.HTTPNotFound:
        return error_response(NotFound(f"no route for {request.path}"))
    except web.HTTPMethodNotAllowed:
        return error_response(
            MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
        )
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error on %s", request.path)
        return error_response(ApiError("internal error"))


class Serving:
    """Request-path state: version tokens per Snapshot, the response cache, popularity."""

    def __init__(self, settings: Settings, store: Store, runner: QueryRunner) -> None:
        self.store = store
        self.endpoints = settings.endpoints
        self.fingerprints = {n: fingerprint(e) for n, e in settings.endpoints.items()}
        self.cache = ResponseCache(int(settings.cache_mb * 2**20))
        for name in settings.endpoints:  # every endpoint's series exists from the start
            self.cache.by_endpoint[name] = [0, 0]
        self.popularity = Popularity(settings.warm_keys)
        self._tokens: dict[int, dict[str, str]] = {}
        self._pointer: tuple[int, bytes, str] | None = None
        # Constant subqueries run once per version, not per query (see `serving.fold`); the
        # batched plans are of the folded SQL.
        self.constants = Constants(fold_endpoints(settings))
        folded = self.constants.folded
        self.batch_sql = {
            n: batch_sql(replace(e, sql=folded[n].sql) if n in folded else e)
            for n, e in settings.endpoints.items()
        }
        self.batcher = Batcher(runner, self.constants)

    def tokens(self, snap: Snapshot) -> dict[str, str]:
        """Token of every endpoint whose datasets are all loaded in `snap` (memoised)."""
        tokens = self._tokens.get(snap.id)
        if tokens is None:
            tokens = endpoint_tokens(self.endpoints, self.fingerprints, snap)
            if len(self._tokens) >= 8:
                del self._tokens[min(self._tokens)]
            self._tokens[snap.id] = tokens
        return tokens

    def pointer(self) -> tuple[bytes, str]:
        """The encoded `/v1/version` document of the current Snapshot and its ETag."""
        snap = self.store.current
        if self._pointer is None or self._pointer[0] != snap.id:
            tokens = self.tokens(snap)
            body = dumps({
                "datasets": {
                    n: {"version": v.version_id, "export_id": v.export_id, "rows": v.rows}
                    for n, v in sorted(snap.versions.items())
                },
                "endpoints": {
                    n: {"path": e.path, "token": tokens.get(n)}
                    for n, e in self.endpoints.items()
                },
            })
            tag = '"' + hashlib.blake2b(body, digest_size=8).hexdigest() + '"'
            self._pointer = (snap.id, body, tag)
        return self._pointer[1], self._pointer[2]


SERVING = web.AppKey("serving", Serving)
REGISTRY = web.AppKey("registry", CollectorRegistry)
LOOP_LAG = web.AppKey("loop_lag", LoopLag)


def _entry_response(entry: Entry, version_token: str, cache_control: str) -> web.Response:
    body, tag, versions = entry
    return web.Response(body=body, headers={
        "Content-Type": "application/json",
        "ETag": tag,
        "Cache-Control": cache_control,
        "X-Duckswap-Token": version_token,
        "X-Duckswap-Versions": versions,
    })


def endpoint_handler(spec: EndpointSpec) -> Handler:
    name = spec.name

    async def handle(request: web.Request) -> web.StreamResponse:
        app = request.app
        serving = app[SERVING]
        raw, wanted = _query(request)
        try:
            params = bind_params(spec.params, request.match_info, raw)
        except ParamError as exc:
            raise BadParameter(f"{exc.name}: {exc.message}", parameter=exc.name) from None
        key = cache_key(params)
        serving.popularity.seen(name, key)
        cache = serving.cache
        store = serving.store
        snap = store.acquire()
        try:
            tok = serving.tokens(snap).get(name)
            if tok is None:
                missing = [d for d in spec.datasets if d not in snap.versions]
                raise NotReady(f"dataset {missing[0]!r} has no loaded version yet",
                               missing=missing)
            if wanted is not None and wanted != tok:
                held = cache.peek((wanted, key))
                if held is not None:  # an older version's exact bytes: still true for its URL
                    return _entry_response(held, wanted, IMMUTABLE)
                return _moved(request, tok)
            cache_control = spec.cache_control if wanted is None else IMMUTABLE
            tag = etag(tok, key)
            if if_none_match(request.headers.get("If-None-Match"), tag):
                return web.Response(status=304, headers={
                    "ETag": tag, "Cache-Control": cache_control, "X-Duckswap-Token": tok})
            entry = cache.get((tok, key), name)
            if entry is None:
                entry = await _compute(app, spec, snap, tok, key, params)
            return _entry_response(entry, tok, cache_control)
        finally:
            store.release(snap)

    return handle


async def _compute(app: web.Application, spec: EndpointSpec, snap: Snapshot, tok: str,
                   key: tuple[Any, ...], params: dict[str, Any]) -> Entry:
    """Query once per key and version: concurrent misses for the same key wait for one."""
    cache = app[SERVING].cache
    ck = (tok, key)
    pending = cache.inflight.get(ck)
    if pending is not None:
        cache.coalesced += 1
        return await asyncio.shield(pending)
    fut: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()
    fut.add_done_callback(_consume)
    cache.inflight[ck] = fut
    try:
        serving = app[SERVING]
        sql = serving.batch_sql.get(spec.name)
        if sql is not None and spec.name not in serving.batcher.disabled:
            result = await serving.batcher.run(spec, sql, snap, params)
        else:
            result = await app[RUNNER].run_endpoint(spec, params, serving.constants, snap)
        versions = snap.version_ids(spec.datasets)
        entry = (
            encode_body(spec, tok, versions, result.columns, result.rows, result.truncated),
            etag(tok, key),
            versions_header(versions),
        )
        cache.put(ck, entry)
        fut.set_result(entry)
        return entry
    except asyncio.CancelledError:
        fut.cancel()
        raise
    except BaseException as exc:
        fut.set_exception(exc)
        raise
    finally:
        del cache.inflight[ck]


def _consume(fut: asyncio.Future[Entry]) -> None:
    if not fut.cancelled():
        fut.exception()


def _moved(request: web.Request, current: str) -> web.Response:
    """`?v=` names a version this process does not hold: point at the current one, uncached."""
    location = str(request.rel_url.update_query(v=current))
    body = {"error": "version_not_held", "status": 307, "token": current,
            "message": "this server does not hold that version; follow Location for the "
                       "current one"}
    return json_response(body, 307, {"Location": location, "Cache-Control": NO_STORE})


def _query(request: web.Request) -> tuple[dict[str, list[str]], str | None]:
    """Query parameters, and the `v` version token if one was given."""
    out: dict[str, list[str]] = {}
    wanted = None
    for key, value in request.query.items():
        if key == "v":
            if wanted is not None:
                raise BadParameter("v: expected a single version token", parameter="v")
            if len(value) != TOKEN_LENGTH or value.strip("0123456789abcdef"):
                raise BadParameter(f"v: expected a {TOKEN_LENGTH}-character version token "
                                   "from /v1/version", parameter="v")
            wanted = value
        else:
            out.setdefault(key, []).append(value)
    return out, wanted


async def version_pointer(request: web.Request) -> web.Response:
    """`/v1/version`: current dataset versions and every endpoint's token. Tiny, short TTL."""
    body, tag = request.app[SERVING].pointer()
    headers = {"ETag": tag, "Cache-Control": request.app[SETTINGS].version_cache_control}
    if if_none_match(request.headers.get("If-None-Match"), tag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type="application/json", headers=headers)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    snap = request.app[STORE].current
    missing = [n for n, d in settings.datasets.items() if d.required and n not in snap.versions]
    if missing:
        return error_response(NotReady("waiting for datasets to load", missing=missing))
    if not request.app[WARMER].settled:  # data is served; answers are still being computed
        return error_response(NotReady("warming the first version's answers", warming=True))
    versions = {n: v.version_id for n, v in snap.versions.items()}
    updater = request.app[UPDATER]
    listed = updater.last_listed
    return json_response({
        "status": "ready", "versions": versions, "data_age_s": updater.data_age(),
        "source": {"url": updater.source.url, "errors": updater.source_errors,
                   "last_listed_age_s": round(time.time() - listed, 3) if listed else None},
    })


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format: cache hit ratio, loads and refusals, dataset versions, warming."""
    return web.Response(body=render(request.app[REGISTRY]),
                        headers={"Content-Type": CONTENT_TYPE, "Cache-Control": NO_STORE})


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = app[STORE]
    stop = asyncio.Event()
    app[WARMER].loop = asyncio.get_running_loop()
    task = asyncio.create_task(app[UPDATER].run(stop), name="duckswap-updater")
    probe = (asyncio.create_task(app[LOOP_LAG].run(), name="duckswap-loop-lag")
             if settings.metrics else None)
    yield
    if probe is not None:
        probe.cancel()
    stop.set()
    # A load in flight is abandoned after 5 s: shutdown must not hang on it.
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(task, timeout=5)
    app[RUNNER].close()
    app[UPDATER].close()
    store.close()
    app[DATA].close()
    gc.unfreeze()  # publishes froze the cache's objects; let the collector have them back
    log.info("stopped serving %s", settings.file)


def make_source(settings: Settings, staging: Path) -> Source:
    """The export source the URL names; gcsfs is imported only for `gs://`."""
    if settings.source_url.startswith("gs://"):
        from loaders.gcs import GcsSource

        return GcsSource(settings.source_url,
                         Path(settings.staging_dir) if settings.staging_dir else staging,
                         endpoint_url=settings.endpoint_url, token=settings.token,
                         concurrency=settings.concurrency, quiet_seconds=settings.quiet_seconds)
    root = settings.source_path
    root.mkdir(parents=True, exist_ok=True)
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
    # One lower-priority process builds versions and computes their warm answers.
    builder = Builder(nice=settings.build_nice, threads=settings.threads,
                      preload=("loaders.build", "serving.spool"), idle=settings.build_idle)
    warmer = Warmer(store, serving.cache, serving.popularity, settings.endpoints,
                    serving.fingerprints, serving.batch_sql, settings.warm_seconds,
                    settings.warm_keys, builder, settings.threads, settings.warm_tail_seconds,
                    settings.warm_busy_seconds, serving.constants.folded)
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
        builder=builder, poll_seconds=settings.poll_seconds, data=data,
        keep_versions=settings.keep_versions,
    )
    app[REGISTRY] = CollectorRegistry()
    app[REGISTRY].register(Metrics(store, serving.cache, app[UPDATER], warmer))
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
