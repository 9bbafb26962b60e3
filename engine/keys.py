"""Which keys a warm answers: the hot ones replayed, the rows of `warm_sql`, small parameter
spaces enumerated; each as its cache key (`engine.params.cache_key`: the normalised parameters
in spec order, a list as a tuple), from which `key_params` gives the parameters to bind."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import Any

import duckdb

from engine.endpoints import EndpointSpec
from engine.params import ParamError, ParamSpec, cache_key, default_value, parse_value

log = logging.getLogger("duckswap.warm")

ENUMERATE_LIMIT = 1000  # largest parameter space enumerated in full
# Most requested keys of each endpoint a worker counts and the warm answers first.
WARM_KEYS = 10000

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


def declared_keys(cur: duckdb.DuckDBPyConnection, spec: EndpointSpec) -> list[tuple[Any, ...]]:
    """Rows of the endpoint's `warm_sql` as cache keys, validated and normalised like request
    parameters. Column by column: each distinct value is parsed once (tens of thousands of
    rows share a few values)."""
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
    columns: list[Iterable[Any]] = []
    for name, p in spec.params.items():
        raw_column = given.get(name)
        if raw_column is None:
            if name not in names and p.required:
                log.warning("warm_sql of %s lacks required parameter %s", spec.name, name)
                return []
            columns.append(itertools.repeat(_parse_declared(p, None, bad), len(rows)))
            continue
        try:  # scalar values: map each distinct one once
            parsed = {v: _parse_declared(p, v, bad) for v in set(raw_column)}
            columns.append([parsed[v] for v in raw_column])
        except TypeError:  # list values (unhashable): by their items
            parsed = {}
            column = []
            for value in raw_column:
                hashable = tuple(value) if isinstance(value, list) else value
                if hashable not in parsed:
                    parsed[hashable] = _parse_declared(p, value, bad)
                column.append(parsed[hashable])
            columns.append(column)
        any_bad = any_bad or any(v is bad for v in parsed.values())
    keys = list(zip(*columns, strict=True))
    if any_bad:
        return [k for k in keys if bad not in k]  # a value no request could spell
    return keys


def _parse_declared(p: ParamSpec, value: Any, bad: object) -> Any:
    """A `warm_sql` value as its cache key holds it (a list as a tuple)."""
    if value is None:
        parsed = default_value(p)
    else:
        items = value if isinstance(value, list) else [value]
        try:
            parsed = parse_value(p, [str(v).lower() if isinstance(v, bool) else str(v)
                                     for v in items])
        except ParamError:
            return bad  # a value no request could spell
    return tuple(parsed) if isinstance(parsed, list) else parsed


def warm_keys(con: duckdb.DuckDBPyConnection, spec: EndpointSpec) -> list[tuple[Any, ...]]:
    """The cache keys of `warm_sql`'s rows and of the small-space enumeration, each once."""
    keys = declared_keys(con, spec) if spec.warm_sql else []
    keys.extend(cache_key(k) for k in enumerate_keys(spec))
    return list(dict.fromkeys(keys))


def key_params(spec: EndpointSpec, key: tuple[Any, ...]) -> dict[str, Any]:
    """The bound parameters of a cache key (of any format), as a request binds them."""
    return {n: list(v) if isinstance(v, tuple) else v
            for n, v in zip(spec.params, key, strict=False)}
