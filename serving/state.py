"""What the handlers reach through the app: its typed keys, and `Serving`, a worker's request
path state (version tokens per Snapshot, the response cache, popularity, the pointer document,
what the loader last said)."""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import replace
from typing import Any

from aiohttp import web

from engine.fold import Constants, fold_endpoints
from engine.keys import WARM_KEYS
from engine.plan import batch_sql
from engine.query import QueryRunner
from engine.responses import dumps, endpoint_tokens, fingerprint
from engine.settings import Settings
from engine.store import Replica, Snapshot
from serving.batcher import Batcher
from serving.cache import Popularity, ResponseCache
from serving.metrics import LoopLag, RequestTimes

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Replica)
RUNNER = web.AppKey("runner", QueryRunner)


class Serving:
    """Request-path state: version tokens per Snapshot, the response cache, popularity."""

    def __init__(self, settings: Settings, store: Replica, runner: QueryRunner,
                 workers: int = 1) -> None:
        self.store = store
        self.endpoints = settings.endpoints
        self.fingerprints = {n: fingerprint(e) for n, e in settings.endpoints.items()}
        budget = int(settings.cache_mb * 2**20)
        # The answers files are shared; each worker's computed answers are its own.
        self.cache = ResponseCache(budget // max(1, workers), budget)
        for name in settings.endpoints:  # every endpoint's series exists from the start
            self.cache.by_endpoint[name] = [0, 0]
        self.popularity = Popularity(WARM_KEYS)
        self._tokens: dict[int, dict[str, str]] = {}
        self._pointer: tuple[tuple[int, Any], bytes, str] | None = None
        # Constant subqueries run once per version, not per query (see `engine.fold`); the
        # batched plans are of the folded SQL.
        self.constants = Constants(fold_endpoints(settings))
        folded = self.constants.folded
        self.batch_sql = {
            n: batch_sql(replace(e, sql=folded[n].sql) if n in folded else e)
            for n, e in settings.endpoints.items()
        }
        self.batcher = Batcher(runner, self.constants)
        self.stopping = False  # a stop began: /readyz answers 503 from then on
        self.query_errors: dict[tuple[str, str], int] = {}  # (endpoint, DuckDB error) -> count
        self.status: dict[str, Any] = {}  # what the loader last said (`loaders.loader.status`)
        self.lag = LoopLag()
        self.times = RequestTimes()

    def tokens(self, snap: Snapshot) -> dict[str, str]:
        """Token of every endpoint whose datasets are all loaded in `snap` (memoised)."""
        tokens = self._tokens.get(snap.id)
        if tokens is None:
            tokens = endpoint_tokens(self.endpoints, self.fingerprints, snap)
            if len(self._tokens) >= 8:
                del self._tokens[min(self._tokens)]
            self._tokens[snap.id] = tokens
        return tokens

    def pointer(self) -> tuple[bytes, str]:
        """The encoded `/v1/version` document of the current Snapshot and its ETag."""
        snap = self.store.current
        pending = self.status.get("pending") or {}
        if self._pointer is None or self._pointer[0] != (snap.id, pending):
            tokens = self.tokens(snap)
            doc: dict[str, Any] = {
                "datasets": {
                    n: {"version": v.version_id, "export_id": v.export_id, "rows": v.rows}
                    for n, v in sorted(snap.versions.items())
                },
                "endpoints": {
                    n: {"path": e.path, "token": tokens.get(n)}
                    for n, e in self.endpoints.items()
                },
            }
            if pending:  # exports being written: parts, no marker yet
                doc["pending"] = {n: [{"export_id": p["export_id"], "since": _iso(p["since"])}
                                      for p in items] for n, items in sorted(pending.items())}
            body = dumps(doc)
            tag = '"' + hashlib.blake2b(body, digest_size=8).hexdigest() + '"'
            self._pointer = ((snap.id, pending), body, tag)
        return self._pointer[1], self._pointer[2]

    def counters(self) -> dict[str, Any]:
        """This worker's counts, for the loader to sum into `/metrics`."""
        c = self.cache
        return {
            "lookups": {e: list(v) for e, v in c.by_endpoint.items()},
            "coalesced": c.coalesced, "pruned": c.pruned,
            "query_errors": dict(self.query_errors),
            "cache_bytes": c.bytes, "cache_entries": len(c),
            "lag": self.lag.counts(),
            "times": self.times.counts(),
        }


SERVING = web.AppKey("serving", Serving)


def _iso(t: float) -> str:
    """A Unix time as UTC ISO 8601 to the second."""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")
