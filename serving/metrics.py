"""Prometheus metrics, read from the live objects at scrape time (nothing on the request path)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from engine.store import Store
from loaders.updater import Updater

if TYPE_CHECKING:
    from serving.cache import ResponseCache
    from serving.remote import QueryProcess
    from serving.warm import Warmer

__all__ = ["CONTENT_TYPE", "CollectorRegistry", "LoopLag", "Metrics", "render"]
CONTENT_TYPE = CONTENT_TYPE_LATEST


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LoopLag:
    """How late the event loop runs a timer that is due: every request arriving then waits at
    least that long before its handler starts (a blocking call on the loop, a long GIL hold by
    another thread, a CPU the load leaves no room on). A probe sleeps `interval` seconds, over
    and over, and records each overshoot: ~20 wake-ups a second, nothing on the request path."""

    def __init__(self, registry: CollectorRegistry, interval: float = 0.05) -> None:
        self.interval = interval
        self.histogram = Histogram(
            "duckswap_event_loop_lag_seconds",
            "How late the event loop ran a due timer (requests wait at least that long)",
            buckets=LAG_BUCKETS, registry=registry)

    async def run(self) -> None:
        """Until cancelled."""
        loop = asyncio.get_running_loop()
        observe = self.histogram.observe
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            observe(max(0.0, loop.time() - due))


class Metrics(Collector):
    def __init__(self, store: Store, cache: ResponseCache, updater: Updater,
                 warmer: Warmer, process: QueryProcess | None = None,
                 query_errors: Mapping[tuple[str, str], int] | None = None) -> None:
        self.query_errors = query_errors if query_errors is not None else {}
        self.store = store
        self.cache = cache
        self.updater = updater
        self.warmer = warmer
        self.process = process

    def collect(self) -> Iterator[Metric]:
        c = self.cache
        lookups = CounterMetricFamily("duckswap_cache_lookups", "Response cache lookups",
                                      labels=["endpoint", "result"])
        for endpoint, (hits, misses) in sorted(list(c.by_endpoint.items())):
            lookups.add_metric([endpoint, "hit"], hits)
            lookups.add_metric([endpoint, "miss"], misses)
        yield lookups
        yield CounterMetricFamily("duckswap_cache_coalesced",
                                  "Misses that waited for an identical query in flight",
                                  value=c.coalesced)
        yield CounterMetricFamily("duckswap_cache_warmed",
                                  "Responses computed before a publish", value=c.warmed)
        yield CounterMetricFamily("duckswap_cache_pruned",
                                  "Responses of replaced versions dropped after a publish",
                                  value=c.pruned)
        failed = CounterMetricFamily("duckswap_query_errors", "Queries DuckDB refused at run "
                                     "time (answered 500), by endpoint and error",
                                     labels=["endpoint", "error"])
        for (endpoint, error), n in sorted(dict(self.query_errors).items()):
            failed.add_metric([endpoint, error], n)
        yield failed
        yield GaugeMetricFamily("duckswap_cache_bytes", "Bytes held by the response cache",
                                value=c.bytes)
        yield GaugeMetricFamily("duckswap_cache_entries", "Responses held", value=len(c))
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
        for name, v in sorted(self.store.current.versions.items()):
            info.add_metric([name, v.version_id, v.export_id], v.rows)
        yield info
        age = GaugeMetricFamily("duckswap_data_age_seconds",
                                "Seconds since the served version was loaded", labels=["dataset"])
        for name, seconds in sorted(self.updater.data_age().items()):
            age.add_metric([name], seconds)
        yield age
        pinned = GaugeMetricFamily("duckswap_dataset_pinned", "1 while an operator pins the "
                                   "dataset (the watcher does not advance it)", labels=["dataset"])
        for name, ds in sorted(self.updater.state.items()):
            pinned.add_metric([name], 1 if ds.pinned else 0)
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
        p = self.process
        if p is not None:
            yield GaugeMetricFamily("duckswap_query_process_up", "1 while the query process "
                                    "answers cache misses", value=1 if p.up else 0)
            queries = CounterMetricFamily("duckswap_query_process_queries",
                                          "Cache-miss queries (a batch counts once), by who "
                                          "answered",
                                          labels=["by"])
            queries.add_metric(["process"], p.answered)
            queries.add_metric(["server"], p.fallbacks)
            yield queries
            yield CounterMetricFamily("duckswap_query_process_restarts",
                                      "Restarts of the query process after it exited",
                                      value=p.restarts)
