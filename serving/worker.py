"""An HTTP worker's side of what the loader says: stage a Snapshot, serve it, report hot keys,
the loader's status, counts for `/metrics`; and the collector that drops drained Snapshots."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web

from engine.answers import AnswersFile, path_of
from engine.channel import Channel
from engine.precompute import HOT_SLICE, write_hot
from engine.query import QueryRunner
from engine.settings import Settings
from engine.store import Replica, Snapshot
from serving.admin import add_routes
from serving.cache import hottest, would_miss
from serving.handlers import (
    endpoint_handler,
    error_middleware,
    healthz,
    metrics,
    openapi_handler,
    readyz,
    status_page,
    version_pointer,
)
from serving.link import LOADER
from serving.state import RUNNER, SERVING, SETTINGS, STORE, Serving

log = logging.getLogger("duckswap.worker")


class Worker:
    def __init__(self, app: web.Application, name: str, answers: Path) -> None:
        self.app = app
        self.name = name
        self.pid = os.getpid()
        self.answers = answers
        self.serving = app[SERVING]
        self.store = app[STORE]
        self._reported: dict[str, frozenset[tuple[Any, ...]]] = {}  # hot keys reported last
        # Attaching and dropping Snapshots run here, off the event loop, one at a time.
        self._ddl = ThreadPoolExecutor(1, thread_name_prefix="duckswap-attach")

    async def stage(self, snap: Snapshot) -> None:
        """Attach `snap`'s version files and open its answers files (off the event loop)."""
        loop, cache = asyncio.get_running_loop(), self.serving.cache
        await loop.run_in_executor(self._ddl, self.store.stage, snap)
        files = {t: path_of(self.answers, t) for t in self.serving.tokens(snap).values()}
        cache.serve(await loop.run_in_executor(self._ddl, cache.open, files))

    async def commit(self, snap: Snapshot) -> None:
        """Serve `snap` (one assignment; staged first if it was not: a worker that started
        after the stage); the answers of versions neither served nor just replaced are let
        go."""
        if snap.id <= self.store.current.id:  # served already, or older than what is (a
            return  # worker starting while a publish reaches it: never go back)
        if not self.store.is_staged(snap.id):
            await self.stage(snap)
        old = self.store.current
        self.store.commit(snap.id)
        live = frozenset(self.serving.tokens(snap).values()) | frozenset(
            self.serving.tokens(old).values())
        task = asyncio.create_task(self.serving.cache.retain(live))
        task.add_done_callback(_log_failure)

    def status(self, doc: dict[str, Any]) -> None:
        self.serving.status = doc

    def kill(self) -> None:
        """In one process (`serving.app.create_app`) there is nothing to end: logged."""
        log.error("worker %s could not serve the new snapshot", self.name)

    async def counters(self) -> dict[str, Any]:
        return self.serving.counters()

    async def hot(self, old_tokens: Mapping[str, str | None], n: int, folder: Path,
                  tag: str) -> tuple[str, float, int]:
        """Write the `n` most requested keys of each endpoint named into a file of its own,
        count the requests since the last call that a publish with only the hot keys reported
        then would have met with misses; a new interval starts. Returns (the file, the
        interval's seconds, those requests).
        On the event loop only the counts are copied (~0.3 ms per 20,000 keys); picking the
        top keys, pickling them and looking the window up in the old answers run on a thread
        (on the loop they held it ~30 ms under load), whose bytecode gives the loop the GIL
        back every switch interval."""
        pop, cache = self.serving.popularity, self.serving.cache
        window, seconds = pop.take_window()  # not touched again by the request path
        counts = pop.counts(old_tokens)
        old = {name: cache.answers(token) for name, token in old_tokens.items() if token}
        path = folder / f"hot-{tag}-{self.name}.pickle"
        missed = await asyncio.to_thread(self._write_hot, path, list(old_tokens), counts,
                                         window, old, n)
        return str(path), seconds, missed

    def _write_hot(self, path: Path, names: list[str],
                   counts: Mapping[str, Mapping[tuple[Any, ...], int]],
                   window: Mapping[str, Mapping[tuple[Any, ...], int]],
                   old: Mapping[str, AnswersFile | None], n: int) -> int:
        missed = 0
        with path.open("wb") as out:
            for name in names:
                keys = hottest(counts.get(name, {}), n)
                for start in range(0, len(keys), HOT_SLICE):  # one C call holds the GIL
                    write_hot(out, name, keys[start:start + HOT_SLICE])
                now = frozenset(k for k, _ in keys)
                # Out of sample: the requests since the last warm against the hot keys
                # reported then (after a start, none: every such request counts).
                earlier, self._reported[name] = self._reported.get(name, now), now
                if name in window and old.get(name) is not None:
                    missed += would_miss(window[name], earlier, old[name])
        return missed

    def close(self) -> None:
        """Wait for an attach or a drop in progress (the Replica closes next)."""
        self._ddl.shutdown(wait=True, cancel_futures=True)

    async def collect_forever(self) -> None:
        """Drop drained Snapshots, tell the loader; wakes often, works only when there is
        garbage. Until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            if self.store.has_garbage():
                dropped = await loop.run_in_executor(self._ddl, self.store.collect)
                if dropped:
                    self.app[LOADER].drained(dropped)
            await asyncio.sleep(0.1)


def _log_failure(task: asyncio.Task[None]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        if task.exception() is not None:
            log.error("letting go of old answers failed", exc_info=task.exception())


WORKER = web.AppKey("worker", Worker)


async def _worker_lifecycle(app: web.Application) -> AsyncIterator[None]:
    serving = app[SERVING]
    tasks = [asyncio.create_task(app[WORKER].collect_forever(), name="duckswap-collect"),
             asyncio.create_task(serving.lag.run(), name="duckswap-loop-lag")]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().run_in_executor(None, app[WORKER].close)
    app[RUNNER].close()
    serving.cache.close()
    app[STORE].close()


def create_worker_app(settings: Settings, name: str, versions: Path, answers: Path,
                      workers: int = 1) -> web.Application:
    """One HTTP worker: it serves what the loader stages and commits on it (`app[WORKER]`),
    and asks the loader (`app[LOADER]`, set by the caller) for the rest."""
    app = web.Application(middlewares=[error_middleware])
    # Each query runs on one DuckDB thread and the pool runs `threads` of them at once: point
    # lookups and small aggregates gain nothing from intra-query parallelism, and two queries
    # each fanning out over both cores measured ~45% fewer queries per second on the demo mix.
    store = Replica(versions, threads=1)
    runner = QueryRunner(store, settings.threads, settings.query_timeout)
    app[SETTINGS] = settings
    app[STORE] = store
    app[RUNNER] = runner
    app[SERVING] = Serving(settings, store, runner, workers)
    app[WORKER] = Worker(app, name, answers)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/version", version_pointer)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_handler(settings))
    app.router.add_get("/status", status_page)
    app.router.add_get("/", status_page)
    if settings.admin_token:
        add_routes(app, settings.admin_token)
    for spec in settings.endpoints.values():
        app.router.add_get(spec.path, endpoint_handler(spec), name=spec.name)
    app.cleanup_ctx.append(_worker_lifecycle)
    return app


class ChannelLoader:
    """The loader, reached over the worker process's control socket."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    async def admin(self, method: str, path: str, body: bytes | None,
                    remote: str | None) -> tuple[int, Any]:
        result: tuple[int, Any] = await self.channel.call("admin", method, path, body, remote)
        return result

    async def metrics(self) -> tuple[bytes, str]:
        result: tuple[bytes, str] = await self.channel.call("metrics")
        return result

    async def page(self, admin: bool) -> bytes:
        result: bytes = await self.channel.call("page", admin)
        return result

    def drained(self, snap_ids: list[int]) -> None:
        self.channel.note("drained", snap_ids)


async def _serve(sock: socket.socket) -> int:
    """The worker process: set up from the loader's `init`, serve the Snapshot it names,
    listen, then follow the loader's messages until it says `stop` (or goes away)."""
    from aiohttp.log import access_logger

    reader, writer = await asyncio.open_unix_connection(sock=sock)
    ready: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()
    stopped: asyncio.Future[tuple[float, float]] = asyncio.get_running_loop().create_future()
    worker: Worker | None = None
    built = asyncio.Event()  # the app exists: messages other than init wait for it

    async def handle(op: str, args: tuple[Any, ...]) -> Any:
        if op == "init":
            ready.set_result(args)
            return None
        if op == "stop":
            if not stopped.done():
                stopped.set_result(args)
            return None
        await built.wait()
        assert worker is not None, op
        if op == "stage":
            return await worker.stage(*args)
        if op == "commit":
            return await worker.commit(*args)
        if op == "hot":
            return await worker.hot(*args)
        if op == "counters":
            return await worker.counters()
        if op == "status":
            return worker.status(*args)
        raise ValueError(f"unknown message {op!r}")

    channel = Channel(reader, writer, handle)
    reading = asyncio.create_task(channel.run())
    settings, name, versions, answers, count, host, port, current = await ready
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s [{name}]: %(message)s")
    loop = type(asyncio.get_running_loop())
    log.info("event loop: %s.%s", loop.__module__, loop.__qualname__)
    app = create_worker_app(settings, name, versions, answers, count)
    # What start-up built (modules, the app: ~54,000 objects) lives as long as the process:
    # out of the collector's sight, a full collection walks ~5,000 objects, not ~59,000 (a
    # 28-30 ms stall of the event loop at 5000 req/s, ~9 ms after; ARCHITECTURE.md).
    gc.freeze()
    app[LOADER] = ChannelLoader(channel)
    worker = app[WORKER]
    built.set()
    # At DEBUG every request is logged (at thousands a second it costs more than the answers).
    debug = logging.getLevelName(settings.log_level.upper()) == logging.DEBUG
    runner = web.AppRunner(app, access_log=access_logger if debug else None,
                           shutdown_timeout=settings.shutdown_seconds)
    await runner.setup()
    if current.id:
        await worker.commit(current)  # what is served now, before the first request
    await web.TCPSite(runner, host, port, reuse_port=True, backlog=BACKLOG).start()
    channel.note("listening", os.getpid())
    waiters: list[asyncio.Future[Any]] = [reading, stopped]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if stopped.done():
        drain, _ = stopped.result()
        app[SERVING].stopping = True
        if drain > 0:
            await asyncio.sleep(drain)
    await runner.cleanup()
    channel.close()
    return 0


def main() -> None:
    """`python -m serving.worker FD`: a worker process the loader started, its control socket
    on file descriptor FD. It ignores SIGINT and SIGTERM (the loader stops it, in order) and
    exits when the loader does, however the loader ends."""
    from engine.lifeline import exit_with
    from serving.cli import new_event_loop

    exit_with(os.getppid())
    with contextlib.suppress(OSError):  # Linux: the name `ps -o comm`, `top` and the bench show
        Path("/proc/self/comm").write_text(NAME)
    sock = socket.socket(fileno=int(sys.argv[1]))
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        code = loop.run_until_complete(_serve(sock))
    finally:
        loop.close()
    os._exit(code)  # no interpreter teardown: a query thread may be mid-query


NAME = "duckswap-http"  # what `ps` and `top` show
BACKLOG = 2048  # as `serving.cli.BACKLOG`

if __name__ == "__main__":
    main()
