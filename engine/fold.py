"""Per-version constants: an endpoint's uncorrelated scalar subqueries, computed once per version.

`WHERE m.patch = (SELECT max(patch) FROM patches)` is the same value for every request on one
Snapshot, yet DuckDB plans and runs it on every query as a join against its one-row result:
~0.9-1.1 ms of a 2-3.5 ms matchup lookup on the demo data. An answer is already a pure function
of the versions the endpoint reads (that is what the response cache keys on), so such a
subquery is folded: the endpoint runs with `CAST($__duckswap_c0 AS VARCHAR)` in its place,
bound to the value computed once per Snapshot (on the request path, in the batched form and in
the warm alike). Folded only when it is safe to: the subquery binds on its own against the
endpoint's declared datasets (so it reads nothing of the outer query), takes no `$parameter`,
the statement defines no CTE (a CTE could shadow a table name), and its type is a plain scalar
that survives a round trip through a bound parameter. A value that fails on some version (more
than one row, say) makes that version run the SQL as written, so its answer or its error is the
one it always was.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import duckdb

from engine.config import ConfigError
from engine.endpoints import EndpointSpec
from engine.settings import Settings
from engine.sqlcheck import declared_tables, only

log = logging.getLogger("duckswap.fold")

PREFIX = "__duckswap_c"
# Types whose values come back from DuckDB as Python objects that bind back to the same value.
_SCALAR = re.compile(
    r"(BOOLEAN|TINYINT|SMALLINT|INTEGER|BIGINT|HUGEINT|UTINYINT|USMALLINT|UINTEGER|UBIGINT|"
    r"FLOAT|DOUBLE|DECIMAL\(\d+,\d+\)|VARCHAR|DATE|TIME|TIMESTAMP|UUID)"
)
_MEMO = 16  # Snapshots whose constants are kept (the served, staged and retiring ones)


@dataclass(frozen=True)
class Constant:
    name: str  # the parameter it is bound as
    sql: str  # `SELECT (subquery)`: its value on a Snapshot


@dataclass(frozen=True)
class Folded:
    """An endpoint's SQL with its constant subqueries as bound parameters."""

    sql: str
    constants: tuple[Constant, ...]


def fold_endpoints(settings: Settings) -> dict[str, Folded]:
    """The endpoints that have constant subqueries, folded."""
    out: dict[str, Folded] = {}
    try:
        with declared_tables(settings) as con:
            for name, spec in settings.endpoints.items():
                with only(con, settings, spec):
                    folded = fold(con, spec)
                if folded is not None:
                    out[name] = folded
                    log.info("endpoint %s: %d subquer%s computed once per version", name,
                             len(folded.constants), "y" if len(folded.constants) == 1 else "ies")
    except ConfigError:  # an unknown column type: check-config names it; fold nothing
        return {}
    return out


def fold(con: duckdb.DuckDBPyConnection, spec: EndpointSpec) -> Folded | None:
    """`spec.sql` with its constant subqueries replaced, or None if it has none. `con` holds
    the endpoint's datasets as (empty) tables with the declared columns."""
    try:
        row = con.execute("SELECT json_serialize_sql($q)", {"q": spec.sql}).fetchone()
    except duckdb.Error:
        return None
    doc: dict[str, Any] = json.loads(row[0]) if row else {"error": True}
    if doc.get("error") or len(doc.get("statements", [])) != 1 or _has_cte(doc):
        return None
    text = spec.sql.encode()
    spans: list[tuple[int, int, str]] = []  # (start, end, type) of each folded subquery

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for v in node:
                walk(v)
            return
        if not isinstance(node, dict):
            return
        if node.get("class") == "SUBQUERY" and node.get("subquery_type") == "SCALAR":
            start = node.get("query_location")
            end = start + node.get("query_location_length", 0) if start is not None else None
            if start is not None and end is not None and not _has_parameter(node):
                sub = text[start:end].decode(errors="replace")
                kind = _constant_type(con, sub) if sub.startswith("(") and \
                    sub.endswith(")") else None
                if kind is not None:
                    spans.append((start, end, kind))
                    return  # the whole subquery is one value: nothing inside to fold
        for v in node.values():
            walk(v)

    walk(doc)
    if not spans:
        return None
    names: dict[bytes, str] = {}  # one parameter per distinct subquery, in order of appearance
    constants: list[Constant] = []
    i = 0
    for start, end, _ in sorted(spans):
        sub = text[start:end]
        if sub not in names:
            while f"{PREFIX}{i}" in spec.params:
                i += 1
            names[sub] = f"{PREFIX}{i}"
            constants.append(Constant(names[sub], f"SELECT {sub.decode()}"))
            i += 1
    for start, end, kind in sorted(spans, reverse=True):
        text = text[:start] + f"CAST(${names[text[start:end]]} AS {kind})".encode() + text[end:]
    folded = Folded(text.decode(), tuple(constants))
    try:  # the rewritten statement must prepare as the original did
        con.execute(f"PREPARE duckswap_fold AS {folded.sql}")
        con.execute("DEALLOCATE duckswap_fold")
    except duckdb.Error:
        return None
    return folded


def _any(node: Any, test: Callable[[dict[str, Any]], bool]) -> bool:
    """Whether `test` holds for any object node of a serialized statement."""
    if isinstance(node, dict):
        return test(node) or any(_any(v, test) for v in node.values())
    if isinstance(node, list):
        return any(_any(v, test) for v in node)
    return False


def _has_cte(node: Any) -> bool:
    return _any(node, lambda n: bool(isinstance(n.get("cte_map"), dict)
                                      and n["cte_map"].get("map")))


def _has_parameter(node: Any) -> bool:
    return _any(node, lambda n: n.get("class") == "PARAMETER")


def _constant_type(con: duckdb.DuckDBPyConnection, sub: str) -> str | None:
    """The subquery's type if it binds on its own (reads none of the outer query) and is a
    plain scalar; else None."""
    try:
        row = con.execute(f"SELECT typeof({sub})").fetchone()
    except duckdb.Error:
        return None
    kind = str(row[0]) if row else ""
    return kind if _SCALAR.fullmatch(kind) else None


def evaluate(cur: duckdb.DuckDBPyConnection, folded: Folded) -> dict[str, Any] | None:
    """The constants' values on the Snapshot `cur` reads; None if one fails there."""
    values: dict[str, Any] = {}
    try:
        for c in folded.constants:
            # fetchall, not fetchone: a result left unfinished makes DuckDB refuse other
            # work on the cursor (registering the warm's `__keys`, say)
            rows = cur.execute(c.sql).fetchall()
            values[c.name] = rows[0][0] if rows else None
    except duckdb.Error as exc:
        log.warning("a constant subquery failed (%s); this version runs the SQL as written",
                    str(exc).splitlines()[0])
        return None
    return values


@dataclass(frozen=True)
class Binding:
    """What an endpoint runs on one Snapshot."""

    sql: str
    fixed: Mapping[str, Any]  # its constants' values, bound with the request's parameters
    batchable: bool  # its batched plan (made from the folded SQL, if any) applies


def binding(sql: str, folded: Folded | None, values: Mapping[str, Any] | None) -> Binding:
    """The endpoint's `sql` as written, or `folded` with `values` (its constants on the
    Snapshot; None where one failed there: then the SQL as written, key by key)."""
    if folded is None:
        return Binding(sql, {}, True)
    if values is None:
        return Binding(sql, {}, False)
    return Binding(folded.sql, values, True)


class Constants:
    """The folded endpoints and their constants' values per Snapshot (computed on first use,
    on the cursor that needs them; thread-safe)."""

    def __init__(self, folded: Mapping[str, Folded]) -> None:
        self.folded = dict(folded)
        self._values: OrderedDict[tuple[int, str], dict[str, Any] | None] = OrderedDict()
        self._lock = threading.Lock()

    def values(self, cur: duckdb.DuckDBPyConnection, snap_id: int,
               endpoint: str) -> dict[str, Any] | None:
        """`cur` reads Snapshot `snap_id`. None: run the endpoint's SQL as written."""
        folded = self.folded.get(endpoint)
        if folded is None:
            return None
        key = (snap_id, endpoint)
        with self._lock:
            if key in self._values:
                return self._values[key]
        got = evaluate(cur, folded)
        with self._lock:
            self._values[key] = got
            while len(self._values) > _MEMO * max(1, len(self.folded)):
                self._values.popitem(last=False)
        return got

    def bind(self, cur: duckdb.DuckDBPyConnection, snap_id: int, spec: EndpointSpec) -> Binding:
        """What `spec` runs on Snapshot `snap_id`, which `cur` reads."""
        return binding(spec.sql, self.folded.get(spec.name),
                       self.values(cur, snap_id, spec.name))
