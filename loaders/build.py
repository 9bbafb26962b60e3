"""Verify, validate and load one export into a DuckDB table, off to the side."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import duckdb
import google_crc32c
import pyarrow.parquet as pq

from engine.schema import DatasetSchema
from engine.sql import lock_down, quote_ident
from engine.store import remove_version_file
from loaders.errors import LoadError
from loaders.source import Export

Crc32c: Any = google_crc32c.Checksum  # untyped upstream
TOTAL = "\0total"  # expected_rows key of the manifest's whole-export row count


def _digests(path: Path) -> tuple[str, str, str]:
    """sha256 (hex), md5 and crc32c (base64, as GCS reports them) in one read."""
    sha, md5, crc = hashlib.sha256(), hashlib.md5(usedforsecurity=False), Crc32c()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
            md5.update(block)
            crc.update(block)
    return (sha.hexdigest(), base64.b64encode(md5.digest()).decode(),
            base64.b64encode(crc.digest()).decode())


def _manifest(export: Export) -> dict[str, Any] | None:
    if export.manifest is None:
        return None
    try:
        doc = json.loads(export.manifest.read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"_manifest.json is not readable JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
        raise LoadError("_manifest.json must be an object with a 'files' list")
    return doc


def size_problems(sizes: Mapping[str, int], schema: DatasetSchema) -> list[str]:
    """Every part over `max_file_mb`, then the export over `max_export_mb`: checked on the
    sizes a source lists, before any byte is downloaded."""
    problems = []
    if schema.max_file_bytes is not None:
        for name, size in sorted(sizes.items()):
            if size > schema.max_file_bytes:
                problems.append(f"{name}: {size} bytes is over max_file_mb "
                                f"({schema.max_file_bytes / 2**20:g} MiB)")
    total = sum(sizes.values())
    if schema.max_export_bytes is not None and total > schema.max_export_bytes:
        problems.append(f"export is {total} bytes, over max_export_mb "
                        f"({schema.max_export_bytes / 2**20:g} MiB)")
    return problems


def verify(export: Export, allow_empty: bool = False) -> tuple[str, dict[str, int]]:
    """Check files against the manifest (if any); return a content-derived version id
    and the expected row count per file from the manifest (empty without one). LoadError
    with the first problem `audit` finds."""
    version_id, expected_rows, problems = audit(export, allow_empty)
    if problems:
        raise LoadError(problems[0])
    return version_id, expected_rows


def audit(export: Export, allow_empty: bool = False) -> tuple[str, dict[str, int], list[str]]:
    """`verify`'s checks with every problem found (`duckswap check-export`), in order."""
    problems: list[str] = []
    if not export.files and not allow_empty:
        problems.append("export has a marker but no part-*.parquet files (allow_empty is false)")
    sums = {p.name: _digests(p) for p in export.files}
    digests = {name: d[0] for name, d in sums.items()}
    expected_rows: dict[str, int] = {}
    try:
        manifest = _manifest(export)
    except LoadError as exc:
        return _version_id(digests), expected_rows, [*problems, str(exc)]
    if manifest is not None:
        listed = {}
        for entry in manifest["files"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                return (_version_id(digests), expected_rows,
                        [*problems, "_manifest.json: each file needs a 'path'"])
            listed[Path(entry["path"]).name] = entry
        problems += [f"_manifest.json lists missing file {name}"
                     for name in sorted(set(listed) - set(digests))]
        problems += [f"file {name} is not listed in _manifest.json"
                     for name in sorted(set(digests) - set(listed))]
        for name, entry in listed.items():
            if name not in sums:
                continue
            size = (export.path / name).stat().st_size
            if "size" in entry and entry["size"] != size:
                problems.append(f"{name}: size {size} != manifest size {entry['size']}")
            for i, algo in enumerate(("sha256", "md5", "crc32c")):
                if algo in entry and entry[algo] != sums[name][i]:
                    problems.append(f"{name}: {algo} does not match the manifest")
            if "rows" in entry:
                expected_rows[name] = int(entry["rows"])
        if "rows" in manifest:
            expected_rows[TOTAL] = int(manifest["rows"])
    return _version_id(digests), expected_rows, problems


def _version_id(digests: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return h.hexdigest()[:16]


def check_export(export: Export, schema: DatasetSchema) -> str:
    """`verify`, then `validate_files`; returns the version id. Run in the builder process:
    hashing a large export is CPU work, kept off the server's cores and its GIL."""
    version_id, expected_rows = verify(export, schema.allow_empty)
    validate_files(export, schema, expected_rows)
    return version_id


def validate_files(export: Export, schema: DatasetSchema, expected_rows: dict[str, int]) -> None:
    """Every part readable as Parquet, with the declared columns; row counts as the manifest."""
    total = 0
    for path in export.files:
        try:
            meta = pq.read_metadata(path)
            names = set(meta.schema.to_arrow_schema().names)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise LoadError(f"{path.name}: not a readable Parquet file: {exc}") from None
        missing = [c for c in schema.columns if c not in names]
        if missing:
            raise LoadError(f"{path.name}: missing required column {missing[0]!r}")
        if path.name in expected_rows and expected_rows[path.name] != meta.num_rows:
            raise LoadError(
                f"{path.name}: {meta.num_rows} rows != manifest rows {expected_rows[path.name]}"
            )
        total += meta.num_rows
    if TOTAL in expected_rows and expected_rows[TOTAL] != total:
        raise LoadError(f"export has {total} rows != manifest rows {expected_rows[TOTAL]}")


def build_file(files: list[str], schema: DatasetSchema, path: str,
               threads: int) -> tuple[int, dict[str, float]]:
    """Write one version as its own DuckDB file: table `data`, declared columns cast to their
    types, sorted by the lookup key, after the schema's checks. Runs in the builder process;
    returns the row count and the seconds spent validating and building."""
    target = Path(path)
    timings = {"validate": 0.0, "build": 0.0}
    try:
        con = duckdb.connect(path, config={"threads": threads})
        try:
            con.execute("SET enable_progress_bar = false")
            # The export's files, and the version file's own folder (spills), nothing else.
            lock_down(con, [target.parent], files)
            start = time.perf_counter()
            check_types(con, files, schema)
            timings["validate"] += time.perf_counter() - start
            start = time.perf_counter()
            ordered = bool(files) and bool(schema.key) and in_key_order(con, files, schema)
            con.execute(_create_sql(schema, bool(files), sort=not ordered),
                        {"files": files} if files else None)
            row = con.execute("SELECT count(*) FROM data").fetchone()
            rows = int(row[0]) if row else 0
            timings["build"] = time.perf_counter() - start
            start = time.perf_counter()
            check_content(con, schema, rows)
            con.execute("CHECKPOINT")
            timings["validate"] += time.perf_counter() - start
        finally:
            con.close()
    except duckdb.Error as exc:
        remove_version_file(target)
        raise LoadError(f"loading into DuckDB failed: {exc}") from None
    except BaseException:
        remove_version_file(target)
        raise
    return rows, timings


def _select(schema: DatasetSchema) -> str:
    """The export's rows with the declared columns cast to their types."""
    casts = ", ".join(
        f"CAST({quote_ident(c)} AS {t}) AS {quote_ident(c)}" for c, t in schema.columns.items()
    )
    select = f"SELECT {casts}" if schema.extra_columns == "drop" else \
        f"SELECT * REPLACE ({casts})"
    return f"{select} FROM read_parquet($files, union_by_name = true)"


def in_key_order(con: duckdb.DuckDBPyConnection, files: list[str],
                 schema: DatasetSchema) -> bool:
    """Whether the export's rows already come in key order, file after file (what a job that
    range-partitions and sorts its output writes). One streaming pass, 0.2-0.3 s for the demo's
    2.55M rows; sorting those rows anyway took 0.2-0.9 s more than the pass. A NULL in a key
    column counts as out of order (ORDER BY puts NULLs last; this check does not try to), and
    so does a check DuckDB cannot run: it only ever saves a sort, never refuses an export."""
    keys = ", ".join(quote_ident(k) for k in schema.key)
    nulls = " OR ".join(f"{quote_ident(k)} IS NULL" for k in schema.key)
    try:
        row = con.execute(
            f"SELECT count(*) FROM (SELECT ({keys}) AS __k, lag(({keys})) OVER () AS __prev, "
            f"{keys} FROM ({_select(schema)})) "
            f"WHERE (__prev IS NOT NULL AND (__k < __prev) IS NOT FALSE) OR {nulls}",
            {"files": files},
        ).fetchone()
    except duckdb.Error:
        return False
    return row is not None and row[0] == 0


def _create_sql(schema: DatasetSchema, has_files: bool, sort: bool = True) -> str:
    """The table `data`; sorted by the key unless `sort` is false (rows already in key order:
    DuckDB keeps the scan's order, `preserve_insertion_order` being on)."""
    if not has_files:  # an allowed empty export: the declared columns, no rows
        cols = ", ".join(f"{quote_ident(c)} {t}" for c, t in schema.columns.items())
        return f"CREATE TABLE data ({cols})"
    order = ", ".join(quote_ident(k) for k in schema.key)
    return f"CREATE TABLE data AS {_select(schema)}" + (f" ORDER BY {order}" if order and sort
                                                         else "")


def check_types(con: duckdb.DuckDBPyConnection, files: list[str], schema: DatasetSchema) -> None:
    """LoadError with the first problem `type_problems` finds."""
    problems = type_problems(con, files, schema, first=True)
    if problems:
        raise LoadError(problems[0])


def type_problems(con: duckdb.DuckDBPyConnection, files: list[str], schema: DatasetSchema,
                  first: bool = False) -> list[str]:
    """Each part's column types are the declared ones, or widen to them the way DuckDB casts
    implicitly (INTEGER -> BIGINT, FLOAT -> DOUBLE); never a narrowing or a change of kind.
    Every problem (`first`: up to the first one)."""
    problems: list[str] = []
    widens: dict[tuple[str, str], bool] = {}
    for file in files:
        rel = con.read_parquet(file)
        found = {c: str(t) for c, t in zip(rel.columns, rel.types, strict=True)}
        name = Path(file).name
        for column, declared in schema.columns.items():
            actual = found.get(column)
            if actual is None or actual == declared:
                continue  # a missing column is reported by validate_files
            pair = (actual, declared)
            if pair not in widens:
                row = con.execute(
                    f"SELECT can_cast_implicitly(NULL::{actual}, NULL::{declared})").fetchone()
                widens[pair] = bool(row and row[0])
            if not widens[pair]:
                problems.append(f"{name}: column {column!r} is {actual}, declared {declared}")
        if schema.extra_columns == "refuse":
            extra = sorted(set(found) - set(schema.columns))
            if extra:
                problems.append(f"{name}: column {extra[0]!r} is not declared "
                                "(extra_columns = refuse)")
        if first and problems:
            break
    return problems


def check_content(con: duckdb.DuckDBPyConnection, schema: DatasetSchema, rows: int) -> None:
    """Row-level checks on the built table: non-empty, not-null columns, a unique key."""
    if rows == 0 and not schema.allow_empty:
        raise LoadError("export has no rows (allow_empty is false)")
    if schema.not_null and rows:
        counts = ", ".join(f"count(*) FILTER (WHERE {quote_ident(c)} IS NULL)"
                           for c in schema.not_null)
        nulls = con.execute(f"SELECT {counts} FROM data").fetchone() or ()
        for column, n in zip(schema.not_null, nulls, strict=True):
            if n:
                raise LoadError(f"column {column!r} has {n} NULL values (declared not_null)")
    if schema.unique_key and rows:
        cols = ", ".join(quote_ident(c) for c in schema.unique_key)
        dup = con.execute(f"SELECT {cols}, count(*) FROM data GROUP BY ALL "
                          "HAVING count(*) > 1 LIMIT 1").fetchone()
        if dup:
            key = ", ".join(f"{c}={v!r}" for c, v in zip(schema.unique_key, dup, strict=False))
            raise LoadError(f"unique_key ({', '.join(schema.unique_key)}) is not unique: "
                            f"{dup[-1]} rows have {key}")
