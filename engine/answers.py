"""Answers files: the warmed answers of one endpoint version (token), in an LMDB file.

A warm writes an endpoint version's encoded answers into `<answers dir>/<token>.lmdb` (in the
build process), and the request path reads them from there: memory-mapped, so they live in the
page cache, not in the server's heap, and cost its collector and its GIL nothing to take in.
The file only grows: an answer, once written, never changes (it is a pure function of the token
and the key), and readers see each committed batch at once (LMDB's MVCC), so the warm after a
publish adds answers while requests read. LMDB over SQLite: a lookup took ~2 us against ~15 us,
a write of 10^5 answers ~0.7-1.0 s against ~1.7 s (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lmdb

from engine.responses import Entry, dumps

log = logging.getLogger("duckswap.cache")

HEADER_KEY = b"\0versions"  # the X-Duckswap-Versions header of every answer in the file
# Keys are tiny; LMDB keeps its map's pages for values plus ~40% (page fill, branch pages).
MAP_FACTOR = 3
MAP_MIN = 64 << 20


def map_size(budget: int) -> int:
    """The map of every writer and reader of an answers file: LMDB refuses a read beyond the
    map a reader opened with (MDB_MAP_RESIZED), and a file grows while it is read."""
    return max(MAP_MIN, budget * MAP_FACTOR)


def path_of(folder: Path, token: str) -> Path:
    return folder / f"{token}.lmdb"


def key_bytes(key: tuple[Any, ...]) -> bytes:
    return dumps(key)


def value(tag: str, body: bytes) -> bytes:
    """An answer as its file holds it: the ETag (quoted, no quote inside), then the body."""
    return tag.encode() + body


def remove(path: Path) -> None:
    """Remove an answers file and its lock file (readers that have it open keep their map)."""
    for p in (path, Path(f"{path}-lock")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


class AnswersWriter:
    """Appends one token's answers (the build process's side)."""

    def __init__(self, path: Path, header: str, budget: int) -> None:
        self.path = path
        self.env = lmdb.open(str(path), subdir=False, map_size=map_size(budget),
                             sync=False, metasync=False, readahead=False, max_dbs=0)
        with self.env.begin(write=True) as txn:
            txn.put(HEADER_KEY, header.encode(), overwrite=False)
        # An earlier warm's answers are in the file (the pass before the publish, for the one
        # after it): `had` looks them up; a new file needs no lookup per key.
        self._earlier = int(self.env.stat()["entries"]) > 1

    def write(self, items: Iterable[tuple[bytes, bytes]]) -> bool:
        """Add (encoded cache key (`key_bytes`), `value(ETag, body)`) answers in one
        transaction, visible to readers as a whole. False when the file is full (nothing of
        this batch is written then)."""
        try:
            with self.env.begin(write=True) as txn:
                txn.cursor().putmulti(items)
        except lmdb.MapFullError:
            return False
        return True

    def had(self, key: tuple[Any, ...]) -> bool:
        """Whether `key` was answered before this writer opened the file."""
        if not self._earlier:
            return False
        with self.env.begin() as txn:
            return txn.get(key_bytes(key)) is not None

    def close(self) -> None:
        self.env.close()


class AnswersFile:
    """Reads one token's answers (the request path's side)."""

    def __init__(self, path: Path, budget: int) -> None:
        self.path = path
        self.failed = False
        self.env = lmdb.open(str(path), subdir=False, readonly=True, lock=True,
                             map_size=map_size(budget), readahead=False, max_dbs=0)
        header = self._get(HEADER_KEY)
        self.header = header.decode() if header is not None else ""

    def _get(self, key: bytes) -> bytes | None:
        try:
            with self.env.begin() as txn:
                return txn.get(key)
        except lmdb.MapResizedError:  # written with a larger map: adopt it (no txn open)
            self.env.set_mapsize(0)
            with self.env.begin() as txn:
                return txn.get(key)

    def get(self, key: tuple[Any, ...]) -> Entry | None:
        """The answer of `key`, or None: not warmed, or the file cannot be read (logged
        once; the request is then answered by a query, as a miss)."""
        try:
            raw = self._get(key_bytes(key))
        except lmdb.Error as exc:
            if not self.failed:
                self.failed = True
                log.error("answers file %s cannot be read (%s); its keys are answered by "
                          "queries", self.path.name, exc)
            return None
        if raw is None:
            return None
        end = raw.index(b'"', 1) + 1  # see `value`
        return raw[end:], raw[:end].decode(), self.header

    def __contains__(self, key: tuple[Any, ...]) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return max(0, int(self.env.stat()["entries"]) - 1)  # the header is no answer

    @property
    def size(self) -> int:
        """Bytes of the file on disk (the page cache holds what is read)."""
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def close(self) -> None:
        self.env.close()
