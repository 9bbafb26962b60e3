"""Sources of exports. One protocol; the local-folder backend lives here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
    marker: str
    fingerprint: str = ""  # changes whenever a file of the export is rewritten

    @property
    def manifest(self) -> Path | None:
        return self.path / "_manifest.json" if self.marker == "_manifest.json" else None


class Candidate(Protocol):
    """A complete export as a source lists it (before any download)."""

    @property
    def dataset(self) -> str: ...
    @property
    def export_id(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...


class Source(Protocol):
    url: str

    def complete_exports(self, dataset: str) -> Sequence[Any]:
        """Complete exports of a dataset (Candidates), oldest first (export ids sort by
        time)."""
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


class LocalSource:
    """`file://` folder laid out as `<root>/<dataset>/<export-id>/part-*.parquet` + marker."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = f"file://{root}"

    def complete_exports(self, dataset: str) -> list[Export]:
        base = self.root / dataset
        if not base.is_dir():
            return []
        found: list[Export] = []
        for folder in sorted(base.iterdir(), key=lambda p: p.name):
            if not folder.is_dir() or is_ignored(folder.name):
                continue
            marker = next((m for m in MARKERS if (folder / m).is_file()), None)
            if marker is None:
                continue
            files = tuple(
                sorted(p for p in folder.glob(PART_GLOB) if p.is_file() and not is_ignored(p.name))
            )
            try:
                stamp = ",".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                 for p in (*files, folder / marker))
            except OSError:
                continue  # being rewritten or removed right now: next time
            found.append(Export(dataset, folder.name, folder, files, marker, stamp))
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
