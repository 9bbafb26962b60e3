"""DuckDB never runs on the event loop: a bounded pool, one cursor per thread, a deadline."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import duckdb

from loaders.snapshot import Snapshot, Store
from serving.errors import NotReady, QueryFailed, QueryTimeout


@dataclass
class Result:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool
    versions: dict[str, str] = field(default_factory=dict)


@dataclass
class _Job:
    sql: str
    params: dict[str, Any]
    limit: int
    snapshot: Snapshot
    cancelled: bool = False
    cursor: duckdb.DuckDBPyConnection | None = field(default=None, repr=False)


class QueryRunner:
    def __init__(self, store: Store, threads: int, timeout: float) -> None:
        self.store = store
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="duckswap-query")
        self._local = threading.local()

    def _cursor(self, schema: str) -> duckdb.DuckDBPyConnection:
        local = self._local
        cur: duckdb.DuckDBPyConnection | None = getattr(local, "cursor", None)
        if cur is None:
            cur = local.cursor = self.store.cursor()
            local.schema = None
        if local.schema != schema:
            cur.execute(f"SET search_path = '{schema}'")  # our own generated name
            local.schema = schema
        return cur

    def _run(self, job: _Job) -> Result:
        if job.cancelled:
            raise QueryTimeout("query waited past its deadline")
        cur = self._cursor(job.snapshot.schema)
        job.cursor = cur
        try:
            return execute(cur, job.sql, job.params, job.limit)
        finally:
            job.cursor = None

    async def run(
        self,
        sql: str,
        datasets: tuple[str, ...],
        params: dict[str, Any],
        limit: int,
        snapshot: Snapshot | None = None,
    ) -> Result:
        """Run on `snapshot` (default: the current one), held until the query ends (even
        past its deadline)."""
        store = self.store
        snap = store.acquire() if snapshot is None else store.hold(snapshot)
        missing = [d for d in datasets if d not in snap.versions]
        if missing:
            store.release(snap)
            raise NotReady(f"dataset {missing[0]!r} has no loaded version yet", missing=missing)
        job = _Job(sql, params, limit, snap)
        fut = asyncio.get_running_loop().run_in_executor(self._pool, self._run, job)
        fut.add_done_callback(lambda _: store.release(snap))
        try:
            result = await asyncio.wait_for(asyncio.shield(fut), self.timeout)
            result.versions = snap.version_ids(datasets)
            return result
        except TimeoutError:
            job.cancelled = True
            cur = job.cursor
            if cur is not None:
                cur.interrupt()
            fut.add_done_callback(_consume)
            raise QueryTimeout(f"query exceeded its {self.timeout:g}s deadline") from None
        except duckdb.InterruptException:
            raise QueryTimeout(f"query exceeded its {self.timeout:g}s deadline") from None
        except duckdb.Error as exc:
            raise QueryFailed(f"query failed: {type(exc).__name__}") from None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def execute(
    cur: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any], limit: int
) -> Result:
    """One endpoint query on a cursor whose search_path is a Snapshot; one extra row tells
    whether the answer was cut at `limit`."""
    cur.execute(f"SELECT * FROM ({sql}) AS q LIMIT {limit + 1}", params)
    rows = cur.fetchall()
    columns = [d[0] for d in cur.description or []]
    return Result(columns, rows[:limit], len(rows) > limit)


def _consume(fut: asyncio.Future[Result]) -> None:
    if not fut.cancelled():
        fut.exception()
