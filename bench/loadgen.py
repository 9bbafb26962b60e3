"""Open-loop load generator, run in its own process.

Requests are sent on a fixed schedule whatever earlier ones are doing; each latency is measured
from the request's intended send time, so queueing anywhere (client pool, network, server) is
counted (no coordinated omission). Writes one JSON line per request to --out.
"""

from __future__ import annotations

import argparse
import asyncio
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
    a = p.parse_args(argv)
    n = max(1, int(a.rate * a.duration))
    if a.path:
        paths = [("path", a.path)] * n
    else:
        mix = Mix(a.mix, a.champions, a.unique, a.seed)
        paths = [mix.next() for _ in range(n)]
    asyncio.run(generate(a.url.rstrip("/"), paths, a.rate, a.out, a.timeout, a.connections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
