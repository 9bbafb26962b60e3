"""Exports from a GCS bucket: one contract for the local folder and the real GCS emulator, and
what only a bucket does (outages, objects rewritten mid-download, replicas)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from gcs_emulator import BUCKET, Emulator

from conftest import Running, seq_config, wait_for, write_seq_export
from loaders.gcs import GcsSource
from serving.app import UPDATER
from serving.settings import Settings, parse_settings

PREFIX = "prod"


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    emu = Emulator(tmp_path / "gcs")
    emu.start()
    yield emu
    emu.stop()


class Bucketish:
    """Where a test drops exports: the local folder or the emulator, same calls."""

    def __init__(self, kind: str, tmp_path: Path, emulator: Emulator | None) -> None:
        self.kind = kind
        self.local = tmp_path / ("src" if kind == "local" else "outbox")
        self.local.mkdir()
        self.emulator = emulator

    def settings(self, **source: Any) -> Settings:
        base = seq_config(self.local)
        raw: dict[str, Any] = {
            "server": {"threads": 2},
            "source": {"url": f"file://{self.local}", "debounce_ms": 20},
            "datasets": {n: {"key": list(d.key), "columns": dict(d.columns)}
                         for n, d in base.datasets.items()},
            "endpoints": {"rows": {
                "path": "/v1/rows", "datasets": ["seqdata"], "row_limit": 1000,
                "sql": "SELECT k, export_seq, label FROM seqdata WHERE k >= $min_k ORDER BY k",
                "params": {"min_k": {"type": "int", "min": 0, "default": 0}}}},
        }
        if self.emulator is not None:
            raw["source"] = {"url": f"gs://{BUCKET}/{PREFIX}", "poll_seconds": 0.3,
                             "endpoint_url": self.emulator.url, "token": "anon"}
        raw["source"].update(source)
        return parse_settings(raw, "test.toml")

    def write(self, seq: int, rows: int = 50, marker: str = "_SUCCESS",
              edit: Any = None) -> Path:
        folder = write_seq_export(self.local, seq, rows, marker)
        if edit is not None:
            edit(folder)
        if self.emulator is not None:
            self.emulator.upload_export(folder, PREFIX)
        return folder


@pytest.fixture(params=["local", "gcs"])
def bucket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Bucketish]:
    if request.param == "local":
        yield Bucketish("local", tmp_path, None)
        return
    emu = Emulator(tmp_path / "gcs")
    emu.start()
    try:
        yield Bucketish("gcs", tmp_path, emu)
    finally:
        emu.stop()


async def _stream(srv: Running, stop: asyncio.Event, failures: list[Any]) -> int:
    n = 0
    while not stop.is_set():
        status, body = await srv.get("/v1/rows")
        n += 1
        if status != 200:
            failures.append((status, body))
        await asyncio.sleep(0.005)
    return n


@pytest.fixture
async def streaming() -> AsyncIterator[Any]:
    tasks: list[tuple[asyncio.Event, asyncio.Task[int]]] = []
    failures: list[Any] = []

    def start(srv: Running) -> list[Any]:
        stop = asyncio.Event()
        tasks.append((stop, asyncio.create_task(_stream(srv, stop, failures))))
        return failures

    yield start
    for stop, task in tasks:
        stop.set()
        await task


def _manifest(folder: Path, **override: Any) -> None:
    import hashlib

    import pyarrow.parquet as pq

    files = []
    for p in sorted(folder.glob("part-*.parquet")):
        files.append({"path": p.name, "size": p.stat().st_size,
                      "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                      "rows": pq.read_metadata(p).num_rows})
    doc = {"format": 1, "files": files, "rows": sum(f["rows"] for f in files), **override}
    (folder / "_manifest.json").write_text(json.dumps(doc))


# -- the contract: both sources -------------------------------------------------------------

async def test_new_export_is_served_with_no_failed_request(bucket: Bucketish, serve: Any,
                                                           streaming: Any) -> None:
    bucket.write(1)
    srv = await serve(bucket.settings())
    await srv.wait_export("/v1/rows", 1)
    failures = streaming(srv)
    bucket.write(2)
    await srv.wait_export("/v1/rows", 2, timeout=20)
    bucket.write(3, marker="_manifest.json", edit=_manifest)
    await srv.wait_export("/v1/rows", 3, timeout=20)
    assert failures == []


async def test_export_without_marker_is_ignored_not_refused(bucket: Bucketish,
                                                            serve: Any) -> None:
    bucket.write(1)
    srv = await serve(bucket.settings())
    await srv.wait_export("/v1/rows", 1)
    bucket.write(2, marker="")
    bucket.write(3)  # a later complete one is still picked up
    await srv.wait_export("/v1/rows", 3, timeout=20)
    assert srv.app[UPDATER].refused == {}


def _truncate(folder: Path) -> None:
    part = folder / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:-40])


def _bad_checksum(folder: Path) -> None:
    _manifest(folder)
    doc = json.loads((folder / "_manifest.json").read_text())
    doc["files"][0]["sha256"] = "0" * 64
    (folder / "_manifest.json").write_text(json.dumps(doc))


def _bad_rows(folder: Path) -> None:
    _manifest(folder)
    doc = json.loads((folder / "_manifest.json").read_text())
    doc["files"][0]["rows"] += 1
    (folder / "_manifest.json").write_text(json.dumps(doc))


def _bad_md5(folder: Path) -> None:
    _manifest(folder)
    doc = json.loads((folder / "_manifest.json").read_text())
    doc["files"][1]["md5"] = "AAAAAAAAAAAAAAAAAAAAAA=="
    (folder / "_manifest.json").write_text(json.dumps(doc))


def _bad_total(folder: Path) -> None:
    _manifest(folder)
    doc = json.loads((folder / "_manifest.json").read_text())
    doc["rows"] = 7
    (folder / "_manifest.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(("edit", "marker", "reason"), [
    (_bad_md5, "_manifest.json", "md5 does not match the manifest"),
    (_bad_total, "_manifest.json", "50 rows != manifest rows 7"),
    (_truncate, "_SUCCESS", "not a readable Parquet file"),
    (_bad_checksum, "_manifest.json", "sha256 does not match the manifest"),
    (_bad_rows, "_manifest.json", "rows != manifest rows"),
])
async def test_bad_export_is_refused_and_old_keeps_serving(
        bucket: Bucketish, serve: Any, caplog: pytest.LogCaptureFixture, edit: Any,
        marker: str, reason: str) -> None:
    bucket.write(1)
    srv = await serve(bucket.settings())
    await srv.wait_export("/v1/rows", 1)
    bucket.write(2, marker=marker, edit=edit)
    updater = srv.app[UPDATER]

    async def refused() -> bool:
        return ("seqdata", "export-000002") in updater.refused

    with caplog.at_level(logging.ERROR, logger="duckswap.loader"):
        await wait_for(refused, 20, "the refusal")
    assert reason in updater.refused[("seqdata", "export-000002")]
    assert reason in caplog.text
    status, body = await srv.get("/v1/rows")
    assert status == 200 and body["data"][0]["export_seq"] == 1
    loads = updater.outcomes[("seqdata", "refused")]
    bucket.write(3)  # the quarantined export is not retried; the next good one lands
    await srv.wait_export("/v1/rows", 3, timeout=20)
    assert updater.outcomes[("seqdata", "refused")] == loads


# -- what only a bucket does ----------------------------------------------------------------

def _gcs(tmp_path: Path, emulator: Emulator) -> Bucketish:
    return Bucketish("gcs", tmp_path, emulator)


async def test_outage_keeps_serving_and_recovers(tmp_path: Path, emulator: Emulator,
                                                 serve: Any, streaming: Any) -> None:
    b = _gcs(tmp_path, emulator)
    b.write(1)
    srv = await serve(b.settings())
    await srv.wait_export("/v1/rows", 1)
    failures = streaming(srv)
    updater = srv.app[UPDATER]
    errors = updater.source_errors
    emulator.stop()

    async def noticed() -> bool:
        return updater.source_errors > errors

    # gcsfs retries a refused connection for ~30 s before the listing fails.
    await wait_for(noticed, 90, "a failed listing")
    status, body = await srv.get("/readyz")
    assert status == 200 and body["data_age_s"]["seqdata"] > 0
    assert body["source"]["errors"] > errors and body["source"]["last_listed_age_s"] > 5
    emulator.start()
    b.write(2)
    await srv.wait_export("/v1/rows", 2, timeout=90)
    assert failures == []


async def test_two_servers_agree_on_version_ids(tmp_path: Path, emulator: Emulator,
                                                serve: Any) -> None:
    b = _gcs(tmp_path, emulator)
    b.write(1)
    first = await serve(b.settings(staging_dir=str(tmp_path / "s1")))
    second = await serve(b.settings(staging_dir=str(tmp_path / "s2")))
    for srv in (first, second):
        await srv.wait_export("/v1/rows", 1)
    ids = [(await srv.get("/readyz"))[1]["versions"] for srv in (first, second)]
    assert ids[0] == ids[1] and ids[0]["seqdata"]


def test_object_rewritten_during_download_is_fetched_again(tmp_path: Path,
                                                           emulator: Emulator) -> None:
    """The second part is rewritten (new rows) after the listing and while the first part
    downloads: the fetched export holds the new generation whole, never a mix."""
    b = _gcs(tmp_path, emulator)
    folder = b.write(1)
    source = GcsSource(f"gs://{BUCKET}/{PREFIX}", tmp_path / "staging",
                       endpoint_url=emulator.url, token="anon", concurrency=1)
    listed = source.complete_exports("seqdata")[0]
    rewritten = write_seq_export(tmp_path / "v2", 2)  # same names, other content
    download = source._download
    calls = []

    def racing(obj: Any, into: Path) -> None:
        if not calls:  # the writer replaces part 1 while part 0 is being fetched
            emulator.fs.put_file(str(rewritten / "part-00001.parquet"),
                                 f"{BUCKET}/{PREFIX}/seqdata/export-000001/part-00001.parquet")
        calls.append(obj.name)
        download(obj, into)

    source._download = racing  # type: ignore[method-assign]
    local = source.fetch(listed)
    got = (local.path / "part-00001.parquet").read_bytes()
    assert got == (rewritten / "part-00001.parquet").read_bytes()
    assert got != (folder / "part-00001.parquet").read_bytes()
    assert calls.count("part-00001.parquet") >= 2  # the stale generation was refused
    assert not list(local.path.glob("*.part"))
    source.discard(local)
    assert not local.path.exists()
