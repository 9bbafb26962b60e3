"""The update path: notice complete exports, load the newest aside, publish, retire the old."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import watchfiles

from loaders.build import remove_version_file, validate_files, verify
from loaders.builder import Builder
from loaders.schema import DatasetSchema, LoadError, Unavailable
from loaders.snapshot import Snapshot, Store, Version
from loaders.source import Export, LocalSource, Source, is_ignored

log = logging.getLogger("duckswap.loader")


def backoff_delay(failures: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Exponential backoff with full jitter after `failures` consecutive failures."""
    return random.uniform(base, min(cap, base * 2 ** failures))


def lower_priority(nice: int) -> None:
    """Raise this thread's nice value (Linux schedules threads separately); best effort."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:
        log.warning("could not lower the loader thread's priority: %s", exc)


@dataclass(frozen=True)
class LoadEvent:
    dataset: str
    export_id: str
    ok: bool
    reason: str
    seconds: float
    version_id: str | None = None


class Updater:
    def __init__(
        self,
        source: Source,
        store: Store,
        schemas: Mapping[str, DatasetSchema],
        debounce_ms: int = 200,
        before_publish: Callable[[Snapshot], object] | None = None,
        after_publish: Callable[[Snapshot], object] | None = None,
        nice: int = 0,
        builder: Builder | None = None,
        poll_seconds: float = 5.0,
    ) -> None:
        self.source = source
        self.store = store
        self.schemas = dict(schemas)
        self.debounce_ms = debounce_ms
        self.before_publish = before_publish
        self.after_publish = after_publish
        self.builder = builder or Builder()
        # Builds, warming and collection share one thread, below the request threads' priority.
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix="duckswap-loader", initializer=lower_priority, initargs=(nice,)
        )
        self.refused: dict[tuple[str, str], str] = {}  # (dataset, export id) -> reason
        # (dataset, export id) -> fingerprint when refused: retried only once it changes
        self.quarantine: dict[tuple[str, str], str] = {}
        self.last_listed: float | None = None  # when the source last answered a listing
        self.poll_seconds = poll_seconds
        self.source_errors = 0
        self.history: list[LoadEvent] = []
        self.outcomes: Counter[tuple[str, str]] = Counter()

    def refresh(self, datasets: Iterable[str] | None = None) -> list[LoadEvent]:
        """Load the newest complete export of each dataset not served yet, and publish them
        together in one Snapshot (after `before_publish`, which warms it). Raises what the
        source raises when it cannot be listed (the caller backs off)."""
        events = []
        built: list[Version] = []
        for name in sorted(self.schemas if datasets is None else set(datasets)):
            if name not in self.schemas:
                continue
            exports = self.source.complete_exports(name)
            self.last_listed = time.time()
            if not exports:
                continue
            newest = exports[-1]
            current = self.store.current.versions.get(name)
            if current is not None and current.export_id >= newest.export_id:
                continue
            if self.quarantine.get((name, newest.export_id)) == newest.fingerprint:
                continue  # refused, and unchanged since
            event, version = self._build(newest)
            events.append(event)
            if version is not None:
                built.append(version)
        if built:
            self._publish(built)
        return events

    def _publish(self, built: list[Version]) -> None:
        start = time.perf_counter()
        snap = self.store.stage(built)
        if self.before_publish is not None:
            try:
                self.before_publish(snap)
            except Exception:  # warming is an optimisation: never block a publish
                log.exception("warming snapshot %d failed; publishing it cold", snap.id)
        self.store.commit(snap)
        # The cache now holds ~10^5 long-lived objects: move everything alive into the
        # permanent generation so the cyclic GC stops re-scanning it (its pauses were tail
        # latency). Objects freed later are still reclaimed by reference counting.
        gc.freeze()
        log.info(
            "published %s in %.3fs after the build",
            ", ".join(f"{v.dataset}/{v.export_id} as {v.version_id}" for v in built),
            time.perf_counter() - start,
        )
        if self.after_publish is not None:
            try:
                self.after_publish(snap)
            except Exception:
                log.exception("warming snapshot %d after its publish failed", snap.id)
            gc.freeze()

    def _build(self, candidate: Any) -> tuple[LoadEvent, Version | None]:
        schema = self.schemas[candidate.dataset]
        start = time.perf_counter()
        local: Export | None = None
        try:
            local = self.source.fetch(candidate)
            version_id, expected_rows = verify(local)
            validate_files(local, schema, expected_rows)
            path = self.store.new_version_path(local.dataset, version_id)
            rows = self.builder.build(local, schema, path)
            try:
                db = self.store.attach(path)
            except duckdb.Error as exc:
                remove_version_file(path)
                raise LoadError(f"attaching the built version failed: {exc}") from None
            version = Version(
                local.dataset, version_id, local.export_id, db, rows,
                time.perf_counter() - start, path,
            )
        except Unavailable as exc:  # not the export's fault: tried again at the next poll
            log.warning("could not fetch export %s/%s: %s (retrying later)",
                        candidate.dataset, candidate.export_id, exc)
            return LoadEvent(candidate.dataset, candidate.export_id, False, str(exc),
                             time.perf_counter() - start), None
        except (LoadError, OSError) as exc:
            reason = str(exc)
            self.refused[(candidate.dataset, candidate.export_id)] = reason
            self.quarantine[(candidate.dataset, candidate.export_id)] = candidate.fingerprint
            event = LoadEvent(
                candidate.dataset, candidate.export_id, False, reason,
                time.perf_counter() - start,
            )
            log.error(
                "refused export %s/%s: %s (previous version keeps serving)",
                candidate.dataset, candidate.export_id, reason,
            )
            self._record(event)
            return event, None
        finally:
            if local is not None:
                self.source.discard(local)
        event = LoadEvent(
            local.dataset, local.export_id, True, "", version.load_seconds, version_id
        )
        log.info(
            "built %s/%s as version %s: %d rows in %.3fs",
            local.dataset, local.export_id, version_id, rows, version.load_seconds,
        )
        self._record(event)
        return event, version

    def _record(self, event: LoadEvent) -> None:
        self.outcomes[(event.dataset, "ok" if event.ok else "refused")] += 1
        self.history.append(event)
        del self.history[:-1000]

    def _watch_filter(self, change: watchfiles.Change, path: str) -> bool:
        return not is_ignored(Path(path).name)

    async def run(self, stop: asyncio.Event) -> None:
        """Initial scan, then watch the folder (or poll the bucket) until `stop` is set."""
        collector = asyncio.create_task(self._collect_forever(stop))
        try:
            if isinstance(self.source, LocalSource):
                await self._refresh_logged(None)
                await self._watch(self.source, stop)
            else:
                await self._poll(stop)
        finally:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _refresh_logged(self, datasets: set[str] | None) -> bool:
        """One refresh in the loader thread; False (logged, nothing else) when the source
        could not be listed: the served data stays, and the caller tries again later."""
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self.refresh, datasets)
        except Exception as exc:  # a source outage must never stop the watcher
            self.source_errors += 1
            log.warning("listing %s failed (%s); serving data %s old, retrying", self.source.url,
                        type(exc).__name__, self.data_age_text())
            return False
        return True

    async def _watch(self, source: LocalSource, stop: asyncio.Event) -> None:
        async for changes in watchfiles.awatch(
            source.root,
            stop_event=stop,
            debounce=self.debounce_ms,
            step=20,
            watch_filter=self._watch_filter,
            recursive=True,
        ):
            names = {source.dataset_of(Path(p)) for _, p in changes}
            touched = {n for n in names if n is not None}
            if touched:
                await self._refresh_logged(touched)

    async def _poll(self, stop: asyncio.Event) -> None:
        """List every `poll_seconds`; after failures, back off (jittered, up to 60 s)."""
        failures = 0
        while not stop.is_set():
            if await self._refresh_logged(None):
                failures = 0
                delay = self.poll_seconds
            else:
                failures += 1
                delay = min(60.0, max(self.poll_seconds, backoff_delay(failures)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    def data_age(self) -> dict[str, float]:
        """Seconds since each served version was loaded."""
        now = time.time()
        return {n: round(now - v.loaded_at, 3) for n, v in self.store.current.versions.items()}

    def data_age_text(self) -> str:
        ages = self.data_age()
        return f"{max(ages.values()):.0f}s" if ages else "(none loaded)"

    def close(self) -> None:
        self.builder.close()

    async def _collect_forever(self, stop: asyncio.Event) -> None:
        """Retire drained Snapshots; wakes often, works only when there is garbage."""
        while not stop.is_set():
            if self.store.has_garbage():
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.store.collect)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.1)
