"""`duckswap serve` as it runs in production: one loader process and HTTP worker processes on
one port. A worker killed under load costs only its requests in flight and is started again;
a killed loader leaves no process behind; swaps under load with two workers never take a
client back to an older export."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from bench.ports import free_port
from conftest import descendants, running, wait_for, write_seq_export

KEYS = 2000


def _config(tmp_path: Path, port: int, workers: int = 2) -> Path:
    config = tmp_path / "duckswap.toml"
    config.write_text(f"""
[server]
port = {port}
workers = {workers}
data_dir = "{tmp_path / 'data'}"
[source]
url = "file://{tmp_path / 'src'}"
debounce_ms = 20
[datasets.seqdata]
key = ["k"]
columns = {{ k = "INTEGER", export_seq = "INTEGER" }}
[endpoints.row]
path = "/v1/rows/{{k}}"
datasets = ["seqdata"]
row_limit = 1
sql = "SELECT k, export_seq FROM seqdata WHERE k = $k"
warm_sql = "SELECT k FROM seqdata"
params.k = {{ type = "int", min = 0 }}
""")
    return config


@contextlib.contextmanager
def _server(tmp_path: Path, workers: int = 2) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    log = (tmp_path / "server.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--config",
                             str(_config(tmp_path, port, workers))], stdout=log, stderr=log)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


async def _ready(base: str) -> bool:
    try:
        async with aiohttp.ClientSession() as s, s.get(f"{base}/readyz") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


def _workers(pid: int) -> set[int]:
    """The HTTP worker processes of server `pid`."""
    out = set()
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{child}/comm").read_text().strip() == "duckswap-http":
                out.add(child)
    return out


async def _metric(base: str, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"{base}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_a_killed_worker_costs_only_its_requests_in_flight(tmp_path: Path) -> None:
    write_seq_export(tmp_path / "src", 1, rows=KEYS)
    with _server(tmp_path) as (proc, base):
        await wait_for(lambda: _ready(base), 90, "/readyz")
        assert len(_workers(proc.pid)) == 2
        answers: list[int | str] = []
        stop = asyncio.Event()

        async def client(i: int) -> None:
            async with aiohttp.ClientSession() as session:  # keep-alive: one connection
                k = i
                while not stop.is_set():
                    k = (k + 7) % KEYS
                    try:
                        async with session.get(f"{base}/v1/rows/{k}") as resp:
                            await resp.read()
                            answers.append(resp.status)
                    except aiohttp.ClientError as exc:
                        answers.append(repr(exc))

        clients = [asyncio.create_task(client(i)) for i in range(8)]
        await wait_for(lambda: _count(answers, 500), 30, "requests under load")
        victim = min(_workers(proc.pid))
        os.kill(victim, signal.SIGKILL)

        async def restarted() -> bool:
            now = _workers(proc.pid)
            return len(now) == 2 and victim not in now and await _ready(base)

        await wait_for(restarted, 60, "the killed worker to be started again")
        before = len(answers)
        await wait_for(lambda: _count(answers, before + 500), 30, "requests after the restart")
        stop.set()
        await asyncio.gather(*clients)
        failed = [a for a in answers if a != 200]
        # At most one request in flight per connection to the killed worker; every request
        # after the restart answered.
        assert len(failed) <= 8, failed
        assert all(a == 200 for a in answers[before:]), set(answers[before:])
        assert await _metric(base, "duckswap_worker_restarts_total") == 1
        assert await _metric(base, "duckswap_workers") == 2


async def _count(answers: list[int | str], n: int) -> bool:
    return len(answers) >= n


async def test_a_killed_loader_leaves_no_process_behind(tmp_path: Path) -> None:
    write_seq_export(tmp_path / "src", 1, rows=KEYS)
    with _server(tmp_path) as (proc, base):
        await wait_for(lambda: _ready(base), 90, "/readyz")
        children = descendants(proc.pid)  # workers, the build processes
        assert len(_workers(proc.pid)) == 2 and len(children) > 2
        proc.kill()
        proc.wait()

        async def gone() -> bool:
            return not running(children)

        await wait_for(gone, 10, "every process of the killed server to exit")


async def test_no_client_sees_an_older_export_with_two_workers(tmp_path: Path) -> None:
    """8 keep-alive clients (spread over both workers by the kernel) each read keys they have
    not read before while 20 exports are published: none is ever answered by an export older
    than one it already had."""
    write_seq_export(tmp_path / "src", 1, rows=KEYS)
    with _server(tmp_path) as (proc, base):
        await wait_for(lambda: _ready(base), 90, "/readyz")
        stop = asyncio.Event()
        backwards: list[str] = []
        failed: list[str] = []
        newest = [0]

        async def client(i: int) -> None:
            seen = 0
            k = i
            async with aiohttp.ClientSession() as session:
                while not stop.is_set():
                    k = (k + 8) % KEYS
                    async with session.get(f"{base}/v1/rows/{k}") as resp:
                        if resp.status != 200:
                            failed.append(f"{resp.status} {await resp.text()}")
                            continue
                        seq = (await resp.json())["data"][0]["export_seq"]
                    if seq < seen:
                        backwards.append(f"client {i}: export {seen} then {seq}")
                    seen = max(seen, seq)
                    newest[0] = max(newest[0], seq)

        clients = [asyncio.create_task(client(i)) for i in range(8)]
        for seq in range(2, 22):
            await asyncio.to_thread(write_seq_export, tmp_path / "src", seq, KEYS)

            async def served(seq: int = seq) -> bool:
                return newest[0] >= seq

            await wait_for(served, 60, f"export {seq}")
        stop.set()
        await asyncio.gather(*clients)
        assert failed == [] and backwards == []


async def test_a_second_server_on_the_same_port_is_refused(tmp_path: Path) -> None:
    """SO_REUSEPORT would let it bind beside the first and take half the connections."""
    write_seq_export(tmp_path / "src", 1, rows=10)
    with _server(tmp_path) as (proc, base):
        await wait_for(lambda: _ready(base), 90, "/readyz")
        port = base.rsplit(":", 1)[1]
        second = tmp_path / "second"
        (second / "src").mkdir(parents=True)
        config = _config(second, int(port))
        done = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--config",
                               str(config)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr[-2000:]
        assert f"{config}: cannot listen on 127.0.0.1:{port}: Address already in use" \
            in done.stderr
        done = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--config",
                               str(config), "--port", port],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and f"--port: cannot listen on 127.0.0.1:{port}" \
            in done.stderr, done.stderr[-2000:]
        assert proc.poll() is None and await _ready(base)
