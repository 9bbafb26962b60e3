"""One assembly point: create_app(settings) wires the store, the query pool and the updater."""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from loaders.snapshot import Store
from loaders.source import LocalSource
from loaders.updater import Updater
from serving.errors import ApiError, BadParameter, MethodNotAllowed, NotFound, NotReady
from serving.params import ParamError, bind_params
from serving.query import QueryRunner
from serving.settings import EndpointSpec, Settings

log = logging.getLogger("duckswap.server")

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
RUNNER = web.AppKey("runner", QueryRunner)
UPDATER = web.AppKey("updater", Updater)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return float(value)
    return str(value)


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body, default=_default, option=orjson.OPT_NON_STR_KEYS),
        status=status,
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return json_response(exc.body(), exc.status, exc.headers)
    except web.HTTPNotFound:
        err: ApiError = NotFound(f"no route for {request.path}")
        return json_response(err.body(), err.status)
    except web.HTTPMethodNotAllowed:
        err = MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
        return json_response(err.body(), err.status)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error on %s", request.path)
        return json_response(ApiError("internal error").body(), 500)


def endpoint_handler(spec: EndpointSpec) -> Handler:
    datasets = spec.datasets

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            params = bind_params(spec.params, request.match_info, _query(request))
        except ParamError as exc:
            raise BadParameter(f"{exc.name}: {exc.message}", parameter=exc.name) from None
        result = await request.app[RUNNER].run(spec.sql, datasets, params, spec.row_limit)
        cols = result.columns
        body = {
            "data": [dict(zip(cols, row, strict=True)) for row in result.rows],
            "meta": {
                "endpoint": spec.name,
                "versions": result.versions,
                "rows": len(result.rows),
                "truncated": result.truncated,
            },
        }
        header = ",".join(f"{d}={v}" for d, v in result.versions.items())
        return json_response(body, headers={"X-Duckswap-Versions": header})

    return handle


def _query(request: web.Request) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in request.query.items():
        out.setdefault(key, []).append(value)
    return out


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    snap = request.app[STORE].current
    missing = [n for n, d in settings.datasets.items() if d.required and n not in snap.versions]
    if missing:
        err = NotReady("waiting for datasets to load", missing=missing)
        return json_response(err.body(), err.status, err.headers)
    versions = {n: v.version_id for n, v in snap.versions.items()}
    return json_response({"status": "ready", "versions": versions})


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = app[STORE]
    stop = asyncio.Event()
    task = asyncio.create_task(app[UPDATER].run(stop), name="duckswap-updater")
    yield
    stop.set()
    # A load in flight is abandoned after 5 s: shutdown must not hang on it.
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(task, timeout=5)
    app[RUNNER].close()
    store.close()
    log.info("stopped serving %s", settings.file)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    store = Store(threads=settings.threads)
    source_root = settings.source_path
    source_root.mkdir(parents=True, exist_ok=True)
    app[SETTINGS] = settings
    app[STORE] = store
    app[RUNNER] = QueryRunner(store, settings.threads, settings.query_timeout)
    app[UPDATER] = Updater(
        LocalSource(source_root), store, settings.datasets, debounce_ms=settings.debounce_ms
    )
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    for spec in settings.endpoints.values():
        app.router.add_get(spec.path, endpoint_handler(spec), name=spec.name)
    app.cleanup_ctx.append(_lifecycle)
    return app
