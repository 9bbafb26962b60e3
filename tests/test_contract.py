"""The swap contract, black box: time never runs backwards for a client, whatever it reads."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from conftest import Running, wait_for, write_seq_export
from serving.settings import Settings, parse_settings

KEYS = 4000  # rows of each export, one key each: far more than a client reads between swaps


def keyed_config(root: Path, **server: object) -> Settings:
    """The default server settings; one endpoint per key, every key declared for the warm."""
    return parse_settings({
        "server": dict(server),
        "source": {"url": f"file://{root}", "debounce_ms": 20},
        "datasets": {"seqdata": {
            "key": ["k"],
            "columns": {"k": "INTEGER", "export_seq": "INTEGER", "label": "VARCHAR"},
        }},
        "endpoints": {"row": {
            "path": "/v1/rows/{k}",
            "datasets": ["seqdata"],
            "sql": "SELECT k, export_seq, label FROM seqdata WHERE k = $k",
            "warm_sql": "SELECT k FROM seqdata",
            "params": {"k": {"type": "int", "min": 0}},
        }},
    }, "test.toml")


async def test_no_client_sees_an_older_export_after_a_newer_one(tmp_path: Path, serve) -> None:
    """8 keep-alive clients each read keys they have not read before while 20 exports are
    published: every answer is whole, and none is older than one that client already had."""
    write_seq_export(tmp_path, 1, rows=KEYS)
    srv: Running = await serve(keyed_config(tmp_path))
    await srv.wait_ready()
    stop = asyncio.Event()
    failed: list[str] = []
    backwards: list[str] = []
    answered = [0] * 8

    async def client(i: int) -> None:
        keys = list(range(KEYS))
        random.Random(i).shuffle(keys)
        last, n = 0, 0
        while not stop.is_set():
            k = keys[n % KEYS]
            n += 1
            async with srv.session.get(srv.url(f"/v1/rows/{k}")) as resp:
                if resp.status != 200:
                    failed.append(f"client {i}: HTTP {resp.status} {await resp.text()}")
                    continue
                body = await resp.json()
            rows = body["data"]
            if len(rows) != 1 or rows[0]["k"] != k:
                failed.append(f"client {i}: key {k} answered {rows}")
                continue
            seq = rows[0]["export_seq"]
            if seq < last:
                backwards.append(f"client {i}: key {k} from export {seq} after export {last}")
            last = max(last, seq)
            answered[i] += 1

    clients = [asyncio.create_task(client(i)) for i in range(8)]
    for seq in range(2, 22):  # 20 swaps
        await asyncio.to_thread(write_seq_export, tmp_path, seq, KEYS)

        async def published(seq: int = seq) -> bool:
            status, body = await srv.get("/v1/rows/0")
            return status == 200 and body["data"][0]["export_seq"] == seq

        await wait_for(published, 60, f"export {seq} to be served")
        await asyncio.sleep(0.3)  # the clients read on the new export a while
    stop.set()
    await asyncio.gather(*clients)
    assert failed == []
    assert backwards == [], f"{len(backwards)} answers went back in time: {backwards[:5]}"
    assert all(n > 0 for n in answered)
