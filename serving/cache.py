"""Response cache (bytes per version token and normalised parameters) and key popularity.

Only the event loop touches these objects. Entries are keyed by the endpoint's version token,
so a swap of a dataset an endpoint does not read leaves its entries valid. Two stores: the
answers warmed for a token, in its answers file (`engine.answers`: written by the build
process, memory-mapped here, shared by every worker through the page cache, and costing this
heap nothing), and an LRU of the answers this worker computed for cache misses, within its
byte budget.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Set
from pathlib import Path
from typing import Any

from cachetools import LRUCache

from engine.answers import AnswersFile
from engine.responses import Entry, entry_size

Key = tuple[str, tuple[Any, ...]]  # (version token, normalised parameters)


class ResponseCache:
    def __init__(self, max_bytes: int, answers_budget: int) -> None:
        self.max_bytes = max_bytes  # of the LRU of computed answers
        self.answers_budget = answers_budget  # the map of every answers file (see `map_size`)
        self._lru: LRUCache[Key, Entry] = LRUCache(
            maxsize=max(1, max_bytes), getsizeof=entry_size
        )
        self._files: dict[str, AnswersFile] = {}
        self.inflight: dict[Key, asyncio.Future[Entry]] = {}
        self.hits = 0
        self.misses = 0
        self.by_endpoint: dict[str, list[int]] = {}  # endpoint -> [hits, misses]
        self.coalesced = 0
        self.pruned = 0

    def _find(self, key: Key) -> Entry | None:
        answers = self._files.get(key[0])
        if answers is not None:
            entry = answers.get(key[1])
            if entry is not None:
                return entry
        return self._lru.get(key)

    def lookup(self, key: Key, endpoint: str = "") -> Entry | None:
        """The entry of `key`, counted as a hit or a miss of `endpoint`."""
        entry = self._find(key)
        counts = self.by_endpoint.get(endpoint)
        if counts is None:
            counts = self.by_endpoint[endpoint] = [0, 0]
        if entry is not None:
            self.hits += 1
            counts[0] += 1
        else:
            self.misses += 1
            counts[1] += 1
        return entry

    def peek(self, key: Key) -> Entry | None:
        """Look up without counting (for `?v=` of versions that may not be current)."""
        return self._find(key)

    def put(self, key: Key, entry: Entry) -> None:
        """Keep a computed answer, within the byte budget."""
        if entry_size(entry) <= self.max_bytes:
            self._lru[key] = entry

    def answers(self, token: str) -> AnswersFile | None:
        """The answers file opened for `token`."""
        return self._files.get(token)

    def open(self, files: Mapping[str, Path]) -> dict[str, AnswersFile]:
        """The answers files (token -> path) a warm wrote, of tokens not served yet, opened
        for `serve`: off the event loop (an open took up to 10 ms under load)."""
        return {token: AnswersFile(path, self.answers_budget) for token, path in files.items()
                if token not in self._files and path.exists()}

    def serve(self, opened: Mapping[str, AnswersFile]) -> None:
        """Serve answers files from `open` as their tokens' warmed answers. A file may grow
        later: its new answers are served as soon as they are written."""
        self._files.update(opened)

    async def retain(self, live: frozenset[str], chunk: int = 500,
                     pause: float = 0.002) -> None:
        """Drop the answers of every token not in `live` (versions neither served nor just
        replaced: a `?v=` for them is a redirect anyway): answers files are closed (the
        loader removes them), computed answers go a chunk at a time between requests."""
        dropped = [self._files.pop(t) for t in [t for t in self._files if t not in live]]
        if dropped:
            self.pruned += sum(len(answers) for answers in dropped)
            # Off the event loop: unmapping the pages requests read held it 40 ms under load.
            # Nothing on the loop holds a dropped file past here (a lookup never awaits).
            await asyncio.to_thread(_close, dropped)
        keys = list(self._lru)
        for start in range(0, len(keys), chunk):
            n = 0
            for key in keys[start:start + chunk]:
                if key[0] not in live and key in self._lru:
                    del self._lru[key]
                    n += 1
            self.pruned += n
            await asyncio.sleep(pause)

    def close(self) -> None:
        for answers in self._files.values():
            answers.close()
        self._files.clear()

    def tokens(self) -> set[str]:
        """The version tokens that have entries."""
        return {key[0] for key in self._lru} | {t for t, a in self._files.items() if len(a)}

    def __contains__(self, key: Key) -> bool:
        return self._find(key) is not None

    @property
    def bytes(self) -> int:
        """Bytes of computed answers held (the answers files are in the page cache)."""
        return int(self._lru.currsize)

    def __len__(self) -> int:
        return len(self._lru) + sum(len(a) for a in self._files.values())


def _close(files: list[AnswersFile]) -> None:
    for answers in files:
        answers.close()


class Popularity:
    """Request counts per endpoint and normalised parameters, bounded; the warmer's guide.

    Counts are halved when a table outgrows twice its limit, so old favourites fade, and the
    keys whose count falls to 0 are forgotten (those asked for once since the last halving). A
    second count per endpoint, the window, starts afresh at each warm (`take_window`): what was
    asked for since the last one, for the warmer to tell how many requests a publish would
    leave to cache misses.
    """

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self._counts: dict[str, Counter[tuple[Any, ...]]] = {}
        self._window: dict[str, Counter[tuple[Any, ...]]] = {}
        self._window_start = clock()

    def seen(self, endpoint: str, key: tuple[Any, ...]) -> None:
        if not self.limit:
            return
        counts = self._counts.get(endpoint)
        if counts is None:
            counts = self._counts[endpoint] = Counter()
            self._window[endpoint] = Counter()
        counts[key] += 1
        window = self._window[endpoint]
        if key in window or len(window) < WINDOW_KEYS * self.limit:  # bounded too
            window[key] += 1
        if len(counts) > 2 * self.limit:
            # On the request path: one pass, ~0.5-1.3 ms for 20,000 keys (`most_common` of
            # half of them took 6-9 ms, a stall of the event loop every few seconds at 5000
            # req/s). A table that keeps outgrowing its limit loses its one-offs at each pass.
            self._counts[endpoint] = Counter({k: c >> 1 for k, c in counts.items() if c > 1})

    def counts(self, endpoints: Iterable[str]) -> dict[str, dict[tuple[Any, ...], int]]:
        """A copy of the counts of `endpoints`, for `hottest` off the event loop (~0.3 ms per
        20,000 keys)."""
        return {e: dict(c) for e in endpoints if (c := self._counts.get(e))}

    def take_window(self) -> tuple[dict[str, Counter[tuple[Any, ...]]], float]:
        """The counts per endpoint since the last call (or since the start) and the seconds
        they cover; a new window starts. The returned counters are not touched again."""
        now = self.clock()
        window, seconds = self._window, now - self._window_start
        self._window = {e: Counter() for e in window}
        self._window_start = now
        return window, seconds


def hottest(counts: Mapping[tuple[Any, ...], int],
            n: int) -> list[tuple[tuple[Any, ...], int]]:
    """The `n` most requested keys in `counts` with their counts, most first (ties in the
    order counted). Runs on a worker's thread (`Worker.hot`): `sorted` would hold the GIL the
    event loop needs 3-12 ms in one C call; grouping the keys by count is bytecode the loop
    can take the GIL back from each switch interval, ~3-4 ms in all for the top 10,000 of
    20,000 keys (heapq.nlargest: ~30 ms; Arrow's sort, which lets go of it, cost the server
    ~50 MB of RSS to import)."""
    by_count: dict[int, list[tuple[Any, ...]]] = {}
    for key, count in counts.items():
        by_count.setdefault(count, []).append(key)
    out: list[tuple[tuple[Any, ...], int]] = []
    for count in sorted(by_count, reverse=True):  # a few hundred distinct counts
        out.extend([(key, count) for key in by_count[count][:n - len(out)]])
        if len(out) >= n:
            break
    return out


WINDOW_KEYS = 4  # a window counts at most this many times `limit` distinct keys per endpoint


def would_miss(window: Mapping[tuple[Any, ...], int], hot: Set[tuple[Any, ...]],
               warmed: AnswersFile | Set[tuple[Any, ...]] | None) -> int:
    """Requests in `window` for keys `warmed` had an answer for that are not `hot`: each one
    met by a cache miss had a version been published with the `hot` keys only."""
    if warmed is None:
        return 0
    return sum(count for k, count in window.items() if k not in hot and k in warmed)
