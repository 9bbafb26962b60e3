"""The loader starts the HTTP worker processes, talks to each over its control socket, and
starts one again when it exits (the others keep serving). They all listen on one port
(SO_REUSEPORT: the kernel spreads new connections over them); the loader holds the port bound,
not listening, so that it stays theirs while one is started again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.channel import Channel, ChannelClosed
from engine.settings import Settings
from engine.store import Snapshot
from loaders.loader import Loader
from loaders.workers import STAGE_SECONDS, WorkerGone, Workers

log = logging.getLogger("duckswap.loader")
START_SECONDS = 60.0  # the longest a worker may take from start to listening
BACKOFF = (0.5, 30.0)  # seconds before a worker that exited is started again: first, most
HEALTHY_SECONDS = 60.0  # a worker that lived this long starts again after the first backoff


class ProcessWorker:
    """A worker process, as the loader reaches it (`loaders.workers.WorkerLink`)."""

    def __init__(self, name: str, process: asyncio.subprocess.Process,
                 channel: Channel) -> None:
        self.name = name
        self.process = process
        self.pid = process.pid
        self.channel = channel
        self.listening = asyncio.Event()

    async def _call(self, op: str, *args: Any) -> Any:
        try:
            return await self.channel.call(op, *args, timeout=STAGE_SECONDS)
        except ChannelClosed:
            raise WorkerGone(self.name) from None

    async def stage(self, snap: Snapshot) -> None:
        await self._call("stage", snap)

    async def commit(self, snap: Snapshot) -> None:
        await self._call("commit", snap)

    async def hot(self, old_tokens: Mapping[str, str | None], n: int, folder: Path,
                  tag: str) -> tuple[str, float, int]:
        result: tuple[str, float, int] = await self._call("hot", dict(old_tokens), n, folder,
                                                          tag)
        return result

    async def counters(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("counters")
        return result

    def status(self, doc: dict[str, Any]) -> None:
        self.channel.note("status", doc)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()


class Supervisor:
    def __init__(self, settings: Settings, loader: Loader, workers: Workers, host: str,
                 port: int) -> None:
        self.settings = settings
        self.loader = loader
        self.workers = workers
        self.host = host
        self.port = port
        self.count = settings.worker_count()
        self.stopping = False
        self._placeholder: socket.socket | None = None
        self._slots: dict[int, ProcessWorker] = {}
        self._keepers: list[asyncio.Task[None]] = []
        self._readers: set[asyncio.Task[None]] = set()  # each worker's channel
        self._generation = 0

    def bind(self) -> int:
        """Hold `host:port` (0: any free port) for the workers; returns the port. OSError
        (EADDRINUSE) where anything else holds it: SO_REUSEPORT would let a second server
        bind beside the first, and the kernel would split connections between the two."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        if self.port:
            with socket.socket(family, socket.SOCK_STREAM) as alone:  # no SO_REUSEPORT
                # SO_REUSEADDR: a stopped server's connections in TIME_WAIT do not count
                alone.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                alone.bind((self.host, self.port))
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self._placeholder = sock
        self.port = sock.getsockname()[1]
        return self.port

    async def start(self) -> None:
        """Start every worker; returns once all listen."""
        for slot in range(self.count):
            self._keepers.append(asyncio.create_task(self._keep(slot),
                                                     name=f"duckswap-worker-{slot + 1}"))

        async def all_listening() -> None:
            while len([w for w in self._slots.values() if w.listening.is_set()]) < self.count:
                await asyncio.sleep(0.02)

        await asyncio.wait_for(all_listening(), START_SECONDS)

    async def _keep(self, slot: int) -> None:
        """Run the worker of `slot`, and start it again whenever it exits."""
        backoff = BACKOFF[0]
        while not self.stopping:
            started = time.monotonic()
            try:
                worker = await self._start(slot)
            except Exception as exc:  # noqa: BLE001 - logged, and tried again
                log.error("worker %d could not start: %s", slot + 1, exc)
            else:
                code = await worker.process.wait()
                self.workers.remove(worker.name)
                self.loader.left(worker.name)
                if self.stopping:
                    return
                log.error("worker %s (pid %d) exited with %s; starting it again in %gs",
                          worker.name, worker.process.pid, code, backoff)
                self.workers.restarts += 1
            if time.monotonic() - started > HEALTHY_SECONDS:
                backoff = BACKOFF[0]
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF[1], backoff * 2)

    async def _start(self, slot: int) -> ProcessWorker:
        self._generation += 1
        name = f"worker-{slot + 1}" + (f".{self._generation}" if self._generation > self.count
                                       else "")
        parent, child = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "serving.worker", str(child.fileno()),
                pass_fds=[child.fileno()], stdin=asyncio.subprocess.DEVNULL)
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        worker: ProcessWorker | None = None

        async def handle(op: str, args: tuple[Any, ...]) -> Any:
            if op == "admin":
                return await self.loader.admin(*args)
            if op == "metrics":
                return await self.loader.metrics()
            if op == "page":
                return await self.loader.page(*args)
            if op == "drained":
                self.loader.drained(name, *args)
                return None
            if op == "listening" and worker is not None:
                worker.listening.set()
                return None
            raise ValueError(f"unknown message {op!r}")

        channel = Channel(reader, writer, handle)
        worker = ProcessWorker(name, process, channel)
        reading = asyncio.create_task(channel.run())  # kept referenced until it ends
        self._readers.add(reading)
        reading.add_done_callback(self._readers.discard)
        current = self.loader.catalog.current
        self.loader.catalog.hold(current, name)  # it serves `current` first
        self.workers.add(worker)  # publishes from now on reach it too
        self._slots[slot] = worker
        data = self.loader.data
        try:
            await channel.call("init", self.settings, name, data.versions, data.answers,
                               self.count, self.host, self.port, current,
                               timeout=START_SECONDS)
        except (ChannelClosed, TimeoutError):
            process.kill()
            raise
        worker.status(self.loader.status())
        return worker

    async def stop(self, drain: float, shutdown: float) -> None:
        """Every worker: `/readyz` answers 503 now, the listener closes after `drain`
        seconds, the requests in flight get up to `shutdown` more."""
        self.stopping = True
        workers = list(self._slots.values())
        for worker in workers:
            worker.channel.note("stop", drain, shutdown)
        deadline = drain + shutdown + 5.0
        for worker in workers:
            try:
                await asyncio.wait_for(worker.process.wait(), deadline)
            except TimeoutError:
                log.warning("worker %s did not stop in %gs; killing it", worker.name, deadline)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()
        for keeper in self._keepers:
            keeper.cancel()
        await asyncio.gather(*self._keepers, return_exceptions=True)
        if self._placeholder is not None:
            self._placeholder.close()
