"""`duckswap check-export`: the server's checks on a local folder, before an upload. Every kind
of bad export the server refuses (`bad_exports.BAD_EXPORTS`, the list the server's tests use) is
refused here with the same reason, and the folder is left exactly as it was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bad_exports import BAD_EXPORTS, missing_column, write_atomically

from conftest import write_seq_export

CONFIG = """
[source]
url = "file://{root}"
[datasets.seqdata]
key = ["k"]
columns = {{ k = "INTEGER", export_seq = "INTEGER", label = "VARCHAR" }}
max_file_mb = 0.1
[endpoints.rows]
path = "/v1/rows"
sql = "SELECT k, export_seq, label FROM seqdata ORDER BY k"
"""


def _check(folder: Path, config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "serving.cli", "check-export", str(folder),
                           "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=120)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "duckswap.toml"
    path.write_text(CONFIG.format(root=tmp_path / "src"))
    return path


@pytest.mark.parametrize(("edit", "marker", "reason"), BAD_EXPORTS)
def test_each_bad_export_the_server_refuses_is_refused_with_its_reason(
        tmp_path: Path, config: Path, edit: Any, marker: str, reason: str) -> None:
    folder = write_seq_export(tmp_path / "src", 2, 50, "")
    edit(folder)
    if not (folder / marker).exists():
        write_atomically(folder / marker, "{}" if marker == "_manifest.json" else "")
    before = _snapshot(folder)
    res = _check(folder, config)
    assert res.returncode == 1, res.stdout + res.stderr
    assert reason in res.stdout, res.stdout
    assert "refused as seqdata" in res.stdout
    assert _snapshot(folder) == before  # nothing written into the folder


def test_every_problem_is_listed_not_only_the_first(tmp_path: Path, config: Path) -> None:
    """No marker, two parts missing a column, one over max_file_mb: each named."""
    folder = write_seq_export(tmp_path / "src", 1, 50, "")
    missing_column(folder)  # both parts lose 'label'
    res = _check(folder, config)
    assert res.returncode == 1
    assert "no marker (_manifest.json or _SUCCESS)" in res.stdout
    assert "part-00000.parquet: missing required column 'label'" in res.stdout
    assert "part-00001.parquet: missing required column 'label'" in res.stdout
    assert "(3 problems)" in res.stdout, res.stdout


def test_every_part_of_the_wrong_type_is_named(tmp_path: Path, config: Path) -> None:
    folder = tmp_path / "src" / "seqdata" / "export-000001"
    folder.mkdir(parents=True)
    for i in range(3):
        pq.write_table(pa.table({"k": pa.array([str(i)]), "export_seq": pa.array([1], pa.int32()),
                                 "label": pa.array(["x"])}), folder / f"part-{i:05d}.parquet")
    (folder / "_SUCCESS").write_text("")
    res = _check(folder, config)
    assert res.returncode == 1
    for i in range(3):
        assert f"part-{i:05d}.parquet: column 'k' is VARCHAR, declared INTEGER" in res.stdout
    assert "(3 problems)" in res.stdout, res.stdout


def test_a_good_export_passes_with_the_servers_version_id(tmp_path: Path, config: Path) -> None:
    folder = write_seq_export(tmp_path / "src", 1, 50)
    res = _check(folder, config)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok as seqdata: 50 rows, version " in res.stdout
    # The version id is content-derived: the one the server gives the same files.
    from loaders.build import verify
    from loaders.source import LocalSource

    (export,) = LocalSource(tmp_path / "src").complete_exports("seqdata")
    assert f"version {verify(export)[0]}" in res.stdout


def test_the_dataset_comes_from_the_folder_or_the_flag(tmp_path: Path, config: Path) -> None:
    folder = write_seq_export(tmp_path / "src", 1, 50)
    other = tmp_path / "elsewhere" / "out"
    other.parent.mkdir(parents=True)
    folder.rename(other)
    res = _check(other, config)
    assert res.returncode == 2 and "no dataset 'elsewhere'" in res.stderr
    assert "--dataset: one of seqdata" in res.stderr
    assert _check(other, config, "--dataset", "seqdata").returncode == 0


def test_a_spark_style_manifest_passes(tmp_path: Path, config: Path) -> None:
    """The manifest docs/exports.md's PySpark snippet writes after a job's parts (each part's
    name, size, row count, and md5 and crc32c in base64 as GCS reports them; the total rows),
    over parts written by pyarrow and named as Spark names them: accepted whole, refused when
    it misdescribes a part."""
    import base64
    import hashlib
    import json

    import google_crc32c

    folder = tmp_path / "src" / "seqdata" / "2026-12-04T0600"
    folder.mkdir(parents=True)
    for i in range(3):
        ks = range(i * 10, i * 10 + 10)
        pq.write_table(pa.table({"k": pa.array(ks, pa.int32()),
                                 "export_seq": pa.array([1] * 10, pa.int32()),
                                 "label": [f"r{k}" for k in ks]}),
                       folder / f"part-{i:05d}-3f2a9c1e-c000.snappy.parquet")
    (folder / "_SUCCESS").write_text("")  # Spark's own marker is there too
    files = []
    for part in sorted(folder.glob("part-*.parquet")):  # what the snippet writes
        data = part.read_bytes()
        files.append({
            "path": part.name, "size": len(data), "rows": pq.ParquetFile(part).metadata.num_rows,
            "md5": base64.b64encode(hashlib.md5(data).digest()).decode(),  # blob.md5_hash
            "crc32c": base64.b64encode(google_crc32c.Checksum(data).digest()).decode(),
        })
    doc = {"format": 1, "rows": sum(f["rows"] for f in files), "files": files}
    (folder / "_manifest.json").write_text(json.dumps(doc))
    res = _check(folder, config)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "30 rows" in res.stdout
    doc["files"][2]["crc32c"] = doc["files"][1]["crc32c"]  # parts the manifest misdescribes
    doc["files"][1]["size"] += 1
    doc["files"][0]["rows"] = 11
    (folder / "_manifest.json").write_text(json.dumps(doc))
    res = _check(folder, config)
    assert res.returncode == 1, res.stdout
    names = [f["path"] for f in doc["files"]]
    for problem in (f"{names[2]}: crc32c does not match the manifest",  # every one of them
                    f"{names[1]}: size {doc['files'][1]['size'] - 1} != manifest size",
                    f"{names[0]}: 10 rows != manifest rows 11"):
        assert problem in res.stdout, res.stdout
