"""A worker's own measurements for `/metrics`: the event loop's lag. (The loader renders the
document: its counts and the sum of every worker's, `loaders.metrics`.)"""

from __future__ import annotations

import asyncio
import bisect

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


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
