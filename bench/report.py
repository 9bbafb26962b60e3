"""Turn raw per-request results into figures, a table, JSON and a picture."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from hdrh.histogram import HdrHistogram

PCTS = (50.0, 90.0, 99.0, 99.9)


@dataclass
class Swap:
    export: int
    marker_at: float
    served_at: float | None = None

    @property
    def lag_s(self) -> float | None:
        return None if self.served_at is None else self.served_at - self.marker_at


@dataclass
class Phase:
    name: str
    rate: float
    duration: float
    rows: list[dict[str, Any]] = field(default_factory=list)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def latency(rows: list[dict[str, Any]]) -> dict[str, float | int]:
    """p50/p90/p99/p99.9/max in ms from an HDR histogram (3 significant digits)."""
    h = HdrHistogram(1, 3_600_000_000, 3)
    for r in rows:
        h.record_value(max(1, r["lat_us"]))
    out: dict[str, float | int] = {"count": len(rows)}
    for p in PCTS:
        out[f"p{p:g}"] = round(h.get_value_at_percentile(p) / 1000, 3) if rows else 0.0
    out["max"] = round(h.get_max_value() / 1000, 3) if rows else 0.0
    return out


def summarise(phase: Phase, swaps: list[Swap], peak_rss_kb: int | None,
              floor: Phase | None, warmup: Phase | None = None) -> dict[str, Any]:
    rows = phase.rows
    errors = Counter(r["kind"] for r in rows if r["kind"] != "ok")
    statuses = Counter(str(r["status"]) for r in rows if r["kind"] == "status")
    if rows:
        t0 = min(r["t"] for r in rows)
        span = max(r["t"] for r in rows) - t0 + 1 / phase.rate
        ends = max(r["t"] + r["lat_us"] / 1e6 for r in rows) - t0
    else:
        span = ends = 0.0
    served = [s for s in swaps if s.served_at is not None]

    def overlaps(r: dict[str, Any]) -> bool:
        end = r["t"] + r["lat_us"] / 1e6
        return any(r["t"] <= (s.served_at or 0) and end >= s.marker_at for s in served)

    during = [r for r in rows if overlaps(r)]
    rest = [r for r in rows if not overlaps(r)]
    lags = sorted(r["lag_us"] for r in rows)
    summary: dict[str, Any] = {
        "target_rate": phase.rate,
        "sent": len(rows),
        "send_rate": round(len(rows) / span, 1) if span else 0.0,
        "completed_rate": round(len(rows) / ends, 1) if ends else 0.0,
        "send_lag_ms": {
            "p99": round(lags[int(0.99 * (len(lags) - 1))] / 1000, 3) if lags else 0.0,
            "max": round(lags[-1] / 1000, 3) if lags else 0.0,
        },
        "latency_ms": latency(rows),
        "errors": {"total": sum(errors.values()), **dict(errors)},
        "error_statuses": dict(statuses),
        "swaps": len(served),
        "swaps_started": len(swaps),
        "overlapping_swap_ms": latency(during),
        "not_overlapping_ms": latency(rest),
        "by_request_ms": {name: latency([r for r in rows if r["ep"] == name])
                          for name in sorted({r["ep"] for r in rows})},
        "freshness_lag_s": [round(s.lag_s, 3) for s in served if s.lag_s is not None],
        "peak_rss_mb": round(peak_rss_kb / 1024, 1) if peak_rss_kb else None,
    }
    if warmup is not None:
        summary["warmup_ms"] = latency(warmup.rows)
        werr = Counter(r["kind"] for r in warmup.rows if r["kind"] != "ok")
        summary["warmup_errors"] = {"total": sum(werr.values()), **dict(werr)}
    if floor is not None:
        summary["healthz_ms"] = latency(floor.rows)
        fl = summary["healthz_ms"]["p99"]
        summary["p99_over_healthz_p99"] = (
            round(summary["latency_ms"]["p99"] / fl, 2) if fl else None)
    return summary


def table(s: dict[str, Any]) -> str:
    lat, ov, rest = s["latency_ms"], s["overlapping_swap_ms"], s["not_overlapping_ms"]
    lines = [
        f"target rate      {s['target_rate']:.0f} req/s   sent {s['sent']}   "
        f"send rate {s['send_rate']} req/s   completed rate {s['completed_rate']} req/s",
        f"generator        {s.get('generator', 'python')}   lag p99 {s['send_lag_ms']['p99']} ms"
        f"   max {s['send_lag_ms']['max']} ms"
        + ("   ** generator fell behind its schedule **" if s["send_lag_ms"]["p99"] > 10 else ""),
        "latency (ms)     p50      p90      p99      p99.9    max      count",
    ]
    rows = [("all", lat), ("during swaps", ov), ("outside swaps", rest)]
    if "healthz_ms" in s:
        rows.append(("/healthz floor", s["healthz_ms"]))
    if "warmup_ms" in s:
        rows.append(("warm-up (cold)", s["warmup_ms"]))
    for name, v in rows:
        lines.append(f"  {name:<15}" + "".join(
            f"{v[k]:<9}" for k in ("p50", "p90", "p99", "p99.9", "max")) + f"{v['count']}")
    if len(s.get("by_request_ms", {})) > 1:
        lines.append("  p50 / p99 / p99.9 by request: " + ", ".join(
            f"{name} {v['p50']:g} / {v['p99']:g} / {v['p99.9']:g}"
            for name, v in s["by_request_ms"].items()))
    lines += [
        f"errors           {s['errors']}  statuses {s['error_statuses']}"
        + (f"   warm-up {s['warmup_errors']}" if "warmup_errors" in s else ""),
        f"swaps            {s['swaps']} served of {s['swaps_started']} written; "
        f"freshness lag (s) {s['freshness_lag_s']}",
        f"server peak PSS  {s['peak_rss_mb']} MB (all its processes)"
        + (f"   steady {s['steady_rss_mb']} MB before the swaps "
           f"(peak/steady {s['peak_over_steady_rss']}x)" if "steady_rss_mb" in s else "")
        + (f"   between swaps {s['between_swaps_rss_mb']} MB "
           f"(peak/between {s['peak_over_between_swaps']}x)" if "between_swaps_rss_mb" in s
           else ""),
    ]
    if "cache" in s:
        c = s["cache"]
        lines.append(f"response cache   hit ratio {c['hit_ratio']}   hits {c['hits']}   "
                     f"misses {c['misses']}"
                     + ("   misses by endpoint " + ", ".join(
                         f"{e} {n}" for e, n in c["misses_by_endpoint"].items())
                        if c.get("misses_by_endpoint") else ""))
    if "event_loop_lag" in s:
        g = s["event_loop_lag"]

        def ms(v: float | None) -> str:
            return "over 2500 ms" if v is None else f"<= {v:g} ms"

        lines.append(f"server loop lag  p99 {ms(g['p99_under_ms'])}   p99.9 "
                     f"{ms(g['p99.9_under_ms'])}   max {ms(g['max_under_ms'])}   "
                     f"{g['over_10ms']} of {g['probes']} probes over 10 ms")
    if s.get("p99_over_healthz_p99") is not None:
        lines.append(f"p99 / healthz p99  {s['p99_over_healthz_p99']}x")
    if s.get("cpu", {}).get("mean_cores"):
        for name, key in (("cores, the run", "mean_cores"),
                          ("cores, swaps", "mean_cores_during_swaps")):
            if s["cpu"].get(key):
                lines.append(f"{name:<17}" + "  ".join(
                    f"{part} {v:g}" for part, v in s["cpu"][key].items()))
        if s["cpu"].get("mean_cores_by_process"):
            lines.append(f"{'cores by process':<17}" + "  ".join(
                f"{who} {v:g}" for who, v in s["cpu"]["mean_cores_by_process"].items()))
    return "\n".join(lines)


def plot(phase: Phase, swaps: list[Swap], cpu: list[tuple[float, dict[str, float]]], path: Path,
         title: str) -> None:
    """Latency percentiles per second with swaps marked, where the CPU went (when sampled),
    and a latency histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = phase.rows
    t0 = min((r["t"] for r in rows), default=0.0)
    buckets: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        buckets[int(r["t"] - t0)].append(r["lat_us"] / 1000)
    secs = sorted(buckets)
    fig, axes = plt.subplots(3 if cpu else 2, 1, figsize=(11, 11 if cpu else 8))
    ax1, ax2 = axes[0], axes[-1]
    for pct, style in ((50, "-"), (99, "-"), (100, ":")):
        ys = []
        for sec in secs:
            v = sorted(buckets[sec])
            ys.append(v[min(len(v) - 1, int(pct / 100 * len(v)))])
        ax1.plot(secs, ys, style, label="max" if pct == 100 else f"p{pct}")
    for i, s in enumerate(swaps):
        ax1.axvline(s.marker_at - t0, color="red", alpha=0.6,
                    label="export written" if i == 0 else None)
        if s.served_at is not None:
            ax1.axvline(s.served_at - t0, color="green", alpha=0.6, linestyle="--",
                        label="export served" if i == 0 else None)
    ax1.set_yscale("log")
    ax1.set_xlabel("seconds into the run")
    ax1.set_ylabel("latency (ms, from intended send time)")
    ax1.set_title(title)
    ax1.legend(loc="upper right")
    if cpu:
        from bench.cpu import PARTS

        ax3 = axes[1]
        xs = [t - t0 for t, _ in cpu]
        ax3.stackplot(xs, *[[c.get(p, 0.0) for _, c in cpu] for p in PARTS], labels=PARTS)
        for s in swaps:
            ax3.axvline(s.marker_at - t0, color="red", alpha=0.6)
            if s.served_at is not None:
                ax3.axvline(s.served_at - t0, color="green", alpha=0.6, linestyle="--")
        ax3.set_xlim(ax1.get_xlim())
        ax3.set_xlabel("seconds into the run")
        ax3.set_ylabel("cores, by process role")
        ax3.legend(loc="upper right", ncol=len(PARTS), fontsize="small")
    lat = [r["lat_us"] / 1000 for r in rows] or [0.0]
    ax2.hist(lat, bins=100, log=True)
    ax2.set_xlabel("latency (ms)")
    ax2.set_ylabel("requests")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
