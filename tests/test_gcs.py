"""Exports from a GCS bucket: one contract for the local folder and the real GCS emulator, and
what only a bucket does (outages, objects rewritten mid-download, replicas)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from bad_exports import BAD_EXPORTS, manifest, write_atomically
from gcs_emulator import BUCKET, Emulator, SlowProxy, free_port

from conftest import Running, descendants, running, seq_config, wait_for, write_seq_export
from engine.settings import Settings, parse_settings
from loaders.gcs import GcsSource
from serving.app import UPDATER

PREFIX = "prod"
ADMIN = "admin-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


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
            "server": {"threads": 2, "admin_token": ADMIN},
            "source": {"url": f"file://{self.local}", "debounce_ms": 20},
            # A test part is ~1 KiB; `_oversized` writes one of ~300 KiB.
            "datasets": {n: {"key": list(d.key), "columns": dict(d.columns),
                             "max_file_mb": 0.1}
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
        # The marker goes last, after any edit: a watcher never sees a half-made bad export.
        folder = write_seq_export(self.local, seq, rows, "")
        if edit is not None:
            edit(folder)
        if marker and not (folder / marker).exists():
            write_atomically(folder / marker, "{}" if marker == "_manifest.json" else "")
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


# -- the contract: both sources -------------------------------------------------------------

async def test_new_export_is_served_with_no_failed_request(bucket: Bucketish, serve: Any,
                                                           streaming: Any) -> None:
    bucket.write(1)
    srv = await serve(bucket.settings())
    await srv.wait_export("/v1/rows", 1)
    failures = streaming(srv)
    updater = srv.app[UPDATER]
    bucket.write(2)
    await srv.wait_export("/v1/rows", 2, timeout=20)
    listings = updater.listings  # the marker of export 3 lands after this many polls
    bucket.write(3, marker="_manifest.json", edit=manifest)
    await srv.wait_export("/v1/rows", 3, timeout=20)
    assert failures == []
    (event,) = [e for e in updater.history if e.export_id == "export-000003"]
    if bucket.kind == "gcs":  # served within two poll intervals: found by the next listing
        assert event.listing <= listings + 2, (event.listing, listings)
    status, listing = await srv.get("/admin/datasets/seqdata", headers=AUTH)
    assert status == 200 and listing["served"]["export_id"] == "export-000003"
    steps = listing["served"]["timings_s"]
    assert set(steps) == {"list", "download", "validate", "build", "publish", "total"}
    # the export's age counts from its marker's time in the source, before it was loaded
    assert listing["served"]["written_at"] <= listing["served"]["loaded_at"]
    assert listing["export_age_s"] >= listing["data_age_s"]


async def test_export_without_marker_is_ignored_not_refused(bucket: Bucketish,
                                                            serve: Any) -> None:
    bucket.write(1)
    srv = await serve(bucket.settings())
    await srv.wait_export("/v1/rows", 1)
    bucket.write(2, marker="")
    bucket.write(3)  # a later complete one is still picked up
    await srv.wait_export("/v1/rows", 3, timeout=20)
    status, listing = await srv.get("/admin/datasets/seqdata", headers=AUTH)
    assert status == 200 and listing["quarantined"] == []
    assert "export-000002" not in [e["export_id"] for e in listing["history"]]


async def test_quiet_period_completes_an_export_without_marker(bucket: Bucketish,
                                                               serve: Any) -> None:
    bucket.write(1)
    srv = await serve(bucket.settings(quiet_seconds=1.0))
    await srv.wait_export("/v1/rows", 1)
    bucket.write(2, marker="")
    written = time.time()
    await srv.wait_export("/v1/rows", 2, timeout=20)
    (event,) = [e for e in srv.app[UPDATER].history if e.export_id == "export-000002"]
    assert event.at - written >= 1.0 - 0.05  # not before it was quiet for 1 s


@pytest.mark.parametrize(("edit", "marker", "reason"), BAD_EXPORTS)
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
    status, listing = await srv.get("/admin/datasets/seqdata", headers=AUTH)
    assert status == 200
    (quarantined,) = listing["quarantined"]
    assert quarantined["export_id"] == "export-000002" and reason in quarantined["reason"]
    assert listing["served"]["export_id"] == "export-000001"
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

    async def told() -> bool:  # the loader tells the workers within STATUS_SECONDS
        status, body = await srv.get("/readyz")
        assert status == 200 and body["data_age_s"]["seqdata"] > 0
        return bool(body["source"]["errors"] > errors)

    await wait_for(told, what="/readyz to count the failed listing")
    status, body = await srv.get("/readyz")
    assert body["source"]["last_listed_age_s"] > 5
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
        await srv.wait_ready()
    ids = [(await srv.get("/readyz"))[1]["versions"] for srv in (first, second)]
    assert ids[0] == ids[1] and ids[0]["seqdata"]
    # and the same export age: the marker's time in the bucket, not each one's load
    written = [srv.app[UPDATER].catalog.current.versions["seqdata"].written_at
               for srv in (first, second)]
    assert written[0] == written[1] > 0


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


async def test_restart_with_the_bucket_down_serves_the_cached_version(
        tmp_path: Path, emulator: Emulator, serve: Any) -> None:
    b = _gcs(tmp_path, emulator)
    b.write(1)
    settings = b.settings()
    srv = await serve(settings)
    await srv.wait_export("/v1/rows", 1)
    await srv.wait_ready()
    _, before = await srv.get("/readyz")
    await srv.stop()
    emulator.stop()
    again = await serve(settings)
    await again.wait_export("/v1/rows", 1, timeout=25)  # under gcsfs's own ~30 s of retries
    await again.wait_ready(timeout=25)
    _, after = await again.get("/readyz")
    assert after["versions"] == before["versions"]
    assert after["data_age_s"]["seqdata"] >= before["data_age_s"]["seqdata"]


def _get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
        return json.loads(resp.read())


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_kill_9_mid_download_restarts_on_the_last_good_version(tmp_path: Path,
                                                               emulator: Emulator) -> None:
    """A real server process, its bucket behind a slow link; SIGKILL while export 2 downloads.
    The restart (bucket unreachable) serves export 1 from its data dir, with staging emptied;
    once the bucket is back, export 2 is loaded whole."""
    b = _gcs(tmp_path, emulator)
    b.write(1)
    proxy = SlowProxy(emulator.port, rate=64 * 1024)
    proxy.start()
    data, port = tmp_path / "data", free_port()
    config = tmp_path / "duckswap.toml"
    config.write_text(f"""
[server]
port = {port}
data_dir = "{data}"
[source]
url = "gs://{BUCKET}/{PREFIX}"
endpoint_url = "{proxy.url}"
token = "anon"
poll_seconds = 0.3
[datasets.seqdata]
key = ["k"]
columns = {{ k = "INTEGER", export_seq = "INTEGER", label = "VARCHAR" }}
[endpoints.rows]
path = "/v1/rows"
datasets = ["seqdata"]
sql = "SELECT k, export_seq FROM seqdata ORDER BY k LIMIT 1"
""")

    log = (tmp_path / "server.log").open("ab")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--config",
                                 str(config)], stdout=log, stderr=log)

    def serving(seq: int) -> bool:
        return bool(_get(port, "/v1/rows")["data"][0]["export_seq"] == seq)

    server = start()
    try:
        _wait(lambda: serving(1), 60, "export 1")
        b.write(2, rows=100_000)  # ~1 MB of parts: seconds at 64 KiB/s
        staged = data / "staging"
        _wait(lambda: any(staged.glob("duckswap-*/*.part")), 30, "export 2 downloading")
        builders = descendants(server.pid)  # its workers and build processes
        assert builders
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        # No cleanup ran in the server, yet its build process does not outlive it.
        _wait(lambda: not running(builders), 10, "the killed server's build process to end")
        assert any(staged.glob("duckswap-*/*.part"))  # the crash did cut a download short
        proxy.stop()  # and the bucket is unreachable when the server comes back

        server = start()
        _wait(lambda: serving(1), 30, "the cached export 1 after the restart")
        # Ready: its first warm (which spools next to the versions) is over.
        _wait(lambda: _get(port, "/readyz")["status"] == "ready", 30, "/readyz")
        assert list(staged.iterdir()) == []
        state = json.loads((data / "state.json").read_text())
        named = {r["file"] for r in state["datasets"]["seqdata"]["versions"]}
        assert {p.name for p in (data / "versions").iterdir()} == named

        proxy.start()
        _wait(lambda: serving(2), 90, "export 2 once the bucket is back")
    finally:
        server.kill()
        server.wait()
        proxy.stop()
        log.close()
