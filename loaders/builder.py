"""Builds run in separate, lower-priority processes that write one DuckDB file per version.

The server only attaches finished files read-only: a build's CPU, its GIL-free sort and its
memory peak stay out of the serving process, and the OS scheduler lets requests go first. The
processes exist while there is work: they exit once idle for `IDLE_SECONDS`, and the next
build or warm starts them again.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
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
# The build processes exit after this long without a task: between exports (hours, in
# production) the server is the loader and its workers alone, not ~200 MB more of two idle
# processes that held a warm's heap. Starting them again costs the next export ~0.5 s (a fresh
# interpreter importing DuckDB and pyarrow); exports a minute apart or less never pay it.
IDLE_SECONDS = 60.0


def _call(fn: Callable[..., T], *args: Any) -> T:
    """In a build process: `fn(*args)`, then the heap it freed handed back to the OS. glibc
    keeps it otherwise: a process that had warmed the demo held ~100 MB between exports, ~70
    once trimmed."""
    try:
        return fn(*args)
    finally:
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)


def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl, macOS): nothing to trim with
        return None


_LIBC = _libc()


def _threads() -> list[int]:
    """This process's thread ids (Linux), else [0]: the calling thread."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


class BuildDied(LoadError):
    """A build process died (the OOM killer, a crash): every task it was running fails."""


def _child_init(nice: int, idle: bool, server: int) -> None:
    exit_with(server)
    with contextlib.suppress(OSError):  # Linux: the name `ps -o comm` and `top` show
        Path("/proc/self/comm").write_text("duckswap-build")
    # Every thread's: nice and the policy are per thread on Linux, and threads that importing
    # pyarrow and DuckDB started (jemalloc's, Arrow's) ran at the server's priority. Threads
    # started from now on inherit them. The value itself, not an increment: the process may
    # have been started from a niced thread (a test's, say) and inherited its nice value.
    for tid in _threads():
        try:
            if nice > 0 and os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            if idle and hasattr(os, "SCHED_IDLE"):
                # CPU only when nothing else wants it: nice 10 still took ~10% of a core from
                # the server whenever both were runnable.
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        except OSError as exc:
            log.warning("could not lower the build process's priority: %s", exc)
            return


class Builder:
    def __init__(self, nice: int = NICE, threads: int = 2, idle: bool = True,
                 processes: int = PROCESSES, idle_seconds: float = IDLE_SECONDS) -> None:
        self.nice = nice
        self.processes = processes
        self.idle = idle
        self.threads = threads
        self.idle_seconds = idle_seconds
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self._tasks = 0  # running now, all threads
        self._retire: threading.Timer | None = None

    def _executor(self) -> ProcessPoolExecutor:
        """The pool, started if need be, with one more task counted on it."""
        with self._lock:
            if self._stopped:
                raise Unavailable(SHUTTING_DOWN)
            self._cancel_retire()
            if self._pool is None:
                # spawn: a fresh interpreter, never a fork of one running DuckDB and threads.
                self._pool = ProcessPoolExecutor(
                    self.processes, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_child_init, initargs=(self.nice, self.idle, os.getpid()))
            self._tasks += 1
            return self._pool

    def _done(self) -> None:
        """A task ended: once none runs, the processes exit after `idle_seconds` (the current
        pool's, whichever pool the task ran on: one that broke is replaced)."""
        with self._lock:
            self._tasks -= 1
            pool = self._pool
            if self._tasks or self._stopped or pool is None:
                return
            self._retire = threading.Timer(self.idle_seconds, self._idle, (pool,))
            self._retire.daemon = True
            self._retire.name = "duckswap-build-idle"
            self._retire.start()

    def _idle(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._tasks or self._pool is not pool:  # busy again, or replaced
                return
            self._pool = self._retire = None
        pool.shutdown(wait=True)  # idle processes: they exit at once
        log.debug("build processes exited after %gs idle", self.idle_seconds)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Call a module-level `fn(*args)` in a build process and wait for its result."""
        pool = self._executor()
        try:
            return pool.submit(_call, fn, *args).result()
        except (BrokenProcessPool, CancelledError):
            with self._lock:
                if self._pool is pool:  # not one another thread has started since
                    self._pool = None  # fresh processes next time
            if self._stopped:
                raise Unavailable(SHUTTING_DOWN) from None
            raise BuildDied("the build process died") from None
        except RuntimeError:  # submitted after `stop` shut the pool down
            if self._stopped:
                raise Unavailable(SHUTTING_DOWN) from None
            raise
        finally:
            self._done()

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
            self._cancel_retire()
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
            self._cancel_retire()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _cancel_retire(self) -> None:
        if self._retire is not None:
            self._retire.cancel()
            self._retire = None
