"""Warm before publish: compute the responses a new Snapshot will be asked for first.

Runs in the updater's thread between `Store.stage` and `Store.commit`, with its own cursor, so
live requests keep their query threads. Which keys: the most requested parameters of each
affected endpoint (replayed from the current version) plus every key of a small parameter space
(enums, bools and narrow int ranges). How: one batched query per endpoint when the SQL allows it
(the endpoint's SQL run LATERAL against a table of keys), else one query per key, hottest first,
until the time budget is spent.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import duckdb

from loaders.build import quote_ident
from loaders.snapshot import Snapshot, Store
from serving.cache import Key, Popularity, ResponseCache
from serving.params import ParamError, cache_key, default_value, parse_value
from serving.query import Result, execute, execute_batch
from serving.responses import Entry, encode_body, etag, token, versions_header
from serving.settings import EndpointSpec, ParamSpec

log = logging.getLogger("duckswap.warm")

T = TypeVar("T")
ENUMERATE_LIMIT = 1000  # largest parameter space enumerated in full


Want = tuple[dict[str, Any], tuple[Any, ...], int]  # (bound params, cache key, request count)


@dataclass(frozen=True)
class BatchPlan:
    sql: str
    bound: tuple[str, ...]  # parameters bound per group of keys (they sit in LIMIT/OFFSET)


@dataclass
class WarmReport:
    snapshot: int
    seconds: float = 0.0
    entries: int = 0
    batched: int = 0
    single: int = 0
    skipped: int = 0
    per_endpoint: dict[str, int] = field(default_factory=dict)


def batch_sql(spec: EndpointSpec) -> BatchPlan | None:
    """Plan answering many parameter sets of an endpoint in one query: its SQL, with each
    `$param` turned into a column of `__keys`, run LATERAL per key. Parameters in LIMIT/OFFSET
    stay bound (keys are grouped by their values). An answer of several rows is ordered by the
    endpoint's own ORDER BY, which must name output columns. None when the SQL does not fit."""
    con = duckdb.connect()
    try:
        row = con.execute("SELECT json_serialize_sql($q)", {"q": spec.sql}).fetchone()
    finally:
        con.close()
    doc: dict[str, Any] = json.loads(row[0]) if row else {"error": True}
    if doc.get("error") or len(doc.get("statements", [])) != 1:
        return None
    found: list[tuple[int, int, str, bool]] = []

    def walk(node: Any, limit: bool) -> None:
        if isinstance(node, dict):
            if node.get("class") == "PARAMETER":
                found.append((node["query_location"], node.get("query_location_length", 0),
                              node["identifier"], limit))
            limit = limit or node.get("type") in ("LIMIT_MODIFIER", "LIMIT_PERCENT_MODIFIER")
            for v in node.values():
                walk(v, limit)
        elif isinstance(node, list):
            for v in node:
                walk(v, limit)

    walk(doc, False)
    order = ""
    if spec.row_limit > 1:
        orders = _output_order(doc["statements"][0]["node"])
        if orders is None:
            return None
        order = "".join(", " + o for o in orders)
    text = spec.sql.encode()
    bound = sorted({name for _, _, name, in_limit in found if in_limit})
    for loc, length, name, in_limit in sorted(found, reverse=True):
        if text[loc:loc + length] != f"${name}".encode():
            return None  # offsets not as expected: do not guess
        if not in_limit:
            text = text[:loc] + f"__k.{quote_ident(name)}".encode() + text[loc + length:]
    sql = (
        "SELECT __k.__i, __q.* FROM __keys AS __k, LATERAL (SELECT * FROM ("
        + text.decode() + f") AS __r LIMIT {spec.row_limit + 1}) AS __q ORDER BY __k.__i"
        + order
    )
    return BatchPlan(sql, tuple(bound))


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items()
                if k not in ("query_location", "query_location_length", "alias")}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _output_order(node: dict[str, Any]) -> list[str] | None:
    """The top-level ORDER BY as terms over output columns, or None if it is not one."""
    if node.get("type") != "SELECT_NODE":
        return None
    outputs: dict[str, Any] = {}
    for item in node.get("select_list", []):
        name = item.get("alias") or (item.get("column_names") or [""])[-1]
        if name:
            outputs[name] = _strip(item)
    mods = [m for m in node.get("modifiers", []) if m.get("type") == "ORDER_MODIFIER"]
    if len(mods) != 1 or any(m.get("type") == "DISTINCT_MODIFIER"
                             for m in node.get("modifiers", [])):
        return None
    terms = []
    for o in mods[0]["orders"]:
        expr = o["expression"]
        if expr.get("class") != "COLUMN_REF":
            return None
        names = expr["column_names"]
        if len(names) == 1 and names[0] in outputs:
            col = names[0]
        else:
            same = [n for n, e in outputs.items() if e == _strip(expr)]
            if len(same) != 1:
                return None
            col = same[0]
        direction = "DESC" if o["type"] == "DESCENDING" else "ASC"
        nulls = "NULLS FIRST" if o["null_order"] == "NULLS_FIRST" else "NULLS LAST"
        terms.append(f"__q.{quote_ident(col)} {direction} {nulls}")
    return terms


def enumerate_keys(spec: EndpointSpec, limit: int = ENUMERATE_LIMIT) -> list[dict[str, Any]]:
    """Every parameter combination when the space is small; [] otherwise."""
    choices: list[list[Any]] = []
    for p in spec.params.values():
        values = _domain(p)
        if values is None:
            return []
        choices.append(values)
    size = 1
    for c in choices:
        size *= len(c)
    if size > limit:
        return []
    names = list(spec.params)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]


def _domain(p: ParamSpec) -> list[Any] | None:
    default = sorted(set(p.default)) if p.unordered and isinstance(p.default, list) else p.default
    if p.is_list:
        return [default] if not p.required else None
    if p.type == "enum":
        values: list[Any] = list(p.values)
    elif p.type == "bool":
        values = [False, True]
    elif p.type == "int" and p.min is not None and p.max is not None and p.max - p.min < 64:
        values = list(range(int(p.min), int(p.max) + 1))
    else:
        return None if p.required else [default]
    if not p.required and default not in values:
        values.append(default)
    return values


def _declared_keys(cur: duckdb.DuckDBPyConnection, spec: EndpointSpec) -> list[dict[str, Any]]:
    """Rows of the endpoint's `warm_sql`, validated and normalised like request parameters
    (each distinct value parsed once: tens of thousands of rows share a few values)."""
    try:
        cur.execute(str(spec.warm_sql))
        rows = cur.fetchall()
        columns = [d[0] for d in cur.description or []]
    except duckdb.Error as exc:
        log.warning("warm_sql of %s failed: %s", spec.name, str(exc).splitlines()[0])
        return []
    fixed: dict[str, Any] = {}
    for name, p in spec.params.items():
        if name not in columns:
            if p.required:
                log.warning("warm_sql of %s lacks required parameter %s", spec.name, name)
                return []
            fixed[name] = default_value(p)
    parsed: dict[tuple[str, Any], Any] = {}
    bad = object()

    def parse(col: str, value: Any) -> Any:
        hashable = tuple(value) if isinstance(value, list) else value
        got = parsed.get((col, hashable))
        if got is None and (col, hashable) not in parsed:
            items = value if isinstance(value, list) else [value]
            raw = [str(v).lower() if isinstance(v, bool) else str(v) for v in items]
            try:
                got = parse_value(spec.params[col], raw)
            except ParamError:
                got = bad  # a value no request could spell
            parsed[(col, hashable)] = got
        return got

    keys = []
    for row in rows:
        key = dict(fixed)
        for col, value in zip(columns, row, strict=True):
            key[col] = default_value(spec.params[col]) if value is None else parse(col, value)
        if not any(v is bad for v in key.values()):
            keys.append({n: key[n] for n in spec.params})
    return keys


class Warmer:
    """Called by the updater with a staged Snapshot; fills the cache for it before commit."""

    def __init__(self, store: Store, cache: ResponseCache, popularity: Popularity,
                 endpoints: Mapping[str, EndpointSpec], fingerprints: Mapping[str, bytes],
                 batch: Mapping[str, BatchPlan | None], seconds: float, keys: int) -> None:
        self.store = store
        self.cache = cache
        self.popularity = popularity
        self.endpoints = {n: e for n, e in endpoints.items() if e.warm}
        self.fingerprints = fingerprints
        self.seconds = seconds
        self.keys = keys
        self.loop: asyncio.AbstractEventLoop | None = None
        self._batch = dict(batch)
        self.last: WarmReport | None = None

    def _on_loop(self, fn: Callable[[], T]) -> T:
        loop = self.loop
        if loop is None:
            return fn()

        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=10)

    def __call__(self, snap: Snapshot) -> WarmReport:
        start = time.perf_counter()
        deadline = start + self.seconds
        report = WarmReport(snap.id)
        if self.seconds <= 0:
            return report
        old = self.store.current
        cur = self.store.cursor()
        try:
            cur.execute(f"SET search_path = '{snap.schema}'")
            work: list[_Job] = []
            for name, spec in self.endpoints.items():
                versions = snap.version_ids(spec.datasets)
                if len(versions) != len(spec.datasets):
                    continue
                if versions == old.version_ids(spec.datasets):
                    continue  # unchanged token: its entries stay valid
                tok = token(self.fingerprints[name], versions)
                keys = self._keys(cur, spec, tok)
                if keys:
                    work.append(_Job(spec, tok, versions, keys))
            if not work:
                return report
            singles: list[tuple[int, int, _Job, Want]] = []
            for i, job in enumerate(work):
                rest = self._batched(cur, job, report)
                singles.extend((w[2], i, job, w) for w in rest)
            # Then key by key, the most requested first across endpoints, until the deadline.
            singles.sort(key=lambda s: (-s[0], s[1]))
            for _, _, job, (k, ck, _) in singles:
                if time.perf_counter() >= deadline:
                    report.skipped += 1
                    continue
                result = execute(cur, job.spec.sql, k, job.spec.row_limit)
                job.add(ck, result)
                report.single += 1
            for job in work:
                for i in range(0, len(job.entries), 500):  # the loop serves between chunks
                    chunk = job.entries[i:i + 500]
                    self._on_loop(lambda c=chunk: self.cache.put_many(c))  # type: ignore[misc]
                report.per_endpoint[job.spec.name] = len(job.entries)
                report.entries += len(job.entries)
        finally:
            cur.close()
        report.seconds = time.perf_counter() - start
        self.last = report
        log.info(
            "warmed snapshot %d: %d responses (%d batched, %d single, %d skipped) in %.3fs",
            snap.id, report.entries, report.batched, report.single, report.skipped,
            report.seconds,
        )
        return report

    def _keys(self, cur: duckdb.DuckDBPyConnection, spec: EndpointSpec,
              tok: str) -> list[Want]:
        """(key, request count): hottest first, then the rows of `warm_sql` and the small-space
        enumeration (count 0); without those already cached."""
        names = list(spec.params)
        hot = self._on_loop(lambda: self.popularity.hottest(spec.name, self.keys))
        keys = [({n: list(v) if isinstance(v, tuple) else v
                  for n, v in zip(names, k, strict=True)}, count) for k, count in hot]
        if spec.warm_sql:
            keys.extend((k, 0) for k in _declared_keys(cur, spec))
        keys.extend((k, 0) for k in enumerate_keys(spec))
        out: list[Want] = []
        seen = set()
        for k, count in keys:
            ck = cache_key(k)
            if ck not in seen:
                seen.add(ck)
                out.append((k, ck, count))
        cache = self.cache
        cached = self._on_loop(lambda: [(tok, w[1]) in cache for w in out])
        return [w for w, c in zip(out, cached, strict=True) if not c]

    def _batched(self, cur: duckdb.DuckDBPyConnection, job: _Job,
                 report: WarmReport) -> list[Want]:
        """Answer what one batched query can; return the keys left for single queries."""
        sql = self._batch.get(job.spec.name)
        if sql is None:
            return job.keys
        keys = [w[0] for w in job.keys]
        try:
            results = execute_batch(cur, job.spec, sql, keys)
        except duckdb.Error as exc:
            log.warning("batched warm of %s failed (%s); warming key by key",
                        job.spec.name, type(exc).__name__)
            self._batch[job.spec.name] = None  # this process warms it key by key from now
            return job.keys
        rest = []
        for want, result in zip(job.keys, results, strict=True):
            if result is None:
                rest.append(want)
            else:
                job.add(want[1], result)
                report.batched += 1
        return rest


@dataclass
class _Job:
    """One endpoint to warm for a staged Snapshot, and the entries computed so far."""

    spec: EndpointSpec
    token: str
    versions: dict[str, str]
    keys: list[Want]
    entries: list[tuple[Key, Entry]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.header = versions_header(self.versions)  # one string shared by every entry

    def add(self, ck: tuple[Any, ...], result: Result) -> None:
        body = encode_body(self.spec, self.token, self.versions, result.columns, result.rows,
                           result.truncated)
        self.entries.append(((self.token, ck), Entry(body, etag(self.token, ck), self.header)))
