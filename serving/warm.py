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
from serving.params import cache_key
from serving.query import Result, execute, execute_batch
from serving.responses import Entry, encode_body, etag, token, versions_header
from serving.settings import EndpointSpec, ParamSpec

log = logging.getLogger("duckswap.warm")

T = TypeVar("T")
ENUMERATE_LIMIT = 1000  # largest parameter space enumerated in full


@dataclass
class WarmReport:
    snapshot: int
    seconds: float = 0.0
    entries: int = 0
    batched: int = 0
    single: int = 0
    skipped: int = 0
    per_endpoint: dict[str, int] = field(default_factory=dict)


def batch_sql(spec: EndpointSpec) -> str | None:
    """The endpoint's SQL with each `$param` turned into a column of `__keys`, run LATERAL per
    key; None when the SQL cannot be batched (a parameter in LIMIT/OFFSET) or when more than
    one row per key would make row order matter."""
    if spec.row_limit != 1:
        return None
    con = duckdb.connect()
    try:
        row = con.execute("SELECT json_serialize_sql($q)", {"q": spec.sql}).fetchone()
    finally:
        con.close()
    doc = json.loads(row[0]) if row else {"error": True}
    if doc.get("error"):
        return None
    found: list[tuple[int, int, str]] = []
    in_limit = False

    def walk(node: Any, limit: bool) -> None:
        nonlocal in_limit
        if isinstance(node, dict):
            if node.get("class") == "PARAMETER":
                found.append((node["query_location"], node.get("query_location_length", 0),
                              node["identifier"]))
                in_limit = in_limit or limit
            limit = limit or node.get("type") in ("LIMIT_MODIFIER", "LIMIT_PERCENT_MODIFIER")
            for v in node.values():
                walk(v, limit)
        elif isinstance(node, list):
            for v in node:
                walk(v, limit)

    walk(doc, False)
    if in_limit:
        return None
    text = spec.sql.encode()
    for loc, length, name in sorted(found, reverse=True):
        if text[loc:loc + length] != f"${name}".encode():
            return None  # offsets not as expected: do not guess
        text = text[:loc] + f"__k.{quote_ident(name)}".encode() + text[loc + length:]
    return (
        "SELECT __k.__i, __q.* FROM __keys AS __k, LATERAL (SELECT * FROM ("
        + text.decode() + f") AS __r LIMIT {spec.row_limit + 1}) AS __q"
    )


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


class Warmer:
    """Called by the updater with a staged Snapshot; fills the cache for it before commit."""

    def __init__(self, store: Store, cache: ResponseCache, popularity: Popularity,
                 endpoints: Mapping[str, EndpointSpec], fingerprints: Mapping[str, bytes],
                 batch: Mapping[str, str | None], seconds: float, keys: int) -> None:
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
        old = self.store.current
        work: list[_Job] = []
        for name, spec in self.endpoints.items():
            versions = snap.version_ids(spec.datasets)
            if len(versions) != len(spec.datasets):
                continue
            if versions == old.version_ids(spec.datasets):
                continue  # unchanged token: its entries stay valid
            tok = token(self.fingerprints[name], versions)
            keys = self._keys(spec, tok)
            if keys:
                work.append(_Job(spec, tok, versions, keys))
        if not work or self.seconds <= 0:
            return report
        cur = self.store.cursor()
        try:
            cur.execute(f"SET search_path = '{snap.schema}'")
            singles: list[tuple[int, int, _Job, dict[str, Any]]] = []
            for i, job in enumerate(work):
                rest = self._batched(cur, job, report)
                singles.extend((count, i, job, k) for k, count in rest)
            # Then key by key, the most requested first across endpoints, until the deadline.
            singles.sort(key=lambda s: (-s[0], s[1]))
            for _, _, job, k in singles:
                if time.perf_counter() >= deadline:
                    report.skipped += 1
                    continue
                result = execute(cur, job.spec.sql, k, job.spec.row_limit)
                job.add(k, result)
                report.single += 1
            for job in work:
                self._on_loop(lambda j=job: self.cache.put_many(j.entries))  # type: ignore[misc]
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

    def _keys(self, spec: EndpointSpec, tok: str) -> list[tuple[dict[str, Any], int]]:
        """(key, request count): hottest first, then the small-space enumeration (count 0);
        without those already cached."""
        names = list(spec.params)
        hot = self._on_loop(lambda: self.popularity.hottest(spec.name, self.keys))
        keys = [({n: list(v) if isinstance(v, tuple) else v
                  for n, v in zip(names, k, strict=True)}, count) for k, count in hot]
        keys.extend((k, 0) for k in enumerate_keys(spec))
        out, seen = [], set()
        for k, count in keys:
            ck = cache_key(k)
            if ck not in seen:
                seen.add(ck)
                out.append((k, count))
        cached = self._on_loop(lambda: [(tok, cache_key(k)) in self.cache for k, _ in out])
        return [kc for kc, c in zip(out, cached, strict=True) if not c]

    def _batched(self, cur: duckdb.DuckDBPyConnection, job: _Job,
                 report: WarmReport) -> list[tuple[dict[str, Any], int]]:
        """Answer what one batched query can; return the keys left for single queries."""
        sql = self._batch.get(job.spec.name)
        if sql is None:
            return job.keys
        keys = [k for k, _ in job.keys]
        try:
            results = execute_batch(cur, job.spec, sql, keys)
        except duckdb.Error as exc:
            log.warning("batched warm of %s failed (%s); warming key by key",
                        job.spec.name, type(exc).__name__)
            self._batch[job.spec.name] = None  # this process warms it key by key from now
            return job.keys
        rest = []
        for kc, result in zip(job.keys, results, strict=True):
            if result is None:
                rest.append(kc)
            else:
                job.add(kc[0], result)
                report.batched += 1
        return rest


@dataclass
class _Job:
    """One endpoint to warm for a staged Snapshot, and the entries computed so far."""

    spec: EndpointSpec
    token: str
    versions: dict[str, str]
    keys: list[tuple[dict[str, Any], int]]
    entries: list[tuple[Key, Entry]] = field(default_factory=list)

    def add(self, k: dict[str, Any], result: Result) -> None:
        ck = cache_key(k)
        body = encode_body(self.spec, self.token, self.versions, result.columns, result.rows,
                           result.truncated)
        self.entries.append(((self.token, ck), Entry(body, etag(self.token, ck),
                                                     versions_header(self.versions))))
