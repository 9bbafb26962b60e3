"""Which keys a warm answers: the hot ones replayed, the rows of `warm_sql`, small parameter
spaces enumerated; each as (bound parameters, cache key, request count)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import duckdb

from engine.endpoints import EndpointSpec
from engine.formats import split_format
from engine.params import ParamError, ParamSpec, cache_key, default_value, parse_value

log = logging.getLogger("duckswap.warm")

ENUMERATE_LIMIT = 1000  # largest parameter space enumerated in full
# Most requested keys of each endpoint a worker counts and the warm answers first.
WARM_KEYS = 10000

Want = tuple[dict[str, Any], tuple[Any, ...], int]  # (bound params, cache key, request count)


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


def declared_keys(cur: duckdb.DuckDBPyConnection,
                   spec: EndpointSpec) -> list[tuple[dict[str, Any], tuple[Any, ...]]]:
    """Rows of the endpoint's `warm_sql` as (bound params, cache key), validated and normalised
    like request parameters. Column by column: each distinct value is parsed once (tens of
    thousands of rows share a few values)."""
    try:
        cur.execute(str(spec.warm_sql))
        names = [d[0] for d in cur.description or []]
        rows = cur.fetchall()
    except duckdb.Error as exc:
        log.warning("warm_sql of %s failed: %s", spec.name, str(exc).splitlines()[0])
        return []
    given = dict(zip(names, zip(*rows, strict=True), strict=False)) if rows else {}
    bad = object()
    any_bad = False
    columns: list[Sequence[Any]] = []
    for name, p in spec.params.items():
        raw_column = given.get(name)
        if raw_column is None:
            if name not in names and p.required:
                log.warning("warm_sql of %s lacks required parameter %s", spec.name, name)
                return []
            columns.append(itertools.repeat(default_value(p), len(rows)))  # type: ignore[arg-type]
            continue
        try:  # scalar values: map each distinct one once
            parsed = {v: _parse_declared(p, v, bad) for v in set(raw_column)}
            columns.append([parsed[v] for v in raw_column])
        except TypeError:  # list values (unhashable)
            parsed = {}
            column = []
            for value in raw_column:
                hashable = tuple(value) if isinstance(value, list) else value
                if hashable not in parsed:
                    parsed[hashable] = _parse_declared(p, value, bad)
                column.append(parsed[hashable])
            columns.append(column)
        any_bad = any_bad or any(v is bad for v in parsed.values())
    lists = [i for i, p in enumerate(spec.params.values()) if p.is_list]
    pnames = list(spec.params)
    rows_out: Iterator[tuple[Any, ...]] = zip(*columns, strict=True)
    if any_bad:
        rows_out = (r for r in rows_out if bad not in r)  # a value no request could spell
    if not lists:
        return [(dict(zip(pnames, r, strict=True)), r) for r in rows_out]
    out = []
    for values in rows_out:
        as_list = list(values)
        for i in lists:
            as_list[i] = tuple(as_list[i])
        out.append((dict(zip(pnames, values, strict=True)), tuple(as_list)))
    return out


def _parse_declared(p: ParamSpec, value: Any, bad: object) -> Any:
    if value is None:
        return default_value(p)
    items = value if isinstance(value, list) else [value]
    raw = [str(v).lower() if isinstance(v, bool) else str(v) for v in items]
    try:
        return parse_value(p, raw)
    except ParamError:
        return bad  # a value no request could spell


def hot_wants(spec: EndpointSpec, hot: Sequence[tuple[tuple[Any, ...], int]]) -> list[Want]:
    """The most requested keys, with their counts (most first), as parameters. Built in the
    builder process (`spool.compute`), not on the server's loader thread: there, with
    `heapq.nlargest`, picking and building them took 59-67 ms of CPU in one go at 2000 req/s;
    picking alone takes 24-27 ms."""
    names = list(spec.params)
    out: list[Want] = []
    for ck, count in hot:
        key, _ = split_format(ck, len(names))  # a CSV or Arrow answer: the same parameters
        out.append(({n: list(v) if isinstance(v, tuple) else v
                     for n, v in zip(names, key, strict=True)}, ck, count))
    return out


def warm_wants(con: duckdb.DuckDBPyConnection, spec: EndpointSpec) -> list[Want]:
    """(key, cache key, 0): the rows of `warm_sql` and the small-space enumeration, each key
    once."""
    keys: list[Want] = []
    if spec.warm_sql:
        keys.extend((k, ck, 0) for k, ck in declared_keys(con, spec))
    keys.extend((k, cache_key(k), 0) for k in enumerate_keys(spec))
    out: list[Want] = []
    seen = set()
    for want in keys:
        if want[1] not in seen:
            seen.add(want[1])
            out.append(want)
    return out
