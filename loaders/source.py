"""Sources of exports. One protocol; the local-folder backend lives here."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

MARKERS = ("_manifest.json", "_SUCCESS")
PART_GLOB = "part-*.parquet"


@dataclass(frozen=True)
class Export:
    """One complete output of a pipeline for one dataset."""

    dataset: str
    export_id: str
    path: Path
    files: tuple[Path, ...]
    marker: str  # "_manifest.json", "_SUCCESS", or "" (complete by its quiet period)
    fingerprint: str = ""  # changes whenever a file of the export is rewritten
    sizes: Mapping[str, int] = field(default_factory=dict)  # part name -> bytes
    written_at: float = 0.0  # when it was complete: its marker's time, else its newest file's

    @property
    def manifest(self) -> Path | None:
        return self.path / "_manifest.json" if self.marker == "_manifest.json" else None


class Source(Protocol):
    url: str
    # dataset -> {export id: when its first file was written} of the folders with files but
    # no marker, as of the last `complete_exports` of that dataset
    pending: dict[str, dict[str, float]]

    def complete_exports(self, dataset: str) -> Sequence[Any]:
        """Complete exports of a dataset as the source lists them (before any download: each
        with `dataset`, `export_id`, `fingerprint` and `sizes`), oldest first (export ids
        sort by time)."""
        ...

    def fetch(self, export: Any) -> Export:
        """The export's files on local disk, verified."""
        ...

    def discard(self, export: Export) -> None:
        """Free what `fetch` staged (after the build copied it)."""
        ...


def is_ignored(name: str) -> bool:
    """Temporary and in-progress files are never part of an export."""
    return (
        name.endswith((".part", ".tmp", ".crc"))
        or name.startswith(".")
        or name.startswith("_temporary")
    )


def quiet_since(newest_change: float, quiet_seconds: float, now: float | None = None) -> bool:
    """A folder with no marker counts as complete once nothing in it changed for
    `quiet_seconds` (0: never; the last resort for pipelines that write no marker)."""
    return quiet_seconds > 0 and (time.time() if now is None else now) - newest_change \
        >= quiet_seconds


def marker_of(folder: Path) -> str | None:
    """The marker that says an export folder is complete, if it has one."""
    return next((m for m in MARKERS if (folder / m).is_file()), None)


def parts_of(folder: Path) -> tuple[Path, ...]:
    """An export folder's part files, in name order."""
    return tuple(sorted(p for p in folder.glob(PART_GLOB)
                        if p.is_file() and not is_ignored(p.name)))


class LocalSource:
    """`file://` folder laid out as `<root>/<dataset>/<export-id>/part-*.parquet` + marker."""

    def __init__(self, root: Path, quiet_seconds: float = 0.0) -> None:
        self.root = root
        self.url = f"file://{root}"
        self.quiet_seconds = quiet_seconds
        self.pending: dict[str, dict[str, float]] = {}

    def complete_exports(self, dataset: str) -> list[Export]:
        base = self.root / dataset
        pending = self.pending[dataset] = {}
        if not base.is_dir():
            return []
        found: list[Export] = []
        for folder in sorted(base.iterdir(), key=lambda p: p.name):
            if not folder.is_dir() or is_ignored(folder.name):
                continue
            marker = marker_of(folder)
            files = parts_of(folder)
            try:
                stats = {p.name: p.stat() for p in (*files, *([folder / marker] if marker else []))}
                if marker is None:  # complete only once quiet: nothing in it changed for a while
                    times = [p.stat().st_mtime for p in folder.iterdir()]
                    if not times:
                        continue
                    if not files or not quiet_since(max([folder.stat().st_mtime, *times]),
                                                    self.quiet_seconds):
                        pending[folder.name] = min(times)  # still being written
                        continue
            except OSError:
                continue  # being rewritten or removed right now: next time
            stamp = ",".join(f"{n}:{st.st_size}:{st.st_mtime_ns}" for n, st in stats.items())
            sizes = {p.name: stats[p.name].st_size for p in files}
            written = stats[marker].st_mtime if marker else max(
                st.st_mtime for st in stats.values())
            found.append(Export(dataset, folder.name, folder, files, marker or "", stamp, sizes,
                                written))
        return found

    def fetch(self, export: Export) -> Export:
        return export  # already local

    def discard(self, export: Export) -> None:
        pass  # the folder is the source itself

    def dataset_of(self, changed: Path) -> str | None:
        """The dataset a changed path under the root belongs to."""
        try:
            rel = changed.resolve().relative_to(self.root.resolve())
        except ValueError:
            return None
        return rel.parts[0] if rel.parts else None
