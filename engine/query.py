"""DuckDB never runs on the event loop: a bounded pool, one cursor per thread, a deadline."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import duckdb
import pyarrow as pa

from engine.endpoints import EndpointSpec
from engine.errors import NotReady, QueryFailed, QueryTimeout
from engine.store import Replica, Snapshot

if TYPE_CHECKING:
    from engine.fold import Constants
    from engine.plan import BatchPlan

T = TypeVar("T")


@dataclass
class Result:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool
    versions: dict[str, str] = field(default_factory=dict)
    types: list[Any] | None = None  # the columns' DuckDB types (Arrow answers are typed so)


@dataclass
class _Job(Generic[T]):
    work: Callable[[duckdb.DuckDBPyConnection], T]
    snapshot: Snapshot
    cancelled: bool = False
    cursor: duckdb.DuckDBPyConnection | None = field(default=None, repr=False)


class QueryRunner:
    def __init__(self, store: Replica, threads: int, timeout: float) -> None:
        self.store = store
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="duckswap-query")
        self._local = threading.local()

    def _run(self, job: _Job[T]) -> T:
        if job.cancelled:
            raise QueryTimeout("query waited past its deadline")
        cur = thread_cursor(self._local, self.store.cursor, job.snapshot.schema)
        job.cursor = cur
        try:
            return job.work(cur)
        finally:
            job.cursor = None

    async def run_endpoint(self, spec: EndpointSpec, params: dict[str, Any],
                           constants: Constants, snapshot: Snapshot | None = None) -> Result:
        """Run an endpoint's SQL on `snapshot` (default: the current one, held until the query
        ends, even past its deadline), with its constant subqueries bound to their values on
        the Snapshot (see `engine.fold`), or as written where they fail there."""

        def work(cur: duckdb.DuckDBPyConnection, snap: Snapshot) -> Result:
            b = constants.bind(cur, snap.id, spec)
            return execute(cur, b.sql, {**params, **b.fixed}, spec.row_limit)

        return await self._answer(spec.datasets, snapshot, work)

    async def _answer(self, datasets: tuple[str, ...], snapshot: Snapshot | None,
                      work: Callable[[duckdb.DuckDBPyConnection, Snapshot], Result]) -> Result:
        snap = self.hold(datasets, snapshot)
        result = await self._submit(snap, lambda cur: work(cur, snap))
        result.versions = snap.version_ids(datasets)
        return result

    async def run_batch(
        self, spec: EndpointSpec, plan: BatchPlan, keys: Sequence[tuple[Any, ...]],
        snapshot: Snapshot, constants: Constants,
    ) -> list[Result | None]:
        """Many parameter sets of one endpoint in one query; see `execute_batch`. `plan` is
        of the folded SQL where the endpoint has constants; on a Snapshot where they fail,
        every key gets None (each is then answered by the SQL as written)."""
        snap = self.hold(spec.datasets, snapshot)

        def work(cur: duckdb.DuckDBPyConnection) -> list[Result | None]:
            b = constants.bind(cur, snap.id, spec)
            if not b.batchable:
                return [None] * len(keys)
            return execute_batch(cur, spec, plan, keys, b.fixed)

        return await self._submit(snap, work)

    def hold(self, datasets: tuple[str, ...], snapshot: Snapshot | None) -> Snapshot:
        """`snapshot` (default: the current one), held for one more reader: NotReady if it
        lacks one of `datasets`."""
        store = self.store
        snap = store.acquire() if snapshot is None else store.hold(snapshot)
        missing = [d for d in datasets if d not in snap.versions]
        if missing:
            store.release(snap)
            raise NotReady(f"dataset {missing[0]!r} has no loaded version yet", missing=missing)
        return snap

    async def _submit(self, snap: Snapshot, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run `work` on a pool cursor reading `snap` (already held; released when the work
        ends, even past its deadline, which interrupts it)."""
        store = self.store
        job = _Job(work, snap)
        fut = asyncio.get_running_loop().run_in_executor(self._pool, self._run, job)
        fut.add_done_callback(lambda _: store.release(snap))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout)
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
            raise QueryFailed(type(exc).__name__, str(exc).splitlines()[0]) from None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def thread_cursor(local: threading.local, make: Callable[[], duckdb.DuckDBPyConnection],
                  schema: str) -> duckdb.DuckDBPyConnection:
    """This thread's cursor (`make` gives it on first use), its search_path set to Snapshot
    schema `schema`."""
    cur: duckdb.DuckDBPyConnection | None = getattr(local, "cursor", None)
    if cur is None:
        cur = local.cursor = make()
        local.schema = None
    if local.schema != schema:
        cur.execute(f"SET search_path = '{schema}'")  # our own generated name
        local.schema = schema
    return cur


def execute(
    cur: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any], limit: int
) -> Result:
    """One endpoint query on a cursor whose search_path is a Snapshot; one extra row tells
    whether the answer was cut at `limit`."""
    cur.execute(f"SELECT * FROM ({sql}) AS q LIMIT {limit + 1}", params)
    rows = cur.fetchall()
    desc = cur.description or []
    return Result([d[0] for d in desc], rows[:limit], len(rows) > limit,
                  types=[d[1] for d in desc])


FETCH_CHUNK = 1000
_ARROW = {"int": pa.int64(), "float": pa.float64(), "string": pa.string(), "enum": pa.string(),
          "bool": pa.bool_()}


def execute_batch(
    cur: duckdb.DuckDBPyConnection, spec: EndpointSpec, plan: BatchPlan,
    keys: Sequence[tuple[Any, ...]], fixed: Mapping[str, Any] | None = None,
) -> list[Result | None]:
    """Answer many parameter sets (cache keys) of one endpoint in one query per group of
    LIMIT values.
    `fixed`: parameters bound alike for every key (constants, see `engine.fold`).
    A key whose answer has more rows than the row limit gets None: which rows are kept is the
    single query's business."""
    out: list[Result | None] = [None] * len(keys)
    for group in batch_groups(spec, plan, keys):
        names, types = start_group(cur, plan, group, fixed)
        for i, rows in fetch_group(cur, spec, group):
            out[i] = None if rows is None else Result(names, rows, False, types=types)
    return out


@dataclass
class Group:
    """The keys of a batch that share their LIMIT values: one query."""

    bound: dict[str, Any]  # the LIMIT/OFFSET parameters, bound
    members: list[int]  # positions in the batch's keys, ascending
    table: pa.Table  # `__keys`: `__i` (the position) and one column per other parameter


def batch_groups(spec: EndpointSpec, plan: BatchPlan,
                 keys: Sequence[tuple[Any, ...]]) -> list[Group]:
    """`keys`: cache keys (`engine.params.cache_key`: the values in spec order; a trailing
    format is ignored)."""
    at = {name: i for i, name in enumerate(spec.params)}
    bound = [at[b] for b in plan.bound]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(tuple(k[b] for b in bound), []).append(i)
    out = []
    for values, members in groups.items():
        columns: dict[str, Any] = {"__i": pa.array(members, pa.int64())}
        for name, p in spec.params.items():
            if name in plan.bound:
                continue
            t, pos = _ARROW[p.type], at[name]
            columns[name] = pa.array([keys[i][pos] for i in members],
                                     pa.list_(t) if p.is_list else t)
        out.append(Group(dict(zip(plan.bound, values, strict=True)), members,
                         pa.table(columns)))
    return out


Columns = tuple[list[str], list[Any]]  # names and DuckDB types


def start_group(cur: duckdb.DuckDBPyConnection, plan: BatchPlan, group: Group,
                fixed: Mapping[str, Any] | None) -> Columns:
    """Run one group's query on `cur` (DuckDB's part: no GIL held); returns its columns. The
    result waits on `cur` for `fetch_group`."""
    cur.register("__keys", group.table)
    try:
        cur.execute(plan.sql, {**group.bound, **(fixed or {})})
    except BaseException:
        cur.unregister("__keys")
        raise
    desc = (cur.description or [])[1:]  # after `__i`
    return [d[0] for d in desc], [d[1] for d in desc]


def fetch_group(cur: duckdb.DuckDBPyConnection, spec: EndpointSpec,
                group: Group) -> Iterator[tuple[int, list[tuple[Any, ...]] | None]]:
    """Each member's rows as they arrive (they come in key order), None for a member with
    more rows than the row limit, so a batch of 10^5 keys is never all Python objects at once.
    Converting rows holds the GIL: in chunks, so an event loop gets it back between them."""
    limit = spec.row_limit
    members = iter(group.members)
    current = -1  # the key whose rows are coming
    rows: list[tuple[Any, ...]] = []
    try:
        while chunk := cur.fetchmany(FETCH_CHUNK):
            for row in chunk:
                i = row[0]
                if i != current:
                    if current >= 0:
                        yield current, rows if len(rows) <= limit else None
                    for member in members:  # keys with no rows before this one
                        if member == i:
                            break
                        yield member, []
                    current, rows = i, []
                rows.append(row[1:])
        if current >= 0:
            yield current, rows if len(rows) <= limit else None
        for member in members:
            yield member, []
    finally:
        cur.unregister("__keys")


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
