"""The query process: cache misses answered outside the server process, and what happens when
it dies, runs past a deadline, or outlives the versions it attached."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from conftest import Running, seq_config, wait_for, write_seq_export
from engine.responses import encode_body
from serving import remote
from serving.remote import QueryProcess
from serving.state import RUNNER, SERVING, STORE


def _process(srv: Running) -> QueryProcess:
    process = srv.app[SERVING].process
    assert process is not None
    return process


async def _up(srv: Running) -> QueryProcess:
    process = _process(srv)

    async def up() -> bool:
        return process.up

    await wait_for(up, what="the query process")
    return process


async def _start(serve: Any, tmp_path: Path, rows: int = 50,
                 **server: Any) -> tuple[Running, QueryProcess]:
    """A server on export 1 of `seqdata`, ready, its query process up."""
    write_seq_export(tmp_path, 1, rows=rows)
    srv: Running = await serve(seq_config(tmp_path, **server))
    await srv.wait_ready()
    return srv, await _up(srv)


async def _kill(process: QueryProcess) -> int:
    """SIGKILL the query process and wait for its replacement; returns the killed pid."""
    pid = process.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    async def restarted() -> bool:
        return process.up and process.pid != pid

    await wait_for(restarted, what="the query process to restart")
    return pid


def _version_files(pid: int) -> set[str]:
    """The version files process `pid` has open (Linux)."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed while listed
            continue
        if ".duckdb" in target and not target.endswith(".wal"):
            out.add(target.removesuffix(" (deleted)"))
    return out


async def test_a_miss_is_answered_by_the_query_process_as_the_server_would(
        tmp_path: Path, serve: Any) -> None:
    srv, process = await _start(serve, tmp_path)
    before = (process.answered, process.fallbacks)
    async with srv.session.get(srv.url("/v1/rows?min_k=17")) as resp:
        assert resp.status == 200
        body = await resp.read()
        token = resp.headers["X-Duckswap-Token"]
    assert (process.answered, process.fallbacks) == (before[0] + 1, before[1])
    # The same answer computed on the server's own threads encodes to the same bytes.
    app = srv.app
    spec = app[SERVING].endpoints["rows"]
    local = await app[RUNNER].run_endpoint(spec, {"min_k": 17}, app[SERVING].constants)
    assert encode_body(spec, token, local.versions, local.columns, local.rows,
                       local.truncated) == body
    status, metrics = 0, ""
    async with srv.session.get(srv.url("/metrics")) as resp:
        status, metrics = resp.status, await resp.text()
    assert status == 200
    assert "duckswap_query_process_up 1.0" in metrics
    assert f'duckswap_query_process_queries_total{{by="process"}} {process.answered}.0' in metrics


async def test_a_killed_query_process_costs_no_request(tmp_path: Path, serve: Any) -> None:
    """Its queries in flight are answered by the server's threads; it is restarted."""
    srv, process = await _start(serve, tmp_path, query_timeout=3)
    slow = asyncio.create_task(srv.get("/v1/slow?x=-1"))  # runs until its deadline

    async def in_flight() -> bool:
        return bool(process._pending)

    await wait_for(in_flight, what="the slow query to reach the query process")
    await _kill(process)
    assert process.restarts == 1
    for k in range(5):  # misses meanwhile and after: all answered
        status, body = await srv.get(f"/v1/rows?min_k={k + 3}")
        assert status == 200 and body["data"][0]["k"] == k + 3
    answered = process.answered
    assert (await srv.get("/v1/rows?min_k=44"))[0] == 200
    assert process.answered == answered + 1  # the new process answers
    # The slow query was run again on the server's threads, and ended at its deadline there.
    status, body = await slow
    assert status == 504 and body["error"] == "query_timeout"
    assert process.fallbacks >= 1


async def test_a_query_past_its_deadline_is_interrupted_in_the_process(
        tmp_path: Path, serve: Any) -> None:
    srv, process = await _start(serve, tmp_path, query_timeout=0.3, threads=1)
    pid = process.pid
    store = srv.app[STORE]
    status, body = await srv.get("/v1/slow?x=-1")
    assert status == 504 and body["error"] == "query_timeout"

    async def ended() -> bool:  # the Snapshot is held until the process says it stopped
        return not process._pending and not store._readers

    await wait_for(ended, what="the interrupted query to end in the process")
    # Its one thread is free again: a new miss is answered there, by the same process.
    status, body = await srv.get("/v1/rows?min_k=9")
    assert status == 200 and body["data"][0]["k"] == 9
    assert process.pid == pid and process.fallbacks == 0


async def test_the_query_process_lets_go_of_replaced_versions(tmp_path: Path, serve: Any) -> None:
    srv, process = await _start(serve, tmp_path, keep_versions=1)
    assert process.pid is not None
    for seq in (2, 3):
        write_seq_export(tmp_path, seq)
        await srv.wait_export("/v1/rows?min_k=1", seq)
        assert (await srv.get(f"/v1/rows?min_k={seq + 5}"))[0] == 200  # a miss on it
    current = {str(v.path) for v in srv.app[STORE].current.versions.values()}

    async def only_current() -> bool:
        return _version_files(process.pid or 0) == current

    await wait_for(only_current, what="the query process to hold only the current version")


async def test_misses_run_in_the_server_when_the_query_process_is_off(
        tmp_path: Path, serve: Any) -> None:
    write_seq_export(tmp_path, 1)
    srv: Running = await serve(seq_config(tmp_path, query_process=False))
    await srv.wait_ready()
    assert srv.app[SERVING].process is None
    status, body = await srv.get("/v1/rows?min_k=21")
    assert status == 200 and body["data"][0]["k"] == 21
    async with srv.session.get(srv.url("/metrics")) as resp:
        assert "duckswap_query_process" not in await resp.text()


async def test_a_hung_query_process_is_killed_and_restarted(
        tmp_path: Path, serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that answers nothing, even the interrupt at the deadline (stopped here with
    SIGSTOP), would hold its Snapshot forever: it is killed STUCK seconds later."""
    monkeypatch.setattr(remote, "STUCK", 0.5)
    srv, process = await _start(serve, tmp_path, query_timeout=0.3)
    pid = process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    status, body = await srv.get("/v1/rows?min_k=30")
    assert status == 504 and body["error"] == "query_timeout"

    async def restarted() -> bool:
        return process.up and process.restarts == 1 and not srv.app[STORE]._readers

    await wait_for(restarted, what="the hung query process to be replaced")
    status, body = await srv.get("/v1/rows?min_k=30")
    assert status == 200 and body["data"][0]["k"] == 30
    assert process.pid != pid


async def test_a_staged_version_is_attached_there_before_its_publish(
        tmp_path: Path, serve: Any) -> None:
    """The first miss after a swap does not wait for the process to attach the new files."""
    srv, process = await _start(serve, tmp_path)
    store = srv.app[STORE]
    first = store.current
    answered = process.answered
    write_seq_export(tmp_path, 2)

    async def swapped() -> bool:
        return store.current is not first

    await wait_for(swapped, what="export 2 to be published")
    new = {str(v.path) for v in store.current.versions.values()}

    async def attached() -> bool:
        return new <= _version_files(process.pid or 0)

    await wait_for(attached, what="the query process to attach the new version")
    assert process.answered == answered  # no miss asked for it
    assert store.current.id in process._defined


async def test_a_miss_storm_is_batched_in_the_query_process(tmp_path: Path, serve: Any) -> None:
    # Every request a miss; one query thread there, so the first misses are still running
    # when the rest arrive.
    srv, process = await _start(serve, tmp_path, rows=200, cache_mb=0, threads=1)
    batcher = srv.app[SERVING].batcher
    answered, batched, batches = process.answered, batcher.batched, batcher.batches
    got = await asyncio.gather(*(srv.get(f"/v1/rows?min_k={k}") for k in range(120)))
    for k, (status, body) in enumerate(got):
        assert status == 200
        assert [r["k"] for r in body["data"]] == list(range(k, 200))
    in_batches = batcher.batched - batched
    assert in_batches > 0
    # Every query ran there: each single miss, and each batch once.
    singles = 120 - in_batches
    assert process.answered - answered == singles + batcher.batches - batches
    assert process.fallbacks == 0


async def test_a_version_the_process_cannot_attach_is_answered_by_the_server(
        tmp_path: Path, serve: Any) -> None:
    """A version file gone from disk under a running server (the server keeps its open
    handle; a new query process cannot attach it): answered by the server, not a crash."""
    srv, process = await _start(serve, tmp_path)
    await _kill(process)
    for v in srv.app[STORE].current.versions.values():
        assert v.path is not None
        v.path.unlink()
    fallbacks = process.fallbacks
    for k in (5, 6):
        status, body = await srv.get(f"/v1/rows?min_k={k}")
        assert status == 200 and body["data"][0]["k"] == k
    assert process.fallbacks == fallbacks + 2
    assert process.up and process.restarts == 1  # it went on running
