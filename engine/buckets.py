"""Histogram bounds shared by the workers, which count, and the loader, which renders
(`/metrics`, the status page); in seconds, the last bucket being everything above."""

from __future__ import annotations

from collections.abc import Sequence

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
REQUEST_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0)


def add_counts(into: dict[str, list[float]], key: str, counts: Sequence[float]) -> None:
    """Add `counts` (per bucket, or any list of counts) into `into[key]`, element by element:
    how every worker's counts, or every slot's, are summed."""
    got = into.setdefault(key, [0.0] * len(counts))
    for i, n in enumerate(counts):
        got[i] += n


def quantile(counts: Sequence[float], q: float) -> float | None:
    """The `q` quantile of a `REQUEST_BUCKETS` histogram: the upper bound of the bucket it
    falls in (None without requests; above the largest bound, that bound)."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0.0
    for i, n in enumerate(counts):
        seen += n
        if seen >= rank:
            return REQUEST_BUCKETS[min(i, len(REQUEST_BUCKETS) - 1)]
    return REQUEST_BUCKETS[-1]
