"""`gs://bucket/prefix` exports through gcsfs (the only module that imports it).

Layout and completeness are the local folder's: `<prefix>/<dataset>/<export-id>/part-*.parquet`
plus a `_manifest.json` or `_SUCCESS` marker. Listings always go to the bucket (other writers'
changes must be seen); downloads pin each object's listed generation, stream to
`<staging>/<name>.part`, are checked against the bucket's md5 / crc32c, fsynced and renamed.
Read-only: nothing here ever writes to the bucket.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from loaders.build import Crc32c
from loaders.errors import LoadError, Unavailable
from loaders.source import MARKERS, PART_GLOB, Export, is_ignored, quiet_since

# gcsfs 2026.10 asks a gRPC bucket-layout service on every call unless told not to (against an
# emulator it waits 60 s each time); set before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
import gcsfs  # noqa: E402

log = logging.getLogger("duckswap.gcs")
T = TypeVar("T")
CHUNK = 1 << 20
STAGED = "duckswap-"  # prefix of staging folders: removed when found at startup


class Changed(Exception):
    """An object's generation changed (or it vanished) between the listing and its download."""


@dataclass(frozen=True)
class RemoteObject:
    name: str  # file name inside the export folder
    path: str  # bucket/key
    size: int
    generation: str
    md5: str | None  # base64, as GCS reports it
    crc32c: str | None  # base64 big-endian
    updated: float = 0.0  # when the object was written (bucket clock)


@dataclass(frozen=True)
class RemoteExport:
    dataset: str
    export_id: str
    marker: str  # "" when complete by its quiet period
    objects: tuple[RemoteObject, ...]  # the parts and the marker

    @property
    def sizes(self) -> dict[str, int]:
        return {o.name: o.size for o in self.objects if o.name != self.marker}

    @property
    def written_at(self) -> float:
        """When it was complete (bucket clock): its marker's time, else its newest object's."""
        return max((o.updated for o in self.objects if o.name == self.marker or not self.marker),
                   default=0.0)

    @property
    def fingerprint(self) -> str:
        """Changes whenever any object of the export is rewritten (a refused export is retried
        only then)."""
        return ",".join(f"{o.name}#{o.generation}" for o in self.objects)


def _timestamp(text: object) -> float:
    """An RFC 3339 time from the bucket as epoch seconds (0 when absent)."""
    if not isinstance(text, str):
        return 0.0
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def backoff(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff with full jitter."""
    return float(random.uniform(0, min(cap, base * 2 ** attempt)))


def retrying(fn: Callable[[], T], what: str, attempts: int = 5,
             sleep: Callable[[float], None] = time.sleep) -> T:
    """Call `fn`, retrying transient errors (OSError, timeouts, 5xx) with jittered backoff.
    `Changed` and `LoadError` are not transient here: they go to the caller at once."""
    for attempt in range(attempts):
        try:
            return fn()
        except (Changed, LoadError, Unavailable, FileNotFoundError):
            raise
        except Exception as exc:  # gcsfs raises OSError subclasses, HttpError, timeouts
            if attempt == attempts - 1:
                raise Unavailable(f"{what} failed after {attempts} attempts: "
                                  f"{type(exc).__name__}") from None
            delay = backoff(attempt)
            log.warning("%s failed (%s); retrying in %.1fs", what, type(exc).__name__, delay)
            sleep(delay)
    raise AssertionError("unreachable")


class GcsSource:
    def __init__(self, url: str, staging: Path, *, endpoint_url: str | None = None,
                 token: str | None = None, concurrency: int = 4, attempts: int = 5,
                 quiet_seconds: float = 0.0) -> None:
        rest = url.split("://", 1)[1].strip("/")
        self.bucket, _, self.prefix = rest.partition("/")
        self.url = url
        self.staging = staging
        staging.mkdir(parents=True, exist_ok=True)
        for stale in staging.glob(f"{STAGED}*"):  # downloads a crash cut short
            shutil.rmtree(stale, ignore_errors=True)
        self.concurrency = concurrency
        self.attempts = attempts
        self.quiet_seconds = quiet_seconds
        self.pending: dict[str, dict[str, float]] = {}
        self.fs = gcsfs.GCSFileSystem(
            token=token, endpoint_url=endpoint_url, access="read_only", version_aware=True,
            skip_instance_cache=True, use_listings_cache=False,
        )

    def _base(self, dataset: str) -> str:
        return "/".join(p for p in (self.bucket, self.prefix, dataset) if p)

    def complete_exports(self, dataset: str) -> list[RemoteExport]:
        """Complete exports of a dataset, oldest first; one listing per call, never cached."""
        base = self._base(dataset)
        pending = self.pending[dataset] = {}
        try:
            found: dict[str, Any] = self.fs.find(base, detail=True, refresh=True)
        except FileNotFoundError:
            return []
        folders: dict[str, list[RemoteObject]] = {}
        for path, info in found.items():
            rel = path[len(base):].strip("/").split("/")
            if len(rel) != 2 or is_ignored(rel[0]) or is_ignored(rel[1]):
                continue
            folders.setdefault(rel[0], []).append(RemoteObject(
                rel[1], path, int(info.get("size") or 0), str(info.get("generation") or ""),
                info.get("md5Hash"), info.get("crc32c"), _timestamp(info.get("updated"))))
        exports = []
        for export_id in sorted(folders):
            objects = folders[export_id]
            names = {o.name for o in objects}
            marker = next((m for m in MARKERS if m in names), "")
            keep = sorted((o for o in objects if o.name == marker
                           or Path(o.name).match(PART_GLOB)), key=lambda o: o.name)
            if not marker and (not keep or not quiet_since(max(o.updated for o in objects),
                                                           self.quiet_seconds)):
                pending[export_id] = min(o.updated for o in objects)  # still being written
                continue
            exports.append(RemoteExport(dataset, export_id, marker, tuple(keep)))
        return exports

    def fetch(self, export: RemoteExport) -> Export:
        """Download a complete export into a fresh staging folder, verified; the caller removes
        the folder (`discard`) when done. An object rewritten meanwhile is fetched again at its
        new generation, together with a fresh listing of the export, so no version mixes two
        writes."""
        for attempt in range(self.attempts):
            folder = self.staging / f"{STAGED}{export.dataset}-{export.export_id}-{os.getpid()}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            try:
                with ThreadPoolExecutor(self.concurrency) as pool:
                    list(pool.map(self._download, export.objects,
                                  [folder] * len(export.objects)))
            except Changed as exc:
                shutil.rmtree(folder, ignore_errors=True)
                log.warning("export %s/%s changed during its download (%s); listing it again",
                            export.dataset, export.export_id, exc)
                again = [e for e in self.complete_exports(export.dataset)
                         if e.export_id == export.export_id]
                if not again:
                    raise Unavailable("the export disappeared during its download") from None
                export = again[0]
                time.sleep(backoff(attempt, base=0.2))
                continue
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            files = tuple(sorted(folder / o.name for o in export.objects
                                 if o.name != export.marker))
            return Export(export.dataset, export.export_id, folder, files, export.marker)
        raise Unavailable(f"the export kept changing during {self.attempts} downloads")

    def _download(self, obj: RemoteObject, folder: Path) -> None:
        target = folder / obj.name
        part = target.with_name(target.name + ".part")

        def once() -> None:
            md5 = hashlib.md5(usedforsecurity=False)
            crc = Crc32c()
            size = 0
            try:
                with self.fs.open(f"{obj.path}#{obj.generation}", "rb",
                                  block_size=CHUNK, cache_type="none") as src, \
                        part.open("wb") as out:
                    while block := src.read(CHUNK):
                        out.write(block)
                        md5.update(block)
                        crc.update(block)
                        size += len(block)
                    out.flush()
                    os.fsync(out.fileno())
            except FileNotFoundError:
                part.unlink(missing_ok=True)
                raise Changed(f"{obj.name} generation {obj.generation} is gone") from None
            if size != obj.size:
                part.unlink(missing_ok=True)
                raise Changed(f"{obj.name}: {size} bytes read, {obj.size} listed")
            # A checksum that does not match the bucket's is corruption in transit: retried.
            if obj.md5 and base64.b64encode(md5.digest()).decode() != obj.md5:
                part.unlink(missing_ok=True)
                raise OSError(f"{obj.name}: md5 does not match the bucket's")
            if obj.crc32c and base64.b64encode(crc.digest()).decode() != obj.crc32c:
                part.unlink(missing_ok=True)
                raise OSError(f"{obj.name}: crc32c does not match the bucket's")
            part.rename(target)

        retrying(once, f"downloading {obj.name}", self.attempts)

    @staticmethod
    def discard(export: Export) -> None:
        shutil.rmtree(export.path, ignore_errors=True)
