"""The watcher: notices new exports and has the Updater load them.

A folder is watched with watchfiles (and listed anyway every `RESCAN_SECONDS` without events);
a bucket is listed every `poll_seconds`, backing off after failures. A listing that fails is
logged and tried again later: the served data stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING

import watchfiles

from loaders.source import LocalSource, is_ignored

if TYPE_CHECKING:
    from loaders.updater import Updater

log = logging.getLogger("duckswap.loader")
RESCAN_SECONDS = 30  # a watched folder is listed at least this often


def backoff_delay(failures: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Exponential backoff with full jitter after `failures` consecutive failures."""
    return random.uniform(base, min(cap, base * 2 ** failures))


class Watcher:
    def __init__(self, updater: Updater, debounce_ms: int = 200,
                 poll_seconds: float = 5.0) -> None:
        self.updater = updater
        self.debounce_ms = debounce_ms
        self.poll_seconds = poll_seconds

    async def run(self, stop: asyncio.Event) -> None:
        """Watch the folder (or poll the bucket) until `stop` is set."""
        source = self.updater.source
        if isinstance(source, LocalSource):
            await self._watch(source, stop)
        else:
            await self._poll(stop)

    async def _refresh(self, datasets: set[str] | None) -> bool:
        """One refresh in the loader thread; False (logged, nothing else) when the source
        could not be listed: the served data stays, and the caller tries again later."""
        updater = self.updater
        try:
            await updater.act(updater.refresh, datasets)
        except Exception as exc:  # a source outage must never stop the watcher
            updater.source_errors += 1
            log.warning("listing %s failed (%s); serving data %s old, retrying",
                        updater.source.url, type(exc).__name__, updater.data_age_text())
            return False
        return True

    @staticmethod
    def _filter(change: watchfiles.Change, path: str) -> bool:
        return not is_ignored(Path(path).name)

    async def _watch(self, source: LocalSource, stop: asyncio.Event) -> None:
        """Watch first, then scan: an export landing during the initial scan (or during a
        long first load) is an event, never missed. Every `RESCAN_SECONDS` without events
        (every second with a quiet period, whose exports complete without any event) the
        folder is listed anyway: a lost notification costs seconds, not an export. A group
        with a run complete in some of its datasets only is listed every second, so the run
        is reported once it is overdue."""
        updater = self.updater
        while not source.root.is_dir():  # watchfiles needs the folder: wait for it
            updater.source_problem = f"source folder {source.root} does not exist"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            if stop.is_set():
                return
        if updater.source_problem is not None:
            log.info("source folder %s exists now: watching it", source.root)
            updater.source_problem = None
        # Runs from awatch's first await, once its watcher exists (created before any await).
        scan = asyncio.create_task(self._refresh(None))
        often = source.quiet_seconds > 0 or bool(updater.groups)
        loop = asyncio.get_running_loop()
        listed = loop.time()
        async for changes in watchfiles.awatch(
            source.root,
            stop_event=stop,
            debounce=self.debounce_ms,
            step=20,
            watch_filter=self._filter,
            recursive=True,
            rust_timeout=1000 if often else RESCAN_SECONDS * 1000,
            yield_on_timeout=True,
        ):
            if not changes:
                if source.quiet_seconds > 0 or loop.time() - listed >= RESCAN_SECONDS - 0.5:
                    listed = loop.time()
                    await self._refresh(None)
                elif updater.pending_runs:
                    await self._refresh({d for g in list(updater.pending_runs)
                                         for d in updater.groups[g].datasets})
                continue
            names = {source.dataset_of(Path(p)) for _, p in changes}
            touched = {n for n in names if n is not None}
            if touched:
                await self._refresh(touched)
        await scan

    async def _poll(self, stop: asyncio.Event) -> None:
        """List every `poll_seconds`; after failures, back off (jittered, up to 60 s)."""
        failures = 0
        while not stop.is_set():
            if await self._refresh(None):
                failures = 0
                delay = self.poll_seconds
            else:
                failures += 1
                delay = min(60.0, max(self.poll_seconds, backoff_delay(failures)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
