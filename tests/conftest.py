"""Shared fixtures: real Parquet exports on disk, real settings, a real server on loopback."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from engine.settings import Settings, load_settings, parse_settings
from engine.store import Replica, Snapshot
from loaders.catalog import Catalog
from loaders.source import LocalSource
from loaders.updater import Updater
from loaders.warm import WarmPolicy
from serving.app import create_app

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "data" / "demo.toml"


def write_seq_export(root: Path, seq: int, rows: int = 50, marker: str = "_SUCCESS") -> Path:
    """A tiny `seqdata` export whose every row carries its export number."""
    folder = root / "seqdata" / f"export-{seq:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    half = rows // 2
    for part, ks in enumerate((range(half), range(half, rows))):
        table = pa.table({
            "k": pa.array(list(ks), pa.int32()),
            "export_seq": pa.array([seq] * len(ks), pa.int32()),
            "label": pa.array([f"row-{k}-of-{seq}" for k in ks]),
        })
        tmp = folder / f"part-{part:05d}.parquet.part"
        pq.write_table(table, tmp)
        tmp.rename(folder / f"part-{part:05d}.parquet")
    if marker:
        (folder / marker).write_text("{}" if marker == "_manifest.json" else "")
    return folder


def seq_config_file(tmp_path: Path, data_dir: Path) -> Path:
    """A config file serving `seqdata` exports from `tmp_path/src` (for `duckswap serve`)."""
    config = tmp_path / "duckswap.toml"
    config.write_text(f"""
[server]
data_dir = "{data_dir}"
[source]
url = "file://{tmp_path / 'src'}"
[datasets.seqdata]
key = ["k"]
columns = {{ k = "INTEGER" }}
[endpoints.rows]
path = "/v1/rows"
datasets = ["seqdata"]
sql = "SELECT k FROM seqdata"
""")
    return config


def seq_config(root: Path, row_limit: int = 1000, export: str | None = None,
               **server: Any) -> Settings:
    raw: dict[str, Any] = {
        "server": {"threads": 2, **server},
        "source": {"url": f"file://{root}", "debounce_ms": 20},
        "datasets": {
            "seqdata": {
                "key": ["k"],
                "columns": {"k": "INTEGER", "export_seq": "INTEGER", "label": "VARCHAR"},
            }
        },
        "endpoints": {
            "rows": {
                "path": "/v1/rows",
                "datasets": ["seqdata"],
                "row_limit": row_limit,
                "sql": "SELECT k, export_seq, label FROM seqdata WHERE k >= $min_k ORDER BY k",
                "params": {"min_k": {"type": "int", "min": 0, "default": 0}},
            },
            "slow": {
                "path": "/v1/slow",
                "datasets": ["seqdata"],
                "sql": "SELECT count(*) AS n FROM range(100000000) a, range(1000000) b, "
                "(SELECT k FROM seqdata LIMIT 1) s WHERE a.range * b.range = $x + s.k",
                "params": {"x": {"type": "int"}},
            },
        },
    }
    if export is not None:
        raw["datasets"]["seqdata"]["export"] = export
    return parse_settings(raw, "test.toml")


def demo_settings(root: Path) -> Settings:
    return load_settings(DEMO_CONFIG, {"DUCKSWAP_SOURCE__URL": f'"file://{root}"'})


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout: float = 30.0, what: str = "condition"
) -> None:
    """Poll `check` until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Running:
    def __init__(self, server: TestServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session
        self.app = server.app

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.session.get(self.url(path), **kw) as resp:
            return resp.status, await resp.json()

    async def raw(self, path: str, **headers: str) -> tuple[int, Any, bytes]:
        """Status, headers and body bytes; redirects not followed."""
        async with self.session.get(self.url(path), headers=headers,
                                    allow_redirects=False) as resp:
            return resp.status, resp.headers.copy(), await resp.read()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        async def ready() -> bool:
            status, _ = await self.get("/readyz")
            return status == 200

        await wait_for(ready, timeout, "/readyz to answer 200")

    async def wait_export(self, path: str, seq: int, timeout: float = 30.0) -> None:
        async def serving() -> bool:
            status, body = await self.get(path)
            return status == 200 and body["data"][0]["export_seq"] == seq

        await wait_for(serving, timeout, f"export {seq} to be served")

    async def stop(self) -> None:
        """Shut down as on SIGTERM (cleanup runs: the data dir is released)."""
        await self.session.close()
        await self.server.close()


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's servers keep their default data dirs (restart caches) in its own folder."""
    home = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


@pytest.fixture
async def serve() -> Any:
    """Start a real server for given settings on a loopback port."""
    started: list[tuple[TestServer, aiohttp.ClientSession]] = []

    async def start(settings: Settings, warm: WarmPolicy | None = None) -> Running:
        server = TestServer(create_app(settings, warm), host="127.0.0.1")
        await server.start_server()
        session = aiohttp.ClientSession()
        started.append((server, session))
        return Running(server, session)

    yield start
    for server, session in started:
        if not session.closed:
            await session.close()
            await server.close()


def _parents() -> dict[int, int]:
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while listed
            continue
        if fields[0] != "Z":
            out[int(stat.parent.name)] = int(fields[1])
    return out


def descendants(pid: int) -> set[int]:
    """Live (not zombie) processes under `pid`: its children, theirs, and so on (Linux)."""
    parents = _parents()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def running(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a zombie has ended)."""
    return pids & set(_parents())



class ReplicaPublisher:
    """A Replica serving what an updater publishes, with no HTTP and no event loop (the
    loader's side of a worker, by calls): for tests of the loader and the store alone."""

    def __init__(self, replica: Replica, catalog: Catalog) -> None:
        self.replica = replica
        self.catalog = catalog

    def holders(self) -> list[str]:
        return ["replica"]

    def stage(self, snap: Snapshot) -> None:
        self.replica.stage(snap)

    def commit(self, snap: Snapshot) -> None:
        self.replica.commit(snap.id)

    def collect(self) -> None:
        """Drop what the replica has drained, and the files nobody holds."""
        for snap_id in self.replica.collect():
            self.catalog.release(snap_id, "replica")
        self.catalog.collect()


def replica_updater(root: Path, datasets: Any, threads: int = 1,
                    **kw: Any) -> tuple[Updater, Replica, ReplicaPublisher]:
    """An updater on the `file://` folder `root` publishing to a Replica (versions in a new
    folder beside `root`: a test's `tmp_path` is its root or holds it, and pytest removes it)."""
    versions = Path(tempfile.mkdtemp(prefix="duckswap-versions-", dir=root.parent))
    replica = Replica(versions, threads=threads)
    catalog = Catalog(versions)
    publisher = ReplicaPublisher(replica, catalog)
    updater = Updater(LocalSource(root), catalog, datasets, publisher=publisher, **kw)
    return updater, replica, publisher


async def small_demo(root: Path, serve: Any) -> Running:
    """The demo config serving a small demo export written under `root`, ready."""
    from data.generate import write_export

    write_export(root, 1, size="small")
    srv: Running = await serve(demo_settings(root))
    await srv.wait_ready()
    return srv


async def metric_samples(srv: Running, name: str) -> dict[tuple[str, ...], float]:
    async with srv.session.get(srv.url("/metrics")) as resp:
        text = await resp.text()
    return {tuple(s.labels.values()): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}
