"""Prometheus metrics, rendered by the loader at scrape time: its own state, and the counts of
every worker summed (nothing on the request path)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from engine.buckets import LAG_BUCKETS, REQUEST_BUCKETS, add_counts
from engine.store import Snapshot
from loaders.updater import Updater
from loaders.warm import Warmer

CONTENT_TYPE = CONTENT_TYPE_LATEST


def render(updater: Updater, warmer: Warmer, workers: Sequence[Mapping[str, Any]],
           endpoints: Sequence[str], restarts: int = 0) -> bytes:
    """The `/metrics` document: the loader's state and `workers`' counts summed."""
    registry = CollectorRegistry()
    registry.register(Metrics(updater, warmer, workers, endpoints, restarts))
    return generate_latest(registry)


def lookup_totals(workers: Sequence[Mapping[str, Any]],
                  endpoints: Sequence[str]) -> dict[str, list[float]]:
    """Each endpoint's [cache hits, misses], every worker's summed."""
    out: dict[str, list[float]] = {e: [0, 0] for e in endpoints}
    for w in workers:
        for endpoint, hits_misses in w.get("lookups", {}).items():
            add_counts(out, endpoint, hits_misses)
    return out


def request_totals(workers: Sequence[Mapping[str, Any]], window: str = "total"
                   ) -> dict[str, list[float]]:
    """Each endpoint's request duration bucket counts, every worker's summed: since the start
    (`total`, then the sum of seconds) or over the last minute (`minute`)."""
    out: dict[str, list[float]] = {}
    for w in workers:
        for endpoint, counts in w.get("times", {}).get(window, {}).items():
            add_counts(out, endpoint, counts)
    return out


def _cumulative(bounds: Sequence[float], counts: Sequence[float]) -> list[tuple[str, float]]:
    out, running = [], 0.0
    for bound, n in zip([*map(str, bounds), "+Inf"], counts, strict=True):
        running += n
        out.append((bound, running))
    return out


class Metrics(Collector):
    def __init__(self, updater: Updater, warmer: Warmer, workers: Sequence[Mapping[str, Any]],
                 endpoints: Sequence[str], restarts: int = 0) -> None:
        self.updater = updater
        self.warmer = warmer
        self.workers = workers
        self.endpoints = endpoints
        self.restarts = restarts

    def _sum(self, name: str) -> int:
        return sum(int(w.get(name, 0)) for w in self.workers)

    def collect(self) -> Iterator[Metric]:
        lookups = CounterMetricFamily("duckswap_cache_lookups", "Response cache lookups",
                                      labels=["endpoint", "result"])
        errors: Counter[tuple[str, str]] = Counter()
        for w in self.workers:
            errors.update(w.get("query_errors", {}))
        for endpoint, (hits, misses) in sorted(lookup_totals(self.workers,
                                                             self.endpoints).items()):
            lookups.add_metric([endpoint, "hit"], hits)
            lookups.add_metric([endpoint, "miss"], misses)
        yield lookups
        yield CounterMetricFamily("duckswap_cache_coalesced",
                                  "Misses that waited for an identical query in flight",
                                  value=self._sum("coalesced"))
        yield CounterMetricFamily("duckswap_cache_warmed", "Responses computed by warms",
                                  value=self.warmer.warmed)
        yield CounterMetricFamily("duckswap_cache_pruned",
                                  "Computed responses of replaced versions dropped",
                                  value=self._sum("pruned"))
        failed = CounterMetricFamily("duckswap_query_errors", "Queries DuckDB refused at run "
                                     "time (answered 500), by endpoint and error",
                                     labels=["endpoint", "error"])
        for (endpoint, error), n in sorted(errors.items()):
            failed.add_metric([endpoint, error], n)
        yield failed
        yield GaugeMetricFamily("duckswap_cache_bytes", "Bytes of computed responses the "
                                "workers hold (the warmed ones are in answers files)",
                                value=self._sum("cache_bytes"))
        yield GaugeMetricFamily("duckswap_cache_entries", "Responses held (answers files "
                                "counted once per worker)", value=self._sum("cache_entries"))
        yield GaugeMetricFamily("duckswap_workers", "HTTP worker processes answering",
                                value=len(self.workers))
        yield CounterMetricFamily("duckswap_worker_restarts",
                                  "HTTP workers started again after they exited",
                                  value=self.restarts)
        lag = HistogramMetricFamily(
            "duckswap_event_loop_lag_seconds",
            "How late a worker's event loop ran a due timer (requests wait at least that long)")
        buckets = [0] * (len(LAG_BUCKETS) + 1)
        total = 0.0
        for w in self.workers:
            got = w.get("lag", {})
            for i, n in enumerate(got.get("buckets", [])):
                buckets[i] += n
            total += got.get("sum", 0.0)
        lag.add_metric([], _cumulative(LAG_BUCKETS, buckets), total)
        yield lag
        times = HistogramMetricFamily(
            "duckswap_request_duration_seconds",
            "Declared endpoints' requests, handler start to answer", labels=["endpoint"])
        for endpoint, counts in sorted(request_totals(self.workers).items()):
            times.add_metric([endpoint], _cumulative(REQUEST_BUCKETS, counts[:-1]), counts[-1])
        yield times
        loads = CounterMetricFamily("duckswap_loads", "Exports built, by outcome",
                                    labels=["dataset", "outcome"])
        for (dataset, outcome), n in sorted(self.updater.outcomes.items()):
            loads.add_metric([dataset, outcome], n)
        yield loads
        refused = GaugeMetricFamily("duckswap_refused_exports", "Exports refused, not retried",
                                    labels=["dataset"])
        per: dict[str, int] = {}
        for dataset, _ in self.updater.refused:  # quarantined, not retried until changed
            per[dataset] = per.get(dataset, 0) + 1
        for dataset, n in sorted(per.items()):
            refused.add_metric([dataset], n)
        yield refused
        late = GaugeMetricFamily("duckswap_incomplete_runs", "Runs of a group complete in some "
                                 "of its datasets only for longer than its incomplete_seconds "
                                 "(not published)", labels=["group"])
        overdue = Counter(g for g, _ in list(self.updater.overdue))
        for group in sorted(self.updater.groups):
            late.add_metric([group], overdue.get(group, 0))
        yield late
        info = GaugeMetricFamily("duckswap_dataset_rows", "Rows of the served version",
                                 labels=["dataset", "version", "export_id"])
        current: Snapshot = self.updater.catalog.current
        for name, v in sorted(current.versions.items()):
            info.add_metric([name, v.version_id, v.export_id], v.rows)
        yield info
        age = GaugeMetricFamily("duckswap_data_age_seconds",
                                "Seconds since the served version was loaded", labels=["dataset"])
        for name, seconds in sorted(self.updater.data_age().items()):
            age.add_metric([name], seconds)
        yield age
        written = GaugeMetricFamily(
            "duckswap_export_age_seconds", "Seconds since the served export was complete in the "
            "source (its marker's time): the same on every replica, and across restarts",
            labels=["dataset"])
        for name, seconds in sorted(self.updater.export_age().items()):
            written.add_metric([name], seconds)
        yield written
        pinned = GaugeMetricFamily("duckswap_dataset_pinned", "1 while an operator pins the "
                                   "dataset, or its config names an export (the watcher does not "
                                   "advance it)", labels=["dataset"])
        for name, ds in sorted(self.updater.state.items()):
            held = ds.pinned or self.updater.config_export(name)
            pinned.add_metric([name], 1 if held else 0)
        yield pinned
        last = self.warmer.last
        yield GaugeMetricFamily("duckswap_warm_last_seconds", "Duration of the last warm",
                                value=last.seconds if last else 0.0)
        yield GaugeMetricFamily("duckswap_warm_last_entries", "Responses of the last warm",
                                value=last.entries if last else 0)
        yield GaugeMetricFamily("duckswap_warm_last_extended", "1 when the last warm before a "
                                "publish went on past its time budget (a busy machine)",
                                value=1 if last and last.extended else 0)
        yield GaugeMetricFamily("duckswap_warm_last_beyond_hot_requests_per_second",
                                "Requests a second, before the last warm, for warmed answers "
                                f"beyond the hot keys: from {self.warmer.miss_rate:g} a publish "
                                "waits for the declared keys",
                                value=last.would_miss if last else 0.0)
