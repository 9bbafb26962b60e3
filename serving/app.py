"""`create_app`: a whole server in one process, the loader and one HTTP worker
(`serving.worker.create_worker_app`) linked by calls: tests and embedding. `duckswap serve` runs
them as processes (`serving.cli`, `loaders.supervisor`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from engine.settings import Settings
from loaders.loader import Loader
from loaders.state import DataDir
from loaders.updater import Updater
from loaders.warm import Warmer, WarmPolicy
from loaders.workers import Workers
from serving.link import LOADER, LoaderLink
from serving.worker import WORKER, create_worker_app

# In one process (`create_app`) only: the loader's parts, for tests and embedding.
UPDATER = web.AppKey("updater", Updater)
WARMER = web.AppKey("warmer", Warmer)
DATA = web.AppKey("data", DataDir)


class LocalLoader:
    """The loader, reached by calls from a worker in its process."""

    def __init__(self, loader: Loader, worker: str) -> None:
        self.loader = loader
        self.worker = worker

    async def admin(self, method: str, path: str, body: bytes | None,
                    remote: str | None) -> tuple[int, Any]:
        return await self.loader.admin(method, path, body, remote)

    async def metrics(self) -> tuple[bytes, str]:
        return await self.loader.metrics()

    async def page(self, admin: bool) -> bytes:
        return await self.loader.page(admin)

    def drained(self, snap_ids: list[int]) -> None:
        self.loader.drained(self.worker, snap_ids)


def create_app(settings: Settings, warm: WarmPolicy | None = None) -> web.Application:
    """A whole server in one process: the loader and one worker."""
    workers = Workers()
    loader = Loader(settings, workers, warm or WarmPolicy())
    app = create_worker_app(settings, "worker-1", loader.data.versions, loader.data.answers)
    workers.add(app[WORKER])
    link: LoaderLink = LocalLoader(loader, app[WORKER].name)
    app[LOADER] = link
    app[UPDATER] = loader.updater
    app[WARMER] = loader.warmer
    app[DATA] = loader.data

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(loader.run(stop), name="duckswap-loader")
        yield
        await loader.shutdown(stop, task)

    app.cleanup_ctx.append(lifecycle)
    return app
