"""The HTTP workers as the loader sees them: publish two-phase across all of them (stage on
every one, then commit on every one), ask them for their hot keys and their counts, tell them
the loader's status. A link is a worker in this process (tests) or a worker process reached
over its control socket (`loaders.supervisor`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from engine.store import Snapshot
from loaders.errors import Unavailable
from loaders.warm import HotReport

log = logging.getLogger("duckswap.loader")
T = TypeVar("T")
STAGE_SECONDS = 120.0  # the longest a worker may take to attach a Snapshot's files


class WorkerLink(Protocol):
    name: str
    pid: int  # its process
    async def stage(self, snap: Snapshot) -> None:
        """Attach `snap`'s files and open its answers; not served yet."""

    async def commit(self, snap: Snapshot) -> None:
        """Serve `snap` (staged first if it was not)."""

    async def hot(self, old_tokens: Mapping[str, str | None], n: int, folder: Path,
                  tag: str) -> tuple[str, float, int]:
        """See `loaders.warm.HotKeys`: (its file, the interval's seconds, would-be misses)."""

    async def counters(self) -> dict[str, Any]:
        """Its counts for `/metrics`."""

    def status(self, doc: dict[str, Any]) -> None:
        """The loader's status (readiness, pending exports), for its `/readyz`."""

    def kill(self) -> None:
        """End it now (it could not serve what every other worker serves)."""


class WorkerGone(Exception):
    """The worker exited while the loader waited for it."""


class Workers:
    """Every worker serving now. The updater calls `stage`, `commit` and `__call__` from the
    loader thread; they run on the event loop `loop`."""

    def __init__(self) -> None:
        self.links: dict[str, WorkerLink] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.restarts = 0

    def add(self, link: WorkerLink) -> None:
        self.links[link.name] = link

    def remove(self, name: str) -> None:
        self.links.pop(name, None)

    def holders(self) -> list[str]:
        return list(self.links)

    def _each(self, call: Callable[[WorkerLink], Awaitable[T]],
              timeout: float) -> dict[str, T | BaseException]:
        """`call` on every worker at once, from the loader thread; a worker that exits
        meanwhile is left out (it gets the current Snapshot when it starts again)."""
        loop = self.loop
        if loop is None or not self.links:
            return {}
        links = list(self.links.values())

        async def each() -> list[T | BaseException]:
            return await asyncio.gather(*(call(link) for link in links),
                                        return_exceptions=True)

        results = asyncio.run_coroutine_threadsafe(each(), loop).result(timeout)
        out: dict[str, T | BaseException] = {}
        for link, result in zip(links, results, strict=True):
            if isinstance(result, WorkerGone) or link.name not in self.links:
                continue
            out[link.name] = result
        return out

    def stage(self, snap: Snapshot) -> None:
        for name, result in self._each(lambda link: link.stage(snap), STAGE_SECONDS).items():
            if isinstance(result, BaseException):
                log.error("worker %s could not stage snapshot %d: %s", name, snap.id, result)
                raise Unavailable(f"worker {name} could not open the new version: {result}")

    def commit(self, snap: Snapshot) -> None:
        for name, result in self._each(lambda link: link.commit(snap), STAGE_SECONDS).items():
            if isinstance(result, BaseException):  # it would go on serving the old one:
                log.error("worker %s could not serve snapshot %d (%s); ending it (it starts "
                          "again on the current one)", name, snap.id, result)
                link = self.links.get(name)
                if link is not None:
                    link.kill()

    def __call__(self, old_tokens: Mapping[str, str | None], n: int, folder: Path,
                 tag: str) -> HotReport:
        report = HotReport()
        got = self._each(lambda link: link.hot(old_tokens, n, folder, tag), STAGE_SECONDS)
        for name, result in got.items():
            if isinstance(result, BaseException):
                log.warning("worker %s could not report its hot keys: %s", name, result)
                continue
            path, seconds, missed = result
            report.files.append(path)
            report.seconds = max(report.seconds, seconds)
            report.would_miss += missed
        return report

    async def counters(self) -> list[dict[str, Any]]:
        links = list(self.links.values())
        results = await asyncio.gather(*(link.counters() for link in links),
                                       return_exceptions=True)
        return [r for r in results if isinstance(r, dict)]

    def pids(self) -> list[int]:
        return sorted(link.pid for link in list(self.links.values()))

    def push_status(self, doc: dict[str, Any]) -> None:
        for link in list(self.links.values()):
            link.status(doc)
