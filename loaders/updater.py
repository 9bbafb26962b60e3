"""The update path: notice complete exports, load the newest aside, publish, retire the old."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from engine.schema import DatasetSchema, RunGroup
from engine.store import Snapshot, Version, check_version_file, remove_version_file
from loaders.build import check_export, size_problems
from loaders.builder import BuildDied, Builder
from loaders.catalog import Catalog
from loaders.errors import LoadError, Unavailable
from loaders.source import Export, Source
from loaders.state import DataDir, DatasetState, Refusal, State, VersionRecord, checks_digest
from loaders.watcher import Watcher

log = logging.getLogger("duckswap.loader")
T = TypeVar("T")
QUARANTINE_KEPT = 50  # refusals remembered per dataset


@dataclass(frozen=True)
class LoadEvent:
    dataset: str
    export_id: str
    ok: bool
    reason: str
    seconds: float
    version_id: str | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    at: float = field(default_factory=time.time)
    retry: bool = False  # the source could not be read: tried again at the next poll
    listing: int = 0  # the updater's listing round that found the export
    held: bool = False  # built, but its run was not published: another member failed

    @property
    def outcome(self) -> str:  # one of OUTCOMES
        if self.ok:
            return "loaded"
        return "unavailable" if self.retry else "held" if self.held else "refused"


OUTCOMES = ("loaded", "refused", "unavailable", "held")


@dataclass(frozen=True)
class _Loaded:
    """An export downloaded, checked and built to its version file, not attached yet."""

    export_id: str
    version_id: str
    path: Path
    rows: int
    timings: dict[str, float]
    start: float  # perf_counter when its load began


@dataclass(frozen=True)
class _Run:
    """A run of a group to load: its export id and the exports of the members to load."""

    group: RunGroup
    run_id: str
    todo: dict[str, Any]  # dataset -> the export the source listed


@dataclass(frozen=True)
class _Failed:
    """An export that could not be loaded, and the seconds spent finding out."""

    error: Exception
    seconds: float


class NotKept(LookupError):
    """An admin action named a version this server does not keep."""


class Publisher(Protocol):
    """The HTTP workers, as the updater sees them: a publish is two-phase across them."""

    def holders(self) -> list[str]:
        """The workers serving now (each holds a Snapshot staged from now on until it says it
        has drained it)."""

    def stage(self, snap: Snapshot) -> None:
        """Every worker attaches `snap` and opens its answers; returns once all have
        (raises `Unavailable` when one cannot)."""

    def commit(self, snap: Snapshot) -> None:
        """Every worker serves `snap`; returns once all do."""


def _refused(export_id: str, dataset: str, reason: str) -> str:
    return f"export {export_id} of {dataset} was refused: {reason}"


class Updater:
    def __init__(
        self,
        source: Source,
        catalog: Catalog,
        schemas: Mapping[str, DatasetSchema],
        debounce_ms: int = 200,
        before_publish: Callable[[Snapshot, Snapshot], object] | None = None,
        after_publish: Callable[[Snapshot], object] | None = None,
        cut_after_publish: Callable[[], None] | None = None,
        builder: Builder | None = None,
        poll_seconds: float = 5.0,
        data: DataDir | None = None,
        keep_versions: int = 2,
        groups: Iterable[RunGroup] = (),
        publisher: Publisher | None = None,
    ) -> None:
        self.source = source
        self.catalog = catalog
        self.publisher = publisher  # None: nothing serves (tests of the loader alone)
        self.schemas = dict(schemas)
        self.debounce_ms = debounce_ms
        self.before_publish = before_publish
        self.after_publish = after_publish
        self.cut_after_publish = cut_after_publish
        self.stopping = False  # `stop` was called: nothing more is published
        # The after-publish warm runs on a thread of its own, so a load never waits for it.
        self._tail_executor = ThreadPoolExecutor(1, thread_name_prefix="duckswap-warm")
        self._tail: Future[None] | None = None
        self.builder = builder or Builder()
        self.data = data
        self.keep_versions = keep_versions
        # Builds, warming, publishing, collection and admin actions share one thread: one
        # writer of the catalog and the state, no locks between them.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="duckswap-loader")
        self.state: State = {name: DatasetState() for name in self.schemas}
        self.last_listed: float | None = None  # when the source last answered a listing
        self.poll_seconds = poll_seconds
        self.source_errors = 0
        self.listings = 0  # refresh rounds started
        self.history: list[LoadEvent] = []
        self.actions: list[dict[str, Any]] = []  # admin actions, newest last
        # every (dataset, outcome) from 0, so a rate over `duckswap_loads_total` sees the first
        self.outcomes: Counter[tuple[str, str]] = Counter(
            {(d, o): 0 for d in self.schemas for o in OUTCOMES})
        self.groups = {g.name: g for g in groups}
        self.group_of = {d: g for g in self.groups.values() for d in g.datasets}
        # group -> run id -> when first seen complete in some members only
        self.pending_runs: dict[str, dict[str, float]] = {}
        self.overdue: set[tuple[str, str]] = set()  # (group, run id) reported incomplete
        self._listed: dict[str, set[str]] = {}  # dataset -> complete export ids last listed
        self._pending_logged: dict[str, set[str]] = {}  # incomplete export folders logged
        # group -> why the export its config names is not served (missing, refused), logged
        self.config_problems: dict[str, str] = {}
        self.source_problem: str | None = None  # why the source cannot be listed, if known

    @property
    def refused(self) -> dict[tuple[str, str], str]:
        """(dataset, export id) -> reason of every quarantined export. Read from other threads
        than the loader's: each dict is copied in one C call (atomic under the GIL) first."""
        return {(n, e): q.reason for n, ds in list(self.state.items())
                for e, q in list(ds.quarantine.items())}

    # -- loading ----------------------------------------------------------------------------
    def config_export(self, dataset: str) -> str | None:
        """The export `datasets.*.export` names for `dataset` (its group's members agree)."""
        return self.schemas[dataset].export

    def _groups(self, names: Iterable[str]) -> list[RunGroup]:
        """The groups (a dataset in none is one of its own) that `names` belong to, none of
        whose members is pinned by an admin, or whose config names an export: a pinned
        member holds its whole group."""
        groups: list[RunGroup] = []
        seen: set[str] = set()
        for name in names:
            if name in seen or name not in self.schemas:
                continue
            group = self.group(name)
            seen.update(group.datasets)
            if self.config_export(name) is not None or all(
                    self.state[d].pinned is None for d in group.datasets):
                groups.append(group)
        return groups

    def _runs(self, group: RunGroup, listed: Mapping[str, Sequence[Any]]) -> list[_Run]:
        """The runs of `group` newer than the one it serves, newest first, that are complete
        in every member and not refused as they are now; each names the exports to load (a
        member that already serves the run's export needs none). Runs complete in some
        members only are noted (`pending_runs`) and reported once overdue. A group whose
        config names an export has that run only, older or newer, until it serves it."""
        served = [self.catalog.current.versions.get(d) for d in group.datasets]
        floor = min((v.export_id for v in served if v is not None), default="") \
            if all(served) else ""
        by_id = [{e.export_id: e for e in listed[d]} for d in group.datasets]
        named = self.config_export(group.datasets[0])
        if named is not None:
            return self._named_run(group, named, served, by_id)
        ids = sorted({i for exports in by_id for i in exports if i > floor}, reverse=True)
        runs: list[_Run] = []
        pending: dict[str, float] = {}
        for run_id in ids:
            if not all(run_id in exports for exports in by_id):
                pending[run_id] = self.pending_runs.get(group.name, {}).get(run_id, time.time())
                continue
            todo = {}
            for d, exports, version in zip(group.datasets, by_id, served, strict=True):
                if version is not None and version.export_id == run_id:
                    continue
                export = exports[run_id]
                refusal = self.state[d].quarantine.get(run_id)
                if refusal is not None and refusal.fingerprint == export.fingerprint:
                    break  # refused, and unchanged since
                todo[d] = export
            else:
                runs.append(_Run(group, run_id, todo))
        if len(group.datasets) > 1:
            self._note_pending(group, pending)
        return runs

    def _named_run(self, group: RunGroup, run_id: str, served: Sequence[Version | None],
                   by_id: Sequence[Mapping[str, Any]]) -> list[_Run]:
        """The run the config names, to load unless it is served, refused unchanged, or not
        complete in the source (then the served data stays, and why is logged once at ERROR
        and shown: `config_problems`)."""
        if all(v is not None and v.export_id == run_id for v in served):
            self.config_problems.pop(group.name, None)
            return []
        problem = None
        todo = {}
        if not all(run_id in exports for exports in by_id):
            problem = f"the source holds no complete export {run_id}"
        else:
            for d, exports, version in zip(group.datasets, by_id, served, strict=True):
                if version is not None and version.export_id == run_id:
                    continue
                refusal = self.state[d].quarantine.get(run_id)
                if refusal is not None and refusal.fingerprint == exports[run_id].fingerprint:
                    problem = _refused(run_id, d, refusal.reason)
                    break
                todo[d] = exports[run_id]
        if problem is None:
            self.config_problems.pop(group.name, None)
            return [_Run(group, run_id, todo)]
        self._config_problem(group, run_id, problem)
        return []

    def _config_problem(self, group: RunGroup, run_id: str, problem: str) -> None:
        """Why the export the config names is not served: shown (`config_problems`), and
        logged at ERROR when it changes."""
        if self.config_problems.get(group.name) == problem:
            return
        self.config_problems[group.name] = problem
        served = [self.catalog.current.versions.get(d) for d in group.datasets]
        log.error("the config names export %s for %s, and %s; serving %s", run_id,
                  ", ".join(group.datasets), problem,
                  ", ".join(v.export_id if v else "nothing" for v in served))

    def group(self, name: str) -> RunGroup:
        """The group `name` is published with (a dataset in none: a group of its own)."""
        return self.group_of.get(name) or RunGroup(name, (name,))

    def named_exports(self) -> dict[str, str]:
        """The exports the config names (`datasets.*.export`), where nothing says they cannot
        be loaded: a replica not serving one is not ready (it serves what it kept). Each
        worker compares them with the Snapshot it serves, not the loader's record, which
        is ahead of the workers during a publish."""
        out = {}
        for name in self.schemas:
            named = self.config_export(name)
            if named is not None and self.group(name).name not in self.config_problems:
                out[name] = named
        return out

    def _note_pending(self, group: RunGroup, pending: dict[str, float]) -> None:
        if pending:
            self.pending_runs[group.name] = pending
        else:
            self.pending_runs.pop(group.name, None)
        now = time.time()
        for run_id, since in pending.items():
            if now - since >= group.incomplete_seconds \
                    and (group.name, run_id) not in self.overdue:
                log.error("run %s of group %s is still incomplete after %.0fs (complete: %s; "
                          "missing: %s); it is not published until every dataset of the group "
                          "has a complete export with that id", run_id, group.name, now - since,
                          ", ".join(self._members_with(group, run_id, True)) or "none",
                          ", ".join(self._members_with(group, run_id, False)) or "none")
                self.overdue.add((group.name, run_id))  # whoever sees it finds the line
        self.overdue = {(g, r) for g, r in self.overdue if g != group.name or r in pending}

    def _note_incomplete_exports(self, dataset: str) -> None:
        """Log once each export folder of `dataset` with files but no marker (the listing
        just made found them): it is not loaded until its marker is written."""
        pending = set(self.source.pending.get(dataset, {}))
        for export_id in sorted(pending - self._pending_logged.get(dataset, set())):
            log.info("export %s/%s has files but no _SUCCESS or _manifest.json: pending, not "
                     "loaded until its marker is written", dataset, export_id)
        self._pending_logged[dataset] = pending

    def pending_exports(self, dataset: str) -> list[dict[str, Any]]:
        """The export folders of `dataset` with files but no marker, with their age."""
        now = time.time()
        return [{"export_id": e, "age_s": round(now - since, 3)}
                for e, since in sorted(dict(self.source.pending.get(dataset, {})).items())]

    def incomplete_runs(self) -> list[dict[str, Any]]:
        """Runs complete in some members of their group only, oldest first (read off the
        loader thread: each container is copied in one C call first)."""
        now = time.time()
        out = []
        for name, runs in sorted(list(self.pending_runs.items())):
            group = self.groups[name]
            overdue = set(self.overdue)
            for run_id, since in sorted(list(runs.items())):
                out.append({"group": name, "export_id": run_id, "age_s": round(now - since, 3),
                            "complete": self._members_with(group, run_id, True),
                            "missing": self._members_with(group, run_id, False),
                            "overdue": (name, run_id) in overdue})
        return out

    def _members_with(self, group: RunGroup, run_id: str, complete: bool) -> list[str]:
        return [d for d in group.datasets
                if (run_id in self._listed.get(d, ())) == complete]

    def refresh(self, datasets: Iterable[str] | None = None) -> list[LoadEvent]:
        """For each group (a dataset in none is one of its own) not pinned, load the newest
        run newer than the served one that is complete in every member, walking back run by
        run while one is refused, and publish every group loaded in one Snapshot (after
        `before_publish`, which warms it). Raises what the source raises when it cannot be
        listed (the caller backs off)."""
        self.listings += 1
        names = sorted(self.schemas if datasets is None else set(datasets))
        walks: dict[tuple[str, ...], list[_Run]] = {}  # by the group's datasets
        listed_seconds: dict[str, float] = {}
        for group in self._groups(names):
            listed: dict[str, Sequence[Any]] = {}
            for name in group.datasets:
                start = time.perf_counter()
                listed[name] = self.source.complete_exports(name)
                listed_seconds[name] = time.perf_counter() - start
                self.last_listed = time.time()
                self._note_incomplete_exports(name)
                self._listed[name] = {e.export_id for e in listed[name]}
                self._backfill_written(name, listed[name])
            walks[group.datasets] = self._runs(group, listed)
        events: list[LoadEvent] = []
        built: list[tuple[Version, dict[str, float]]] = []
        # A newer export loads now, not after the warm of the version it may replace.
        cut = any(walks.values()) and self._cut_tail(wait=False)
        while any(walks.values()):
            runs = [walk.pop(0) for walk in walks.values() if walk]
            found = [(e, listed_seconds[d]) for run in runs for d, e in run.todo.items()]
            loaded = iter(self._load_all(found))
            for run in runs:
                outcomes = {d: next(loaded) for d in run.todo}
                versions = self._finish_run(run, outcomes, listed_seconds, events)
                if versions is not None:  # loaded, or to be tried again later: no walk back
                    built.extend(versions)
                    walks[run.group.datasets] = []
        if built:
            self._publish([v for v, _ in built], {v.dataset: t for v, t in built})
        elif cut:  # nothing replaced the version it warmed: it goes on where it stopped
            self._cut_tail(wait=True)
            self._warm_after(self.catalog.current)
        return events

    def _finish_run(self, run: _Run, outcomes: dict[str, _Loaded | _Failed],
                    listed: Mapping[str, float],
                    events: list[LoadEvent]) -> list[tuple[Version, dict[str, float]]] | None:
        """Attach a run's versions, or record why it was not loaded. Returns its versions
        (none when it must be tried again later), or None to walk back to the run before."""
        attached: dict[str, tuple[Version, LoadEvent]] = {}
        if not any(isinstance(o, _Failed) for o in outcomes.values()):
            for d, loaded in outcomes.items():
                assert isinstance(loaded, _Loaded)
                done = self._attach_loaded(run.todo[d], listed[d], loaded)
                if isinstance(done, _Failed):
                    outcomes[d] = done
                else:
                    attached[d] = done
        failed = {d: o for d, o in outcomes.items() if isinstance(o, _Failed)}
        if not failed:
            for _, event in attached.values():
                self._record(event)
                events.append(event)
            if run.group.name in self.pending_runs:  # runs older than this one: passed by
                self._note_pending(run.group, {r: t for r, t in self.pending_runs[
                    run.group.name].items() if r > run.run_id})
            return [(v, dict(e.timings)) for v, e in attached.values()]
        for version, _ in attached.values():
            self.catalog.drop(version)
        retry = any(isinstance(o.error, Unavailable) for o in failed.values())
        for d, outcome in outcomes.items():
            candidate = run.todo[d]
            if d in failed:
                events.append(self._refuse(candidate, failed[d]))
                continue
            if isinstance(outcome, _Loaded):
                remove_version_file(outcome.path)
            culprit = ", ".join(f"{f}: {failed[f].error}" for f in sorted(failed))
            reason = (f"run {run.run_id} of group {run.group.name} not published: "
                      f"{'could not fetch' if retry else 'refused'} {culprit}")
            log.warning("%s/%s built but not published: %s", d, run.run_id, reason)
            event = LoadEvent(d, run.run_id, False, reason, outcome.seconds if isinstance(
                outcome, _Failed) else time.perf_counter() - outcome.start,
                held=True, listing=self.listings)
            self._record(event)
            events.append(event)
        return [] if retry else None

    def _load_all(self, found: list[tuple[Any, float]]) -> list[_Loaded | _Failed]:
        """Download, check and build each export, up to `builder.processes` at a time, the
        largest first: a build leaves cores idle in its serial steps (hashing, the order
        check, writing the file), which the next dataset's build can use."""
        if len(found) < 2 or self.builder.processes < 2:
            return [self._load(c) for c, _ in found]
        order = sorted(range(len(found)), key=lambda i: -sum(found[i][0].sizes.values()))
        with ThreadPoolExecutor(self.builder.processes,
                                thread_name_prefix="duckswap-load") as pool:
            futures = {i: pool.submit(self._load, found[i][0]) for i in order}
            loaded = [futures[i].result() for i in range(len(found))]
        # A build process that dies fails every task of the pool: which export killed it is
        # not known, so those are loaded again one at a time, and only the culprit is refused.
        for i, outcome in enumerate(loaded):
            if isinstance(outcome, _Failed) and isinstance(outcome.error, BuildDied):
                loaded[i] = self._load(found[i][0])
        return loaded

    def _publish(self, built: list[Version],
                 timings: Mapping[str, dict[str, float]] | None = None) -> None:
        """Stage, warm and commit one Snapshot; record and save the state at once (before
        the after-publish warm)."""
        start = time.perf_counter()
        self._cut_tail(wait=True)  # one warm at a time; that one's version is being replaced
        if self.stopping:
            return
        publisher = self.publisher
        snap = self.catalog.stage(built, publisher.holders() if publisher else [])
        if self.before_publish is not None:
            try:
                self.before_publish(snap, self.catalog.current)
            except Exception:  # warming is an optimisation: never block a publish
                log.exception("warming snapshot %d failed; publishing it cold", snap.id)
        if self.stopping:  # its warm was cut short, and nothing will be served anyway
            self.catalog.discard(snap)
            return
        try:
            if publisher is not None:
                publisher.stage(snap)  # every worker has it open ...
        except BaseException:
            self.catalog.discard(snap)
            raise
        # Published from here on. The loader's record (admin API, metrics, state.json, a
        # worker that starts now) says so before any worker serves it: a client that has been
        # served the new export never reads an older record afterwards.
        self.catalog.commit(snap)
        seconds = time.perf_counter() - start
        for version in built:
            steps = (timings or {}).get(version.dataset)
            if steps is not None:
                steps["publish"] = seconds
                steps["total"] = sum(steps.values())
            self._served(version, steps)
        self._save()
        if publisher is not None:
            publisher.commit(snap)  # now every worker serves it
        log.info(
            "published %s in %.3fs",
            ", ".join(f"{v.dataset}/{v.export_id} as {v.version_id}" for v in built),
            time.perf_counter() - start,
        )
        self._warm_after(snap)

    def _warm_after(self, snap: Snapshot) -> None:
        """Run `after_publish` for `snap` on its own thread: the next load need not wait for
        it (a newer export cuts it short, see `refresh`). `snap` is held meanwhile."""
        if self.after_publish is None:
            return
        after = self.after_publish
        self.catalog.hold(snap, "warm")

        def warm() -> None:
            try:
                after(snap)
            except Exception:
                log.exception("warming snapshot %d after its publish failed", snap.id)
            finally:
                self.catalog.release(snap.id, "warm")

        self._tail = self._tail_executor.submit(warm)

    def _cut_tail(self, wait: bool) -> bool:
        """Cut the after-publish warm in progress short (`cut_after_publish`); with `wait`,
        until it has ended. True when one was running."""
        tail = self._tail
        if tail is None or tail.done():
            return False
        if self.cut_after_publish is not None:
            self.cut_after_publish()
        if wait:
            with contextlib.suppress(Exception):
                tail.result()
        return True

    def _served(self, version: Version, timings: dict[str, float] | None = None) -> None:
        """Record `version` as its dataset's served one, first in the kept list."""
        assert version.path is not None
        ds = self.state[version.dataset]
        record = ds.find(version.version_id)
        if record is None or record.file != version.path.name:
            record = VersionRecord(
                version.dataset, version.version_id, version.export_id, version.path.name,
                version.rows, version.loaded_at,
                checks_digest(self.schemas[version.dataset].checks()),
                {k: round(v, 4) for k, v in (timings or {}).items()}, version.written_at)
        ds.versions = [record, *[r for r in ds.versions if r.version_id != version.version_id]]
        del ds.versions[self.keep_versions:]
        ds.quarantine.pop(version.export_id, None)

    def _save(self) -> None:
        """Persist the state, then let go of version files no longer kept."""
        if self.data is not None:
            self.data.save(self.state)
        self.catalog.keep({self._path(r) for ds in self.state.values() for r in ds.versions})

    def _path(self, record: VersionRecord) -> Path:
        return self.catalog.data_dir / record.file

    def _load(self, candidate: Any) -> _Loaded | _Failed:
        """Download, check and build one export (on a loader thread of `_load_all`: it touches
        no state); what it raised is returned, for `_finish_run` to record."""
        schema = self.schemas[candidate.dataset]
        start = time.perf_counter()
        timings: dict[str, float] = {}
        local: Export | None = None
        try:
            problems = size_problems(candidate.sizes, schema)  # before any byte is downloaded
            if problems:
                raise LoadError(problems[0])
            local = self.source.fetch(candidate)
            step = time.perf_counter()
            timings["download"] = step - start
            version_id = self.builder.run(check_export, local, schema)
            timings["validate"] = time.perf_counter() - step
            path = self.catalog.new_version_path(local.dataset, version_id)
            rows, steps = self.builder.build(local, schema, path)
            timings["validate"] += steps["validate"]
            timings["build"] = steps["build"]
            return _Loaded(local.export_id, version_id, path, rows, timings, start)
        except (Unavailable, LoadError, OSError) as exc:
            return _Failed(exc, time.perf_counter() - start)
        finally:
            if local is not None:
                self.source.discard(local)

    def _attach_loaded(self, candidate: Any, listed: float,
                       loaded: _Loaded) -> tuple[Version, LoadEvent] | _Failed:
        """A built version, with the event that records it (not recorded yet)."""
        try:
            check_version_file(loaded.path)
        except OSError as exc:
            remove_version_file(loaded.path)
            return _Failed(LoadError(f"opening the built version failed: {exc}"),
                           time.perf_counter() - loaded.start)
        seconds = time.perf_counter() - loaded.start
        timings = {"list": listed, **loaded.timings}
        version = Version(candidate.dataset, loaded.version_id, loaded.export_id,
                          loaded.rows, seconds, loaded.path, written_at=candidate.written_at)
        log.info(
            "built %s/%s as version %s: %d rows in %.3fs (%s)",
            candidate.dataset, loaded.export_id, loaded.version_id, loaded.rows, seconds,
            ", ".join(f"{k} {v:.3f}s" for k, v in timings.items()),
        )
        return version, LoadEvent(candidate.dataset, loaded.export_id, True, "", seconds,
                                  loaded.version_id, timings, listing=self.listings)

    def _refuse(self, candidate: Any, failed: _Failed) -> LoadEvent:
        """Record why an export was not loaded: quarantined with its reason, or (the source
        failed) tried again at the next poll."""
        if isinstance(failed.error, Unavailable):
            log.warning("could not fetch export %s/%s: %s (retrying later)",
                        candidate.dataset, candidate.export_id, failed.error)
            event = LoadEvent(candidate.dataset, candidate.export_id, False, str(failed.error),
                              failed.seconds, retry=True, listing=self.listings)
            self._record(event)
            return event
        reason = str(failed.error)
        # Logged and counted first: whoever sees the refusal in the state finds it in the
        # log, the history and the metrics.
        log.error("refused export %s/%s: %s (previous version keeps serving)",
                  candidate.dataset, candidate.export_id, reason)
        event = LoadEvent(candidate.dataset, candidate.export_id, False, reason,
                          failed.seconds, listing=self.listings)
        self._record(event)
        if self.config_export(candidate.dataset) == candidate.export_id:  # said at once
            self._config_problem(self.group(candidate.dataset), candidate.export_id,
                                 _refused(candidate.export_id, candidate.dataset, reason))
        quarantine = self.state[candidate.dataset].quarantine
        quarantine[candidate.export_id] = Refusal(
            candidate.dataset, candidate.export_id, candidate.fingerprint, reason, time.time())
        for old in sorted(quarantine, key=lambda e: quarantine[e].at)[:-QUARANTINE_KEPT]:
            del quarantine[old]
        self._save()
        return event

    def _record(self, event: LoadEvent) -> None:
        self.outcomes[(event.dataset, event.outcome)] += 1
        self.history.append(event)
        del self.history[:-1000]

    # -- restart ----------------------------------------------------------------------------
    def restore(self) -> list[Version]:
        """Serve the versions the data dir's state names (what a crash left behind is
        removed first); a version built under other checks is dropped and rebuilt."""
        if self.data is None:
            return []
        restored: list[Version] = []
        for name, ds in self.data.recover().items():
            if name not in self.schemas:
                continue
            digest = checks_digest(self.schemas[name].checks())
            kept = [r for r in ds.versions if r.checks == digest]
            if len(kept) < len(ds.versions):
                log.info("dropping %d cached version(s) of %s built under other checks",
                         len(ds.versions) - len(kept), name)
            ds.versions = kept
            if ds.pinned is not None and ds.find(ds.pinned) is None:
                ds.pinned = None
            self.state[name] = ds
            named = self.config_export(name)  # the version the config names first, where kept
            if named is not None and ds.pinned is not None:
                log.warning("%s: dropping the admin API's pin of version %s: the config names "
                            "export %s", name, ds.pinned, named)
                ds.pinned = None
            for record in sorted(ds.versions, key=lambda r: r.export_id != named):
                try:
                    restored.append(self._attach(record))
                    break
                except OSError as exc:
                    log.warning("cached version %s/%s cannot be opened (%s); dropped",
                                name, record.version_id, exc)
                    ds.versions.remove(record)
        if restored:
            log.info("serving cached %s before the source answers",
                     ", ".join(f"{v.dataset}/{v.export_id}" for v in restored))
            self._publish(restored)
        self._save()
        return restored

    def _attach(self, record: VersionRecord) -> Version:
        path = self._path(record)
        check_version_file(path)
        return Version(record.dataset, record.version_id, record.export_id, record.rows,
                       record.timings.get("total", 0.0), path, record.loaded_at,
                       record.written_at)

    # -- admin actions (on the loader thread: see `act`) ------------------------------------
    def _kept(self, dataset: str, version_id: str | None, default: int) -> VersionRecord:
        ds = self.state[dataset]
        if version_id is None:
            if len(ds.versions) <= default:
                raise NotKept(f"{dataset} keeps no earlier version to roll back to "
                              f"(server.keep_versions = {self.keep_versions})")
            return ds.versions[default]
        record = ds.find(version_id)
        if record is None:
            kept = ", ".join(r.version_id for r in ds.versions) or "none"
            raise NotKept(f"{dataset} does not keep version {version_id!r} (kept: {kept})")
        return record

    def _serve(self, records: list[VersionRecord]) -> None:
        current = self.catalog.current.versions
        todo = [r for r in records if (c := current.get(r.dataset)) is None
                or c.version_id != r.version_id]
        if todo:
            self._publish([self._attach(r) for r in todo])

    def rollback(self, dataset: str, version_id: str | None = None) -> VersionRecord:
        """Serve the previously served version (or a kept one) and pin it, so the watcher
        does not move forward again until `unpin`."""
        return self._pin(dataset, self._kept(dataset, version_id, 1))

    def pin(self, dataset: str, version_id: str | None = None) -> VersionRecord:
        """Keep serving the current version (or serve a kept one): the watcher stops
        advancing this dataset."""
        return self._pin(dataset, self._kept(dataset, version_id, 0))

    def _pin(self, dataset: str, record: VersionRecord) -> VersionRecord:
        """Pin `record`, and in a group the same export of every other member: a run is
        served whole (one Snapshot), never mixed with another."""
        group = self.group(dataset)
        records = [record, *(self._same_export(d, record.export_id, group)
                             for d in group.datasets if d != dataset)]
        before = {r.dataset: self.state[r.dataset].pinned for r in records}
        for r in records:
            self.state[r.dataset].pinned = r.version_id  # saved with the publish
        try:
            self._serve(records)
        except BaseException:
            for name, pinned in before.items():
                self.state[name].pinned = pinned
            raise
        self._save()
        return record

    def _same_export(self, dataset: str, export_id: str, group: RunGroup) -> VersionRecord:
        for r in self.state[dataset].versions:
            if r.export_id == export_id:
                return r
        raise NotKept(f"{dataset} keeps no version of export {export_id}, and group "
                      f"{group.name} is served whole (kept: "
                      f"{', '.join(r.export_id for r in self.state[dataset].versions) or 'none'})")

    def unpin(self, dataset: str) -> list[LoadEvent]:
        """Follow the source again (the whole group): the newest valid export is loaded now."""
        names = list(self.group(dataset).datasets)
        for name in names:
            self.state[name].pinned = None
        self._save()
        return self.refresh(names)

    def reload(self, dataset: str | None = None, retry: bool = False) -> list[LoadEvent]:
        """List the source now; `retry` also forgets quarantined exports."""
        names = list(self.schemas) if dataset is None else [dataset]
        if retry:
            for name in names:
                self.state[name].quarantine.clear()
            self._save()
        return self.refresh(names)

    async def act(self, fn: Callable[..., T], *args: Any) -> T:
        """Run an action on the loader thread, after the load in progress."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def record_action(self, action: str, dataset: str | None, **detail: Any) -> None:
        entry = {"at": time.time(), "action": action, "dataset": dataset, **detail}
        self.actions.append(entry)
        del self.actions[:-200]
        log.warning("admin: %s %s %s", action, dataset or "(all datasets)",
                    " ".join(f"{k}={v}" for k, v in detail.items()))

    async def run(self, stop: asyncio.Event) -> None:
        """Serve the cached versions, then scan, then watch the folder (or poll the bucket)
        until `stop` is set."""
        collector = asyncio.create_task(self._collect_forever(stop))
        try:
            try:
                await self.act(self.restore)
            except Exception:  # a cache that cannot be read is no reason not to serve
                log.exception("restoring cached versions failed; loading from the source")
            await Watcher(self, self.debounce_ms, self.poll_seconds).run(stop)
        finally:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)
            # Nothing may run on these threads once the server closes what they use.
            for executor in (self._executor, self._tail_executor):
                await asyncio.get_running_loop().run_in_executor(
                    None, functools.partial(executor.shutdown, wait=True, cancel_futures=True))

    def stop(self) -> None:
        """The server is stopping: cut the warm short, end the build processes (the loads
        and warms in flight end as `Unavailable`: nothing is refused for it), and publish
        nothing more. `run` then returns once its threads are idle."""
        self.stopping = True
        self._cut_tail(wait=False)
        self.builder.stop()

    def data_age(self) -> dict[str, float]:
        """Seconds since each served version was loaded."""
        now = time.time()
        return {n: round(now - v.loaded_at, 3)
                for n, v in self.catalog.current.versions.items()}

    def export_age(self) -> dict[str, float]:
        """Seconds since each served version's export was complete in the source (where the
        source said when): the same on every replica, and across restarts."""
        ages = {name: self.export_age_of(name) for name in list(self.catalog.current.versions)}
        return {name: age for name, age in ages.items() if age is not None}

    def export_age_of(self, name: str) -> float | None:
        """`export_age` of one dataset (None: not served, or its source gave no time)."""
        v = self.catalog.current.versions.get(name)
        if v is None:
            return None
        record = self.state[name].find(v.version_id)
        written = record.written_at if record is not None else v.written_at
        return round(time.time() - written, 3) if written else None

    def _backfill_written(self, name: str, listed: Sequence[Any]) -> None:
        """A version kept by a server that did not record when its export was written (an
        older state.json) learns it from the listing, once."""
        served = self.catalog.current.versions.get(name)
        record = self.state[name].find(served.version_id) if served is not None else None
        if record is None or record.written_at:
            return
        export = next((e for e in listed if e.export_id == record.export_id), None)
        if export is not None and export.written_at:
            record.written_at = export.written_at
            self._save()

    def data_age_text(self) -> str:
        ages = self.data_age()
        return f"{max(ages.values()):.0f}s" if ages else "(none loaded)"

    def close(self) -> None:
        self._cut_tail(wait=True)
        self.builder.close()

    async def _collect_forever(self, stop: asyncio.Event) -> None:
        """Retire drained Snapshots; wakes often, works only when there is garbage."""
        while not stop.is_set():
            if self.catalog.has_garbage():
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.catalog.collect)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.1)
