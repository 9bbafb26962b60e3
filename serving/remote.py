"""Cache misses' queries run in a query process (`serving.qworker`), not on the server's
threads, so they never wait for the GIL the event loop holds, nor make the loop wait for it.

The event loop writes each query to the process's socket and reads the answer back as bytes
(a few microseconds of the loop per miss). The process attaches the same version files
read-only; a Snapshot is defined there before its first query and dropped there once the Store
has collected it (its readers, remote queries included, have drained). While the process is
down (not started yet, crashed, restarting) the server's own query threads answer, so a crash
costs no request: the queries it had in flight are run again here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import socket
import time
from collections.abc import Mapping
from multiprocessing.process import BaseProcess
from typing import Any

from engine.endpoints import EndpointSpec
from engine.errors import QueryFailed, QueryTimeout
from engine.fold import Constants, Folded
from engine.plan import BatchPlan
from engine.query import QueryRunner, Result
from engine.store import Snapshot
from loaders.builder import process_context
from serving import qworker

log = logging.getLogger("duckswap.server")
RESTART_MAX = 30.0  # seconds between restarts of a process that keeps dying
STUCK = 5.0  # seconds a query may run on past its deadline's interrupt before the process
# is killed (and restarted): its Snapshot must not stay held forever


class _Lost(Exception):
    """The query process went away before answering."""


class _Conn(asyncio.Protocol):
    def __init__(self, owner: QueryProcess) -> None:
        self.owner = owner
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        size = qworker.FRAME.size
        while len(buf) >= size:
            end = size + qworker.FRAME.unpack_from(buf)[0]
            if len(buf) < end:
                break
            msg = pickle.loads(memoryview(buf)[size:end])
            del buf[:end]
            self.owner._answer(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(self)


class QueryProcess:
    """`run_endpoint` and `run_batch` as `QueryRunner`'s, answered by the query process when
    it is up."""

    def __init__(self, local: QueryRunner, endpoints: Mapping[str, EndpointSpec],
                 plans: Mapping[str, BatchPlan | None], folded: Mapping[str, Folded],
                 threads: int, preload: tuple[str, ...]) -> None:
        self.local = local
        self.store = local.store
        self.timeout = local.timeout
        self.threads = threads
        self.preload = preload
        self._endpoints = dict(endpoints)
        self._plans = dict(plans)
        self._folded = dict(folded)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc: BaseProcess | None = None
        self._conn: _Conn | None = None
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, tuple[asyncio.Future[Any], Snapshot, asyncio.TimerHandle]] = {}
        self._defined: set[int] = set()
        self._ids = itertools.count(1)
        self._closing = False
        self._restart: asyncio.Task[None] | None = None
        self._started_at = 0.0
        self._delay = 0.5
        self.answered = 0  # queries the process answered
        self.fallbacks = 0  # queries the server's threads answered instead
        self.restarts = 0

    @property
    def up(self) -> bool:
        t = self._transport
        return t is not None and not t.is_closing()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.store.on_stage = self._staged
        self.store.on_collect = self._collected
        try:
            await self._spawn()
        except Exception:  # the server's own threads answer instead
            log.exception("could not start the query process; queries run in the server")

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = process_context(list(self.preload)).Process(
                target=qworker.main, name=qworker.NAME, daemon=True,
                args=(child, self._endpoints, self._plans, self._folded, self.threads,
                      os.getpid(), str(self.store.data_dir)))
            await loop.run_in_executor(None, proc.start)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        transport, conn = await loop.create_unix_connection(lambda: _Conn(self), sock=parent)
        if self._closing:
            transport.close()
            return
        self._proc, self._conn, self._transport = proc, conn, transport
        self._started_at = time.monotonic()
        log.info("query process %d started", proc.pid)

    async def run_endpoint(self, spec: EndpointSpec, params: dict[str, Any],
                           constants: Constants, snapshot: Snapshot | None = None) -> Result:
        try:
            snap, (columns, rows, truncated) = await self._ask(
                "query", spec, params, snapshot)
        except _Lost:
            self.fallbacks += 1
            return await self.local.run_endpoint(spec, params, constants, snapshot)
        return Result(columns, rows, truncated, snap.version_ids(spec.datasets))

    async def run_batch(self, spec: EndpointSpec, plan: BatchPlan, keys: list[dict[str, Any]],
                        snapshot: Snapshot, constants: Constants) -> list[Result | None]:
        """`QueryRunner.run_batch` there (with its own copy of the endpoint's `plan`)."""
        try:
            _, answers = await self._ask("batch", spec, keys, snapshot)
        except _Lost:
            self.fallbacks += 1
            return await self.local.run_batch(spec, plan, keys, snapshot, constants)
        return [None if a is None else Result(*a) for a in answers]

    async def _ask(self, op: str, spec: EndpointSpec, arg: Any,
                   snapshot: Snapshot | None) -> tuple[Snapshot, Any]:
        """Send one query to the process and wait for its answer; _Lost if the process is
        down, or goes down first (the caller then runs it here)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise _Lost
        snap = self.local.hold(spec.datasets, snapshot)
        if not self._define(snap):  # a version with no file (tests' tables): here
            self.store.release(snap)
            raise _Lost
        qid = next(self._ids)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        timer = loop.call_later(self.timeout, self._expire, qid)
        self._pending[qid] = (fut, snap, timer)
        transport.write(qworker.dump((op, qid, snap.id, spec.name, arg)))
        answer = await fut
        self.answered += 1
        return snap, answer

    def _define(self, snap: Snapshot) -> bool:
        """Have the process attach `snap` (once per process; the process is up). False where
        one of its versions has no file."""
        if snap.id in self._defined:
            return True
        files = {d: str(v.path) for d, v in snap.versions.items() if v.path is not None}
        if len(files) != len(snap.versions):
            return False
        assert self._transport is not None
        self._transport.write(qworker.dump(("snap", snap.id, snap.schema, files)))
        self._defined.add(snap.id)
        return True

    def _staged(self, snap: Snapshot) -> None:
        """On the loader thread: a Snapshot staged for publishing. The process attaches it
        now, while the warm runs, not in front of the first miss after the publish (~15 ms
        for the demo's five files, idle)."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(self._stage, snap)

    def _stage(self, snap: Snapshot) -> None:
        if self.up:
            self._define(snap)

    def _answer(self, msg: tuple[Any, ...]) -> None:
        got = self._pending.pop(msg[1], None)
        if got is None:
            return
        fut, snap, timer = got
        timer.cancel()
        self.store.release(snap)
        if fut.done():  # answered 504 already
            return
        if msg[0] == "ok":
            fut.set_result(msg[2])
        elif msg[2] == "absent":  # it could not attach that Snapshot: run it here; the
            self._defined.discard(snap.id)  # next query of it sends the definition again
            fut.set_exception(_Lost())
        elif msg[2] == "timeout":
            fut.set_exception(QueryTimeout(f"query exceeded its {self.timeout:g}s deadline"))
        else:
            fut.set_exception(QueryFailed(*msg[3]))

    def _expire(self, qid: int) -> None:
        """Past its deadline: answer 504 now, interrupt it there; the Snapshot stays held
        until the process says the query ended, or is killed STUCK seconds later."""
        got = self._pending.get(qid)
        if got is None:
            return
        fut, snap, _ = got
        if not fut.done():
            fut.set_exception(QueryTimeout(f"query exceeded its {self.timeout:g}s deadline"))
        if self.up:
            assert self._transport is not None
            self._transport.write(qworker.dump(("cancel", qid)))
            stuck = asyncio.get_running_loop().call_later(STUCK, self._kill, qid)
            self._pending[qid] = (fut, snap, stuck)

    def _kill(self, qid: int) -> None:
        proc = self._proc
        if qid in self._pending and proc is not None and proc.is_alive():
            log.error("a query went on %g s past its interrupt; killing the query process",
                      STUCK)
            proc.kill()  # the connection ends: `_lost` restarts it

    def _lost(self, conn: _Conn) -> None:
        if conn is not self._conn:
            return
        self._conn = self._transport = None
        pending, self._pending = self._pending, {}
        self._defined = set()
        for fut, snap, timer in pending.values():
            timer.cancel()
            self.store.release(snap)
            if not fut.done():
                fut.set_exception(_Lost())
        if self._closing:
            return
        proc = self._proc
        code = proc.exitcode if proc is not None else None
        if time.monotonic() - self._started_at > 10 * RESTART_MAX:
            self._delay = 0.5  # it ran a good while: not a crash loop
        log.warning("query process exited (code %s); %d queries in flight run in the server; "
                    "restarting in %.1f s", code, len(pending), self._delay)
        self._restart = asyncio.get_running_loop().create_task(self._respawn(self._delay))
        self._delay = min(self._delay * 2, RESTART_MAX)

    async def _respawn(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._proc.join, 5)
        try:
            await self._spawn()
        except Exception:
            log.exception("could not restart the query process; queries run in the server")
            return
        self.restarts += 1

    def _collected(self, drained: list[Snapshot]) -> None:
        """On the loader thread: Snapshots the Store dropped, none of them read any more."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to tell
                loop.call_soon_threadsafe(self._drop, [s.id for s in drained])

    def _drop(self, ids: list[int]) -> None:
        ids = [i for i in ids if i in self._defined]
        if ids and self.up:
            assert self._transport is not None
            self._transport.write(qworker.dump(("drop", ids)))
        self._defined.difference_update(ids)

    async def close(self) -> None:
        self._closing = True
        if self._restart is not None:
            self._restart.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restart
        if self._transport is not None:
            self._transport.close()  # end of input: the process exits
        proc = self._proc
        if proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, proc.join, 5)
            if proc.is_alive():
                proc.kill()
                await asyncio.get_running_loop().run_in_executor(None, proc.join, 5)
