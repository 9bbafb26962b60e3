"""Verify, validate and load one export into a DuckDB table, off to the side."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq

from loaders.schema import DatasetSchema, LoadError
from loaders.source import Export


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def verify(export: Export) -> tuple[str, dict[str, int]]:
    """Check files against the manifest (if any); return a content-derived version id
    and the expected row count per file from the manifest (empty without one)."""
    if not export.files:
        raise LoadError("export has a marker but no part-*.parquet files")
    manifest = _manifest(export)
    digests = {p.name: _sha256(p) for p in export.files}
    expected_rows: dict[str, int] = {}
    if manifest is not None:
        listed = {}
        for entry in manifest["files"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise LoadError("_manifest.json: each file needs a 'path'")
            listed[Path(entry["path"]).name] = entry
        missing = sorted(set(listed) - set(digests))
        if missing:
            raise LoadError(f"_manifest.json lists missing file {missing[0]}")
        extra = sorted(set(digests) - set(listed))
        if extra:
            raise LoadError(f"file {extra[0]} is not listed in _manifest.json")
        for name, entry in listed.items():
            size = (export.path / name).stat().st_size
            if "size" in entry and entry["size"] != size:
                raise LoadError(f"{name}: size {size} != manifest size {entry['size']}")
            if "sha256" in entry and entry["sha256"] != digests[name]:
                raise LoadError(f"{name}: sha256 does not match the manifest")
            if "rows" in entry:
                expected_rows[name] = int(entry["rows"])
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return h.hexdigest()[:16], expected_rows


def validate_files(export: Export, schema: DatasetSchema, expected_rows: dict[str, int]) -> None:
    """Every part readable as Parquet, with the declared columns; row counts as the manifest."""
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


def build_file(
    files: list[str], columns: dict[str, str], key: tuple[str, ...], path: str, threads: int
) -> int:
    """Write one version as its own DuckDB file: table `data`, declared columns cast to their
    types, sorted by the lookup key. Runs in the builder process; returns the row count."""
    casts = ", ".join(
        f"CAST({quote_ident(c)} AS {t}) AS {quote_ident(c)}" for c, t in columns.items()
    )
    order = ", ".join(quote_ident(k) for k in key)
    sql = (
        f"CREATE TABLE data AS SELECT * REPLACE ({casts}) "
        f"FROM read_parquet($files, union_by_name = true)"
        + (f" ORDER BY {order}" if order else "")
    )
    target = Path(path)
    try:
        con = duckdb.connect(path, config={"threads": threads})
        try:
            con.execute("SET enable_progress_bar = false")
            con.execute(sql, {"files": files})
            row = con.execute("SELECT count(*) FROM data").fetchone()
            con.execute("CHECKPOINT")
        finally:
            con.close()
    except duckdb.Error as exc:
        remove_version_file(target)
        raise LoadError(f"loading into DuckDB failed: {exc}") from None
    except BaseException:
        remove_version_file(target)
        raise
    rows = int(row[0]) if row else 0
    if rows == 0:
        remove_version_file(target)
        raise LoadError("export has no rows")
    return rows


def remove_version_file(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".wal")):
        p.unlink(missing_ok=True)
