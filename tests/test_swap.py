"""Hot swaps: zero failed requests, one export per response, no leaks, bad exports refused."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    Running,
    demo_settings,
    replica_updater,
    running,
    seq_config,
    wait_for,
    write_seq_export,
)
from loaders.admin import dataset_doc
from serving.app import UPDATER
from serving.state import STORE
from serving.worker import WORKER


async def test_zero_failed_requests_during_30_swaps(tmp_path: Path, serve) -> None:
    write_seq_export(tmp_path, 1)
    srv: Running = await serve(seq_config(tmp_path))
    await srv.wait_ready()
    stop = asyncio.Event()
    failures: list[str] = []
    counts = [0] * 8

    async def client(i: int) -> None:
        last = 0
        while not stop.is_set():
            async with srv.session.get(srv.url("/v1/rows")) as resp:
                if resp.status != 200:
                    failures.append(f"client {i}: HTTP {resp.status} {await resp.text()}")
                    continue
                body = await resp.json()
            seqs = {row["export_seq"] for row in body["data"]}
            if len(seqs) != 1 or len(body["data"]) != 50:
                failures.append(f"client {i}: mixed or partial rows {sorted(seqs)}")
                continue
            (seq,) = seqs
            if seq < last:
                failures.append(f"client {i}: went back from export {last} to {seq}")
            last = seq
            counts[i] += 1

    clients = [asyncio.create_task(client(i)) for i in range(8)]
    start = time.monotonic()
    for seq in range(2, 33):  # 31 new exports
        await asyncio.to_thread(write_seq_export, tmp_path, seq)
        await srv.wait_export("/v1/rows", seq)
    while time.monotonic() - start < 10:
        await asyncio.sleep(0.05)  # keep the load on for at least 10 s in all
    stop.set()
    await asyncio.gather(*clients)
    assert failures == []
    assert all(c > 0 for c in counts)
    status, body = await srv.get("/v1/rows")
    assert status == 200 and body["data"][0]["export_seq"] == 32
    assert body["meta"]["versions"]["seqdata"] == srv.app[STORE].current.versions[
        "seqdata"].version_id
    ok = [e for e in srv.app[UPDATER].history if e.ok]
    assert len(ok) == 32


async def test_the_loader_records_a_publish_before_any_worker_serves_it(
        tmp_path: Path, serve) -> None:
    """A client served the new export and then asking the admin API is never told the old one
    is served (the worker's commit comes after the loader's record)."""
    write_seq_export(tmp_path, 1)
    srv: Running = await serve(seq_config(tmp_path))
    await srv.wait_ready()
    updater, worker = srv.app[UPDATER], srv.app[WORKER]
    seen: list[str | None] = []
    commit = worker.commit

    async def recording(snap: Any) -> None:
        seen.append((dataset_doc(updater, "seqdata")["served"] or {}).get("export_id"))
        await commit(snap)

    worker.commit = recording  # type: ignore[method-assign]
    write_seq_export(tmp_path, 2)
    await srv.wait_export("/v1/rows", 2)
    assert seen == ["export-000002"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_no_leak_across_100_swaps(tmp_path: Path) -> None:
    updater, store, publisher = replica_updater(tmp_path, seq_config(tmp_path).datasets, 2)
    cur = store.cursor()

    def swap(seq: int) -> None:
        folder = write_seq_export(tmp_path, seq, rows=20_000)
        (event,) = updater.refresh()
        assert event.ok, event.reason
        snap = store.acquire()
        cur.execute(f"SET search_path = '{snap.schema}'")
        assert cur.execute("SELECT max(export_seq) FROM seqdata").fetchall() == [(seq,)]
        store.release(snap)
        publisher.collect()
        shutil.rmtree(folder.parent / f"export-{seq - 1:06d}", ignore_errors=True)

    for seq in range(1, 11):
        swap(seq)
    rss_10, tables_10 = _rss_bytes(), store.held_versions()
    for seq in range(11, 101):
        swap(seq)
    rss_100, tables_100 = _rss_bytes(), store.held_versions()
    assert tables_10 == tables_100 == 1
    assert rss_100 <= rss_10 * 1.10, (rss_10, rss_100)
    store.close()


async def test_export_without_marker_is_never_loaded(tmp_path: Path, serve) -> None:
    write_seq_export(tmp_path, 1)
    srv: Running = await serve(seq_config(tmp_path))
    await srv.wait_ready()
    write_seq_export(tmp_path, 2, marker="")
    write_seq_export(tmp_path, 3)  # a later complete export proves the watcher looked
    await srv.wait_export("/v1/rows", 3)
    loaded = [e.export_id for e in srv.app[UPDATER].history]
    assert "export-000002" not in loaded


async def test_folder_renamed_into_place_is_loaded(tmp_path: Path, serve) -> None:
    write_seq_export(tmp_path, 1)
    srv: Running = await serve(seq_config(tmp_path))
    await srv.wait_ready()
    staged = write_seq_export(tmp_path / "staging", 2)
    staged.rename(tmp_path / "seqdata" / staged.name)
    await srv.wait_export("/v1/rows", 2)


async def test_unreadable_export_is_refused_and_old_keeps_serving(
    tmp_path: Path, serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="duckswap.loader")
    write_seq_export(tmp_path, 1)
    srv: Running = await serve(seq_config(tmp_path))
    await srv.wait_ready()
    bad = tmp_path / "seqdata" / "export-000002"
    bad.mkdir()
    (bad / "part-00000.parquet").write_bytes(b"this is not parquet at all")
    (bad / "_SUCCESS").write_text("")

    async def refused() -> bool:
        return any(not e.ok and e.export_id == "export-000002"
                   for e in srv.app[UPDATER].history)

    await wait_for(refused, 30, "the bad export to be refused")
    (event,) = [e for e in srv.app[UPDATER].history if not e.ok]
    assert "part-00000.parquet: not a readable Parquet file" in event.reason
    assert "refused export seqdata/export-000002" in caplog.text
    status, body = await srv.get("/v1/rows")
    assert status == 200 and body["data"][0]["export_seq"] == 1
    write_seq_export(tmp_path, 3)  # and the next good export still swaps in
    await srv.wait_export("/v1/rows", 3)


async def test_manifest_mismatch_is_refused(tmp_path: Path, serve) -> None:
    write_seq_export(tmp_path, 1)
    srv: Running = await serve(seq_config(tmp_path))
    await srv.wait_ready()
    folder = write_seq_export(tmp_path, 2, marker="")
    (folder / "_manifest.json").write_text(
        '{"files": [{"path": "part-00000.parquet", "rows": 7}, {"path": "part-00001.parquet"}]}'
    )

    async def refused() -> bool:
        return any(not e.ok for e in srv.app[UPDATER].history)

    await wait_for(refused, 30, "the export to be refused")
    (event,) = [e for e in srv.app[UPDATER].history if not e.ok]
    assert "part-00000.parquet: 25 rows != manifest rows 7" in event.reason
    status, body = await srv.get("/v1/rows")
    assert body["data"][0]["export_seq"] == 1


def _thread_priorities() -> dict[str, tuple[int, int]]:
    """In a build process: each thread's (name, id) -> (policy, nice)."""
    out = {}
    for tid in map(int, os.listdir("/proc/self/task")):
        name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        out[f"{name} {tid}"] = (os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid))
    return out


@pytest.mark.parametrize("idle", [True, False])
def test_the_build_process_yields_the_cpu_to_requests(idle: bool) -> None:
    """Builds and warms run niced and, by default, under SCHED_IDLE (Linux): every thread of
    the process, those its imports started before the priority was set (jemalloc's, Arrow's)
    included."""
    from loaders.builder import Builder

    builder = Builder(nice=7, threads=1, idle=idle)
    try:
        threads = builder.run(_thread_priorities)
    finally:
        builder.close()
    assert len(threads) > 1  # the test means something: threads were started before
    for name, (policy, nice) in threads.items():
        assert policy == (os.SCHED_IDLE if idle else os.SCHED_OTHER), name
        assert nice >= 7, name  # more if started from a niced thread


async def test_idle_build_processes_exit_and_the_next_task_starts_them_again(
    tmp_path: Path,
) -> None:
    """Between exports the server is its loader and workers alone: the build processes exit
    once idle for `idle_seconds`, not while a task runs, and the next task starts them again."""
    from loaders.builder import Builder

    builder = Builder(threads=1, processes=2, idle_seconds=1.0)
    try:
        # A task ends while another runs on for longer than idle_seconds: the processes stay
        # (the next task runs on one of them).
        started = tmp_path / "started"
        long = asyncio.create_task(asyncio.to_thread(
            builder.run, subprocess.check_output,
            ["sh", "-c", f"touch '{started}'; sleep 2.5; echo $PPID"]))

        async def running_long() -> bool:
            return started.exists()

        await wait_for(running_long, 30, "the long task to start")
        first = await asyncio.to_thread(builder.run, os.getpid)
        other = int(await long)  # ~2 s after the quick task ended
        assert await asyncio.to_thread(builder.run, os.getpid) in {first, other}

        async def exited() -> bool:
            return not running({first})

        await wait_for(exited, 10, "the idle build processes to exit")
        second = await asyncio.to_thread(builder.run, os.getpid)
        assert second != first and running({second})
    finally:
        builder.close()


async def test_the_loader_thread_keeps_the_request_threads_priority(
    tmp_path: Path, serve
) -> None:
    """Only the build process is niced. The loader thread shares the server's GIL: niced, it
    would hold the lock while the OS lets it wait for a core, and stall the event loop."""
    write_seq_export(tmp_path, 1)
    srv: Running = await serve(seq_config(tmp_path))
    await srv.wait_ready()
    updater = srv.app[UPDATER]
    loader = await updater.act(os.getpriority, os.PRIO_PROCESS, 0)  # the calling thread's
    assert loader == os.getpriority(os.PRIO_PROCESS, 0)
    assert updater.builder.run(os.getpriority, os.PRIO_PROCESS, 0) >= 10  # build_nice


def test_the_datasets_of_one_export_are_built_side_by_side(tmp_path: Path) -> None:
    """One export's datasets are loaded `build_processes` at a time, the largest first (one
    build's serial steps leave a core to the next), and published together."""
    from data.generate import DATASETS, write_export
    from loaders.builder import Builder

    folders = write_export(tmp_path, 1, "small")
    settings = demo_settings(tmp_path)
    builder = Builder(threads=1, processes=2)
    updater, store, _ = replica_updater(tmp_path, settings.datasets, builder=builder)
    both = threading.Barrier(2, timeout=30)
    started: list[str] = []
    build = builder.build

    def build_two_at_once(export: Any, schema: Any, path: Path) -> Any:
        started.append(export.dataset)
        if len(started) <= 2:
            both.wait()  # broken (the test fails) unless the other load runs meanwhile
        return build(export, schema, path)

    builder.build = build_two_at_once  # type: ignore[method-assign]
    try:
        events = updater.refresh()
        assert [e.dataset for e in events] == sorted(DATASETS)  # recorded in listing order
        assert all(e.ok for e in events), [e.reason for e in events]
        assert set(store.current.versions) == set(DATASETS)  # one Snapshot
        assert len(store.current.versions) == len(events)
    finally:
        builder.close()
        store.close()
    size = {d: sum(p.stat().st_size for p in f.glob("*.parquet")) for d, f in folders.items()}
    # the two largest first (the barrier holds every other load back until they run)
    assert set(started[:2]) == set(sorted(size, key=lambda d: size[d], reverse=True)[:2])


def test_a_build_process_that_dies_refuses_only_the_export_that_killed_it(
    tmp_path: Path,
) -> None:
    """A build process that dies fails every load in flight on the pool: those are loaded
    again one at a time, so only the export whose build kills it is refused."""
    from data.generate import DATASETS, write_export
    from loaders.builder import Builder

    write_export(tmp_path, 1, "small")
    settings = demo_settings(tmp_path)
    builder = Builder(threads=1, processes=2)
    updater, store, _ = replica_updater(tmp_path, settings.datasets, builder=builder)
    culprit, in_flight = "matchups", threading.Event()
    builds: list[str] = []
    build = builder.build

    def build_or_die(export: Any, schema: Any, path: Path) -> Any:
        builds.append(export.dataset)
        if export.dataset == culprit:
            in_flight.wait(30)  # another load is under way: the death fails it too
            builder.run(os._exit, 1)  # what the OOM killer does to a build process
        in_flight.set()
        return build(export, schema, path)

    builder.build = build_or_die  # type: ignore[method-assign]
    try:
        events = {e.dataset: e for e in updater.refresh()}
        assert not events[culprit].ok
        assert events[culprit].reason == "the build process died"
        assert updater.refused == {(culprit, "export-000001"): "the build process died"}
        innocent = set(DATASETS) - {culprit}
        assert all(events[d].ok for d in innocent), {d: events[d].reason for d in innocent}
        assert set(store.current.versions) == innocent
    finally:
        builder.close()
        store.close()
    assert builds.count(culprit) == 2  # once beside the others, once alone
