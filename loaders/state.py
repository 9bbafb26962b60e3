"""The data dir: verified versions on local disk and the one state file that names them.

A restart serves the versions the state names before the source answers, and a crash at any
point of a load leaves a state a restart recovers from:

    <data_dir>/.lock              flock: one server per data dir
    <data_dir>/state.json         rewritten whole: temporary file, fsync, rename, fsync the dir
    <data_dir>/versions/*.duckdb  one file per version; named in state.json only once complete
    <data_dir>/staging/           downloads in progress; emptied at startup

A version file the state does not name (a build or a publish cut short) and everything in
staging (a download cut short) is removed at startup.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("duckswap.loader")
FORMAT = 1


@dataclass
class VersionRecord:
    """A verified version kept on disk."""

    dataset: str
    version_id: str
    export_id: str
    file: str  # name under versions/
    rows: int
    loaded_at: float  # wall clock, for the data's age
    checks: str  # digest of the dataset's checks it was built under
    timings: dict[str, float] = field(default_factory=dict)
    written_at: float = 0.0  # when the export was complete in the source (0: not known)


@dataclass
class Refusal:
    """An export refused with its reason; retried only once its fingerprint changes."""

    dataset: str
    export_id: str
    fingerprint: str
    reason: str
    at: float


@dataclass
class DatasetState:
    versions: list[VersionRecord] = field(default_factory=list)  # last served first
    pinned: str | None = None  # the version id the watcher must not move away from
    quarantine: dict[str, Refusal] = field(default_factory=dict)  # export id -> refusal

    @property
    def served(self) -> VersionRecord | None:
        return self.versions[0] if self.versions else None

    def find(self, version_id: str) -> VersionRecord | None:
        return next((r for r in self.versions if r.version_id == version_id), None)


State = dict[str, DatasetState]


def checks_digest(checks: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(checks, sort_keys=True).encode()).hexdigest()[:16]


def default_dir(source_url: str) -> Path:
    """`$XDG_CACHE_HOME/duckswap/<hash of the source URL>` (one cache per source)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "duckswap" / hashlib.sha256(source_url.encode()).hexdigest()[:16]


class DataDirError(RuntimeError):
    """The data dir cannot be used (not creatable, not writable, held by another server)."""


class DataDirBusy(DataDirError):
    """Another live server holds the data dir."""


class DataDir:
    def __init__(self, path: Path, persistent: bool = True) -> None:
        self.path = path
        self.persistent = persistent
        self.versions = path / "versions"
        self.staging = path / "staging"
        self.answers = path / "answers"  # warmed answers per endpoint version: rebuilt each run
        self.state_file = path / "state.json"
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._lock = (path / ".lock").open("a")
        except OSError as exc:
            raise DataDirError(f"data dir {path} cannot be used: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.versions.mkdir(exist_ok=True)
            self.staging.mkdir(exist_ok=True)
            shutil.rmtree(self.answers, ignore_errors=True)
            self.answers.mkdir()
        except BlockingIOError:
            self._lock.close()
            raise DataDirBusy(f"data dir {path} is in use by another server") from None
        except OSError as exc:
            self._lock.close()
            raise DataDirError(f"data dir {path} cannot be used: {exc.strerror}") from None

    @classmethod
    def open(cls, configured: str | None, source_url: str) -> DataDir:
        """The configured data dir (another server holding it is an error), or the default
        one for this source, or a temporary one when another server holds the default."""
        if configured:
            return cls(Path(configured))
        path = default_dir(source_url)
        try:
            return cls(path)
        except DataDirError as exc:
            log.warning("%s; keeping versions in a temporary folder (no restart cache)", exc)
            return cls.temporary()

    @classmethod
    def temporary(cls) -> DataDir:
        return cls(Path(tempfile.mkdtemp(prefix="duckswap-data-")), persistent=False)

    def recover(self) -> State:
        """Read the state and remove what a crash left behind: staging, version files the
        state does not name, a half-written state file."""
        state = self._read()
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(exist_ok=True)
        named = {r.file for ds in state.values() for r in ds.versions}
        for leftover in self.versions.iterdir():
            if leftover.name not in named:
                with contextlib.suppress(OSError):
                    leftover.unlink()
                    log.info("removed %s left by an interrupted load", leftover.name)
        for ds in state.values():  # a named file that is gone cannot be served
            ds.versions = [r for r in ds.versions if (self.versions / r.file).is_file()]
        self.state_file.with_suffix(".tmp").unlink(missing_ok=True)
        return state

    def _read(self) -> State:
        try:
            doc = json.loads(self.state_file.read_text())
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT}")
            return {
                name: DatasetState(
                    [VersionRecord(**r) for r in ds["versions"]], ds.get("pinned"),
                    {e: Refusal(**q) for e, q in ds.get("quarantine", {}).items()})
                for name, ds in doc["datasets"].items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s (%s): loading from the source", self.state_file,
                        exc)
            return {}

    def save(self, state: State) -> None:
        """Replace the state file atomically and durably."""
        if not self.persistent:
            return
        doc: dict[str, Any] = {"format": FORMAT, "datasets": {
            name: {"versions": [asdict(r) for r in ds.versions], "pinned": ds.pinned,
                   "quarantine": {e: asdict(q) for e, q in ds.quarantine.items()}}
            for name, ds in sorted(state.items())}}
        tmp = self.state_file.with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.state_file)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._lock.close()  # releases the flock
        if not self.persistent:
            shutil.rmtree(self.path, ignore_errors=True)
