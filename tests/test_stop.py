"""A clean stop: SIGTERM or SIGINT under load, during a warm, and during the first start."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from bench.ports import free_port
from conftest import descendants, running, wait_for, write_seq_export

KEYS = 8000  # rows; from export 2 on, each a declared key of `top`, one query each: seconds


def _config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "duckswap.toml"
    config.write_text(f"""
[server]
port = {port}
data_dir = "{tmp_path / 'data'}"
drain_seconds = 1
shutdown_seconds = 10
[source]
url = "file://{tmp_path / 'src'}"
debounce_ms = 20
[datasets.seqdata]
key = ["k"]
columns = {{ k = "INTEGER", export_seq = "INTEGER" }}
[endpoints.row]
path = "/v1/rows/{{k}}"
datasets = ["seqdata"]
sql = "SELECT k, export_seq FROM seqdata WHERE k = $k"
warm_sql = "SELECT k FROM seqdata"
params.k = {{ type = "int", min = 0 }}
[endpoints.top]
path = "/v1/top/{{n}}"
datasets = ["seqdata"]
sql = "SELECT k, export_seq FROM seqdata ORDER BY k LIMIT $n"
warm_sql = "SELECT k + 1 AS n FROM seqdata WHERE export_seq > 1"
params.n = {{ type = "int", min = 1 }}
[endpoints.slow]
path = "/v1/slow"
datasets = ["seqdata"]
warm = false
sql = "SELECT $n AS n, sum(range % 7) AS s FROM range($n) JOIN seqdata ON k = 0"
params.n = {{ type = "int", min = 1, max = 1000000000 }}
""")
    return config


async def _status(session: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with session.get(url) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientError:
        return None


@contextlib.contextmanager
def _process(cmd: list[str], log_path: Path, cwd: Path | None = None
             ) -> Iterator[subprocess.Popen[bytes]]:
    """A server process writing to `log_path`, killed at the end if it is still running."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_stop_under_load_finishes_the_requests_in_flight(
        tmp_path: Path, sig: signal.Signals) -> None:
    """A real server process, the warm of a new export running, slow queries and keep-alive
    clients in flight: /readyz answers 503 first, every request in flight gets its answer,
    the warm and the build processes stop, and the server logs one "shutting down" and one
    "stopped" line, no traceback, and exits 0."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    write_seq_export(tmp_path / "src", 1, rows=KEYS)
    log_path = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--config", str(_config(tmp_path, port))]
    with _process(cmd, log_path) as server:
        async with aiohttp.ClientSession() as probe:
            await wait_for(lambda: _ready(probe, base), 90, "/readyz")
            answers: list[int | str] = []
            stop_sending = asyncio.Event()

            async def client(i: int) -> None:
                async with aiohttp.ClientSession() as session:
                    k = i
                    while not stop_sending.is_set():
                        k = (k + 7) % KEYS
                        try:
                            async with session.get(f"{base}/v1/rows/{k}") as resp:
                                await resp.read()
                                answers.append(resp.status)
                        except aiohttp.ClientError as exc:
                            answers.append(repr(exc))

            sent: list[str] = []  # slow requests on the wire
            trace = aiohttp.TraceConfig()

            async def on_sent(*_: object) -> None:
                sent.append("slow")

            trace.on_request_headers_sent.append(on_sent)

            async def slow(n: int) -> int:
                async with aiohttp.ClientSession(trace_configs=[trace]) as session, \
                        session.get(f"{base}/v1/slow?n={n}") as resp:
                    await resp.read()
                    return resp.status

            async def both_sent() -> bool:
                return len(sent) == 2

            clients = [asyncio.create_task(client(i)) for i in range(4)]
            slows = [asyncio.create_task(slow(400_000_000 + i)) for i in range(2)]
            await wait_for(both_sent, 10, "the slow requests to be sent")
            write_seq_export(tmp_path / "src", 2, rows=KEYS)

            async def built() -> bool:  # its warm starts now: 8000 queries of `top`
                return "built seqdata/export-000002" in log_path.read_text()

            await wait_for(built, 60, "export 2 built")
            children = descendants(server.pid)  # the workers, the build processes
            server.send_signal(sig)
            async with aiohttp.ClientSession() as fresh:  # a new connection, while draining
                await wait_for(lambda: _is(fresh, f"{base}/readyz", 503), 1.0, "/readyz 503")
            stop_sending.set()  # before the listener closes (drain_seconds = 1)
            await asyncio.gather(*clients)
            assert await asyncio.gather(*slows) == [200, 200]
            assert answers and set(answers) == {200}, set(answers)
            assert server.wait(timeout=30) == 0
    output = log_path.read_text()
    assert "Traceback" not in output and "Error" not in output, output[-3000:]
    assert output.count("duckswap: shutting down") == 1, output
    assert output.count("duckswap: stopped\n") == 1, output
    assert re.search(r"warm of snapshot \d+ ended: the server is stopping", output), output
    deadline = time.monotonic() + 10
    while running(children) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not running(children)


async def _ready(session: aiohttp.ClientSession, base: str) -> bool:
    return await _status(session, f"{base}/readyz") == 200


async def _is(session: aiohttp.ClientSession, url: str, status: int) -> bool:
    return await _status(session, url) == status


def test_a_stop_during_the_first_demo_write_is_repaired_at_the_next_start(
        tmp_path: Path) -> None:
    """`duckswap serve` with no config writes the demo first: a SIGTERM then stops it cleanly,
    and the next start writes what is missing (a folder an older version left half-written
    included) and serves it."""
    port = free_port()
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--port", str(port)]
    aside, demo = tmp_path / ".duckswap-demo.writing", tmp_path / "duckswap-demo"
    half = demo / "patches" / "export-000001"
    log_path = tmp_path / "server.log"
    with _process(cmd, log_path, tmp_path) as server:
        _wait(lambda: any(aside.glob("*/*/part-*.parquet")), 60, "the demo being written")
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        assert not aside.exists() and not any(demo.glob("*/*/part-*"))
        half.mkdir(parents=True)  # as a stop left it before the demo was written aside
        (half / "part-00000.parquet").write_bytes(b"half a file")
    with _process(cmd, log_path, tmp_path) as server:
        _wait(lambda: _get_status(f"http://127.0.0.1:{port}/readyz") == 200, 180, "/readyz")
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    output = log_path.read_text()
    assert "Traceback" not in output, output[-3000:]
    assert "stopped (SIGTERM) before serving" in output


def _wait(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _get_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None
