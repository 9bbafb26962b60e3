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
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lmdb

from serving.responses import Entry, dumps

HEADER_KEY = b"\0versions"  # the X-Duckswap-Versions header of every answer in the file
# Keys are tiny; LMDB keeps its map's pages for values plus ~40% (page fill, branch pages).
MAP_FACTOR = 3
MAP_MIN = 64 << 20


def path_of(folder: Path, token: str) -> Path:
    return folder / f"{token}.lmdb"


def key_bytes(key: tuple[Any, ...]) -> bytes:
    return dumps(key)


def remove(path: Path) -> None:
    """Remove an answers file and its lock file (readers that have it open keep their map)."""
    for p in (path, Path(f"{path}-lock")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


class AnswersWriter:
    """Appends one token's answers (the build process's side)."""

    def __init__(self, path: Path, header: str, map_bytes: int) -> None:
        self.path = path
        # Every writer of a file maps it alike (readers take the size from the file).
        self.env = lmdb.open(str(path), subdir=False,
                             map_size=max(MAP_MIN, map_bytes * MAP_FACTOR),
                             sync=False, metasync=False, readahead=False, max_dbs=0)
        with self.env.begin(write=True) as txn:
            txn.put(HEADER_KEY, header.encode(), overwrite=False)

    def write(self, items: Iterable[tuple[tuple[Any, ...], bytes, str]]) -> bool:
        """Add (cache key, body, ETag) answers in one transaction, visible to readers as a
        whole. False when the file is full (nothing of this batch is written then)."""
        try:
            with self.env.begin(write=True) as txn:
                for key, body, tag in items:
                    txn.put(key_bytes(key), tag.encode() + body)
        except lmdb.MapFullError:
            return False
        return True

    def has(self, key: tuple[Any, ...]) -> bool:
        with self.env.begin() as txn:
            return txn.get(key_bytes(key)) is not None

    def close(self) -> None:
        self.env.close()


class AnswersFile:
    """Reads one token's answers (the request path's side)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.env = lmdb.open(str(path), subdir=False, readonly=True, lock=True,
                             readahead=False, max_dbs=0)
        with self.env.begin() as txn:
            header = txn.get(HEADER_KEY)
        self.header = header.decode() if header is not None else ""

    def get(self, key: tuple[Any, ...]) -> Entry | None:
        with self.env.begin() as txn:
            raw = txn.get(key_bytes(key))
        if raw is None:
            return None
        end = raw.index(b'"', 1) + 1  # a value is the ETag (quoted, no quote inside), the body
        return raw[end:], raw[:end].decode(), self.header

    def __contains__(self, key: tuple[Any, ...]) -> bool:
        with self.env.begin() as txn:
            return txn.get(key_bytes(key)) is not None

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
