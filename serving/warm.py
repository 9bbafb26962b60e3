"""Warm before publish: compute the responses a new Snapshot will be asked for first.

Runs between `Store.stage` and `Store.commit`: the updater's thread asks the builder process
(lower priority, its own GIL) to answer and encode on the staged version files, then reads
the answers into one dict per endpoint, which the event loop adopts in one step.
Which keys: the most requested parameters of each affected endpoint (replayed from the current
version), every key of a small parameter space (enums, bools and narrow int ranges) and the
rows of the endpoint's `warm_sql`. How: one batched query per endpoint when the SQL allows it
(the endpoint's SQL run LATERAL against a table of keys), else one query per key: every hot key
first, then the rest until the time budget is spent (see `Budget`: longer on a busy machine).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import json
import logging
import math
import pickle
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import duckdb

from loaders.build import quote_ident, quote_literal
from loaders.builder import Builder
from loaders.snapshot import QUERY_CONFIG, Snapshot, Store
from serving.cache import Answers, Popularity, ResponseCache, hottest
from serving.fold import Folded, binding, evaluate
from serving.params import ParamError, cache_key, default_value, parse_value
from serving.query import Result, execute, execute_batch
from serving.responses import (
    BodyEncoder,
    endpoint_tokens,
    entry_size,
    etag,
    versions_header,
)
from serving.settings import EndpointSpec, ParamSpec

log = logging.getLogger("duckswap.warm")

T = TypeVar("T")
ENUMERATE_LIMIT = 1000  # largest parameter space enumerated in full
BUSY_SHARE = 0.9  # cores: a warm process getting less than this is on a busy machine
# Requests a second that a publish would leave to cache misses (see `would_miss`): from this
# many on, the warm of the declared keys is not cut short either (~20 queries a second on the
# request path, ~3-6 ms of CPU each under load, against ~0.03 ms per key batched in the warm).
MISS_RATE = 20.0


class Budget:
    """When the warm of the declared keys stops: `seconds` after it started, unless the machine
    is busy, then up to `busy_seconds`.

    Busy means the warm process (idle priority) got less than `busy_share` of a core so far:
    requests are using the CPU. (The warmer passes an infinite share, always busy, when the
    requests of the last interval say a publish now would meet many of them with misses: see
    `would_miss`. The CPU the warm gets so far cannot tell that the machine is about to be busy
    with those very misses.) Keys left for after the publish are then mostly answered by
    cache misses first, each a query on the request path (~3-6 ms of CPU under load against
    ~0.03 ms per key batched here), and the misses starve the after-publish warm in turn: a
    publish on a busy machine waits for the warm instead. On an idle one nothing changes: the
    rest is warmed right after the publish.
    """

    def __init__(self, seconds: float, busy_seconds: float = 0.0,
                 busy_share: float = BUSY_SHARE, clock: Callable[[], float] = time.perf_counter,
                 cpu: Callable[[], float] = time.process_time) -> None:
        self.clock, self.cpu, self.busy_share = clock, cpu, busy_share
        self.start, self.cpu_start = clock(), cpu()
        self.deadline = self.start + seconds
        self.hard_deadline = self.start + max(seconds, busy_seconds)
        self.extended = False

    def share(self) -> float:
        """Cores this process got since the budget started."""
        return (self.cpu() - self.cpu_start) / max(self.clock() - self.start, 1e-9)

    def expired(self) -> bool:
        now = self.clock()
        if now < self.deadline:
            return False
        if now >= self.hard_deadline:
            return True
        if self.share() < self.busy_share:
            self.extended = True
            return False
        return True


Want = tuple[dict[str, Any], tuple[Any, ...], int]  # (bound params, cache key, request count)


@dataclass(frozen=True)
class BatchPlan:
    sql: str
    bound: tuple[str, ...]  # parameters bound per group of keys (they sit in LIMIT/OFFSET)


@dataclass
class WarmReport:
    snapshot: int
    seconds: float = 0.0
    entries: int = 0
    batched: int = 0
    single: int = 0
    skipped: int = 0
    unlisted: bool = False  # the declared keys were not enumerated in time (count unknown)
    cpu_share: float = 0.0  # cores the warm process got while it ran (under 1: requests had them)
    extended: bool = False  # went on past the time budget because the machine was busy
    # requests a second, in the interval before the warm, for answers the old version had
    # warmed beyond the hot keys the warm before chose: what an early publish met with misses
    would_miss: float = 0.0
    read_seconds: float = 0.0  # reading the answers back here (the loader thread), wall
    read_cpu: float = 0.0  # ... and the CPU that thread spent on it
    per_endpoint: dict[str, int] = field(default_factory=dict)


def batch_sql(spec: EndpointSpec) -> BatchPlan | None:
    """Plan answering many parameter sets of an endpoint in one query: its SQL, with each
    `$param` turned into a column of `__keys`, run LATERAL per key. Parameters in LIMIT/OFFSET
    stay bound (keys are grouped by their values). An answer of several rows is ordered by the
    endpoint's own ORDER BY, which must name output columns. None when the SQL does not fit."""
    con = duckdb.connect()
    try:
        row = con.execute("SELECT json_serialize_sql($q)", {"q": spec.sql}).fetchone()
    finally:
        con.close()
    doc: dict[str, Any] = json.loads(row[0]) if row else {"error": True}
    if doc.get("error") or len(doc.get("statements", [])) != 1:
        return None
    found: list[tuple[int, int, str, bool]] = []

    def walk(node: Any, limit: bool) -> None:
        if isinstance(node, dict):
            if node.get("class") == "PARAMETER":
                found.append((node["query_location"], node.get("query_location_length", 0),
                              node["identifier"], limit))
            limit = limit or node.get("type") in ("LIMIT_MODIFIER", "LIMIT_PERCENT_MODIFIER")
            for v in node.values():
                walk(v, limit)
        elif isinstance(node, list):
            for v in node:
                walk(v, limit)

    walk(doc, False)
    order = ""
    if spec.row_limit > 1:
        orders = _output_order(doc["statements"][0]["node"])
        if orders is None:
            return None
        order = "".join(", " + o for o in orders)
    text = spec.sql.encode()
    # A parameter that is not a request's (a constant, see `serving.fold`) stays bound: it
    # is the same for every key.
    bound = sorted({name for _, _, name, in_limit in found if in_limit and name in spec.params})
    for loc, length, name, in_limit in sorted(found, reverse=True):
        if text[loc:loc + length] != f"${name}".encode():
            return None  # offsets not as expected: do not guess
        if not in_limit and name in spec.params:
            text = text[:loc] + f"__k.{quote_ident(name)}".encode() + text[loc + length:]
    sql = (
        "SELECT __k.__i, __q.* FROM __keys AS __k, LATERAL (SELECT * FROM ("
        + text.decode() + f") AS __r LIMIT {spec.row_limit + 1}) AS __q ORDER BY __k.__i"
        + order
    )
    return BatchPlan(sql, tuple(bound))


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items()
                if k not in ("query_location", "query_location_length", "alias")}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _output_order(node: dict[str, Any]) -> list[str] | None:
    """The top-level ORDER BY as terms over output columns, or None if it is not one."""
    if node.get("type") != "SELECT_NODE":
        return None
    outputs: dict[str, Any] = {}
    for item in node.get("select_list", []):
        name = item.get("alias") or (item.get("column_names") or [""])[-1]
        if name:
            outputs[name] = _strip(item)
    mods = [m for m in node.get("modifiers", []) if m.get("type") == "ORDER_MODIFIER"]
    if len(mods) != 1 or any(m.get("type") == "DISTINCT_MODIFIER"
                             for m in node.get("modifiers", [])):
        return None
    terms = []
    for o in mods[0]["orders"]:
        expr = o["expression"]
        if expr.get("class") != "COLUMN_REF":
            return None
        names = expr["column_names"]
        if len(names) == 1 and names[0] in outputs:
            col = names[0]
        else:
            same = [n for n, e in outputs.items() if e == _strip(expr)]
            if len(same) != 1:
                return None
            col = same[0]
        direction = "DESC" if o["type"] == "DESCENDING" else "ASC"
        nulls = "NULLS FIRST" if o["null_order"] == "NULLS_FIRST" else "NULLS LAST"
        terms.append(f"__q.{quote_ident(col)} {direction} {nulls}")
    return terms


def enumerate_keys(spec: EndpointSpec, limit: int = ENUMERATE_LIMIT) -> list[dict[str, Any]]:
    """Every parameter combination when the space is small; [] otherwise."""
    choices: list[list[Any]] = []
    for p in spec.params.values():
        values = _domain(p)
        if values is None:
            return []
        choices.append(values)
    size = 1
    for c in choices:
        size *= len(c)
    if size > limit:
        return []
    names = list(spec.params)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]


def _domain(p: ParamSpec) -> list[Any] | None:
    default = sorted(set(p.default)) if p.unordered and isinstance(p.default, list) else p.default
    if p.is_list:
        return [default] if not p.required else None
    if p.type == "enum":
        values: list[Any] = list(p.values)
    elif p.type == "bool":
        values = [False, True]
    elif p.type == "int" and p.min is not None and p.max is not None and p.max - p.min < 64:
        values = list(range(int(p.min), int(p.max) + 1))
    else:
        return None if p.required else [default]
    if not p.required and default not in values:
        values.append(default)
    return values


def _declared_keys(cur: duckdb.DuckDBPyConnection,
                   spec: EndpointSpec) -> list[tuple[dict[str, Any], tuple[Any, ...]]]:
    """Rows of the endpoint's `warm_sql` as (bound params, cache key), validated and normalised
    like request parameters. Column by column: each distinct value is parsed once (tens of
    thousands of rows share a few values)."""
    try:
        cur.execute(str(spec.warm_sql))
        names = [d[0] for d in cur.description or []]
        rows = cur.fetchall()
    except duckdb.Error as exc:
        log.warning("warm_sql of %s failed: %s", spec.name, str(exc).splitlines()[0])
        return []
    given = dict(zip(names, zip(*rows, strict=True), strict=False)) if rows else {}
    bad = object()
    any_bad = False
    columns: list[Sequence[Any]] = []
    for name, p in spec.params.items():
        raw_column = given.get(name)
        if raw_column is None:
            if name not in names and p.required:
                log.warning("warm_sql of %s lacks required parameter %s", spec.name, name)
                return []
            columns.append(itertools.repeat(default_value(p), len(rows)))  # type: ignore[arg-type]
            continue
        try:  # scalar values: map each distinct one once
            parsed = {v: _parse_declared(p, v, bad) for v in set(raw_column)}
            columns.append([parsed[v] for v in raw_column])
        except TypeError:  # list values (unhashable)
            parsed = {}
            column = []
            for value in raw_column:
                hashable = tuple(value) if isinstance(value, list) else value
                if hashable not in parsed:
                    parsed[hashable] = _parse_declared(p, value, bad)
                column.append(parsed[hashable])
            columns.append(column)
        any_bad = any_bad or any(v is bad for v in parsed.values())
    lists = [i for i, p in enumerate(spec.params.values()) if p.is_list]
    pnames = list(spec.params)
    rows_out: Iterator[tuple[Any, ...]] = zip(*columns, strict=True)
    if any_bad:
        rows_out = (r for r in rows_out if bad not in r)  # a value no request could spell
    if not lists:
        return [(dict(zip(pnames, r, strict=True)), r) for r in rows_out]
    out = []
    for values in rows_out:
        as_list = list(values)
        for i in lists:
            as_list[i] = tuple(as_list[i])
        out.append((dict(zip(pnames, values, strict=True)), tuple(as_list)))
    return out


def _parse_declared(p: ParamSpec, value: Any, bad: object) -> Any:
    if value is None:
        return default_value(p)
    items = value if isinstance(value, list) else [value]
    raw = [str(v).lower() if isinstance(v, bool) else str(v) for v in items]
    try:
        return parse_value(p, raw)
    except ParamError:
        return bad  # a value no request could spell


@dataclass(frozen=True)
class WarmTask:
    """One endpoint to warm for a staged Snapshot (sent to the warm process: picklable)."""

    spec: EndpointSpec
    token: str
    versions: dict[str, str]
    plan: BatchPlan | None  # of `folded`'s SQL where there is one
    hot: list[tuple[tuple[Any, ...], int]]  # the most requested cache keys, with counts
    folded: Folded | None = None  # its constant subqueries as parameters (`serving.fold`)


WarmItem = tuple[tuple[Any, ...], bytes, str]  # (cache key, body, ETag)


class Warmer:
    """Called by the updater with a staged Snapshot; fills the cache for it before commit.

    The queries and the encoding run in the builder process (lower priority, its own GIL), on
    the Snapshot's version files attached read-only there; this process only reads the answers
    back from a spool file into one dict per endpoint (on the loader thread), and the event
    loop adopts each dict in one step (`ResponseCache.adopt`).
    """

    def __init__(self, store: Store, cache: ResponseCache, popularity: Popularity,
                 endpoints: Mapping[str, EndpointSpec], fingerprints: Mapping[str, bytes],
                 batch: Mapping[str, BatchPlan | None], seconds: float, keys: int,
                 builder: Builder, threads: int = 2, tail_seconds: float = 0.0,
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
        self.threads = threads
        self.tail_seconds = tail_seconds
        self.busy_seconds = busy_seconds
        self.busy_share = busy_share
        self.miss_rate = miss_rate
        self._hot: dict[str, frozenset[tuple[Any, ...]]] = {}  # each endpoint's last hot keys
        # (the Snapshot, its tasks, the keys already warmed per task, the busy share used)
        self._tail: tuple[Snapshot, list[WarmTask], list[set[tuple[Any, ...]]], float] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
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
        self._tail = None
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
        dropped = self._drop_others(frozenset(old_tokens.values())
                                    | frozenset(new_tokens.values()))
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
                missed += would_miss(window[name], earlier, self.cache.warmed_answers(old_tok))
                pacer.pause()
            tasks.append(WarmTask(
                replace(spec, params=dict(spec.params)),
                tok, snap.version_ids(spec.datasets), self._batch.get(name), hot,
                self.folded.get(name),
            ))
        if not tasks:
            _free(dropped)
            return WarmReport(snap.id)
        done: list[set[tuple[Any, ...]]] = [set() for _ in tasks]
        # Waiting on a busy machine trades freshness for fewer misses; an endpoint not served
        # yet has no misses to spare, only 503s: publish it as soon as possible.
        served = all(t.spec.name in old_tokens for t in tasks)
        # Requests for warmed answers beyond the hot keys: a publish before their keys are
        # warmed meets them with misses, which on this box take the CPU the rest of the warm
        # needs. Many of them make the machine busy whatever the CPU the warm gets now.
        rate = missed / max(window_seconds, 1.0)
        share = math.inf if rate >= self.miss_rate else self.busy_share
        report = self._run(snap, tasks, self.seconds, done, self.busy_seconds if served else 0,
                           share, dropped)
        if report is None:
            return WarmReport(snap.id)
        report.would_miss = round(rate, 1)
        if (report.skipped or report.unlisted) and self.tail_seconds > 0:
            self._tail = (snap, tasks, done, share)
        report.seconds = time.perf_counter() - start
        self.last = report
        log.info(
            "warmed snapshot %d: %d responses (%d batched, %d single, %s left for after the "
            "publish) in %.3fs on %.2f cores, read back in %.3fs (%.3fs of CPU)%s", snap.id,
            report.entries, report.batched, report.single,
            f"{report.skipped}{' + declared keys' if report.unlisted else ''}", report.seconds,
            report.cpu_share, report.read_seconds, report.read_cpu,
            _extension(report, self.miss_rate),
        )
        return report

    def after_publish(self, snap: Snapshot) -> WarmReport | None:
        """After publish: the keys the first pass had no time for (the long tail of
        `warm_sql` and enumerations), within `tail_seconds` (longer on a busy machine, see
        `Budget`: the keys it leaves are met by misses until the next publish)."""
        try:
            return self._after_publish(snap)
        finally:
            self.settled = True

    def _after_publish(self, snap: Snapshot) -> WarmReport | None:
        pending, self._tail = self._tail, None
        if pending is None or pending[0].id != snap.id:
            return None
        start = time.perf_counter()
        _, tasks, done, share = pending
        report = self._run(snap, tasks, self.tail_seconds, done, self.busy_seconds, share)
        if report is not None:
            report.seconds = time.perf_counter() - start
            report.would_miss = self.last.would_miss if self.last else 0.0
            self.last_tail = report  # its answers are all in the cache by now
            log.info("warmed snapshot %d after its publish: %d more responses (%d left) in "
                     "%.3fs on %.2f cores, read back in %.3fs (%.3fs of CPU)%s", snap.id,
                     report.entries, report.skipped, report.seconds, report.cpu_share,
                     report.read_seconds, report.read_cpu, _extension(report, self.miss_rate))
        return report

    def _run(self, snap: Snapshot, tasks: list[WarmTask], seconds: float,
             done: list[set[tuple[Any, ...]]], busy_seconds: float = 0.0,
             busy_share: float = BUSY_SHARE,
             dropped: Sequence[Answers] = ()) -> WarmReport | None:
        """Answer in the builder process, then insert the spooled answers on the loop.
        None when the Snapshot's versions have no files (nothing to attach there).
        `dropped`: answers to free meanwhile (see `_drop_others`)."""
        files = {d: str(v.path) for d, v in snap.versions.items() if v.path is not None}
        if len(files) != len(snap.versions):
            _free(dropped)
            return None
        spool = self.store.data_dir / f"warm-{snap.id}.spool"
        try:
            return self._answer(snap, tasks, seconds, done, busy_seconds, busy_share, files,
                                spool, dropped)
        except concurrent.futures.CancelledError:  # the event loop stopped: shutting down
            log.info("warm of snapshot %d stopped: the server is shutting down", snap.id)
            return None
        finally:
            spool.unlink(missing_ok=True)

    def _answer(self, snap: Snapshot, tasks: list[WarmTask], seconds: float,
                done: list[set[tuple[Any, ...]]], busy_seconds: float, busy_share: float,
                files: dict[str, str], spool: Path, dropped: Sequence[Answers]) -> WarmReport:
        report: WarmReport = self.builder.run(
            compute, files, tasks, seconds, self.threads,
            max(0, self.cache.max_bytes - self.cache.warm_bytes), str(spool),
            done, busy_seconds, busy_share, meanwhile=lambda: _free(dropped))
        report.snapshot = snap.id
        read_start, read_cpu = time.perf_counter(), time.thread_time()
        # Each task's answers go into a dict of their own here, off the loop, which then
        # adopts each dict in one step (a copy of what the token had plus the new answers).
        # A chunk arrives as a dict of finished entries with its size: merging it is a few C
        # calls, and unpickling is most of the work (a demo warm's ~96,000 answers: ~0.13 s
        # of CPU idle, 0.2-0.5 s at 2000 req/s). The pacer keeps this thread to a quarter of
        # the GIL, so the requests do not queue behind it.
        pacer = _GilPacer()
        answers: dict[int, Answers] = {}
        had: dict[int, int] = {}
        sizes: dict[int, int] = {}
        with spool.open("rb") as f:
            while True:
                try:
                    i, chunk, nbytes = pickle.load(f)
                except EOFError:
                    break
                into = answers.get(i)
                if into is None:
                    token = tasks[i].token
                    before = self.cache.warmed_answers(token) or {}
                    into = answers[i] = dict(before)
                    had[i], sizes[i] = len(before), self.cache.warmed_bytes(token)
                replaced = into.keys() & chunk.keys()
                sizes[i] += nbytes - sum(entry_size(into[k]) for k in replaced)
                into.update(chunk)
                done[i].update(chunk)
                pacer.pause()
        adopt = [(tasks[i].token, a, sizes[i], len(a) - had[i]) for i, a in answers.items()]
        report.read_seconds = time.perf_counter() - read_start
        report.read_cpu = time.thread_time() - read_cpu

        def adopt_all() -> None:
            for args in adopt:
                self.cache.adopt(*args)

        self._on_loop(adopt_all)
        return report

    def _drop_others(self, live: frozenset[str]) -> list[Answers]:
        """Have the event loop drop, between requests, the cached answers of every token
        not in `live` (a `?v=` for them is the 307 anyway). Returns the warmed answers it
        dropped, for `_free`: freeing ~10^5 of them at once would stall the loop."""
        loop = self.loop
        if loop is None:
            return []
        try:
            return asyncio.run_coroutine_threadsafe(self.cache.retain(live), loop).result(
                timeout=HANDOFF_TIMEOUT)
        except concurrent.futures.CancelledError:  # the event loop stopped: shutting down
            return []


def _free(dropped: Sequence[Answers]) -> None:
    """Free dropped answers on this thread, a slice at a time, at `FREE_SHARE` of the GIL.
    A demo version's ~97,000 answers are 40-70 ms of CPU at 2000 req/s; a warm runs this
    while the builder process computes (7-10 s there), so it can take its time."""
    pacer = _GilPacer(FREE_SHARE)
    for old in dropped:
        while old:
            for _ in range(min(FREE_SLICE, len(old))):
                old.popitem()
            pacer.pause()


def would_miss(window: Mapping[tuple[Any, ...], int], hot: Set[tuple[Any, ...]],
               warmed: Mapping[tuple[Any, ...], Any] | None) -> int:
    """Requests in `window` for keys `warmed` had an answer for that are not `hot`: each one
    met by a cache miss had a version been published with the `hot` keys only."""
    if not warmed:
        return 0
    return sum(n for k, n in window.items() if k in warmed and k not in hot)


def _extension(report: WarmReport, miss_rate: float) -> str:
    if not report.extended:
        return ""
    if report.would_miss >= miss_rate:
        return (f" (went on past its time budget: {report.would_miss:g} requests/s asked for "
                "answers beyond the hot keys)")
    return " (busy machine: went on past its time budget)"


LOADER_SHARE = 0.25  # of the GIL, at most, for the loader thread's share of a warm (picking
# the hot keys, reading the answers back)


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


SPOOL_CHUNK = 250  # entries per pickled chunk: what the loader thread reads between yields
YIELD_SECONDS = 0.001  # the loader thread's shortest pause between chunks (see `_GilPacer`)
FREE_SLICE = 2000  # replaced answers freed between two pauses (~1 ms of work)
FREE_SHARE = 0.1  # of the GIL, at most, for freeing a replaced version's answers
HANDOFF_TIMEOUT = 60.0
ROUND = 4096  # keys of the first round (one batched query per endpoint); each round doubles


def compute(files: dict[str, str], tasks: list[WarmTask], seconds: float, threads: int,
            max_bytes: int, spool: str, skip: list[set[tuple[Any, ...]]] | None = None,
            busy_seconds: float = 0.0, busy_share: float = BUSY_SHARE) -> WarmReport:
    """In the warm (builder) process: answer the tasks' keys on the version files in rounds
    (batched where the SQL allows): every most-requested key first, whatever the time, then
    the declared and enumerated ones until `seconds` (up to `busy_seconds` on a busy machine,
    see `Budget`); all within `max_bytes` of answers. Spool (task index, {cache key: cache
    entry}, bytes of the entries) chunks to `spool`. Keys in `skip[i]` (already warmed) are
    left out."""
    budget = Budget(seconds, busy_seconds, busy_share)
    report = WarmReport(0)
    con = duckdb.connect(config={"threads": threads, **QUERY_CONFIG})
    # 10^5 answers and keys are built here and live until the spool is written: full
    # collections over them took 50-120 ms each, several per warm. Nothing here makes cycles.
    gc.disable()
    try:
        con.execute("SET enable_progress_bar = false")
        for i, (dataset, path) in enumerate(sorted(files.items())):
            con.execute(f"ATTACH {quote_literal(path)} AS w_{i} (READ_ONLY)")
            con.execute(f"CREATE VIEW {quote_ident(dataset)} AS SELECT * FROM w_{i}.main.data")
        jobs = [_Job(i, t) for i, t in enumerate(tasks)]
        for job in jobs:
            job.bind(con)
        with open(spool, "wb") as out:
            spooler = _Spooler(out, max_bytes, report)
            # The most requested keys first, hottest first, before anything is enumerated, and
            # all of them whatever the deadline: they are what the first requests after the
            # publish ask for, and a publish without them is a miss storm.
            hot: list[tuple[int, int, int, Want]] = []
            hot_keys = [_hot(job.task) for job in jobs]
            for job in jobs:
                done = skip[job.index] if skip else set()
                hot.extend((-w[2], pos, job.index, w)
                           for pos, w in enumerate(hot_keys[job.index]) if w[1] not in done)
            hot.sort(key=lambda w: (w[0], w[1]))
            _rounds(con, jobs, hot, None, spooler)
            # Then the rest (`warm_sql` rows and small parameter spaces), round-robin across
            # endpoints so a small endpoint is not left behind a large one's long tail.
            rest: list[tuple[int, int, int, Want]] = []
            if not budget.expired() and not spooler.full:
                for job in jobs:
                    done = skip[job.index] if skip else set()
                    seen = {w[1] for w in hot_keys[job.index]}
                    rest.extend((0, pos, job.index, w) for pos, w in enumerate(
                        w for w in _keys(con, job.task) if w[1] not in done and w[1] not in seen))
                rest.sort(key=lambda w: w[1])
                _rounds(con, jobs, rest, budget, spooler)
            else:
                report.unlisted = True  # left to the after-publish pass, uncounted
            for job in jobs:
                spooler.flush(job)
        report.cpu_share = round(budget.share(), 2)
        report.extended = budget.extended
    finally:
        gc.enable()
        con.close()
    return report


def _rounds(con: duckdb.DuckDBPyConnection, jobs: list[_Job],
            wants: list[tuple[int, int, int, Want]], budget: Budget | None,
            spooler: _Spooler) -> None:
    """Answer `wants` in growing rounds (a batched query scans its tables once whatever the
    key count) until the budget (None: no limit) or the byte budget, checked between rounds."""
    report = spooler.report

    def expired() -> bool:
        return budget is not None and budget.expired()

    start, size = 0, ROUND
    while start < len(wants):
        if expired() or spooler.full:
            report.skipped += len(wants) - start
            return
        per_job: dict[int, list[Want]] = {}
        round_, start, size = wants[start:start + size], start + size, size * 2
        for _, _, i, w in round_:
            per_job.setdefault(i, []).append(w)
        for i, keys in per_job.items():
            job = jobs[i]
            for k, ck, _ in _batched(con, job, keys, spooler):
                if job.failed or expired() or spooler.full:
                    report.skipped += 1
                    continue
                try:
                    result = execute(con, job.sql, {**k, **job.fixed}, job.task.spec.row_limit)
                except duckdb.Error as exc:
                    # Its other keys are left to requests, each of which gets its own answer
                    # or error; the rest of the warm goes on.
                    job.failed = True
                    report.skipped += 1
                    log.warning("warm query of %s failed (%s); its other keys are left to "
                                "requests", job.task.spec.name, str(exc).splitlines()[0])
                    continue
                spooler.add(job, ck, result)
                report.single += 1


def _hot(task: WarmTask) -> list[Want]:
    """The most requested keys, with their counts (most first), as parameters: built here,
    in the builder process: with `heapq.nlargest` they took the server's loader thread
    59-67 ms of CPU in one go at 2000 req/s, 24-27 ms without them."""
    names = list(task.spec.params)
    return [({n: list(v) if isinstance(v, tuple) else v for n, v in zip(names, ck, strict=True)},
             ck, count) for ck, count in task.hot]


def _keys(con: duckdb.DuckDBPyConnection, task: WarmTask) -> list[Want]:
    """(key, cache key, 0): the rows of `warm_sql` and the small-space enumeration, each key
    once."""
    spec = task.spec
    keys: list[Want] = []
    if spec.warm_sql:
        keys.extend((k, ck, 0) for k, ck in _declared_keys(con, spec))
    keys.extend((k, cache_key(k), 0) for k in enumerate_keys(spec))
    out: list[Want] = []
    seen = set()
    for want in keys:
        if want[1] not in seen:
            seen.add(want[1])
            out.append(want)
    return out


def _batched(con: duckdb.DuckDBPyConnection, job: _Job, keys: list[Want],
             spooler: _Spooler) -> list[Want]:
    """Answer what one batched query can; return the keys left for single queries."""
    plan = None if job.unbatched else job.task.plan
    if plan is None:
        return keys
    try:
        results = execute_batch(con, job.task.spec, plan, [w[0] for w in keys], job.fixed)
    except duckdb.Error as exc:
        log.warning("batched warm of %s failed (%s); warming key by key",
                    job.task.spec.name, type(exc).__name__)
        job.unbatched = True
        return keys
    rest = []
    for want, result in zip(keys, results, strict=True):
        if result is None:
            rest.append(want)
        elif not spooler.full:
            spooler.add(job, want[1], result)
            spooler.report.batched += 1
        else:
            spooler.report.skipped += 1
    return rest


@dataclass
class _Job:
    """One task, and its answers not spooled yet."""

    index: int
    task: WarmTask
    unbatched: bool = False  # its batched query failed: key by key from now
    failed: bool = False  # a single query failed: its other keys are left to requests
    pending: list[WarmItem] = field(default_factory=list)
    encode: BodyEncoder = field(init=False, repr=False)
    header: str = field(init=False)  # X-Duckswap-Versions of its answers
    sql: str = field(init=False)  # what each single query runs, with `fixed` bound
    fixed: Mapping[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        t = self.task
        self.encode = BodyEncoder(t.spec, t.token, t.versions)
        self.header = versions_header(t.versions)

    def bind(self, con: duckdb.DuckDBPyConnection) -> None:
        """Compute the endpoint's constants on this version (`serving.fold`); where they
        fail, run its SQL as written, key by key."""
        folded = self.task.folded
        b = binding(self.task.spec.sql, folded, evaluate(con, folded) if folded else None)
        self.sql, self.fixed = b.sql, b.fixed
        self.unbatched = self.unbatched or not b.batchable


class _Spooler:
    """Encodes answers and writes them to the spool file in chunks, within a byte budget."""

    def __init__(self, out: BinaryIO, max_bytes: int, report: WarmReport) -> None:
        self.out = out
        self.max_bytes = max_bytes
        self.report = report
        self.bytes = 0

    @property
    def full(self) -> bool:
        return self.bytes >= self.max_bytes

    def add(self, job: _Job, ck: tuple[Any, ...], result: Result) -> None:
        body = job.encode(result.columns, result.rows, result.truncated)
        tag = etag(job.task.token, ck)
        self.bytes += entry_size((body, tag, ""))
        pending = job.pending
        pending.append((ck, body, tag))
        if len(pending) >= SPOOL_CHUNK:
            self.flush(job)

    def flush(self, job: _Job) -> None:
        if job.pending:
            n = len(job.pending)
            report, name = self.report, job.task.spec.name
            report.entries += n
            report.per_endpoint[name] = report.per_endpoint.get(name, 0) + n
            # Finished cache entries, keyed: the server merges the dict in one call
            chunk = {ck: (body, tag, job.header) for ck, body, tag in job.pending}
            nbytes = sum(entry_size(entry) for entry in chunk.values())
            pickle.dump((job.index, chunk, nbytes), self.out, protocol=pickle.HIGHEST_PROTOCOL)
            job.pending = []
