"""Response cache (bytes per version token and normalised parameters) and key popularity.

Only the event loop touches these objects; the warmer reaches them through the loop.
Entries are keyed by the endpoint's version token, so a swap of a dataset an endpoint does not
read leaves its entries valid, and entries of replaced versions simply age out of the LRU.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from typing import Any

from cachetools import LRUCache

from serving.responses import Entry, entry_size

Key = tuple[str, tuple[Any, ...]]  # (version token, normalised parameters)


class ResponseCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lru: LRUCache[Key, Entry] = LRUCache(
            maxsize=max(1, max_bytes), getsizeof=entry_size
        )
        self.inflight: dict[Key, asyncio.Future[Entry]] = {}
        self.hits = 0
        self.misses = 0
        self.by_endpoint: dict[str, list[int]] = {}  # endpoint -> [hits, misses]
        self.coalesced = 0
        self.warmed = 0
        self.pruned = 0

    def get(self, key: Key, endpoint: str = "") -> Entry | None:
        entry = self._lru.get(key)
        counts = self.by_endpoint.get(endpoint)
        if counts is None:
            counts = self.by_endpoint[endpoint] = [0, 0]
        if entry is None:
            self.misses += 1
            counts[1] += 1
        else:
            self.hits += 1
            counts[0] += 1
        return entry

    def peek(self, key: Key) -> Entry | None:
        """Look up without counting (for `?v=` of versions that may not be current)."""
        return self._lru.get(key)

    def put(self, key: Key, entry: Entry) -> None:
        if entry_size(entry) <= self.max_bytes:
            self._lru[key] = entry

    def put_many(self, items: Iterable[tuple[Key, Entry]]) -> int:
        n = 0
        for key, entry in items:
            self.put(key, entry)
            n += 1
        self.warmed += n
        return n

    async def put_chunks(self, chunks: Iterable[Iterable[tuple[Key, Entry]]],
                         pause: float = 0.002) -> int:
        """Insert warmed answers a chunk at a time, pausing between chunks: ~10^5 answers
        inserted back to back held requests up for a second or more."""
        n = 0
        for chunk in chunks:
            n += self.put_many(chunk)
            # A real pause, not sleep(0): see `retain`.
            await asyncio.sleep(pause)
        return n

    async def retain(self, live: frozenset[str], chunk: int = 500,
                     pause: float = 0.002) -> int:
        """Drop the entries of every token not in `live` (versions neither served nor just
        replaced: a `?v=` for them is a redirect anyway), a chunk at a time between requests,
        so old versions' answers do not sit in memory until the byte budget pushes them out.
        Returns how many were dropped."""
        keys = list(self._lru)
        dropped = 0
        for start in range(0, len(keys), chunk):
            n = 0
            for key in keys[start:start + chunk]:
                if key[0] not in live and key in self._lru:
                    del self._lru[key]
                    n += 1
            self.pruned += n
            dropped += n
            # A real pause, not sleep(0): the loop then waits in select() without the GIL,
            # so the query threads get it (they wait a whole switch interval otherwise).
            await asyncio.sleep(pause)
        return dropped

    def tokens(self) -> set[str]:
        """The version tokens that have entries."""
        return {key[0] for key in self._lru}

    def __contains__(self, key: Key) -> bool:
        return key in self._lru

    @property
    def bytes(self) -> int:
        return int(self._lru.currsize)

    def __len__(self) -> int:
        return len(self._lru)

    def stats(self) -> dict[str, Any]:
        looked = self.hits + self.misses
        return {
            "entries": len(self._lru),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "coalesced": self.coalesced,
            "warmed": self.warmed,
            "pruned": self.pruned,
            "hit_ratio": round(self.hits / looked, 4) if looked else None,
        }


class Popularity:
    """Request counts per endpoint and normalised parameters, bounded; the warmer's guide.

    Counts are halved when a table outgrows twice its limit, so old favourites fade.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, Counter[tuple[Any, ...]]] = {}

    def seen(self, endpoint: str, key: tuple[Any, ...]) -> None:
        if not self.limit:
            return
        counts = self._counts.get(endpoint)
        if counts is None:
            counts = self._counts[endpoint] = Counter()
        counts[key] += 1
        if len(counts) > 2 * self.limit:
            kept = counts.most_common(self.limit)
            counts.clear()
            counts.update({k: max(1, c // 2) for k, c in kept})

    def hottest(self, endpoint: str, n: int) -> list[tuple[tuple[Any, ...], int]]:
        """The `n` most requested keys of an endpoint with their counts, most first."""
        counts = self._counts.get(endpoint)
        return counts.most_common(n) if counts else []
