"""The query process's side: answers the server's cache misses on its own DuckDB database.

In the server process a miss's query shares the GIL with the event loop: DuckDB's client lets
go of it and takes it back ~8 times a query, and each retake can wait a switch interval (5 ms)
while the loop runs. Here nothing else wants the GIL but this process's own query threads.

The server sends length-prefixed pickled frames over one Unix socket (see `serving.remote`):
    ("snap", snap_id, schema, {dataset: version file})  defines a Snapshot, before its queries
    ("query", query_id, snap_id, endpoint, params)       one endpoint query
    ("batch", query_id, snap_id, endpoint, [params, ...]) many keys in one query (a miss storm)
    ("cancel", query_id)                                 past its deadline: interrupt it
    ("drop", [snap_id, ...])                             drained: drop, detach unused files
and reads back ("ok", query_id, answer) or ("error", query_id, kind, message), kind "timeout",
"failed" or "absent" (the Snapshot could not be attached here: the server runs it). An answer
is (columns, rows, truncated); a batch's is a list of those or None (see `execute_batch`). This
module imports neither aiohttp nor asyncio's server parts: the forkserver preloads it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import duckdb

from engine.endpoints import EndpointSpec
from engine.fold import Binding, Constants, Folded, binding
from engine.plan import BatchPlan
from engine.query import execute, execute_batch, thread_cursor
from engine.sql import lock_down
from engine.store import QUERY_CONFIG, attach_sql, view_sql
from loaders.builder import exit_with

FRAME = struct.Struct("!I")
NAME = "duckswap-query"  # what `ps` and `top` show
log = logging.getLogger("duckswap.query")


def dump(msg: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(body)) + body


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class _Job:
    __slots__ = ("cancelled", "cursor")

    def __init__(self) -> None:
        self.cancelled = False
        self.cursor: duckdb.DuckDBPyConnection | None = None


class Worker:
    """One DuckDB database, `threads` query threads (one cursor each, one DuckDB thread per
    query), and the thread that reads the socket."""

    def __init__(self, sock: socket.socket, endpoints: Mapping[str, EndpointSpec],
                 plans: Mapping[str, BatchPlan | None], folded: Mapping[str, Folded],
                 threads: int, versions: str) -> None:
        self.sock = sock
        self.endpoints = dict(endpoints)
        self.plans = dict(plans)  # each endpoint's batched form (of its folded SQL)
        self.constants = Constants(folded)
        self.db = duckdb.connect(":memory:", config={"threads": 1, **QUERY_CONFIG})
        self.db.execute("SET enable_progress_bar = false")
        lock_down(self.db, [versions])  # version files are attached from there only
        self._admin = self.db.cursor()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="duckswap-query")
        self._local = threading.local()
        self._send = threading.Lock()
        self._jobs: dict[int, _Job] = {}
        self._jobs_lock = threading.Lock()
        self._names = itertools.count(1)
        self._attached: dict[str, str] = {}  # version file -> its database name
        self._snaps: dict[int, tuple[str, frozenset[str]]] = {}  # id -> schema, databases

    def serve(self) -> None:
        """Until the server closes its end (or exits)."""
        while (head := _recv_exact(self.sock, FRAME.size)) is not None:
            body = _recv_exact(self.sock, FRAME.unpack(head)[0])
            if body is None:
                break
            msg = pickle.loads(body)
            op = msg[0]
            if op in ("query", "batch"):
                job = _Job()
                with self._jobs_lock:
                    self._jobs[msg[1]] = job
                work = self._query if op == "query" else self._batch
                self._pool.submit(self._run, job, work, *msg[1:])
            elif op == "cancel":
                with self._jobs_lock:
                    running = self._jobs.get(msg[1])
                if running is not None:
                    running.cancelled = True
                    if running.cursor is not None:
                        running.cursor.interrupt()
            elif op == "snap":
                self._define(*msg[1:])
            elif op == "drop":
                self._drop(msg[1])

    def _define(self, snap_id: int, schema: str, files: Mapping[str, str]) -> None:
        """Attach a Snapshot's files and make its schema. One that cannot be attached (a file
        gone from disk) stays undefined: its queries are answered "absent", and the server
        runs them itself."""
        names: dict[str, str] = {}
        try:
            for dataset, path in files.items():
                name = self._attached.get(path)
                if name is None:
                    name = f"w_{next(self._names)}"
                    self._admin.execute(attach_sql(path, name))
                    self._attached[path] = name
                names[dataset] = name
            self._admin.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")  # a retry's too
            for dataset, name in names.items():
                self._admin.execute(view_sql(schema, dataset, name))
        except (duckdb.Error, OSError) as exc:
            log.warning("could not attach snapshot %d here (%s); the server answers its "
                        "queries", snap_id, type(exc).__name__)
            return
        self._snaps[snap_id] = (schema, frozenset(names.values()))

    def _drop(self, snap_ids: list[int]) -> None:
        """The server sends this only once no query of these Snapshots is running."""
        for snap_id in snap_ids:
            got = self._snaps.pop(snap_id, None)
            if got is not None:
                self._admin.execute(f"DROP SCHEMA IF EXISTS {got[0]} CASCADE")
        in_use = {n for _, names in self._snaps.values() for n in names}
        for path, name in list(self._attached.items()):
            if name not in in_use:
                self._admin.execute(f"DETACH DATABASE IF EXISTS {name}")
                del self._attached[path]

    def _bind(self, cur: duckdb.DuckDBPyConnection, snap_id: int, endpoint: str) -> Binding:
        """The endpoint's SQL with its constants on this Snapshot (`engine.fold`)."""
        c = self.constants
        return binding(self.endpoints[endpoint].sql, c.folded.get(endpoint),
                       c.values(cur, snap_id, endpoint))

    def _query(self, cur: duckdb.DuckDBPyConnection, snap_id: int, endpoint: str,
               params: dict[str, Any]) -> Any:
        b = self._bind(cur, snap_id, endpoint)
        r = execute(cur, b.sql, {**params, **b.fixed}, self.endpoints[endpoint].row_limit)
        return r.columns, r.rows, r.truncated

    def _batch(self, cur: duckdb.DuckDBPyConnection, snap_id: int, endpoint: str,
               keys: list[dict[str, Any]]) -> Any:
        spec, plan = self.endpoints[endpoint], self.plans[endpoint]
        b = self._bind(cur, snap_id, endpoint)
        if plan is None or not b.batchable:
            return [None] * len(keys)
        return [None if r is None else (r.columns, r.rows, r.truncated)
                for r in execute_batch(cur, spec, plan, keys, b.fixed)]

    def _run(self, job: _Job, work: Callable[..., Any], query_id: int, snap_id: int,
             endpoint: str, arg: Any) -> None:
        try:
            snap = self._snaps.get(snap_id)
            if job.cancelled:
                raise duckdb.InterruptException("cancelled before it ran")
            if snap is None:
                reply = dump(("error", query_id, "absent", "snapshot not attached here"))
            else:
                cur = thread_cursor(self._local, self.db.cursor, snap[0])
                job.cursor = cur
                reply = dump(("ok", query_id, work(cur, snap_id, endpoint, arg)))
        except duckdb.InterruptException:
            reply = dump(("error", query_id, "timeout", "interrupted at its deadline"))
        except Exception as exc:  # named to the server; the process goes on serving
            reply = dump(("error", query_id, "failed",
                          (type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")))
        finally:
            job.cursor = None
            with self._jobs_lock:
                self._jobs.pop(query_id, None)
        with self._send:
            self.sock.sendall(reply)


def main(sock: socket.socket, endpoints: Mapping[str, EndpointSpec],
         plans: Mapping[str, BatchPlan | None], folded: Mapping[str, Folded], threads: int,
         server: int, versions: str) -> None:
    """The process's entry point (module level, for multiprocessing)."""
    exit_with(server)
    with contextlib.suppress(OSError):  # Linux: the name `ps -o comm`, `top` and the bench show
        Path("/proc/self/comm").write_text(NAME)
    with contextlib.suppress(OSError, EOFError):  # the server went away mid-frame
        Worker(sock, endpoints, plans, folded, threads, versions).serve()
    os._exit(0)  # no interpreter teardown: the query threads may be mid-query
