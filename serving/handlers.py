"""The request handlers: declared endpoints (from the cache, else one query per key and
version), the version pointer, health, readiness and metrics; one error shape for all."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from engine.endpoints import EndpointSpec
from engine.errors import (
    ApiError,
    BadParameter,
    MethodNotAllowed,
    NotFound,
    NotReady,
    QueryFailed,
)
from engine.formats import FORMATS, encode_answer, with_format
from engine.openapi import document
from engine.params import ParamError, bind_params, cache_key
from engine.responses import (
    IMMUTABLE,
    NO_STORE,
    TOKEN_LENGTH,
    VERSION_CACHE_CONTROL,
    BodyEncoder,
    Entry,
    dumps,
    etag,
    if_none_match,
    versions_header,
)
from engine.settings import Settings
from engine.store import Snapshot
from serving.link import LOADER
from serving.state import SERVING, SETTINGS, STORE

log = logging.getLogger("duckswap.server")

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
    except web.HTTPMethodNotAllowed as exc:
        err = MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
        err.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))  # RFC 9110 15.5.6
        return error_response(err)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error on %s", request.path)
        return error_response(ApiError("internal error"))


def _entry_response(entry: Entry, version_token: str, cache_control: str,
                    content_type: str = FORMATS["json"]) -> web.Response:
    body, tag, versions = entry
    return web.Response(body=body, headers={
        "Content-Type": content_type,
        "ETag": tag,
        "Cache-Control": cache_control,
        "X-Duckswap-Token": version_token,
        "X-Duckswap-Versions": versions,
    })


def _not_modified(tag: str, cache_control: str, version_token: str) -> web.Response:
    return web.Response(status=304, headers={
        "ETag": tag, "Cache-Control": cache_control, "X-Duckswap-Token": version_token})


def endpoint_handler(spec: EndpointSpec) -> Handler:
    name = spec.name

    async def handle(request: web.Request) -> web.StreamResponse:
        start = time.perf_counter()
        serving = request.app[SERVING]
        try:
            app = request.app
            raw, wanted, fmt = _query(request)
            try:
                params = bind_params(spec.params, request.match_info, raw)
            except ParamError as exc:
                raise BadParameter(f"{exc.name}: {exc.message}", parameter=exc.name) from None
            key = with_format(cache_key(params), fmt)
            content_type = FORMATS[fmt]
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
                        return _entry_response(held, wanted, IMMUTABLE, content_type)
                    return _moved(request, tok)
                cache_control = spec.cache_control if wanted is None else IMMUTABLE
                tag = etag(tok, key)
                validator = request.headers.get("If-None-Match")
                if if_none_match(validator, tag):
                    return _not_modified(tag, cache_control, tok)
                entry = cache.lookup((tok, key), name)
                if entry is None:
                    entry = await _compute(app, spec, snap, tok, key, params, fmt)
                return _entry_response(entry, tok, cache_control, content_type)
            finally:
                store.release(snap)
        finally:
            serving.times.observe(name, time.perf_counter() - start)

    return handle


async def _compute(app: web.Application, spec: EndpointSpec, snap: Snapshot, tok: str,
                   key: tuple[Any, ...], params: dict[str, Any], fmt: str) -> Entry:
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
            result = await serving.batcher.run(spec, sql, snap, params, key)
        else:
            result = await serving.batcher.runner.run_endpoint(spec, params, serving.constants,
                                                                snap)
        versions = snap.version_ids(spec.datasets)
        entry = (
            encode_answer(fmt, BodyEncoder(spec, tok, versions), result.columns, result.types,
                          result.rows, result.truncated),
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
        if isinstance(exc, QueryFailed):  # once per failed query, not per waiter
            log.error("query of endpoint %s failed with %s: %s", spec.name,
                      ", ".join(f"{k}={v!r}" for k, v in sorted(params.items())), exc.detail)
            errors = app[SERVING].query_errors
            errors[(spec.name, exc.error)] = errors.get((spec.name, exc.error), 0) + 1
            exc.extra["endpoint"] = spec.name
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


def _query(request: web.Request) -> tuple[dict[str, list[str]], str | None, str]:
    """Query parameters, the `v` version token if one was given, and the format."""
    out: dict[str, list[str]] = {}
    wanted = None
    fmt = None
    for key, value in request.query.items():
        if key == "format":
            if fmt is not None:
                raise BadParameter("format: given more than once", parameter="format")
            if value not in FORMATS:
                raise BadParameter(f"format: expected one of {', '.join(FORMATS)}, got "
                                   f"{value!r}", parameter="format")
            fmt = value
        elif key == "v":
            if wanted is not None:
                raise BadParameter("v: expected a single version token", parameter="v")
            if len(value) != TOKEN_LENGTH or value.strip("0123456789abcdef"):
                raise BadParameter(f"v: expected a {TOKEN_LENGTH}-character version token "
                                   "from /v1/version", parameter="v")
            wanted = value
        else:
            out.setdefault(key, []).append(value)
    return out, wanted, fmt or "json"


def _no_query(request: web.Request) -> None:
    """A cacheable document takes no query parameters: each one would be another CDN key."""
    for name in request.query:
        raise BadParameter(f"{name}: unknown parameter", parameter=name)


async def version_pointer(request: web.Request) -> web.Response:
    """`/v1/version`: current dataset versions and every endpoint's token. Tiny, short TTL."""
    _no_query(request)
    body, tag = request.app[SERVING].pointer()
    headers = {"ETag": tag, "Cache-Control": VERSION_CACHE_CONTROL}
    if if_none_match(request.headers.get("If-None-Match"), tag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type="application/json", headers=headers)


OPENAPI_CACHE_CONTROL = "public, max-age=300"  # it changes only with the config (a restart)


def openapi_handler(settings: Settings) -> Handler:
    """`/openapi.json`: the config's OpenAPI document, built once, with an ETag."""
    body = dumps(document(settings))
    tag = f'"{hashlib.blake2b(body, digest_size=8).hexdigest()}"'
    headers = {"ETag": tag, "Cache-Control": OPENAPI_CACHE_CONTROL}

    async def handle(request: web.Request) -> web.Response:
        _no_query(request)
        if if_none_match(request.headers.get("If-None-Match"), tag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type="application/json", headers=headers)

    return handle


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"}, headers={"Cache-Control": NO_STORE})


async def readyz(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    serving = request.app[SERVING]
    if serving.stopping:
        return error_response(NotReady("shutting down", stopping=True))
    snap = request.app[STORE].current
    status = serving.status
    missing = [n for n, d in settings.datasets.items() if d.required and n not in snap.versions]
    if missing:
        pending = status.get("pending", {})
        return error_response(NotReady(
            "waiting for datasets to load", missing=missing,
            pending={n: [p["export_id"] for p in pending.get(n, [])] for n in missing},  # ids
            source_problem=status.get("source_problem")))
    awaiting = {d: e for d, e in status.get("named", {}).items()
                if (v := snap.versions.get(d)) is None or v.export_id != e}
    if awaiting:  # serving what it kept, not yet the exports its config names
        return error_response(NotReady("waiting for the exports the config names (serving "
                                       "what the data dir kept meanwhile)", awaiting=awaiting))
    if not status.get("settled"):  # data is served; answers are still being computed
        return error_response(NotReady("warming the first version's answers", warming=True))
    now = time.time()
    listed = status.get("last_listed")
    return json_response({
        "status": "ready",
        "versions": {n: v.version_id for n, v in snap.versions.items()},
        "data_age_s": {n: round(now - v.loaded_at, 3) for n, v in snap.versions.items()},
        "source": {"url": status.get("source_url"), "errors": status.get("source_errors", 0),
                   "last_listed_age_s": round(now - listed, 3) if listed else None},
    }, headers={"Cache-Control": NO_STORE})


STATUS_CONTENT_TYPE = "text/html; charset=utf-8"


async def status_page(request: web.Request) -> web.Response:
    """The status page, rendered by the loader (`loaders.status`); what only admins see is at
    `/admin/status`."""
    body = await request.app[LOADER].page(False)
    return web.Response(body=body, headers={"Content-Type": STATUS_CONTENT_TYPE,
                                            "Cache-Control": NO_STORE})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format, rendered by the loader: its state and every worker's counts."""
    body, content_type = await request.app[LOADER].metrics()
    return web.Response(body=body, headers={"Content-Type": content_type,
                                            "Cache-Control": NO_STORE})
