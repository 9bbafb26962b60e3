"""A worker's own measurements for `/metrics` and the status page: the event loop's lag and
the requests' durations. (The loader renders both: its counts and the sum of every worker's,
`loaders.metrics`, `loaders.status`.)"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable
from typing import Any

from engine.buckets import LAG_BUCKETS, REQUEST_BUCKETS, add_counts


class LoopLag:
    """How late the event loop runs a timer that is due: every request arriving then waits at
    least that long before its handler starts (a blocking call on the loop, a CPU the load
    leaves no room on). A probe sleeps `interval` seconds, over and over, and counts each
    overshoot in `LAG_BUCKETS`: ~20 wake-ups a second, nothing on the request path."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.buckets = [0] * (len(LAG_BUCKETS) + 1)  # the last: over the largest bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(LAG_BUCKETS, seconds)] += 1
        self.sum += seconds

    def counts(self) -> dict[str, object]:
        return {"buckets": list(self.buckets), "sum": self.sum}

    async def run(self) -> None:
        """Until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.observe(max(0.0, loop.time() - due))


SLOT_SECONDS = 10.0  # the last minute is six slots of ten seconds
SLOTS = 6


class RequestTimes:
    """Each endpoint's request durations, handler start to answer (~1 us a request): since the
    start, for `/metrics`, and over the last minute in ten-second slots, for the status page's
    rate and percentiles."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.total: dict[str, list[float]] = {}  # endpoint -> bucket counts..., sum
        self._slots: list[tuple[int, dict[str, list[int]]]] = []  # (slot number, counts)

    def observe(self, endpoint: str, seconds: float) -> None:
        i = bisect.bisect_left(REQUEST_BUCKETS, seconds)
        total = self.total.get(endpoint)
        if total is None:
            total = self.total[endpoint] = [0.0] * (len(REQUEST_BUCKETS) + 2)
        total[i] += 1
        total[-1] += seconds
        slot = int(self.clock() // SLOT_SECONDS)
        if not self._slots or self._slots[-1][0] != slot:
            self._slots = [s for s in self._slots if s[0] > slot - SLOTS]
            self._slots.append((slot, {}))
        counts = self._slots[-1][1].get(endpoint)
        if counts is None:
            counts = self._slots[-1][1][endpoint] = [0] * (len(REQUEST_BUCKETS) + 1)
        counts[i] += 1

    def counts(self) -> dict[str, Any]:
        """`total`: endpoint -> bucket counts and the sum of seconds; `minute`: endpoint ->
        bucket counts over the last full minute (the current slot and five before)."""
        now = int(self.clock() // SLOT_SECONDS)
        minute: dict[str, list[float]] = {}
        for slot, per in self._slots:
            if slot > now - SLOTS:
                for endpoint, counts in per.items():
                    add_counts(minute, endpoint, counts)
        return {"total": {e: list(t) for e, t in self.total.items()}, "minute": minute}
