"""Planning batched queries: an endpoint's SQL rewritten to answer many parameter sets at once.

The warm (`engine.precompute`) and the miss storms of the request path (`serving.batcher`) both run
the plan; `batch_sql` makes it once per endpoint at start-up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import duckdb

from engine.endpoints import EndpointSpec
from engine.sql import quote_ident


@dataclass(frozen=True)
class BatchPlan:
    sql: str
    bound: tuple[str, ...]  # parameters bound per group of keys (they sit in LIMIT/OFFSET)


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
    # A parameter that is not a request's (a constant, see `engine.fold`) stays bound: it
    # is the same for every key.
    bound = sorted({name for _, _, name, in_limit in found if in_limit and name in spec.params})
    for loc, length, name, in_limit in sorted(found, reverse=True):
        if text[loc:loc + length] != f"${name}".encode():
            return None  # offsets not as expected: do not guess
        if not in_limit and name in spec.params:
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
