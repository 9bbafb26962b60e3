"""Warm before publish: compute the responses a new Snapshot will be asked for first.

Runs between staging a Snapshot and publishing it: the loader's thread has the build process
(lower priority) answer and encode on the staged version files into each endpoint version's
answers file (`engine.answers`), which every HTTP worker opens when the Snapshot is staged on
it. Which keys: the most requested parameters of each affected endpoint (each worker writes its
own to a file, `HotKeys`), every key of a small parameter space (enums, bools and narrow int
ranges) and the rows of the endpoint's `warm_sql`. How: one batched query per endpoint when the
SQL allows it (the endpoint's SQL run LATERAL against a table of keys), else one query per key:
every hot key first, then the rest until the time budget is spent (see
`engine.precompute.Budget`: longer on a busy machine). This module is the loader's side;
`engine.precompute` the build process's, `engine.keys` which keys, `engine.plan` the batched SQL.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from engine.answers import remove
from engine.endpoints import EndpointSpec
from engine.fold import Folded
from engine.keys import WARM_KEYS
from engine.plan import BatchPlan
from engine.precompute import BUSY_SHARE, WarmReport, WarmTask, compute
from engine.responses import endpoint_tokens
from engine.store import Snapshot
from loaders.builder import Builder
from loaders.errors import Unavailable

log = logging.getLogger("duckswap.warm")

# Requests a second that a publish would leave to cache misses (see `HotReport.would_miss`):
# from this many on, the warm of the declared keys is not cut short either (~20 queries a
# second on the request path, ~3-6 ms of CPU each under load, against ~0.03 ms per key batched
# in the warm).
MISS_RATE = 20.0


@dataclass(frozen=True)
class WarmPolicy:
    """How long the warms of a new Snapshot run: chosen by measurement (docs/benchmarks.md),
    not configured (tests shorten or lengthen them)."""

    # Before a publish, on the declared keys once every hot key is answered: none on an idle
    # machine (they are answered right after the publish, which comes sooner).
    seconds: float = 0.0
    tail_seconds: float = 10.0  # after the publish, for the keys the first pass left
    # On a busy machine (see `engine.precompute.Budget`) both go on up to this long rather
    # than leave keys to cache misses that would keep the warm starved.
    busy_seconds: float = 60.0
    keys: int = WARM_KEYS  # the most requested keys of each endpoint, answered first


@dataclass
class HotReport:
    """What the workers said before a warm."""

    files: list[str] = field(default_factory=list)  # each worker's most requested keys
    seconds: float = 0.0  # the interval `would_miss` counts over (since the last warm)
    # Requests in that interval for answers the old version had warmed beyond the hot keys
    # the worker reported last time: each one met by a miss had a version been published with
    # the hot keys only.
    would_miss: int = 0


class HotKeys(Protocol):
    def __call__(self, old_tokens: Mapping[str, str | None], n: int,
                 folder: Path, tag: str) -> HotReport:
        """Each worker writes its `n` most requested keys of each endpoint named (with the
        token it replaces, or None) into a file in `folder` named after `tag`, and counts
        its would-be misses (see `HotReport`); a new interval starts."""


def no_hot_keys(old_tokens: Mapping[str, str | None], n: int, folder: Path,
                tag: str) -> HotReport:
    """Nobody serves (the loader alone): no popularity to replay."""
    return HotReport()


class Warmer:
    """Called by the updater with a staged Snapshot; computes its answers before commit.

    The queries and the encoding run in the build process (lower priority), on the
    Snapshot's version files attached read-only there, and the answers go straight into the
    answers files in `answers`, which the workers open when the Snapshot is staged on them.
    """

    def __init__(self, endpoints: Mapping[str, EndpointSpec], fingerprints: Mapping[str, bytes],
                 batch: Mapping[str, BatchPlan | None], seconds: float, keys: int,
                 builder: Builder, answers: Path, cache_bytes: int, threads: int = 2,
                 tail_seconds: float = 0.0, busy_seconds: float = 0.0,
                 folded: Mapping[str, Folded] | None = None, busy_share: float = BUSY_SHARE,
                 miss_rate: float = MISS_RATE, hot: HotKeys = no_hot_keys) -> None:
        self.specs = dict(endpoints)
        self.endpoints = {n: e for n, e in endpoints.items() if e.warm}
        self.fingerprints = fingerprints
        self.seconds = seconds
        self.keys = keys
        self.builder = builder
        self.answers = answers
        self.cache_bytes = cache_bytes
        self.threads = threads
        self.tail_seconds = tail_seconds
        self.busy_seconds = busy_seconds
        self.busy_share = busy_share
        self.miss_rate = miss_rate
        self.hot = hot
        # (the Snapshot, its tasks, the busy share used)
        self._tail: tuple[Snapshot, list[WarmTask], float] | None = None
        self._stop: Path | None = None  # the stop file of the after-publish warm running now
        self._cutting = False  # `cut_short` called, the after-publish warm not ended since
        self._batch = dict(batch)
        self.folded = dict(folded or {})
        self._bytes: dict[str, int] = {}  # bytes of answers written per token
        self.warmed = 0  # answers written, all warms
        self.last: WarmReport | None = None
        self.last_tail: WarmReport | None = None
        # True once the first publish's after-publish pass has ended: until then a cold
        # replica would meet its first traffic with a cache miss per declared key (/readyz).
        self.settled = False

    def __call__(self, snap: Snapshot, old: Snapshot) -> WarmReport:
        """Before publish (`old` is served): the most requested keys first, within
        `seconds`."""
        self._tail, self._cutting = None, False
        start = time.perf_counter()
        old_tokens = endpoint_tokens(self.specs, self.fingerprints, old)
        new_tokens = endpoint_tokens(self.specs, self.fingerprints, snap)
        # Only the served version and this one keep their answers: the version `old` replaced
        # loses them now, so a swap holds two versions' answers at its peak, not three. (A
        # worker that still has a file open keeps reading it until it lets go.)
        self._drop_others(set(old_tokens.values()) | set(new_tokens.values()))
        changed = {name: old_tokens.get(name) for name in self.endpoints
                   if new_tokens.get(name) not in (None, old_tokens.get(name))}
        if not changed:  # not all their datasets loaded, or unchanged tokens (still valid)
            return WarmReport(snap.id)
        hot = self.hot(changed, self.keys, self.answers, f"{snap.id}")
        tasks = [WarmTask(replace(self.specs[name], params=dict(self.specs[name].params)),
                          new_tokens[name], snap.version_ids(self.specs[name].datasets),
                          self._batch.get(name), [], self.folded.get(name))
                 for name in changed]
        if not tasks:
            return WarmReport(snap.id)
        # Waiting on a busy machine trades freshness for fewer misses; an endpoint not served
        # yet has no misses to spare, only 503s: publish it as soon as possible.
        wait = all(changed.values())
        # Requests for warmed answers beyond the hot keys: a publish before their keys are
        # warmed meets them with misses, which on this box take the CPU the rest of the warm
        # needs. Many of them make the machine busy whatever the CPU the warm gets now.
        rate = hot.would_miss / max(hot.seconds, 1.0)
        share = math.inf if rate >= self.miss_rate else self.busy_share
        try:
            report = self._run(snap, tasks, self.seconds, self.busy_seconds if wait else 0,
                               share, hot.files)
        finally:
            for f in hot.files:
                Path(f).unlink(missing_ok=True)
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
        stop = self.answers / f"warm-{snap.id}.stop"
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
            if report.stopped:  # cut short: resumed if the load publishes nothing (see
                self._tail = pending  # `Updater.refresh`), dropped by the next warm if it does
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
             inputs: list[str] | None = None, stop: Path | None = None) -> WarmReport | None:
        """Answer in the build process into the answers files. `inputs`: the workers' hot
        keys files (their keys go first, merged)."""
        files = {d: str(v.path) for d, v in snap.versions.items()}
        written = sum(self._bytes.get(t.token, 0) for t in tasks)
        try:
            report: WarmReport = self.builder.run(
                compute, files, tasks, seconds, self.threads,
                max(0, self.cache_bytes - written), str(self.answers), self.cache_bytes,
                busy_seconds, busy_share, inputs, self.keys, str(stop) if stop else None)
        except (concurrent.futures.CancelledError, Unavailable):  # the server is stopping
            log.info("warm of snapshot %d ended: the server is stopping", snap.id)
            return None
        report.snapshot = snap.id
        self.warmed += report.entries
        for token, (_, nbytes) in report.added.items():
            self._bytes[token] = self._bytes.get(token, 0) + nbytes
        return report

    def _drop_others(self, live: set[str]) -> None:
        """Remove the answers files of every token not in `live` (a `?v=` for them is the
        307 anyway)."""
        for token in [t for t in self._bytes if t not in live]:
            del self._bytes[token]
        for path in self.answers.glob("*.lmdb"):
            if path.stem not in live:
                remove(path)


def _extension(report: WarmReport, miss_rate: float) -> str:
    if not report.extended:
        return ""
    if report.would_miss >= miss_rate:
        return (f" (went on past its time budget: {report.would_miss:g} requests/s asked for "
                "answers beyond the hot keys)")
    return " (busy machine: went on past its time budget)"
