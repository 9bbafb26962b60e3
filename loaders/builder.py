"""Builds run in a separate, lower-priority process that writes one DuckDB file per version.

The server only attaches finished files read-only: a build's CPU, its GIL-free sort and its
memory peak stay out of the serving process, and the OS scheduler lets requests go first.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

from engine.lifeline import exit_with
from engine.schema import DatasetSchema
from engine.store import remove_version_file
from loaders.build import build_file
from loaders.errors import LoadError, Unavailable
from loaders.source import Export

log = logging.getLogger("duckswap.loader")
T = TypeVar("T")
SHUTTING_DOWN = "the server is shutting down"
# Builds and warms yield to requests: nice 10, and SCHED_IDLE on top (a core only when the
# requests leave one idle; nice 10 alone still took ~10% of a core from the server whenever
# both were runnable).
NICE = 10
# The datasets of one export are checked and built this many at a time, the largest first, so
# one build's serial steps (digests, the order check, writing its file) leave no core idle;
# each has its own memory peak (~150 MB building the demo export).
PROCESSES = 2


class BuildDied(LoadError):
    """A build process died (the OOM killer, a crash): every task it was running fails."""


def _child_init(nice: int, idle: bool, server: int) -> None:
    exit_with(server)
    with contextlib.suppress(OSError):  # Linux: the name `ps -o comm` and `top` show
        Path("/proc/self/comm").write_text("duckswap-build")
    # The value itself, not an increment: the forkserver may have been started from a niced
    # thread (a test's, say) and passed its nice value on.
    if nice > 0 and hasattr(os, "setpriority") and os.getpriority(os.PRIO_PROCESS, 0) < nice:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    if idle and hasattr(os, "SCHED_IDLE"):
        # CPU only when nothing else wants it (DuckDB's threads inherit the policy): nice 10
        # still took ~10% of a core from the server whenever both were runnable.
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:
            log.warning("could not set SCHED_IDLE on the build process: %s", exc)


def process_context(
    preload: list[str],
) -> multiprocessing.context.ForkServerContext | multiprocessing.context.SpawnContext:
    """forkserver: a clean single-threaded parent (never fork a process running DuckDB and an
    event loop) that has imported DuckDB once, so each builder starts in milliseconds."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(preload)
        return ctx
    return multiprocessing.get_context("spawn")


class Builder:
    def __init__(self, nice: int = NICE, threads: int = 2,
                 preload: tuple[str, ...] = ("loaders.build",), idle: bool = True,
                 processes: int = PROCESSES) -> None:
        self.nice = nice
        self.processes = processes
        self.idle = idle
        self.threads = threads
        self.preload = list(preload)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._stopped:
                raise Unavailable(SHUTTING_DOWN)
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.processes, mp_context=process_context(self.preload),
                    initializer=_child_init, initargs=(self.nice, self.idle, os.getpid()))
            return self._pool

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Call a module-level `fn(*args)` in the builder process and wait for its result."""
        pool = self._executor()
        try:
            return pool.submit(fn, *args).result()
        except (BrokenProcessPool, CancelledError):
            with self._lock:
                if self._pool is pool:  # not one another thread has started since
                    self._pool = None  # fresh processes next time
            if self._stopped:
                raise Unavailable(SHUTTING_DOWN) from None
            raise BuildDied("the build process died") from None

    def build(self, export: Export, schema: DatasetSchema,
              path: Path) -> tuple[int, dict[str, float]]:
        """Check and write `export` to the DuckDB file `path`; returns its row count and the
        seconds spent validating and building."""
        files = [str(p) for p in export.files]
        try:
            return self.run(build_file, files, schema, str(path), self.threads)
        except LoadError:
            remove_version_file(path)
            raise

    def stop(self) -> None:
        """End the build processes now (the server is stopping): builds and warms in flight
        raise `Unavailable`, and nothing new starts."""
        with self._lock:
            self._stopped = True
            pool, self._pool = self._pool, None
        if pool is not None:
            # ProcessPoolExecutor has no public way to end its workers before Python 3.14
            # (`kill_workers`); a build or a warm is seconds to minutes of CPU a stop must not
            # wait for. SIGKILL: a build process ignores SIGTERM (`engine.lifeline`).
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                with contextlib.suppress(OSError):
                    process.kill()
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
