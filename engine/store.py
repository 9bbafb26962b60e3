"""Versions, frozen Snapshots, and a worker's `Replica`: its DuckDB database of them.

Each Version is its own DuckDB file (built by the build process). A Snapshot is a frozen
mapping dataset -> Version; the loader names and publishes it (`loaders.catalog`), every HTTP
worker attaches its files read-only in its own `Replica`, where it is a schema of views, one per
dataset, so an endpoint's SQL names datasets plainly and a cursor reads one Snapshot via its
search_path. A worker drops an old Snapshot, and detaches the files no live one uses, only after
its readers drain; the loader deletes the files once every worker has.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping
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
    rows: int
    load_seconds: float
    path: Path
    loaded_at: float = field(default_factory=time.time)  # wall clock, for the data's age
    written_at: float = 0.0  # when the export was complete in the source (0: not known)


@dataclass(frozen=True)
class Snapshot:
    id: int
    versions: Mapping[str, Version] = field(default_factory=lambda: MappingProxyType({}))
    base: int = 0  # the Snapshot this one was staged on

    @property
    def schema(self) -> str:
        """Its schema of views in a Replica."""
        return f"s_{self.id}" if self.id else "main"

    def version_ids(self, datasets: tuple[str, ...]) -> dict[str, str]:
        return {d: self.versions[d].version_id for d in datasets if d in self.versions}

    def __reduce__(self) -> tuple[object, ...]:  # sent to workers: a plain dict, not a proxy
        return (Snapshot, (self.id, dict(self.versions), self.base))


EMPTY = Snapshot(0)


def attach_sql(path: str | Path, name: str) -> str:
    """Attach a version file read-only as database `name` (a Replica, the warm)."""
    return f"ATTACH {quote_literal(str(path))} AS {name} (READ_ONLY)"


def view_sql(schema: str | None, dataset: str, db: str) -> str:
    """The view an endpoint's SQL reads a dataset through: version database `db`'s table."""
    view = quote_ident(dataset) if schema is None else f"{schema}.{quote_ident(dataset)}"
    return f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM {db}.main.data"


# DuckDB settings for the databases endpoint queries run on (a Replica's, and the warm's).
# Late materialization answers a small `ORDER BY ... LIMIT n` by scanning the table twice (the
# top n rowids, then their columns): made for wide scans, it made the demo's builds lookup
# 2.5 -> 3.8 ms (idle, median of 200 uncached answers) and nothing faster.
QUERY_CONFIG: dict[str, str] = {"disabled_optimizers": "late_materialization"}


class Replica:
    """One worker's in-memory DuckDB database: the Snapshots it was given, attached read-only;
    the one mutable reference to the current one; reader counts; retirement after drain."""

    def __init__(self, versions: Path, threads: int = 1, memory_limit: str | None = None) -> None:
        self.data_dir = versions
        config: dict[str, str | bool | int | float | list[str]] = {"threads": threads,
                                                                    **QUERY_CONFIG}
        if memory_limit:
            config["memory_limit"] = memory_limit
        self.db = duckdb.connect(":memory:", config=config)
        self.db.execute("SET enable_progress_bar = false")
        lock_down(self.db, [versions])  # version files are attached from there only
        self._admin = self.db.cursor()
        self._lock = threading.Lock()  # guards reader counts and the live lists
        self._ddl = threading.Lock()  # one DDL writer at a time
        self._readers: dict[int, int] = {}
        self._staged: dict[int, Snapshot] = {}
        self._retiring: list[Snapshot] = []
        self._names = itertools.count(1)
        self._attached: dict[Path, str] = {}  # version file -> its database name
        self.current: Snapshot = EMPTY

    # -- request path -------------------------------------------------------------------
    def acquire(self) -> Snapshot:
        with self._lock:
            snap = self.current
            self._readers[snap.id] = self._readers.get(snap.id, 0) + 1
            return snap

    def hold(self, snap: Snapshot) -> Snapshot:
        """Count one more reader of `snap`, which the caller already holds."""
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

    # -- what the loader says ---------------------------------------------------------------
    def stage(self, snap: Snapshot) -> None:
        """Attach `snap`'s files (those not attached yet) and make its schema; not served
        until `commit`. Idempotent."""
        with self._ddl:
            names = {}
            for dataset, v in snap.versions.items():
                name = self._attached.get(v.path)
                if name is None:
                    name = f"v_{next(self._names)}"
                    self._admin.execute(attach_sql(v.path, name))
                    self._attached[v.path] = name
                names[dataset] = name
            self._admin.execute(f"CREATE SCHEMA IF NOT EXISTS {snap.schema}")
            for dataset, name in names.items():
                self._admin.execute(view_sql(snap.schema, dataset, name))
            with self._lock:
                self._staged[snap.id] = snap

    def is_staged(self, snap_id: int) -> bool:
        with self._lock:
            return snap_id in self._staged

    def commit(self, snap_id: int) -> Snapshot:
        """Serve the staged Snapshot `snap_id`: the one assignment every request reads. The
        one before retires."""
        with self._lock:
            snap = self._staged.pop(snap_id)
            old, self.current = self.current, snap
            if old.id:
                self._retiring.append(old)
            for other in [s for s in self._staged.values() if s.id < snap_id]:
                self._retiring.append(self._staged.pop(other.id))  # staged, never committed
            return snap

    def has_garbage(self) -> bool:
        with self._lock:
            return any(s.id not in self._readers for s in self._retiring)

    def collect(self) -> list[int]:
        """Drop drained old Snapshots and detach the files no live one uses; returns the ids
        dropped (the loader deletes files once every worker has). Idempotent."""
        with self._ddl:
            with self._lock:
                drained = [s for s in self._retiring if s.id not in self._readers]
                self._retiring = [s for s in self._retiring if s.id in self._readers]
                live = [self.current, *self._retiring, *self._staged.values()]
            in_use = {v.path for s in live for v in s.versions.values()}
            for s in drained:
                self._admin.execute(f"DROP SCHEMA IF EXISTS {s.schema} CASCADE")
            for path in [p for p in self._attached if p not in in_use]:
                self._admin.execute(f"DETACH DATABASE IF EXISTS {self._attached.pop(path)}")
        return [s.id for s in drained]

    def held_versions(self) -> int:
        """Version databases attached now (leak checks)."""
        row = self.db.cursor().execute(
            "SELECT count(*) FROM duckdb_databases() WHERE database_name LIKE 'v\\_%' ESCAPE '\\'"
        ).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.db.close()


def remove_version_file(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".wal")):
        p.unlink(missing_ok=True)


MAGIC = b"DUCK"  # at byte 8 of every DuckDB database file


def check_version_file(path: Path) -> None:
    """Raise OSError unless `path` is a DuckDB database file (cheap: the worker that attaches it
    finds anything deeper)."""
    with path.open("rb") as f:
        head = f.read(12)
    if head[8:12] != MAGIC:
        raise OSError(f"{path.name} is not a DuckDB database file")
