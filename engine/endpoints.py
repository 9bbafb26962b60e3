"""Endpoint and parameter specs, parsed from the config's `[endpoints.*]` tables."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.config import ConfigError, Reader, positive
from engine.params import ParamSpec, parse_param
from engine.schema import DatasetSchema

PATH_PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


DEFAULT_CACHE_CONTROL = "public, max-age=5, stale-while-revalidate=30"
RESERVED_PATHS = ("/healthz", "/readyz", "/metrics", "/v1/version", "/admin", "/openapi.json",
                  "/status")


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    path: str
    sql: str
    datasets: tuple[str, ...]
    params: Mapping[str, ParamSpec]
    row_limit: int = 1000
    cache_control: str = DEFAULT_CACHE_CONTROL
    warm: bool = True
    warm_sql: str | None = None


def parse_endpoint(r: Reader, name: str, datasets: Mapping[str, DatasetSchema]) -> EndpointSpec:
    e = r.sub(name)
    path = e.get("path", str)
    if not path.startswith("/"):
        raise e.fail("path", f"must start with '/', got {path!r}")
    if path == "/":
        raise e.fail("path", "/ is reserved by the server (the status page)")
    for reserved in RESERVED_PATHS:
        if path == reserved or path.startswith(reserved + "/"):
            raise e.fail("path", f"{reserved} is reserved by the server")
    sql = e.get("sql", str).strip().rstrip(";").strip()
    if not sql:
        raise e.fail("sql", "must not be empty")
    used = sql_parameters(sql, r.file, e.key("sql"))  # one SELECT, first
    tables, functions = sql_reads(sql, r.file, e.key("sql"))
    for fn in functions:
        if fn not in TABLE_FUNCTIONS:
            raise e.fail("sql", f"reads with {fn}(): endpoint SQL may read only the declared "
                         f"datasets (table functions allowed: {', '.join(TABLE_FUNCTIONS)})")
    for t in sorted(tables):
        if t not in datasets:
            raise e.fail("sql", f"reads table {t!r}, which is not a declared dataset")
    if not tables:
        raise e.fail("sql", "reads no dataset")
    listed = e.get("datasets", list, None)  # optional: the SQL says which it reads
    if listed is not None:
        for d in listed:
            if d not in datasets:
                raise e.fail("datasets", f"reads undeclared dataset {d!r}")
            if d not in tables:
                raise e.fail("datasets", f"lists {d!r}, which the SQL does not read")
        for t in sorted(tables - set(listed)):
            raise e.fail("datasets", f"does not list {t!r}, which the SQL reads")
    ds = list(listed) if listed is not None else sorted(tables)
    params_r = e.sub("params", {})
    params = {pname: parse_param(params_r, pname) for pname in params_r.table}
    if "v" in params:
        raise params_r.fail("v", "`v` is reserved for version tokens (`?v=`)")
    if "format" in params:
        raise params_r.fail("format", "`format` is reserved for the answer format (`?format=`)")
    row_limit = e.get("row_limit", int, 1000)
    positive(e, "row_limit", row_limit)
    cache_control = e.get("cache_control", str, DEFAULT_CACHE_CONTROL)
    warm = e.get("warm", bool, True)
    warm_sql = e.get("warm_sql", str, None)
    e.finish()
    if warm_sql is not None:
        warm_sql = warm_sql.strip().rstrip(";").strip()
        if sql_parameters(warm_sql, r.file, e.key("warm_sql")):
            raise e.fail("warm_sql", "takes no parameters")
        warm_tables, warm_functions = sql_reads(warm_sql, r.file, e.key("warm_sql"))
        for fn in warm_functions:
            if fn not in TABLE_FUNCTIONS:
                raise e.fail("warm_sql", f"reads with {fn}(): it may read only the declared "
                             "datasets")
        for t in sorted(warm_tables - set(datasets)):
            raise e.fail("warm_sql", f"reads table {t!r}, which is not a declared dataset")
    for pname in PATH_PARAM_RE.findall(path):
        if pname not in params:
            raise e.fail("path", f"path parameter {pname!r} has no spec in params")
        if params[pname].is_list:
            raise e.fail(f"params.{pname}.list", "a path parameter cannot be a list")
    for pname in used:
        if pname not in params:
            raise e.fail("sql", f"SQL parameter ${pname} has no spec in params")
    for pname in params:
        if pname not in used:
            raise e.fail(f"params.{pname}", "declared but not used in the SQL")
    return EndpointSpec(name, path, sql, tuple(ds), params, row_limit, cache_control, warm,
                        warm_sql)


# The table functions endpoint SQL may use: they compute rows and read nothing.
TABLE_FUNCTIONS = ("generate_series", "range", "unnest")


def sql_reads(sql: str, file: str, key: str) -> tuple[set[str], list[str]]:
    """The tables (CTEs aside) and the table functions one SQL statement reads, from DuckDB's
    own parse tree (`json_serialize_sql`)."""
    import json

    import duckdb

    row = duckdb.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()
    tree = json.loads(row[0]) if row else {}
    if tree.get("error"):
        raise ConfigError(file, key, f"SQL does not parse: {tree.get('error_message')}")
    tables: set[str] = set()
    ctes: set[str] = set()
    functions: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            kind = node.get("type")
            if kind == "BASE_TABLE":
                tables.add(str(node.get("table_name")))
            elif kind == "TABLE_FUNCTION":
                name = str((node.get("function") or {}).get("function_name"))
                if name not in functions:
                    functions.append(name)
            cte_map = node.get("cte_map")
            if isinstance(cte_map, dict):
                ctes.update(str(c.get("key")) for c in cte_map.get("map") or [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(tree)
    return tables - ctes, functions


def sql_parameters(sql: str, file: str, key: str) -> set[str]:
    """Named `$parameters` of one SQL statement, as DuckDB's parser sees them."""
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise ConfigError(file, key, f"SQL does not parse: {exc}") from None
    if len(statements) != 1:
        raise ConfigError(file, key, f"must be exactly one statement, got {len(statements)}")
    stmt = statements[0]
    if stmt.type != duckdb.StatementType.SELECT:
        raise ConfigError(file, key, f"must be a SELECT statement, got {stmt.type.name}")
    return set(stmt.named_parameters)
