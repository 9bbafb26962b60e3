"""The kinds of bad export the server refuses, each with the reason it gives: one list for the
server's tests (`test_gcs.py`, both sources) and `duckswap check-export`'s
(`test_check_export.py`). Each edit spoils a `write_seq_export` folder (50 rows, two parts);
the datasets are declared with `max_file_mb = 0.1`."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")  # ignored by sources; renamed into place
    tmp.write_text(text)
    tmp.rename(path)


def manifest(folder: Path, change: Any = None) -> None:
    files = []
    for p in sorted(folder.glob("part-*.parquet")):
        files.append({"path": p.name, "size": p.stat().st_size,
                      "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                      "rows": pq.read_metadata(p).num_rows})
    doc = {"format": 1, "files": files, "rows": sum(f["rows"] for f in files)}
    if change is not None:
        change(doc)
    write_atomically(folder / "_manifest.json", json.dumps(doc))


def _truncate(folder: Path) -> None:
    part = folder / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:-40])


def _bad_checksum(folder: Path) -> None:
    manifest(folder, lambda doc: doc["files"][0].update(sha256="0" * 64))


def _bad_rows(folder: Path) -> None:
    manifest(folder, lambda doc: doc["files"][0].update(rows=doc["files"][0]["rows"] + 1))


def _bad_md5(folder: Path) -> None:
    manifest(folder, lambda doc: doc["files"][1].update(md5="AAAAAAAAAAAAAAAAAAAAAA=="))


def _rewrite_parts(folder: Path, change: Any) -> None:
    for part in sorted(folder.glob("part-*.parquet")):
        pq.write_table(change(pq.read_table(part)), part)


def missing_column(folder: Path) -> None:
    _rewrite_parts(folder, lambda t: t.drop_columns(["label"]))


def _changed_type(folder: Path) -> None:
    _rewrite_parts(folder, lambda t: t.set_column(
        1, "export_seq", t.column("export_seq").cast(pa.string())))


def _empty(folder: Path) -> None:
    _rewrite_parts(folder, lambda t: t.slice(0, 0))


def _oversized(folder: Path) -> None:
    part = folder / "part-00001.parquet"
    table = pq.read_table(part)
    n = 300
    pad = [os.urandom(512).hex() for _ in range(n)]
    pq.write_table(pa.table({"k": pa.array(range(1000, 1000 + n), pa.int32()),
                             "export_seq": pa.array([2] * n, pa.int32()),
                             "label": pad}).cast(table.schema), part)


def _bad_total(folder: Path) -> None:
    manifest(folder, lambda doc: doc.update(rows=7))


# (edit, marker, a part of the reason the server gives)
BAD_EXPORTS: list[tuple[Any, str, str]] = [
    (_bad_md5, "_manifest.json", "md5 does not match the manifest"),
    (_bad_total, "_manifest.json", "50 rows != manifest rows 7"),
    (_truncate, "_SUCCESS", "not a readable Parquet file"),
    (_bad_checksum, "_manifest.json", "sha256 does not match the manifest"),
    (_bad_rows, "_manifest.json", "rows != manifest rows"),
    (missing_column, "_SUCCESS", "missing required column 'label'"),
    (_changed_type, "_SUCCESS", "column 'export_seq' is VARCHAR, declared INTEGER"),
    (_empty, "_SUCCESS", "export has no rows"),
    (_oversized, "_SUCCESS", "part-00001.parquet: 3"),  # "...: 3xxxxx bytes is over max_file_mb"
]
