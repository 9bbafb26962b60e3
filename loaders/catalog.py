"""The loader's record of Snapshots: which one is current, which are staged, which retire.

The loader attaches nothing: the HTTP workers do (`engine.store.Replica`). It names each
Snapshot, remembers who still holds which (every worker, until it says it has drained it; the
after-publish warm, while it runs), and deletes a version file once no live Snapshot uses it
and it is not kept for rollback.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from types import MappingProxyType

from engine.store import EMPTY, Snapshot, Version, remove_version_file


class Catalog:
    def __init__(self, versions: Path) -> None:
        self.data_dir = versions
        self.current: Snapshot = EMPTY
        self.kept: frozenset[Path] = frozenset()  # files kept once unused (rollback)
        self._ids = itertools.count(1)
        self._files = itertools.count(1)
        self._lock = threading.Lock()
        self._staged: list[Snapshot] = []
        self._retiring: list[Snapshot] = []
        self._holders: dict[int, set[str]] = {}  # Snapshot id -> who has not let go of it

    def new_version_path(self, dataset: str, version_id: str) -> Path:
        """A file name never used before (DuckDB caches database instances by path)."""
        return self.data_dir / f"{dataset}-{version_id}-{os.getpid()}-{next(self._files)}.duckdb"

    def stage(self, new: Iterable[Version], holders: Iterable[str]) -> Snapshot:
        """The current Snapshot with `new` replacing their datasets' versions, not published;
        held by `holders` (the workers it is staged on) until each releases it."""
        with self._lock:
            versions = dict(self.current.versions)
            for version in new:
                versions[version.dataset] = version
            snap = Snapshot(next(self._ids), MappingProxyType(versions), base=self.current.id)
            self._staged.append(snap)
            self._holders[snap.id] = set(holders)
            return snap

    def commit(self, snap: Snapshot) -> Snapshot:
        """`snap` is what every worker serves now; the one before it retires."""
        with self._lock:
            if snap.base != self.current.id:
                raise RuntimeError(f"snapshot {snap.id} was staged on {snap.base}, "
                                   f"but {self.current.id} is current")
            old, self.current = self.current, snap
            self._staged.remove(snap)
            if old is not EMPTY:
                self._retiring.append(old)
            return old

    def discard(self, snap: Snapshot) -> None:
        """Forget a staged Snapshot that will not be published."""
        with self._lock:
            self._staged.remove(snap)
            self._retiring.append(snap)

    def hold(self, snap: Snapshot, who: str) -> None:
        with self._lock:
            self._holders.setdefault(snap.id, set()).add(who)

    def release(self, snap_id: int, who: str) -> None:
        with self._lock:
            held = self._holders.get(snap_id)
            if held is not None:
                held.discard(who)

    def forget(self, who: str) -> None:
        """`who` (a worker that exited) holds nothing any more."""
        with self._lock:
            for held in self._holders.values():
                held.discard(who)

    def collect(self) -> list[Snapshot]:
        """Forget retiring Snapshots nobody holds; delete the version files no live Snapshot
        uses and none kept. Returns the Snapshots forgotten. Idempotent."""
        with self._lock:
            gone = [s for s in self._retiring if not self._holders.get(s.id)]
            if not gone:
                return []
            self._retiring = [s for s in self._retiring if s not in gone]
            for s in gone:
                self._holders.pop(s.id, None)
            in_use = self._paths(self.current, *self._staged, *self._retiring)
            for path in self._paths(*gone) - in_use - self.kept:
                remove_version_file(path)
            return gone

    def drop(self, version: Version) -> None:
        """Delete the file of a version no Snapshot was staged with (its run was not
        published), unless it is kept or in use."""
        with self._lock:
            live = self._paths(self.current, *self._staged, *self._retiring)
            if version.path not in live and version.path not in self.kept:
                remove_version_file(version.path)

    def keep(self, paths: set[Path]) -> None:
        """Keep these version files once unused (the versions retained for rollback); a file
        no longer kept is deleted now if no live Snapshot uses it."""
        with self._lock:
            dropped = self.kept - paths
            self.kept = frozenset(paths)
            live = self._paths(self.current, *self._staged, *self._retiring)
            for path in dropped - live:
                remove_version_file(path)

    def has_garbage(self) -> bool:
        with self._lock:
            return any(not self._holders.get(s.id) for s in self._retiring)

    @staticmethod
    def _paths(*snaps: Snapshot) -> set[Path]:
        return {v.path for s in snaps for v in s.versions.values()}
