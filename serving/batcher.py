"""A storm of cache misses of one endpoint and Snapshot is answered by batched queries.

A single point query costs ~1 ms (zone maps skip most of a sorted table); a batched LATERAL
join costs about one scan (8-45 ms on the demo data) whatever the number of keys. So misses run
as single queries until BATCH_AFTER of them are in flight for the endpoint (a cold start, an
unwarmed swap); then new ones queue, and each batch takes everything queued while the previous
one ran.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from engine.endpoints import EndpointSpec
from engine.errors import QueryFailed
from engine.fold import Constants
from engine.plan import BatchPlan
from engine.query import QueryRunner, Result
from engine.store import Snapshot

MAX_BATCH = 2000
BATCH_AFTER = 16
log = logging.getLogger("duckswap.server")


class Batcher:
    def __init__(self, runner: QueryRunner, constants: Constants) -> None:
        self.runner = runner
        self.constants = constants
        # (parameters, cache key, the waiter) per endpoint and Snapshot
        self._pending: dict[tuple[str, int], list[tuple[dict[str, Any], tuple[Any, ...],
                                                        asyncio.Future[Any]]]] = {}
        self._running: set[tuple[str, int]] = set()
        self.disabled: set[str] = set()
        self._singles: dict[tuple[str, int], int] = {}
        self.batches = 0
        self.batched = 0

    async def run(self, spec: EndpointSpec, sql: BatchPlan, snap: Snapshot,
                  params: dict[str, Any], key: tuple[Any, ...]) -> Result:
        """`key`: the cache key of `params` (`engine.params.cache_key`; a trailing format is
        ignored)."""
        k = (spec.name, snap.id)
        if self._singles.get(k, 0) < BATCH_AFTER and k not in self._pending:
            self._singles[k] = self._singles.get(k, 0) + 1
            try:
                return await self._single(spec, snap, params)
            finally:
                left = self._singles[k] - 1
                if left:
                    self._singles[k] = left
                else:
                    del self._singles[k]
        fut: asyncio.Future[Result | None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(k, []).append((params, key, fut))
        if k not in self._running:
            self._running.add(k)
            asyncio.create_task(self._drain(spec, sql, snap, k))
        result = await fut
        if result is None:  # cut at the row limit (only the single query orders those rows),
            # or the batched form failed
            return await self._single(spec, snap, params)
        result.versions = snap.version_ids(spec.datasets)
        return result

    async def _single(self, spec: EndpointSpec, snap: Snapshot,
                      params: dict[str, Any]) -> Result:
        return await self.runner.run_endpoint(spec, params, self.constants, snap)

    async def _drain(self, spec: EndpointSpec, sql: BatchPlan, snap: Snapshot,
                     k: tuple[str, int]) -> None:
        try:
            while self._pending.get(k):
                waiting = self._pending.pop(k)
                batch, rest = waiting[:MAX_BATCH], waiting[MAX_BATCH:]
                if rest:
                    self._pending[k] = rest
                self.batches += 1
                self.batched += len(batch)
                try:
                    results: list[Result | None] = await self.runner.run_batch(
                        spec, sql, [key for _, key, _ in batch], snap, self.constants)
                except QueryFailed as exc:  # DuckDB refused the batched form: go key by key
                    log.warning("batched query of %s failed (%s); answering it key by key",
                                spec.name, exc.message)
                    self.disabled.add(spec.name)
                    results = [None] * len(batch)
                except Exception as exc:
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                            fut.exception()  # the waiter re-raises; no "never retrieved"
                    continue
                for (_, _, fut), result in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)
        finally:
            self._running.discard(k)
