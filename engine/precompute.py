"""The warm's half in the builder process: answer the keys of a staged Snapshot on its version
files and write the encoded answers into each endpoint version's answers file
(`engine.answers`), which the server reads from there.

Runs in the builder process (lower priority, its own GIL): every hot key first, whatever the
time, then the declared and enumerated keys in growing batched rounds until the time budget
(see `Budget`: longer on a busy machine); all within a byte budget of answers.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import duckdb

from engine.answers import AnswersWriter, key_bytes, path_of, value
from engine.endpoints import EndpointSpec
from engine.fold import Folded, binding, evaluate
from engine.formats import encode_answer, split_format
from engine.keys import key_params, warm_keys
from engine.plan import BatchPlan
from engine.query import (
    Columns,
    Group,
    batch_groups,
    execute,
    fetch_group,
    start_group,
)
from engine.responses import ENTRY_OVERHEAD, BodyEncoder, key_etag, versions_header
from engine.sql import lock_down
from engine.store import QUERY_CONFIG, attach_sql, view_sql

log = logging.getLogger("duckswap.warm")

BUSY_SHARE = 0.9  # cores: a warm process getting less than this is on a busy machine


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
                 cpu: Callable[[], float] = time.process_time, stop: str | None = None) -> None:
        self.clock, self.cpu, self.busy_share = clock, cpu, busy_share
        self.stop = stop  # a file whose existence ends the warm now (`Warmer.cut_short`)
        self.stopped = False
        self.start, self.cpu_start = clock(), cpu()
        self.deadline = self.start + seconds
        self.hard_deadline = self.start + max(seconds, busy_seconds)
        self.extended = False

    def share(self) -> float:
        """Cores this process got since the budget started."""
        return (self.cpu() - self.cpu_start) / max(self.clock() - self.start, 1e-9)

    def expired(self) -> bool:
        if self.stop is not None and os.path.exists(self.stop):
            self.stopped = True
            return True
        now = self.clock()
        if now < self.deadline:
            return False
        if now >= self.hard_deadline:
            return True
        if self.share() < self.busy_share:
            self.extended = True
            return False
        return True


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
    stopped: bool = False  # cut short: a newer export was about to replace its version
    # requests a second, in the interval before the warm, for answers the old version had
    # warmed beyond the hot keys the warm before chose: what an early publish met with misses
    would_miss: float = 0.0
    per_endpoint: dict[str, int] = field(default_factory=dict)
    added: dict[str, tuple[int, int]] = field(default_factory=dict)  # token -> (answers, bytes)


@dataclass(frozen=True)
class WarmTask:
    """One endpoint to warm for a staged Snapshot (sent to the warm process: picklable)."""

    spec: EndpointSpec
    token: str
    versions: dict[str, str]
    plan: BatchPlan | None  # of `folded`'s SQL where there is one
    hot: list[tuple[tuple[Any, ...], int]]  # the most requested cache keys, with counts
    folded: Folded | None = None  # its constant subqueries as parameters (`engine.fold`)


Key = tuple[Any, ...]  # a cache key (`engine.keys`)
WarmItem = tuple[bytes, bytes]  # (encoded cache key, `engine.answers.value`)

WRITE_CHUNK = 1000  # answers per transaction of an answers file (visible to readers at once)
HOT_SLICE = 2000  # hot keys per pickled slice of a worker's hot keys file (~0.5 ms of CPU)
# Keys of the first round (one batched query per endpoint, each reading its tables in full);
# each round doubles. The demo's 239,406 declared keys in 3 rounds, not 7: -11% warm CPU.
ROUND = 65536


def write_hot(out: BinaryIO, endpoint: str, keys: list[tuple[tuple[Any, ...], int]]) -> None:
    """In a worker: one slice of an endpoint's most requested keys, with their counts, into
    its hot keys file (written a slice at a time: pickling 10^4 keys in one call would stall
    the worker's event loop)."""
    pickle.dump((endpoint, keys), out, pickle.HIGHEST_PROTOCOL)


def read_hot(paths: list[str], tasks: list[WarmTask], n: int) -> list[WarmTask]:
    """In the build process: `tasks` with the `n` most requested keys of their endpoints, the
    workers' counts summed."""
    counts: dict[str, Counter[tuple[Any, ...]]] = {t.spec.name: Counter() for t in tasks}
    for path in paths:
        try:
            f = open(path, "rb")  # noqa: SIM115
        except FileNotFoundError:  # a worker that died before writing it
            continue
        with f:
            while True:
                try:
                    endpoint, keys = pickle.load(f)
                except EOFError:
                    break
                into = counts.get(endpoint)
                if into is not None:
                    for key, count in keys:
                        into[key] += count
    return [replace(task, hot=counts[task.spec.name].most_common(n)) for task in tasks]


def compute(files: dict[str, str], tasks: list[WarmTask], seconds: float, threads: int,
            max_bytes: int, answers: str, cache_bytes: int, busy_seconds: float = 0.0,
            busy_share: float = BUSY_SHARE, inputs: list[str] | None = None, hot_count: int = 0,
            stop: str | None = None) -> WarmReport:
    """In the warm (builder) process: answer the tasks' keys on the version files in rounds
    (batched where the SQL allows): every most-requested key first, whatever the time, then
    the declared and enumerated ones until `seconds` (up to `busy_seconds` on a busy machine,
    see `Budget`); all within `max_bytes` of answers. Each task's answers go to its token's
    answers file in the folder `answers` (mapped for `cache_bytes`, the cache's whole byte budget,
    as the server maps it); keys already there are left out.
    `inputs`: the workers' hot keys files (`write_hot`): the `hot_count` most requested keys of
    each endpoint, their counts summed, are answered first.
    `stop`: a file whose existence ends the warm after the hot keys (see `Budget`)."""
    if inputs:
        tasks = read_hot(inputs, tasks, hot_count)
    budget = Budget(seconds, busy_seconds, busy_share, stop=stop)
    report = WarmReport(0)
    con = duckdb.connect(config={"threads": threads, **QUERY_CONFIG})
    # 10^5 answers and keys are built here and live until the spool is written: full
    # collections over them took 50-120 ms each, several per warm. Nothing here makes cycles.
    gc.disable()
    try:
        con.execute("SET enable_progress_bar = false")
        for i, (dataset, path) in enumerate(sorted(files.items())):
            con.execute(attach_sql(path, f"w_{i}"))
            con.execute(view_sql(None, dataset, f"w_{i}"))
        lock_down(con)  # endpoint SQL from here on: it reads the attached versions only
        jobs = [_Job(i, t) for i, t in enumerate(tasks)]
        for job in jobs:
            job.bind(con)
        ahead = _Ahead(con, jobs)
        with ahead, _Spooler(Path(answers), jobs, max_bytes, cache_bytes, report) as spooler:
            # The most requested keys first, hottest first, before anything is enumerated, and
            # all of them whatever the deadline: they are what the first requests after the
            # publish ask for, and a publish without them is a miss storm.
            hot: list[tuple[int, int, int, Key]] = []
            for job in jobs:
                done = spooler.had(job)
                hot.extend((-count, pos, job.index, key)
                           for pos, (key, count) in enumerate(job.task.hot) if not done(key))
            hot.sort(key=lambda w: (w[0], w[1]))
            _rounds(con, jobs, hot, None, spooler, ahead)
            # Then the rest (`warm_sql` rows and small parameter spaces), round-robin across
            # endpoints so a small endpoint is not left behind a large one's long tail.
            rest: list[tuple[int, int, int, Key]] = []
            if not budget.expired() and not spooler.full:
                for job in jobs:
                    done = spooler.had(job)
                    seen = {key for key, _ in job.task.hot}
                    left = (k for k in warm_keys(con, job.task.spec)
                            if k not in seen and not done(k))
                    rest.extend((0, pos, job.index, k) for pos, k in enumerate(left))
                rest.sort(key=lambda w: w[1])
                _rounds(con, jobs, rest, budget, spooler, ahead)
            else:
                report.unlisted = True  # left to the after-publish pass, uncounted
            for job in jobs:
                spooler.flush(job)
        report.cpu_share = round(budget.share(), 2)
        report.extended = budget.extended
        report.stopped = budget.stopped
    finally:
        gc.enable()
        con.close()
    return report


def _rounds(con: duckdb.DuckDBPyConnection, jobs: list[_Job],
            wants: list[tuple[int, int, int, Key]], budget: Budget | None,
            spooler: _Spooler, ahead: _Ahead) -> None:
    """Answer `wants` in growing rounds (a batched query scans its tables once whatever the
    key count) until the budget or the byte budget, checked between rounds. Without a budget
    (None: the hot keys, answered whatever the time) in one round: each endpoint's tables
    scanned once (the demo's 85,000-key lookup is ~0.15 s however many keys it is asked)."""
    report = spooler.report

    def expired() -> bool:
        return budget is not None and budget.expired()

    start, size = 0, ROUND if budget is not None else max(len(wants), 1)
    while start < len(wants):
        if expired() or spooler.full:
            report.skipped += len(wants) - start
            return
        per_job: dict[int, list[Key]] = {}
        round_, start, size = wants[start:start + size], start + size, size * 2
        for _, _, i, w in round_:
            per_job.setdefault(i, []).append(w)
        items = list(per_job.items())
        for (i, keys), outcome in zip(items, ahead.answers(items), strict=True):
            job = jobs[i]
            for key in _batched(job, keys, outcome, spooler):
                if job.failed or expired() or spooler.full:
                    report.skipped += 1
                    continue
                spec = job.task.spec
                try:
                    result = execute(con, job.sql, {**key_params(spec, key), **job.fixed},
                                     spec.row_limit)
                except duckdb.Error as exc:
                    # Its other keys are left to requests, each of which gets its own answer
                    # or error; the rest of the warm goes on.
                    job.failed = True
                    report.skipped += 1
                    log.warning("warm query of %s failed (%s); its other keys are left to "
                                "requests", job.task.spec.name, str(exc).splitlines()[0])
                    continue
                job.columns = (result.columns, result.types or [])
                spooler.add(job, key, result.rows, result.truncated)
                report.single += 1


# A batched query's answers as they are fetched, (position in its keys, rows or None: left to a
# single query; the columns are the job's), or why there are none (None: the endpoint's SQL
# cannot be batched).
Rows = list[tuple[Any, ...]]
Batch = Iterator[tuple[int, Rows | None]] | duckdb.Error | None


class _Ahead:
    """Runs the endpoints' batched queries one ahead, on a cursor and thread of their own:
    DuckDB answers the next endpoint's keys (without the GIL) while the warm's thread converts
    and encodes the answers of the last one (with it), as they are fetched from its cursor, so
    a round's answers are never all Python objects at once (a 65,536-key round of the demo
    held ~30 MB of rows). One after the other, a warm left a core idle while it encoded,
    ~0.2-0.4 s of a demo publish's hot keys."""

    def __init__(self, con: duckdb.DuckDBPyConnection, jobs: list[_Job]) -> None:
        # Two cursors: one fetched from, one running the next query (a cursor shows no
        # progress bar, and its configuration is locked).
        self.curs = [con.cursor(), con.cursor()]
        self.jobs = jobs
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="duckswap-warm-query")

    def __enter__(self) -> _Ahead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for cur in self.curs:
            cur.close()

    def _plan(self, i: int) -> BatchPlan | None:
        job = self.jobs[i]
        return None if job.unbatched else job.task.plan

    def _start(self, n: int, i: int, keys: list[Key]
               ) -> tuple[list[Group], Columns] | duckdb.Error | None:
        """On the query thread: item `n`'s first query, on cursor `n % 2`."""
        plan, job = self._plan(i), self.jobs[i]
        if plan is None:
            return None
        try:
            groups = batch_groups(job.task.spec, plan, keys)
            return groups, start_group(self.curs[n % 2], plan, groups[0], job.fixed)
        except duckdb.Error as exc:
            return exc

    def _fetch(self, n: int, i: int, groups: list[Group],
               columns: Columns) -> Iterator[tuple[int, Rows | None]]:
        cur, job = self.curs[n % 2], self.jobs[i]
        plan = job.task.plan
        assert plan is not None
        for g, group in enumerate(groups):
            if g:  # keys with other LIMIT values: their own query, here (rare)
                columns = start_group(cur, plan, group, job.fixed)
            job.columns = columns
            yield from fetch_group(cur, job.task.spec, group)

    def answers(self, items: list[tuple[int, list[Key]]]) -> Iterator[Batch]:
        """Each item's batched answers, in order; the next item's query runs meanwhile. Each
        must be consumed before the next is asked for (its cursor runs the one after)."""
        nxt = self.pool.submit(self._start, 0, *items[0]) if items else None
        for n in range(len(items)):
            assert nxt is not None
            started = nxt.result()
            nxt = (self.pool.submit(self._start, n + 1, *items[n + 1])
                   if n + 1 < len(items) else None)
            if started is None or isinstance(started, duckdb.Error):
                yield started
            else:
                yield self._fetch(n, items[n][0], *started)


def _batched(job: _Job, keys: list[Key], outcome: Batch, spooler: _Spooler) -> list[Key]:
    """Spool what the batched query answered; return the keys left for single queries."""
    if outcome is None:
        return keys
    rest: list[Key] = []
    done = [False] * len(keys)
    try:
        if isinstance(outcome, duckdb.Error):
            raise outcome
        for i, rows in outcome:
            done[i] = True
            if rows is None:
                rest.append(keys[i])
            elif not spooler.full:
                spooler.add(job, keys[i], rows)
                spooler.report.batched += 1
            else:
                spooler.report.skipped += 1
    except duckdb.Error as exc:
        log.warning("batched warm of %s failed (%s); warming key by key",
                    job.task.spec.name, type(exc).__name__)
        job.unbatched = True
        rest.extend(k for k, d in zip(keys, done, strict=True) if not d)
    return rest


@dataclass
class _Job:
    """One task, and its answers not spooled yet."""

    index: int
    task: WarmTask
    unbatched: bool = False  # its batched query failed: key by key from now
    failed: bool = False  # a single query failed: its other keys are left to requests
    pending: list[WarmItem] = field(default_factory=list)
    pending_bytes: int = 0  # their sizes as `engine.responses.entry_size` counts
    encode: BodyEncoder = field(init=False, repr=False)
    columns: Columns = field(init=False)  # of the answers being added
    header: str = field(init=False)  # X-Duckswap-Versions of its answers
    sql: str = field(init=False)  # what each single query runs, with `fixed` bound
    fixed: Mapping[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        t = self.task
        self.encode = BodyEncoder(t.spec, t.token, t.versions)
        self.header = versions_header(t.versions)

    def bind(self, con: duckdb.DuckDBPyConnection) -> None:
        """Compute the endpoint's constants on this version (`engine.fold`); where they
        fail, run its SQL as written, key by key."""
        folded = self.task.folded
        b = binding(self.task.spec.sql, folded, evaluate(con, folded) if folded else None)
        self.sql, self.fixed = b.sql, b.fixed
        self.unbatched = self.unbatched or not b.batchable


class _Spooler:
    """Encodes answers and writes them to their tokens' answers files in batches, within a
    byte budget."""

    def __init__(self, folder: Path, jobs: list[_Job], max_bytes: int, budget: int,
                 report: WarmReport) -> None:
        self.max_bytes = max_bytes
        self.report = report
        self.bytes = 0
        self.writers = [AnswersWriter(path_of(folder, job.task.token), job.header, budget)
                        for job in jobs]
        self._full = False

    def __enter__(self) -> _Spooler:
        return self

    def __exit__(self, *exc: object) -> None:
        for writer in self.writers:
            writer.close()

    @property
    def full(self) -> bool:
        return self._full or self.bytes >= self.max_bytes

    def had(self, job: _Job) -> Callable[[tuple[Any, ...]], bool]:
        """Whether a key of `job` is in its answers file already (an earlier pass)."""
        return self.writers[job.index].had

    def add(self, job: _Job, ck: tuple[Any, ...], rows: Rows, truncated: bool = False) -> None:
        """One answer: `rows` of `job.columns`."""
        _, fmt = split_format(ck, len(job.task.spec.params))
        names, types = job.columns
        body = encode_answer(fmt, job.encode, names, types, rows, truncated)
        encoded = key_bytes(ck)
        item = (encoded, value(key_etag(job.task.token, encoded), body))
        size = len(item[1]) + ENTRY_OVERHEAD
        self.bytes += size
        job.pending_bytes += size
        pending = job.pending
        pending.append(item)
        if len(pending) >= WRITE_CHUNK:
            self.flush(job)

    def flush(self, job: _Job) -> None:
        if not job.pending:
            return
        items, nbytes, job.pending, job.pending_bytes = job.pending, job.pending_bytes, [], 0
        if not self.writers[job.index].write(items):
            self._full = True  # the map is full: the byte budget, however counted
            return
        n = len(items)
        report, name, token = self.report, job.task.spec.name, job.task.token
        report.entries += n
        report.per_endpoint[name] = report.per_endpoint.get(name, 0) + n
        had = report.added.get(token, (0, 0))
        report.added[token] = (had[0] + n, had[1] + nbytes)
