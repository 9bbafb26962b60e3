"""The OpenAPI 3.1 document of a config (`GET /openapi.json`).

Every declared endpoint is an operation: its path and query parameters with their types,
enum values, bounds, defaults, list form and required flag, and its answer's schema, whose
row properties are the result columns of its SQL as DuckDB types them without running it (the
SQL prepared on empty tables of the declared columns). The server's own public routes are
documented too; the admin API is not (it exists only with a token). Built once per config.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Mapping
from typing import Any

import duckdb

from engine.endpoints import PATH_PARAM_RE, EndpointSpec
from engine.formats import FORMATS
from engine.params import INT_MAX, INT_MIN, ParamSpec
from engine.responses import IMMUTABLE, NO_STORE, TOKEN_LENGTH, VERSION_CACHE_CONTROL
from engine.schema import DatasetSchema
from engine.settings import Settings
from engine.sql import quote_ident

log = logging.getLogger("duckswap.openapi")

ERROR = {"$ref": "#/components/schemas/Error"}
_INTEGERS = {"tinyint", "smallint", "integer", "bigint", "hugeint", "utinyint", "usmallint",
             "uinteger", "ubigint", "uhugeint", "varint", "bignum"}
_NUMBERS = {"float", "double", "decimal"}
_STRINGS = {"varchar", "uuid", "date", "time", "time with time zone", "timestamp",
            "timestamp with time zone", "timestamp_s", "timestamp_ms", "timestamp_ns",
            "interval", "blob", "bit", "enum", "time_ns"}


def version() -> str:
    try:
        return importlib.metadata.version("duckswap")
    except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
        return "0"


def column_schema(t: Any) -> dict[str, Any]:
    """The JSON Schema of a column of DuckDB type `t` as the server encodes it (orjson: dates
    and times as ISO strings, decimals as numbers, lists as arrays, structs and maps as
    objects), NULL allowed."""
    kind = t.id
    if kind == "boolean":
        base: dict[str, Any] = {"type": "boolean"}
    elif kind in _INTEGERS:
        base = {"type": "integer"}
    elif kind in _NUMBERS:
        base = {"type": "number"}
    elif kind == "date":
        base = {"type": "string", "format": "date"}
    elif kind == "enum":
        base = {"type": "string", "enum": [str(v) for v in t.children[0][1]]}
    elif kind in ("list", "array"):
        base = {"type": "array", "items": column_schema(t.children[0][1])}
    elif kind == "struct":
        props = {name: column_schema(child) for name, child in t.children}
        base = {"type": "object", "properties": props, "required": list(props)}
    elif kind == "map":
        base = {"type": "object", "additionalProperties": column_schema(t.children[1][1])}
    elif kind in _STRINGS:
        base = {"type": "string"}
    else:  # a type this mapping does not know: what orjson writes is still JSON
        return {}
    base["x-duckdb-type"] = str(t)
    return {"anyOf": [base, {"type": "null"}]}


def _sample(p: ParamSpec) -> Any:
    """A value of the parameter's type, for typing the SQL (never run against data)."""
    value: Any = {"int": int(p.min) if p.min is not None else 0,
                  "float": float(p.min) if p.min is not None else 0.0,
                  "bool": False,
                  "enum": p.values[0] if p.values else ""}.get(p.type, "")
    return [value] if p.is_list else value


def result_columns(spec: EndpointSpec,
                   datasets: Mapping[str, DatasetSchema]) -> list[tuple[str, Any]] | None:
    """The endpoint's result columns and their DuckDB types, from its SQL on empty tables of
    the declared columns; None where DuckDB cannot type it there (the SQL reads columns an
    export brings beyond the declared ones, say)."""
    con = duckdb.connect()
    try:
        for name in spec.datasets:
            cols = ", ".join(f"{quote_ident(c)} {t}" for c, t in datasets[name].columns.items())
            con.execute(f"CREATE TABLE {quote_ident(name)} ({cols})")
        params = {n: _sample(p) for n, p in spec.params.items()}
        con.execute(f"SELECT * FROM ({spec.sql}) AS q LIMIT 0", params)
        return [(d[0], d[1]) for d in con.description or []]
    except duckdb.Error as exc:
        log.info("endpoint %s: its result columns are not typed in the OpenAPI document (%s)",
                 spec.name, str(exc).splitlines()[0])
        return None
    finally:
        con.close()


def param_schema(p: ParamSpec) -> dict[str, Any]:
    item: dict[str, Any]
    if p.type == "int":
        item = {"type": "integer", "format": "int64"}
    elif p.type == "float":
        item = {"type": "number"}
    elif p.type == "bool":
        item = {"type": "boolean"}
    elif p.type == "enum":
        item = {"type": "string", "enum": list(p.values)}
    else:
        item = {"type": "string", "maxLength": p.max_length}
        if p.pattern is not None:
            item["pattern"] = f"^(?:{p.pattern})$"  # matched in full, as the server does
    if p.type in ("int", "float"):
        if p.min is not None:
            item["minimum"] = p.min
        if p.max is not None:
            item["maximum"] = p.max
    if p.type == "int":  # what DuckDB binds
        item["minimum"] = max(item.get("minimum", INT_MIN), INT_MIN)
        item["maximum"] = min(item.get("maximum", INT_MAX), INT_MAX)
    schema = ({"type": "array", "items": item, "minItems": 1, "maxItems": p.max_items}
              if p.is_list else item)
    if p.default is not None:
        schema["default"] = p.default
    return schema


def _parameter(p: ParamSpec, where: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": p.name, "in": where, "required": where == "path" or p.required,
                           "schema": param_schema(p)}
    notes = []
    if p.is_list:
        doc.update(style="form" if where == "query" else "simple", explode=False)
        notes.append("a list: comma-separated (or the parameter repeated)")
        if p.unordered:
            notes.append("order and repeats do not matter (sorted, deduplicated)")
    if p.ignore_case:
        notes.append("matched case-insensitively")
    if not p.required and p.default is None:
        notes.append("absent: NULL")
    if notes:
        text = "; ".join(notes)
        doc["description"] = text[0].upper() + text[1:] + "."
    return doc


def _headers() -> dict[str, Any]:
    text = {"schema": {"type": "string"}}
    return {
        "ETag": {**text, "description": "Strong validator: the version token and the "
                 "normalised parameters; send it back in `If-None-Match` for a 304."},
        "Cache-Control": {**text, "description": "The endpoint's `cache_control` without `v`; "
                          f"`{IMMUTABLE}` with the current token as `v`."},
        "X-Duckswap-Token": {**text, "description": "The endpoint's version token."},
        "X-Duckswap-Versions": {**text, "description": "`dataset=version,...` it was read from."},
    }


def _errors(*codes: str) -> dict[str, Any]:
    texts = {
        "400": "A parameter is missing, malformed or out of range (`bad_parameter`, naming it).",
        "404": "No such route (`not_found`): a path parameter holding `/`, `{` or `}` "
               "matches none.",
        "500": "DuckDB refused the query at run time (`query_failed`).",
        "503": "A dataset it reads has no version yet, or the server is stopping "
               "(`not_ready`, with `Retry-After`).",
        "504": "The query ran past `server.query_timeout` and was interrupted "
               "(`query_timeout`).",
    }
    return {c: {"description": texts[c], "content": {"application/json": {"schema": ERROR}}}
            for c in codes}


def _operation(spec: EndpointSpec, columns: list[tuple[str, Any]] | None) -> dict[str, Any]:
    in_path = set(PATH_PARAM_RE.findall(spec.path))
    params = [_parameter(p, "path" if n in in_path else "query") for n, p in spec.params.items()]
    params.append({
        "name": "v", "in": "query", "required": False,
        "schema": {"type": "string", "pattern": f"^[0-9a-f]{{{TOKEN_LENGTH}}}$"},
        "description": "The endpoint's version token (`/v1/version`): the answer is immutable. "
                       "A token this server does not hold answers 307 to the current one.",
    })
    params.append({
        "name": "format", "in": "query", "required": False,
        "schema": {"type": "string", "enum": list(FORMATS), "default": "json"},
        "description": "The answer's format: JSON (`data` and `meta`), CSV (a header row, then "
                       "the rows; a cell is the text of the JSON value, NULL empty) or an Arrow "
                       "IPC stream (columns typed as DuckDB types them; `meta` as schema "
                       "metadata). Each is cached and has its own ETag.",
    })
    row: dict[str, Any] = {"type": "object"}
    if columns is not None:
        row["properties"] = {name: column_schema(t) for name, t in columns}
        row["required"] = [name for name, _ in columns]
        row["additionalProperties"] = False
    body = {
        "type": "object", "required": ["data", "meta"], "additionalProperties": False,
        "properties": {
            "data": {"type": "array", "items": row, "maxItems": spec.row_limit},
            "meta": {"$ref": "#/components/schemas/Meta"},
        },
    }
    return {
        "operationId": spec.name,
        "summary": f"`{spec.name}`: reads {', '.join(spec.datasets)}",
        "description": f"At most {spec.row_limit} rows; more are cut and `meta.truncated` "
                       "is true. Answers carry an ETag; `If-None-Match` with it answers 304.",
        "tags": ["endpoints"],
        "parameters": params,
        "responses": {
            "200": {"description": "The rows.", "headers": _headers(), "content": {
                "application/json": {"schema": body},
                "text/csv": {"schema": {"type": "string"}},
                FORMATS["arrow"]: {"schema": {"type": "string",
                                              "contentMediaType": FORMATS["arrow"]}},
            }},
            "304": {"description": "Not modified: the ETag sent in `If-None-Match` is current."},
            "307": {"description": "`v` names a version this server does not hold: the same "
                    f"URL with the current token (`Cache-Control: {NO_STORE}`).",
                    "headers": {"Location": {"schema": {"type": "string"}}}},
            **_errors("400", "404", "500", "503", "504"),
        },
    }


def _server_routes() -> dict[str, Any]:
    pointer = {
        "type": "object", "required": ["datasets", "endpoints"],
        "properties": {
            "pending": {"type": "object", "description": "Only while some exist: export "
                        "folders with parts but no marker yet, with when their first file was "
                        "written (UTC).", "additionalProperties": {
                            "type": "array", "items": {
                                "type": "object", "required": ["export_id", "since"],
                                "properties": {"export_id": {"type": "string"},
                                               "since": {"type": "string"}}}}},
            "datasets": {"type": "object", "additionalProperties": {
                "type": "object", "required": ["version", "export_id", "rows"],
                "properties": {"version": {"type": "string"}, "export_id": {"type": "string"},
                               "rows": {"type": "integer"}}}},
            "endpoints": {"type": "object", "additionalProperties": {
                "type": "object", "required": ["path", "token"],
                "properties": {"path": {"type": "string"}, "token": {"type": "string"}}}},
        },
    }
    json_object = {"application/json": {"schema": {"type": "object"}}}
    return {
        "/v1/version": {"get": {
            "operationId": "version", "tags": ["server"],
            "summary": "The version pointer: every dataset's served version and every "
                       "endpoint's token, to build immutable URLs (`?v=`) from.",
            "responses": {
                "200": {"description": f"`Cache-Control: {VERSION_CACHE_CONTROL}`, an ETag.",
                        "content": {"application/json": {"schema": pointer}}},
                "304": {"description": "Not modified."},
            }}},
        "/healthz": {"get": {
            "operationId": "healthz", "tags": ["server"], "summary": "The process is alive.",
            "responses": {"200": {"description": "Alive.", "content": json_object}}}},
        "/readyz": {"get": {
            "operationId": "readyz", "tags": ["server"],
            "summary": "Ready: every required dataset loaded and the first version warmed.",
            "responses": {
                "200": {"description": "Ready, with the served versions.", "content": json_object},
                "503": {"description": "Not ready: what it waits for, or stopping.",
                        "content": json_object}}}},
        "/metrics": {"get": {
            "operationId": "metrics", "tags": ["server"],
            "summary": "Prometheus metrics, every worker's counts summed.",
            "responses": {"200": {"description": "Prometheus text format.",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/status": {"get": {
            "operationId": "status", "tags": ["server"],
            "summary": "The status page: datasets, freshness, pending and refused exports, "
                       "hit ratio, each endpoint's rate and P50/P99 over the last minute.",
            "responses": {"200": {"description": "HTML, no script, no asset from elsewhere.",
                                  "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {
            "operationId": "openapi", "tags": ["server"], "summary": "This document.",
            "responses": {"200": {"description": "OpenAPI 3.1, with an ETag.",
                                  "content": json_object},
                          "304": {"description": "Not modified."}}}},
    }


def document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `settings`."""
    paths: dict[str, Any] = {}
    for spec in settings.endpoints.values():
        paths[spec.path] = {"get": _operation(spec, result_columns(spec, settings.datasets))}
    paths.update(_server_routes())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "duckswap",
            "version": version(),
            "description": "Declared stats endpoints over DuckDB tables that are swapped in "
                           "whole as new exports arrive. Every endpoint answers JSON; the "
                           "version pointer (`/v1/version`) names each endpoint's current "
                           "token, for immutable URLs (`?v=<token>`).",
        },
        "paths": paths,
        "components": {"schemas": {
            "Error": {
                "type": "object", "required": ["error", "message", "status"],
                "properties": {"error": {"type": "string"}, "message": {"type": "string"},
                               "status": {"type": "integer"},
                               "parameter": {"type": "string"}},
            },
            "Meta": {
                "type": "object",
                "required": ["endpoint", "token", "versions", "rows", "truncated"],
                "properties": {
                    "endpoint": {"type": "string"}, "token": {"type": "string"},
                    "versions": {"type": "object",
                                 "additionalProperties": {"type": "string"}},
                    "rows": {"type": "integer", "minimum": 0},
                    "truncated": {"type": "boolean"},
                },
            },
        }},
    }
