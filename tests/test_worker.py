"""A worker's miss path: queries on its own Replica's threads, interrupted at their deadline,
batched in a storm; and the versions it lets go of once replaced."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from conftest import Running, seq_config, wait_for, write_seq_export
from serving.state import SERVING, STORE


async def _start(serve: Any, tmp_path: Path, rows: int = 50, **server: Any) -> Running:
    """A server on export 1 of `seqdata`, ready."""
    write_seq_export(tmp_path, 1, rows=rows)
    srv: Running = await serve(seq_config(tmp_path, **server))
    await srv.wait_ready()
    return srv


def _version_files(pid: int, folder: Path) -> set[str]:
    """The version files in `folder` process `pid` has open (Linux)."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed while listed
            continue
        if target.startswith(str(folder)) and ".duckdb" in target and \
                not target.endswith(".wal"):
            out.add(target.removesuffix(" (deleted)"))
    return out


async def test_a_query_past_its_deadline_is_interrupted(tmp_path: Path, serve: Any) -> None:
    srv = await _start(serve, tmp_path, query_timeout=0.3, threads=1)
    store = srv.app[STORE]
    status, body = await srv.get("/v1/slow?x=-1")
    assert status == 504 and body["error"] == "query_timeout"

    async def ended() -> bool:  # the Snapshot is held until the query has stopped
        return not store._readers

    await wait_for(ended, what="the interrupted query to end")
    # Its one thread is free again: a new miss is answered.
    status, body = await srv.get("/v1/rows?min_k=9")
    assert status == 200 and body["data"][0]["k"] == 9


async def test_a_worker_lets_go_of_replaced_versions(tmp_path: Path, serve: Any) -> None:
    srv = await _start(serve, tmp_path, keep_versions=1)
    for seq in (2, 3):
        write_seq_export(tmp_path, seq)
        await srv.wait_export("/v1/rows?min_k=1", seq)
        assert (await srv.get(f"/v1/rows?min_k={seq + 5}"))[0] == 200  # a miss on it
    store = srv.app[STORE]
    current = {str(v.path) for v in store.current.versions.values()}

    async def only_current() -> bool:
        return _version_files(os.getpid(), store.data_dir) == current and \
            store.held_versions() == 1

    await wait_for(only_current, what="the worker to hold only the current version")
    versions = store.data_dir

    async def deleted() -> bool:  # the loader deletes what no worker holds (1 kept)
        return {str(p) for p in versions.glob("*.duckdb")} == current

    await wait_for(deleted, what="the replaced version files to be deleted")


async def test_a_miss_storm_is_batched(tmp_path: Path, serve: Any) -> None:
    # Every request a miss; one query thread, so the first misses are still running when the
    # rest arrive.
    srv = await _start(serve, tmp_path, rows=200, cache_mb=0, threads=1)
    batcher = srv.app[SERVING].batcher
    batched = batcher.batched
    got = await asyncio.gather(*(srv.get(f"/v1/rows?min_k={k}") for k in range(120)))
    for k, (status, body) in enumerate(got):
        assert status == 200
        assert [r["k"] for r in body["data"]] == list(range(k, 200))
    assert batcher.batched - batched > 0
