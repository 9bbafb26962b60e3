"""Verify, validate and load one export into a DuckDB table, off to the side."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import duckdb
import google_crc32c
import pyarrow.parquet as pq

from loaders.schema import DatasetSchema, LoadError
from loaders.source import Export

Crc32c: Any = google_crc32c.Checksum  # untyped upstream
TOTAL = "\0total"  # expected_rows key of the manifest's whole-export row count


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


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


def verify(export: Export) -> tuple[str, dict[str, int]]:
    """Check files against the manifest (if any); return a content-derived version id
    and the expected row count per file from the manifest (empty without one)."""
    if not export.files:
        raise LoadError("export has a marker but no part-*.parquet files")
    manifest = _manifest(export)
    sums = {p.name: _digests(p) for p in export.files}
    digests = {name: d[0] for name, d in sums.items()}
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
            for i, algo in enumerate(("sha256", "md5", "crc32c")):
                if algo in entry and entry[algo] != sums[name][i]:
                    raise LoadError(f"{name}: {algo} does not match the manifest")
            if "rows" in entry:
                expected_rows[name] = int(entry["rows"])
        if "rows" in manifest:
            expected_rows[TOTAL] = int(manifest["rows"])
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return h.hexdigest()[:16], expected_rows


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
