"""The status page (`GET /status`; with the admin token, `/admin/status`): what is served, how
fresh it is, what was refused or is pending, the cache's hit ratio, each endpoint's request rate
and P50/P99 over the last minute, and the loader and workers. One HTML document rendered by the
loader from the same state as the admin API and `/metrics`: no script, no asset from anywhere,
refreshed by the browser every 10 s.

Public: versions, rows, ages, counts, timings. With the admin token only: the source's URL, why
each export was refused, and the workers' process ids.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from engine.buckets import quantile
from engine.precompute import WarmReport
from engine.settings import Settings
from loaders.admin import dataset_doc
from loaders.metrics import lookup_totals, request_totals
from loaders.updater import Updater
from loaders.warm import Warmer

CONTENT_TYPE = "text/html; charset=utf-8"
LOADS = 5  # last loads shown per dataset
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;margin:.2em 0}th,td{padding:.25em .7em;text-align:left;
border-bottom:1px solid #ddd;vertical-align:top}th{background:#f4f4f4}
td.n{text-align:right;font-variant-numeric:tabular-nums}.bad{color:#b00020}.ok{color:#1b7f3b}
.muted{color:#777}code{font-size:.95em}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"&le; {seconds * 1000:g} ms"


def _cell(key: str, text: str, numeric: bool = False, cls: str = "") -> str:
    """A table cell; `data-k` names the figure, for tests and scrapers."""
    classes = " ".join(c for c in ("n" if numeric else "", cls) if c)
    attr = f' class="{classes}"' if classes else ""
    return f'<td data-k="{_e(key)}"{attr}>{text}</td>'


def _pinned(d: Mapping[str, Any]) -> str:
    if d["export_from_config"]:
        problem = f", {_e(d['config_problem'])}" if d["config_problem"] else ""
        return (f' <span class="muted">(export {_e(d["export_from_config"])} named by the '
                f"config{problem})</span>")
    return ' <span class="muted">(pinned)</span>' if d["pinned"] else ""


def _table(head: Sequence[str], rows: Sequence[str]) -> str:
    if not rows:
        return '<p class="muted">none</p>'
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    return f"<table><tr>{th}</tr>{''.join(f'<tr>{r}</tr>' for r in rows)}</table>"


def render(updater: Updater, warmer: Warmer, settings: Settings,
           workers: Sequence[Mapping[str, Any]], restarts: int, pids: Sequence[int],
           admin: bool) -> bytes:
    now = time.time()
    docs = [dataset_doc(updater, n) for n in sorted(updater.state)]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name=viewport content="width=device-width,initial-scale=1">',
        '<meta http-equiv=refresh content="10">',
        f"<title>duckswap status</title><style>{STYLE}</style></head><body>",
        "<h1>duckswap status</h1>",
        f'<p class=muted>{_e(datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"))}'
        f"{' &middot; admin view' if admin else ''} &middot; refreshed every 10 s &middot; "
        '<a href="/v1/version">/v1/version</a> &middot; <a href="/metrics">/metrics</a> '
        '&middot; <a href="/openapi.json">/openapi.json</a></p>',
    ]
    parts.append("<h2>Datasets</h2>")
    rows = []
    for d in docs:
        served = d["served"] or {}
        name = d["name"]
        pending = ", ".join(f"{p['export_id']} ({_age(p['age_s'])})" for p in d["pending"])
        refused = len(d["quarantined"])
        rows.append("".join([
            f"<td><b>{_e(name)}</b>{_pinned(d)}</td>",
            _cell(f"{name}.version", f"<code>{_e(served.get('version', '-'))}</code>"),
            _cell(f"{name}.export_id", _e(served.get("export_id", "-"))),
            _cell(f"{name}.rows", _e(served.get("rows", "-")), numeric=True),
            _cell(f"{name}.age", _age(d["data_age_s"]), numeric=True),
            _cell(f"{name}.pending", _e(pending) or '<span class="muted">-</span>'),
            _cell(f"{name}.refused", str(refused), numeric=True,
                  cls="bad" if refused else ""),
        ]))
    parts.append(_table(["dataset", "served version", "export", "rows", "data age",
                         "pending (parts, no marker)", "refused"], rows))
    parts.append("<h2>Last loads</h2>")
    rows = []
    for d in docs:
        for event in d["history"][:LOADS]:
            timings = ", ".join(f"{k} {v:.3f} s" for k, v in event["timings_s"].items())
            outcome = event["outcome"]
            reason = event["reason"] if admin else ("(admin view)" if event["reason"] else "")
            rows.append("".join([
                f"<td>{_e(d['name'])}</td>", f"<td>{_e(event['at'])}</td>",
                f"<td>{_e(event['export_id'])}</td>",
                f'<td class="{"ok" if outcome == "loaded" else "bad"}">{_e(outcome)}</td>',
                f'<td class="n">{event["seconds"]:.3f} s</td>', f"<td>{_e(timings)}</td>",
                f"<td>{_e(reason)}</td>",
            ]))
    parts.append(_table(["dataset", "at", "export", "outcome", "took", "steps", "reason"],
                        rows))
    if admin:
        parts.append("<h2>Refused exports</h2>")
        parts.append(_table(["dataset", "export", "at", "reason"], [
            f"<td>{_e(d['name'])}</td><td>{_e(q['export_id'])}</td><td>{_e(q['at'])}</td>"
            f'<td class="bad">{_e(q["reason"])}</td>'
            for d in docs for q in d["quarantined"]]))
    parts.append("<h2>Endpoints (the last minute)</h2>")
    hits_misses = lookup_totals(workers, list(settings.endpoints))
    minute = request_totals(workers, "minute")
    totals = request_totals(workers)
    rows = []
    for name in settings.endpoints:
        counts = minute.get(name, [])
        hits, misses = hits_misses.get(name, [0, 0])
        ratio = hits / (hits + misses) if hits + misses else None
        rows.append("".join([
            f"<td><b>{_e(name)}</b> <code>{_e(settings.endpoints[name].path)}</code></td>",
            _cell(f"{name}.rate", f"{sum(counts) / 60:.1f}/s", numeric=True),
            _cell(f"{name}.p50", _ms(quantile(counts, 0.5)), numeric=True),
            _cell(f"{name}.p99", _ms(quantile(counts, 0.99)), numeric=True),
            _cell(f"{name}.requests", str(int(sum(totals.get(name, [0])[:-1]))), numeric=True),
            _cell(f"{name}.hit_ratio", "-" if ratio is None else f"{ratio:.4f}", numeric=True),
        ]))
    parts.append(_table(["endpoint", "requests/s", "P50", "P99", "requests since start",
                         "cache hit ratio since start"], rows))
    all_hits = sum(h for h, _ in hits_misses.values())
    all_lookups = sum(h + m for h, m in hits_misses.values())
    parts.append("<p>Cache hit ratio, every endpoint: " + _cell_inline(
        "hit_ratio", "-" if not all_lookups else f"{all_hits / all_lookups:.4f}") +
        f" ({all_lookups} lookups; percentiles are bucket bounds)</p>")
    parts.append("<h2>Loader and workers</h2>")
    listed = updater.last_listed
    last = warmer.last
    facts = [
        ("source", _e(updater.source.url) if admin else "(admin view)"),
        ("source errors", _cell_inline("source_errors", str(updater.source_errors))),
        ("listed", f"{_age(now - listed)} ago" if listed else "not yet"),
        ("source problem", _e(updater.source_problem) if updater.source_problem else "none"),
        ("HTTP workers answering", _cell_inline("workers", str(len(workers)))),
        ("worker restarts", _cell_inline("restarts", str(restarts))),
        ("last warm", _warm(last, warmer.last_tail)),
    ]
    if admin:
        facts.append(("worker pids", _e(", ".join(map(str, pids)))))
    parts.append("<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>"
                                     for k, v in facts) + "</table>")
    parts.append("</body></html>")
    return "".join(parts).encode()


def _cell_inline(key: str, text: str) -> str:
    return f'<span data-k="{_e(key)}">{text}</span>'


def _warm(before: WarmReport | None, after: WarmReport | None) -> str:
    """The last Snapshot's warm: before its publish, and after it where that pass ran."""
    if before is None:
        return "none"
    text = f"snapshot {before.snapshot}: {before.entries} answers before the publish " \
           f"({before.seconds:.3f} s)"
    if after is not None and after.snapshot == before.snapshot:
        text += f", {after.entries} after it ({after.seconds:.3f} s)"
    return _e(text)
