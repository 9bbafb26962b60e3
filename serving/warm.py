"""Warm before publish: compute the responses a new Snapshot will be asked for first.

Runs between `Store.stage` and `Store.commit`: the updater's thread asks the builder process
(lower priority, its own GIL) to answer and encode on the staged version files into each
endpoint version's answers file (`engine.answers`), which the event loop then opens.
Which keys: the most requested parameters of each affected endpoint (replayed from the current
version), every key of a small parameter space (enums, bools and narrow int ranges) and the
rows of the endpoint's `warm_sql`. How: one batched query per endpoint when the SQL allows it
(the endpoint's SQL run LATERAL against a table of keys), else one query per key: every hot key
first, then the rest until the time budget is spent (see `spool.Budget`: longer on a busy
machine). This module is the server's side; `engine.precompute` the builder's, `engine.keys` which
keys, `engine.plan` the batched SQL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Set
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from engine.answers import AnswersFile, path_of
from engine.endpoints import EndpointSpec
from engine.fold import Folded
from engine.plan import BatchPlan
from engine.precompute import BUSY_SHARE, WarmReport, WarmTask, compute, write_inputs
from engine.responses import endpoint_tokens
from engine.store import Snapshot, Store
from loaders.builder import Builder
from loaders.errors import Unavailable
from serving.cache import Popularity, ResponseCache, hottest

log = logging.getLogger("duckswap.warm")

T = TypeVar("T")
# Requests a second that a publish would leave to cache misses (see `would_miss`): from this
# many on, the warm of the declared keys is not cut short either (~20 queries a second on the
# request path, ~3-6 ms of CPU each under load, against ~0.03 ms per key batched in the warm).
MISS_RATE = 20.0


class Warmer:
    """Called by the updater with a staged Snapshot; fills the cache for it before commit.

    The queries and the encoding run in the builder process (lower priority, its own GIL), on
    the Snapshot's version files attached read-only there, and the answers go straight into
    the answers files in `answers`; the event loop then opens them (`ResponseCache.adopt`).
    """

    def __init__(self, store: Store, cache: ResponseCache, popularity: Popularity,
                 endpoints: Mapping[str, EndpointSpec], fingerprints: Mapping[str, bytes],
                 batch: Mapping[str, BatchPlan | None], seconds: float, keys: int,
                 builder: Builder, answers: Path, threads: int = 2, tail_seconds: float = 0.0,
                 busy_seconds: float = 0.0, folded: Mapping[str, Folded] | None = None,
                 busy_share: float = BUSY_SHARE, miss_rate: float = MISS_RATE) -> None:
        self.store = store
        self.cache = cache
        self.popularity = popularity
        self.specs = dict(endpoints)
        self.endpoints = {n: e for n, e in endpoints.items() if e.warm}
        self.fingerprints = fingerprints
        self.seconds = seconds
        self.keys = keys
        self.builder = builder
        self.answers = answers
        self.threads = threads
        self.tail_seconds = tail_seconds
        self.busy_seconds = busy_seconds
        self.busy_share = busy_share
        self.miss_rate = miss_rate
        self._hot: dict[str, frozenset[tuple[Any, ...]]] = {}  # each endpoint's last hot keys
        # (the Snapshot, its tasks, the busy share used)
        self._tail: tuple[Snapshot, list[WarmTask], float] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: Path | None = None  # the stop file of the after-publish warm running now
        self._cutting = False  # `cut_short` called, the after-publish warm not ended since
        self._batch = dict(batch)
        self.folded = dict(folded or {})
        self.last: WarmReport | None = None
        self.last_tail: WarmReport | None = None
        # True once the first publish's after-publish pass has ended: until then a cold
        # replica would meet its first traffic with a cache miss per declared key (/readyz).
        self.settled = False

    def _on_loop(self, fn: Callable[[], T]) -> T:
        loop = self.loop
        if loop is None:
            return fn()

        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=10)

    def __call__(self, snap: Snapshot) -> WarmReport:
        """Before publish: the most requested keys first, within `seconds`."""
        self._tail, self._cutting = None, False
        start = time.perf_counter()
        old = self.store.current

        def take() -> tuple[tuple[dict[str, Counter[tuple[Any, ...]]], float],
                            dict[str, dict[tuple[Any, ...], int]]]:
            return self.popularity.take_window(), self.popularity.counts(self.endpoints)

        # Copies, taken on the loop in one step; the top keys are picked here, off it.
        (window, window_seconds), counts = self._on_loop(take)
        missed = 0
        old_tokens = endpoint_tokens(self.specs, self.fingerprints, old)
        new_tokens = endpoint_tokens(self.specs, self.fingerprints, snap)
        # Only the served version and this one keep their answers: the version `old` replaced
        # loses them now, before anything is inserted, so a swap holds two versions' answers at
        # its peak, not three (and this one pass, on every publish, is the only prune).
        self._drop_others(frozenset(old_tokens.values()) | frozenset(new_tokens.values()))
        tasks: list[WarmTask] = []
        # Picking the hot keys is ~25 ms of GIL at 2000 req/s (a sort of up to 20,000 counts
        # per endpoint, the window's count of would-be misses): paced, a step at a time.
        pacer = _GilPacer()
        for name, spec in self.endpoints.items():
            tok, old_tok = new_tokens.get(name), old_tokens.get(name)
            if tok is None or tok == old_tok:
                continue  # not all its datasets loaded, or an unchanged token (still valid)
            hot = hottest(counts.get(name, {}), self.keys)
            hot_now = frozenset(k for k, _ in hot)
            pacer.pause()
            # Out of sample: the requests since the last warm against the hot keys it chose
            # (the ones chosen now were chosen from those very requests). After a start, that
            # warm had none to choose from: every such request counts.
            earlier, self._hot[name] = self._hot.get(name, hot_now), hot_now
            if name in window and old_tok is not None:
                missed += would_miss(window[name], earlier, self.cache.answers(old_tok),
                                     pacer.pause)
            tasks.append(WarmTask(
                replace(spec, params=dict(spec.params)),
                tok, snap.version_ids(spec.datasets), self._batch.get(name), hot,
                self.folded.get(name),
            ))
        if not tasks:
            return WarmReport(snap.id)
        # Waiting on a busy machine trades freshness for fewer misses; an endpoint not served
        # yet has no misses to spare, only 503s: publish it as soon as possible.
        wait = all(old_tokens.get(t.spec.name) for t in tasks)
        # Requests for warmed answers beyond the hot keys: a publish before their keys are
        # warmed meets them with misses, which on this box take the CPU the rest of the warm
        # needs. Many of them make the machine busy whatever the CPU the warm gets now.
        rate = missed / max(window_seconds, 1.0)
        share = math.inf if rate >= self.miss_rate else self.busy_share
        report = self._run(snap, tasks, self.seconds, self.busy_seconds if wait else 0, share)
        if report is None:
            return WarmReport(snap.id)
        report.would_miss = round(rate, 1)
        if (report.skipped or report.unlisted) and self.tail_seconds > 0:
            self._tail = (snap, tasks, share)
        report.seconds = time.perf_counter() - start
        self.last = report
        log.info(
            "warmed snapshot %d: %d responses (%d batched, %d single, %s left for after the "
            "publish) in %.3fs on %.2f cores%s", snap.id,
            report.entries, report.batched, report.single,
            f"{report.skipped}{' + declared keys' if report.unlisted else ''}", report.seconds,
            report.cpu_share, _extension(report, self.miss_rate),
        )
        return report

    def after_publish(self, snap: Snapshot) -> WarmReport | None:
        """After publish: the keys the first pass had no time for (the long tail of
        `warm_sql` and enumerations), within `tail_seconds` (longer on a busy machine, see
        `spool.Budget`: the keys it leaves are met by misses until the next publish)."""
        try:
            return self._after_publish(snap)
        finally:
            self.settled = True

    def _after_publish(self, snap: Snapshot) -> WarmReport | None:
        pending, self._tail = self._tail, None
        if pending is None or pending[0].id != snap.id:
            return None
        start = time.perf_counter()
        _, tasks, share = pending
        stop = self.store.data_dir / f"warm-{snap.id}.stop"
        self._stop = stop
        try:
            if self._cutting:  # cut before it began: resumed if nothing replaces `snap`
                self._tail = pending
                return None
            report = self._run(snap, tasks, self.tail_seconds, self.busy_seconds, share,
                               stop=stop)
        finally:
            self._stop, self._cutting = None, False
            stop.unlink(missing_ok=True)
        if report is not None:
            report.seconds = time.perf_counter() - start
            report.would_miss = self.last.would_miss if self.last else 0.0
            self.last_tail = report  # its answers are all in the cache by now
            if report.stopped and self.store.current is snap:
                self._tail = pending  # cut short for a load that published nothing: resumable
            log.info("warmed snapshot %d after its publish: %d more responses (%d left%s) in "
                     "%.3fs on %.2f cores%s", snap.id,
                     report.entries, report.skipped,
                     ", cut short for a newer export" if report.stopped else "",
                     report.seconds, report.cpu_share, _extension(report, self.miss_rate))
        return report

    def cut_short(self) -> None:
        """End the after-publish warm in progress, if any, once its current round is done
        (from any thread): a newer export is loading, and its builds want the builder
        processes. Its answers so far are kept; one cut before it begins ends it at once."""
        self._cutting = True
        stop = self._stop
        if stop is not None:
            stop.touch()

    def _run(self, snap: Snapshot, tasks: list[WarmTask], seconds: float,
             busy_seconds: float = 0.0, busy_share: float = BUSY_SHARE,
             stop: Path | None = None) -> WarmReport | None:
        """Answer in the builder process into the answers files, then have the event loop
        serve them. None when the Snapshot's versions have no files (nothing to attach there)."""
        files = {d: str(v.path) for d, v in snap.versions.items() if v.path is not None}
        if len(files) != len(snap.versions):
            return None
        inputs = self.store.data_dir / f"warm-{snap.id}.in"
        try:
            light = write_inputs(str(inputs), tasks, _GilPacer().pause)
            report: WarmReport = self.builder.run(
                compute, files, light, seconds, self.threads,
                max(0, self.cache.max_bytes - self.cache.warm_bytes), str(self.answers),
                self.cache.max_bytes, busy_seconds, busy_share, str(inputs),
                str(stop) if stop else None)
        except (concurrent.futures.CancelledError, Unavailable):  # the server is stopping
            log.info("warm of snapshot %d ended: the server is stopping", snap.id)
            return None
        finally:
            inputs.unlink(missing_ok=True)
        report.snapshot = snap.id
        adopt = []
        for task in tasks:
            added, nbytes = report.added.get(task.token, (0, 0))
            adopt.append((task.token, path_of(self.answers, task.token), nbytes, added))

        def adopt_all() -> None:
            for token, path, nbytes, added in adopt:
                self.cache.adopt(token, path, self.cache.warm_bytes_of(token) + nbytes, added)

        self._on_loop(adopt_all)
        return report

    def _drop_others(self, live: frozenset[str]) -> None:
        """Have the event loop drop, between requests, the cached answers of every token
        not in `live` (a `?v=` for them is the 307 anyway)."""
        loop = self.loop
        if loop is None:
            return
        # CancelledError: the event loop stopped (shutting down)
        with contextlib.suppress(concurrent.futures.CancelledError):
            asyncio.run_coroutine_threadsafe(self.cache.retain(live), loop).result(
                timeout=HANDOFF_TIMEOUT)


def would_miss(window: Mapping[tuple[Any, ...], int], hot: Set[tuple[Any, ...]],
               warmed: AnswersFile | Set[tuple[Any, ...]] | None,
               pause: Callable[[], None] = lambda: None) -> int:
    """Requests in `window` for keys `warmed` had an answer for that are not `hot`: each one
    met by a cache miss had a version been published with the `hot` keys only. `pause()`
    after each slice of keys looked up."""
    if warmed is None:
        return 0
    n = 0
    for i, (k, count) in enumerate(window.items()):
        if k not in hot and k in warmed:
            n += count
        if i % LOOKUP_SLICE == LOOKUP_SLICE - 1:
            pause()
    return n


def _extension(report: WarmReport, miss_rate: float) -> str:
    if not report.extended:
        return ""
    if report.would_miss >= miss_rate:
        return (f" (went on past its time budget: {report.would_miss:g} requests/s asked for "
                "answers beyond the hot keys)")
    return " (busy machine: went on past its time budget)"


LOADER_SHARE = 0.25  # of the GIL, at most, for the loader thread's share of a warm (picking
# the hot keys, handing them over)


class _GilPacer:
    """Paces a thread that shares the GIL with the event loop: after each slice of work it
    sleeps `1 / share - 1` times the CPU the slice took (at least `YIELD_SECONDS`), so the
    loop gets the GIL at least `1 - share` of the time. A thread that holds it for long
    stretches makes the loop wait a whole switch interval (5 ms) for it after every wait for
    I/O: with ~0.3 s of a warm's answers read back in one go, requests at 1000 req/s had P99
    spikes of ~120 ms at each publish. A fixed 1 ms pause was not enough at 2000 req/s: a
    chunk took 0.5-1.3 ms of CPU there, so the loop had the GIL as little as half the time
    while it needs ~0.55 of a core, and requests queued behind the read-back (P50 up to 25 ms
    for a second or two). A real sleep, so the loop takes the GIL at once."""

    def __init__(self, share: float = LOADER_SHARE) -> None:
        self.ratio = 1 / share - 1
        self.mark = time.thread_time()

    def pause(self) -> None:
        spent = time.thread_time() - self.mark
        time.sleep(max(YIELD_SECONDS, spent * self.ratio))
        self.mark = time.thread_time()

YIELD_SECONDS = 0.001  # the loader thread's shortest pause between chunks (see `_GilPacer`)
LOOKUP_SLICE = 2000  # keys looked up between two pauses (~2-4 ms of work)
HANDOFF_TIMEOUT = 60.0
