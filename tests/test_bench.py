"""The benchmark works, its gate can fail, and its generator is open loop."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hdrh.histogram import HdrHistogram

from bench.cli import lag_summary, run_loadgen
from bench.mix import DEFAULT_MIX
from bench.report import read_rows
from data.generate import write_export

REPO = Path(__file__).resolve().parent.parent
BENCH = [sys.executable, "-m", "bench"]
SHORT = ["--size", "small", "--rate", "100", "--duration", "6", "--floor-seconds", "1",
         "--swap-every", "2"]


def test_ci_gate_fails_on_an_impossible_bound_and_draws_the_swaps(tmp_path: Path) -> None:
    res = subprocess.run([*BENCH, "ci", *SHORT, "--max-p99-ms", "0.01", "--min-swaps", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "BENCH GATE FAILED: p99" in res.stdout and ">= bound 0.01 ms" in res.stdout
    (summary,) = json.loads((tmp_path / "ci.json").read_text())
    assert summary["errors"]["total"] == 0
    assert summary["swaps"] >= 1 and all(lag > 0 for lag in summary["freshness_lag_s"])
    assert summary["healthz_ms"]["count"] == 100
    assert summary["event_loop_lag"]["probes"] > 50  # ~20 a second of the 6 s run
    cpu = summary["cpu"]  # where the box's CPU went, sampled every 0.5 s
    assert cpu["samples"] >= 8 and cpu["mean_cores"]["workers"] > 0
    assert cpu["mean_cores"]["generator"] > 0 and cpu["mean_cores"]["builder"] > 0
    by_process = cpu["mean_cores_by_process"]  # and each server process on its own
    workers = [v for k, v in by_process.items() if k.startswith("worker ")]
    assert workers and abs(sum(workers) - cpu["mean_cores"]["workers"]) <= 0.05
    assert any(k.startswith("build ") for k in by_process)
    assert "cores by process" in res.stdout
    assert "duckswap.loader: published" in (tmp_path / "ci-server.log").read_text()
    png = tmp_path / "ci-100.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loop_lag_quantiles_are_read_from_the_histogram_buckets() -> None:
    before = {0.001: 10.0, 0.01: 10.0, 0.1: 10.0, float("inf"): 10.0}
    # 1,000 probes more: 990 under 1 ms, 9 under 10 ms, 1 over 100 ms
    after = {0.001: 1000.0, 0.01: 1009.0, 0.1: 1009.0, float("inf"): 1010.0}
    assert lag_summary(before, after) == {"probes": 1000, "p99_under_ms": 1.0,
                                          "p99.9_under_ms": 10.0, "max_under_ms": None,
                                          "over_10ms": 1}


def test_ci_gate_reports_errors_when_the_server_stops(tmp_path: Path) -> None:
    write_export(tmp_path / "src", 1, "small")
    port = 18000 + int(time.time() * 1000) % 2000
    env = {"DUCKSWAP_SOURCE__URL": f'"file://{tmp_path / "src"}"',
           "DUCKSWAP_SERVER__PORT": str(port)}
    server = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--config", str(REPO / "data/demo.toml")],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.05)  # poll until the server is ready
        bench = subprocess.Popen(
            [*BENCH, "ci", "--url", f"http://127.0.0.1:{port}", "--rate", "100", "--duration",
             "6", "--floor-seconds", "0", "--min-swaps", "0", "--timeout", "1",
             "--out", str(tmp_path / "out")],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(2)  # the fault: the server dies 2 s into the 6 s run
        server.kill()
        out, _ = bench.communicate(timeout=120)
    finally:
        server.kill()
        server.wait()
    assert bench.returncode == 1, out
    assert "BENCH GATE FAILED" in out and "failed requests" in out
    (summary,) = json.loads((tmp_path / "out" / "ci.json").read_text())
    assert summary["errors"].get("connection", 0) > 0
    assert 0 < summary["latency_ms"]["count"] == 600


async def _one_route(path: str,
                     handler: Callable[[web.Request], Awaitable[web.Response]]) -> TestServer:
    """A real aiohttp server on a loopback port answering GET `path`."""
    app = web.Application()
    app.router.add_get(path, handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def _loadgen(url: str, path: str, out: Path, *args: str) -> int:
    """Run the load generator on one path in its own process; its exit status."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.loadgen", "--url", url, "--path", path, "--out", str(out),
        *args, cwd=REPO)
    return await proc.wait()


@pytest.mark.parametrize("engine", ["python", "lean"])
async def test_generator_is_open_loop(tmp_path: Path, engine: str) -> None:
    """One request at a time is served, 100 ms each; requests are sent at 20/s regardless."""
    lock = asyncio.Lock()

    async def slow(request: web.Request) -> web.Response:
        async with lock:
            await asyncio.sleep(0.1)
        return web.Response(text="ok")

    server = await _one_route("/slow", slow)
    out = tmp_path / "rows.jsonl"
    try:
        assert await _loadgen(str(server.make_url("")), "/slow", out, "--rate", "20",
                              "--duration", "2", "--engine", engine) == 0
    finally:
        await server.close()
    rows = read_rows(out)
    assert len(rows) == 40
    # Sent on schedule: the send lag stays small although the server is 2x over capacity.
    assert max(r["lag_us"] for r in rows) < 200_000
    span = max(r["t"] for r in rows) - min(r["t"] for r in rows)
    assert 1.8 < span < 2.2
    # Latency counts the queueing: the last request waits for the 39 before it (~4 s total),
    # where a closed-loop client would report ~100 ms each.
    lat = sorted(r["lat_us"] / 1e6 for r in rows)
    assert lat[-1] > 1.5 and lat[len(lat) // 2] > 0.8


async def test_unique_runs_of_one_bench_never_repeat_a_url(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`--unique` makes a URL of an endpoint with a counter parameter a miss only if no
    generator of the bench sent it before (the warm-up, then the run; a sweep's rates one after
    the other): a repeat is an answer the server has cached or warmed."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(str(request.rel_url))
        return web.Response(text="{}")

    server = await _one_route("/{tail:.*}", record)
    monkeypatch.chdir(REPO)
    args = argparse.Namespace(loadgen_cpus=None, mix=DEFAULT_MIX, size="small", timeout=5.0,
                              generator="python", unique=True)
    try:
        for n, seed in enumerate((0, 1, 1)):  # a warm-up, then two rates of a sweep
            proc = run_loadgen(str(server.make_url("")), 100, 1.0, tmp_path / f"{n}.jsonl",
                               args, seed=seed)
            assert await asyncio.to_thread(proc.wait) == 0
    finally:
        await server.close()
    assert len(seen) == 300
    varied = [u for u in seen if "min_games=" in u]  # the mix's tier lists and builds
    assert len(varied) > 30
    assert len(set(varied)) == len(varied), "a generator sent a URL an earlier one had sent"


async def test_closed_loop_keeps_one_request_in_flight_per_connection(tmp_path: Path) -> None:
    """`--closed`: 3 connections against 50 ms answers for 1 s: never more than 3 requests at
    once, each connection's next request right after its answer (~20 answers a connection),
    latency from the actual send."""
    now = {"in": 0, "max": 0}

    async def slow(request: web.Request) -> web.Response:
        now["in"] += 1
        now["max"] = max(now["max"], now["in"])
        await asyncio.sleep(0.05)
        now["in"] -= 1
        return web.Response(text="ok")

    server = await _one_route("/slow", slow)
    out = tmp_path / "closed.json"
    try:
        assert await _loadgen(str(server.make_url("")), "/slow", out, "--closed",
                              "--connections", "3", "--duration", "1") == 0
    finally:
        await server.close()
    summary = json.loads(out.read_text())
    assert now["max"] == 3
    assert summary["failed"] == {} and 45 <= summary["ok"] <= 60
    hist = HdrHistogram.decode(summary["histogram"])
    assert hist.get_total_count() == summary["ok"]
    assert 50_000 <= hist.get_value_at_percentile(50) < 80_000  # µs: the handler's 50 ms


async def test_closed_loop_counts_unanswered_requests_as_timeouts(tmp_path: Path) -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response(text="late")

    server = await _one_route("/hang", hang)
    out = tmp_path / "closed.json"
    started = time.monotonic()
    try:
        assert await _loadgen(str(server.make_url("")), "/hang", out, "--closed",
                              "--connections", "2", "--duration", "0.5",
                              "--timeout", "0.5") == 0
    finally:
        await server.close()
    assert time.monotonic() - started < 10  # not the handler's 30 s
    summary = json.loads(out.read_text())
    assert summary["ok"] == 0 and summary["failed"] == {"timeout": 2}


def test_scale_reports_throughput_and_cpu_per_worker_count(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "bench.scale", "--workers", "1,2", "--rounds",
                          "1", "--duration", "2", "--warmup", "0", "--size", "small",
                          "--connections", "16", "--lead", "1.5", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=110)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads((tmp_path / "scale.json").read_text())
    assert [r["workers"] for r in doc["runs"]] == [1, 2]
    for run in doc["runs"]:
        assert run["failed"] == {} and run["ok"] > 100 and run["rate"] == run["ok"] / 2
        assert len(run["cores"]["workers"]) == run["workers"]  # one figure per worker process
        assert sum(run["cores"]["workers"]) > 0.2 and run["cores"]["generators"] > 0
    assert [r["ratio"] for r in doc["summary"]][0] == 1.0
    assert "| 2 |" in res.stdout
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_lean_generator_counts_timeouts_and_refused_connections(tmp_path: Path) -> None:
    """Two connections at most; every request hangs past the 0.5 s timeout. The ones that
    waited for a connection count as timeouts too, from when they were due; a closed port
    gives connection errors. Each request is in the file once."""
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response(text="late")

    server = await _one_route("/hang", hang)
    url = str(server.make_url(""))
    out = tmp_path / "rows.jsonl"
    lean = ["--rate", "10", "--duration", "1", "--timeout", "0.5", "--engine", "lean"]
    try:
        assert await _loadgen(url, "/hang", out, *lean, "--connections", "2") == 0
    finally:
        await server.close()
    rows = read_rows(out)
    assert len(rows) == 10 and {r["kind"] for r in rows} == {"timeout"}
    assert all(0.5e6 <= r["lat_us"] < 1.5e6 for r in rows)
    refused = tmp_path / "refused.jsonl"  # the same port, now closed
    assert await _loadgen(url, "/hang", refused, *lean) == 0
    rows = read_rows(refused)
    assert len(rows) == 10 and {r["kind"] for r in rows} == {"connection"}
