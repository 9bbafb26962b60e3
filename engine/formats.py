"""Answer formats beside JSON: CSV and the Arrow IPC stream, chosen with `?format=` (never
`Accept`: public answers carry no `Vary`, so the URL alone must name the bytes).

A format other than JSON is part of the cache key (`with_format`), so each format is cached,
ETagged, counted as popular and warmed like JSON. Both hold exactly the rows of their JSON twin:
a CSV cell is the text of the JSON value (strings and dates unquoted, NULL empty, lists and
structs as JSON); Arrow columns have the types DuckDB gives its own Arrow output.
"""

from __future__ import annotations

import csv
import functools
import io
import threading
from typing import Any

import duckdb
import pyarrow as pa

from engine.responses import BodyEncoder, dumps

FORMATS = {
    "json": "application/json",
    "csv": "text/csv; charset=utf-8; header=present",
    "arrow": "application/vnd.apache.arrow.stream",
}
_MARK = "\0format="  # no parameter value can hold a NUL, so no JSON key looks like this


def with_format(key: tuple[Any, ...], fmt: str) -> tuple[Any, ...]:
    """The cache key of `key`'s answer in `fmt` (JSON keys stay as they are)."""
    return key if fmt == "json" else (*key, _MARK + fmt)


def split_format(key: tuple[Any, ...], params: int) -> tuple[tuple[Any, ...], str]:
    """(the parameters' key, the format) of a cache key of an endpoint with `params`
    parameters."""
    if len(key) == params + 1 and isinstance(key[-1], str) and key[-1].startswith(_MARK):
        return key[:-1], key[-1][len(_MARK):]
    return key, "json"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    text = dumps(value).decode()
    return text[1:-1] if text.startswith('"') else text  # dates, times, UUIDs: unquoted


def encode_csv(columns: list[str], rows: list[tuple[Any, ...]]) -> bytes:
    """RFC 4180: a header row, then one row per answer row (CRLF line ends)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    writer.writerows([_cell(v) for v in row] for row in rows)
    return out.getvalue().encode()


_types_lock = threading.Lock()
_types_con: duckdb.DuckDBPyConnection | None = None


@functools.lru_cache(maxsize=256)
def arrow_type(duckdb_type: str) -> pa.DataType:
    """The Arrow type DuckDB gives a column of `duckdb_type` in its own Arrow output."""
    global _types_con
    with _types_lock:
        if _types_con is None:
            _types_con = duckdb.connect()
        table = _types_con.sql(f"SELECT NULL::{duckdb_type} AS x").to_arrow_table()
    return table.schema.field(0).type


def encode_arrow(columns: list[str], types: list[Any] | None, rows: list[tuple[Any, ...]],
                 metadata: dict[str, str] | None = None) -> bytes:
    """One record batch in an Arrow IPC stream, typed as DuckDB types the columns (`types`:
    their DuckDB types; where unknown, Arrow infers from the values); `metadata` on the
    schema."""
    arrays = []
    for i in range(len(columns)):
        values = [row[i] for row in rows]
        t = arrow_type(str(types[i])) if types is not None else None
        arrays.append(pa.array(values, type=t))
    table = pa.Table.from_arrays(arrays, names=list(columns), metadata=metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def encode_answer(fmt: str, encoder: BodyEncoder, columns: list[str], types: list[Any] | None,
                  rows: list[tuple[Any, ...]], truncated: bool) -> bytes:
    """An answer's bytes in `fmt`. JSON carries `meta`; an Arrow stream the same as schema
    metadata (`duckswap.endpoint`, `.token`, `.truncated`); CSV the rows alone (the headers
    name the token and versions of every format)."""
    if fmt == "json":
        return encoder(columns, rows, truncated)
    if fmt == "csv":
        return encode_csv(columns, rows)
    return encode_arrow(columns, types, rows, {**encoder.meta,
                                               "duckswap.truncated": str(truncated).lower()})
