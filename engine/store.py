"""Versions, frozen Snapshots and the one mutable reference to the current Snapshot.

Each Version is its own DuckDB file (built by the builder process), attached read-only. Each
Snapshot is a schema of views, one per dataset, so an endpoint's SQL names datasets plainly and
a cursor reads one Snapshot via its search_path. Old Snapshots are dropped, and versions no live
Snapshot uses detached and deleted, only after their readers drain.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import duckdb

from engine.sql import lock_down, quote_ident, quote_literal


@dataclass(frozen=True)
class Version:
    dataset: str
    version_id: str
    export_id: str
    db: str  # the attached database holding table `data`
    rows: int
    load_seconds: float
    path: Path | None = None
    loaded_at: float = field(default_factory=time.time)  # wall clock, for the data's age


@dataclass(frozen=True)
class Snapshot:
    id: int
    schema: str
    versions: Mapping[str, Version] = field(default_factory=lambda: MappingProxyType({}))
    base: int = 0  # the Snapshot this one was staged on

    def version_ids(self, datasets: tuple[str, ...]) -> dict[str, str]:
        return {d: self.versions[d].version_id for d in datasets if d in self.versions}


EMPTY = Snapshot(0, "main")


def attach_sql(path: str | Path, name: str) -> str:
    """Attach a version file read-only as database `name` (the server's Store, the warm, the
    query process)."""
    return f"ATTACH {quote_literal(str(path))} AS {name} (READ_ONLY)"


def view_sql(schema: str | None, dataset: str, db: str) -> str:
    """The view an endpoint's SQL reads a dataset through: version database `db`'s table."""
    view = quote_ident(dataset) if schema is None else f"{schema}.{quote_ident(dataset)}"
    return f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM {db}.main.data"


# DuckDB settings for the databases endpoint queries run on (the server's, and the warm's).
# Late materialization answers a small `ORDER BY ... LIMIT n` by scanning the table twice (the
# top n rowids, then their columns): made for wide scans, it made the demo's builds lookup
# 2.5 -> 3.8 ms (idle, median of 200 uncached answers) and nothing faster.
QUERY_CONFIG: dict[str, str] = {"disabled_optimizers": "late_materialization"}


class Store:
    """One in-process DuckDB database; holds the current Snapshot and retires old ones."""

    def __init__(
        self, threads: int = 2, memory_limit: str | None = None, data_dir: Path | None = None
    ) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="duckswap-versions-")) if data_dir is None \
            else data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config: dict[str, str | bool | int | float | list[str]] = {"threads": threads,
                                                                    **QUERY_CONFIG}
        if memory_limit:
            config["memory_limit"] = memory_limit
        self.db = duckdb.connect(":memory:", config=config)
        self.db.execute("SET enable_progress_bar = false")
        lock_down(self.db, [self.data_dir])  # version files are attached from there only
        self._admin = self.db.cursor()
        self._lock = threading.Lock()  # guards reader counts and the live lists
        self._ddl = threading.Lock()  # one DDL writer at a time
        self._readers: dict[int, int] = {}
        self._retiring: list[Snapshot] = []
        self._staged: list[Snapshot] = []
        self._ids = itertools.count(1)
        self._dbs = itertools.count(1)
        self._attached: dict[Path, str] = {}  # version file -> its database name
        self.kept: frozenset[Path] = frozenset()  # files kept after detaching (rollback)
        self.current: Snapshot = EMPTY
        # Told (on the staging or collecting thread) of each Snapshot staged, and of those
        # `collect` dropped: the query process attaches and drops them too.
        self.on_stage: Callable[[Snapshot], None] | None = None
        self.on_collect: Callable[[list[Snapshot]], None] | None = None

    # -- request path -------------------------------------------------------------------
    def acquire(self) -> Snapshot:
        with self._lock:
            snap = self.current
            self._readers[snap.id] = self._readers.get(snap.id, 0) + 1
            return snap

    def hold(self, snap: Snapshot) -> Snapshot:
        """Count one more reader of `snap`, which the caller already holds or just staged."""
        with self._lock:
            self._readers[snap.id] = self._readers.get(snap.id, 0) + 1
            return snap

    def release(self, snap: Snapshot) -> None:
        with self._lock:
            left = self._readers[snap.id] - 1
            if left:
                self._readers[snap.id] = left
            else:
                del self._readers[snap.id]

    def cursor(self) -> duckdb.DuckDBPyConnection:
        return self.db.cursor()

    # -- update path --------------------------------------------------------------------
    def new_version_path(self, dataset: str, version_id: str) -> Path:
        """A file name never used before in this process (DuckDB caches instances by path)."""
        return self.data_dir / f"{dataset}-{version_id}-{os.getpid()}-{next(self._dbs)}.duckdb"

    def attach(self, path: Path) -> str:
        """Attach a version file read-only (once: a file attached already keeps its name);
        returns its database name."""
        with self._ddl:
            name = self._attached.get(path)
            if name is None:
                name = f"v_{next(self._dbs)}"
                self._admin.execute(attach_sql(path, name))
                self._attached[path] = name
            return name

    def detach(self, db: str) -> None:
        """Detach a version database no Snapshot uses (attached for a run that was not
        published) and delete its file."""
        with self._ddl:
            path = next(p for p, name in self._attached.items() if name == db)
            self._admin.execute(f"DETACH DATABASE IF EXISTS {db}")
            del self._attached[path]
            if path not in self.kept:
                remove_version_file(path)

    def keep(self, paths: set[Path]) -> None:
        """Keep these version files on disk once detached (the versions retained for
        rollback); a file no longer kept is deleted now, or when its last reader drains."""
        with self._ddl:
            dropped = self.kept - paths
            self.kept = frozenset(paths)
            for path in dropped:
                if path not in self._attached:
                    remove_version_file(path)

    def stage(self, new: list[Version]) -> Snapshot:
        """Build, but do not publish, a Snapshot of the current one with `new` replacing
        their datasets' versions. It can be queried (warmed) before `commit`."""
        with self._ddl:
            old = self.current
            versions = dict(old.versions)
            for version in new:
                versions[version.dataset] = version
            snap_id = next(self._ids)
            schema = f"s_{snap_id}"
            self._admin.execute(f"CREATE SCHEMA {schema}")
            for name, v in versions.items():
                self._admin.execute(view_sql(schema, name, v.db))
            snap = Snapshot(snap_id, schema, MappingProxyType(versions), base=old.id)
            with self._lock:
                self._staged.append(snap)
        if self.on_stage is not None:
            self.on_stage(snap)
        return snap

    def commit(self, snap: Snapshot) -> Snapshot:
        """Publish a staged Snapshot: the one assignment every request reads."""
        with self._lock:
            if snap.base != self.current.id:
                raise RuntimeError(f"snapshot {snap.id} was staged on {snap.base}, "
                                   f"but {self.current.id} is current")
            old = self.current
            self.current = snap
            self._staged.remove(snap)
            if old is not EMPTY:
                self._retiring.append(old)
            return snap

    def discard(self, snap: Snapshot) -> None:
        """Forget a staged Snapshot that will not be published; `collect` drops it."""
        with self._lock:
            self._staged.remove(snap)
            self._retiring.append(snap)

    def has_garbage(self) -> bool:
        with self._lock:
            return any(s.id not in self._readers for s in self._retiring)

    def collect(self) -> int:
        """Drop drained old Snapshots and tables no live Snapshot uses. Idempotent."""
        with self._ddl:
            with self._lock:
                drained = [s for s in self._retiring if s.id not in self._readers]
                self._retiring = [s for s in self._retiring if s.id in self._readers]
                live = [self.current, *self._retiring, *self._staged]
            in_use = {v.db for s in live for v in s.versions.values()}
            gone = {v.db: v for s in drained for v in s.versions.values() if v.db not in in_use}
            for s in drained:
                self._admin.execute(f"DROP SCHEMA IF EXISTS {s.schema} CASCADE")
            for name, v in sorted(gone.items()):
                self._admin.execute(f"DETACH DATABASE IF EXISTS {name}")
                if v.path is not None:
                    self._attached.pop(v.path, None)
                    if v.path not in self.kept:
                        remove_version_file(v.path)
        if drained and self.on_collect is not None:
            self.on_collect(drained)
        return len(drained)

    def held_versions(self) -> int:
        """Version databases attached now (leak checks)."""
        row = self.db.cursor().execute(
            "SELECT count(*) FROM duckdb_databases() WHERE database_name LIKE 'v\\_%' ESCAPE '\\'"
        ).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.db.close()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def remove_version_file(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".wal")):
        p.unlink(missing_ok=True)
