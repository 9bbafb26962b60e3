"""The update path: notice complete exports, load the newest aside, publish, retire the old."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import watchfiles

from loaders.build import load_table, validate_files, verify
from loaders.schema import DatasetSchema, LoadError
from loaders.snapshot import Store, Version
from loaders.source import Export, LocalSource, is_ignored

log = logging.getLogger("duckswap.loader")


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
        source: LocalSource,
        store: Store,
        schemas: Mapping[str, DatasetSchema],
        debounce_ms: int = 200,
    ) -> None:
        self.source = source
        self.store = store
        self.schemas = dict(schemas)
        self.debounce_ms = debounce_ms
        self.refused: dict[tuple[str, str], str] = {}
        self.history: list[LoadEvent] = []

    def refresh(self, datasets: Iterable[str] | None = None) -> list[LoadEvent]:
        """Load the newest complete export of each dataset if it is not served yet."""
        events = []
        for name in sorted(self.schemas if datasets is None else set(datasets)):
            if name not in self.schemas:
                continue
            exports = self.source.complete_exports(name)
            if not exports:
                continue
            newest = exports[-1]
            current = self.store.current.versions.get(name)
            if current is not None and current.export_id >= newest.export_id:
                continue
            if (name, newest.export_id) in self.refused:
                continue
            events.append(self._load(newest))
        return events

    def _load(self, export: Export) -> LoadEvent:
        schema = self.schemas[export.dataset]
        start = time.perf_counter()
        table = None
        try:
            version_id, expected_rows = verify(export)
            validate_files(export, schema, expected_rows)
            table = self.store.new_table_name(export.dataset, version_id)
            cur = self.store.cursor()
            try:
                rows = load_table(cur, export, schema, table)
            finally:
                cur.close()
            version = Version(
                export.dataset, version_id, export.export_id, table, rows,
                time.perf_counter() - start,
            )
            self.store.publish(version)
        except (LoadError, OSError) as exc:
            reason = str(exc)
            self.refused[(export.dataset, export.export_id)] = reason
            event = LoadEvent(
                export.dataset, export.export_id, False, reason, time.perf_counter() - start
            )
            log.error(
                "refused export %s/%s: %s (previous version keeps serving)",
                export.dataset, export.export_id, reason,
            )
        else:
            event = LoadEvent(
                export.dataset, export.export_id, True, "", version.load_seconds, version_id
            )
            log.info(
                "swapped in %s/%s as version %s: %d rows in %.3fs",
                export.dataset, export.export_id, version_id, rows, version.load_seconds,
            )
        self.history.append(event)
        del self.history[:-1000]
        return event

    def _watch_filter(self, change: watchfiles.Change, path: str) -> bool:
        return not is_ignored(Path(path).name)

    async def run(self, stop: asyncio.Event) -> None:
        """Initial scan, then watch the folder until `stop` is set."""
        await asyncio.to_thread(self.refresh)
        collector = asyncio.create_task(self._collect_forever(stop))
        try:
            async for changes in watchfiles.awatch(
                self.source.root,
                stop_event=stop,
                debounce=self.debounce_ms,
                step=20,
                watch_filter=self._watch_filter,
                recursive=True,
            ):
                names = {self.source.dataset_of(Path(p)) for _, p in changes}
                touched = {n for n in names if n is not None}
                if touched:
                    await asyncio.to_thread(self.refresh, touched)
        finally:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)

    async def _collect_forever(self, stop: asyncio.Event) -> None:
        """Retire drained Snapshots; wakes often, works only when there is garbage."""
        while not stop.is_set():
            if self.store.has_garbage():
                await asyncio.to_thread(self.store.collect)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.1)
