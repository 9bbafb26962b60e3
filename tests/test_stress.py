"""Concurrency stress: many threads query through the real runner pool while swaps happen."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from pathlib import Path

from conftest import replica_updater, seq_config, write_seq_export
from engine.fold import Constants
from engine.query import QueryRunner


def test_threads_query_while_swapping(tmp_path: Path) -> None:
    updater, store, publisher = replica_updater(tmp_path, seq_config(tmp_path).datasets, 2)
    write_seq_export(tmp_path, 1, rows=2000)
    updater.refresh()
    errors: list[BaseException] = []
    seen: list[int] = []
    done = threading.Event()

    def reader() -> None:
        cur = store.cursor()
        try:
            while not done.is_set():
                snap = store.acquire()
                try:
                    cur.execute(f"SET search_path = '{snap.schema}'")
                    rows = cur.execute(
                        "SELECT min(export_seq), max(export_seq), count(*) FROM seqdata"
                    ).fetchall()
                finally:
                    store.release(snap)
                lo, hi, n = rows[0]
                assert lo == hi and n == 2000, rows
                seen.append(hi)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)
        finally:
            cur.close()

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for seq in range(2, 42):
        write_seq_export(tmp_path, seq, rows=2000)
        (event,) = updater.refresh()
        assert event.ok, event.reason
        publisher.collect()
    deadline = time.monotonic() + 30
    while 41 not in seen and not errors and time.monotonic() < deadline:
        time.sleep(0.01)  # poll: readers pick up the last swap
    done.set()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert max(seen) == 41 and len(set(seen)) > 5
    publisher.collect()
    assert store.held_versions() == 1
    store.close()


async def test_runner_pool_under_concurrent_swaps(tmp_path: Path) -> None:
    updater, store, publisher = replica_updater(tmp_path, seq_config(tmp_path).datasets, 2)
    write_seq_export(tmp_path, 1)
    updater.refresh()
    runner = QueryRunner(store, threads=4, timeout=10)
    spec = replace(seq_config(tmp_path).endpoints["rows"], params={}, row_limit=10,
                   sql="SELECT export_seq, count(*) AS n FROM seqdata GROUP BY export_seq")

    async def swapper() -> None:
        for seq in range(2, 32):
            await asyncio.to_thread(write_seq_export, tmp_path, seq)
            await asyncio.to_thread(updater.refresh)
            await asyncio.to_thread(store.collect)

    async def querier() -> int:
        count = 0
        while store.current.versions["seqdata"].export_id != "export-000031":
            result = await runner.run_endpoint(spec, {}, Constants({}))
            assert len(result.rows) == 1 and result.rows[0][1] == 50
            count += 1
        return count

    results = await asyncio.gather(swapper(), *[querier() for _ in range(16)])
    assert all(n > 0 for n in results[1:])
    runner.close()
    publisher.collect()
    assert store.held_versions() == 1
    store.close()
