"""`python -m bench.scale`: throughput on cache hits against the number of HTTP workers.

For each worker count (`--workers 1,2,4,8`) and each round: start the server on the demo data,
pinned to `--server-cpus`; run the overlay mix closed-loop (`bench.loadgen --closed`) from one
generator process per CPU of `--loadgen-cpus`, each pinned to its CPU, first a warm-up, then
the measured window; no swaps. Reported per count: answers a second (median over the rounds),
the ratio to one worker measured in the same round, latency at saturation, and the CPU each
process used over the window (loader, every worker, build processes, generators). The worker
counts run in reverse order every other round, so a slow spell of a shared box falls on all
of them.

On the 2-core box the generator shares the cores and caps the ratio; the curve is meant for
a machine with cores for the generator of their own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from hdrh.histogram import HdrHistogram

from bench.cli import Server
from bench.cpu import CpuSampler
from bench.mix import DEFAULT_MIX
from data.generate import SIZES, write_export


def cpu_list(spec: str | None) -> list[int]:
    """`0-3,8` -> [0, 1, 2, 3, 8] (taskset's list form)."""
    cpus: list[int] = []
    for part in (spec or "").split(","):
        if part.strip():
            a, _, b = part.partition("-")
            cpus.extend(range(int(a), int(b or a) + 1))
    return cpus


def _generators(args: argparse.Namespace, url: str, start: float, duration: float,
                work: Path, label: str) -> list[tuple[subprocess.Popen[bytes], Path]]:
    cpus: list[int | None] = [*cpu_list(args.loadgen_cpus)] or [None] * args.generators
    procs = []
    for i, cpu in enumerate(cpus):
        out = work / f"{label}-gen{i}.json"
        cmd = [*(["taskset", "-c", str(cpu)] if cpu is not None else []), sys.executable,
               "-m", "bench.loadgen", "--closed", "--url", url,
               "--duration", str(duration), "--start-at", str(start), "--out", str(out),
               "--mix", str(args.mix), "--champions", str(SIZES[args.size].champions),
               "--connections", str(args.connections), "--seed", str(i + 1)]
        procs.append((subprocess.Popen(cmd), out))
    return procs


def closed_loop(args: argparse.Namespace, server: Server, work: Path, label: str,
                duration: float) -> dict[str, Any]:
    """One closed-loop window from every generator; the CPU of each process over it."""
    start = time.time() + args.lead
    gens = _generators(args, server.url, start, duration, work, label)
    time.sleep(max(0.0, start - time.time()))
    cpu = CpuSampler(server.proc.pid, [p.pid for p, _ in gens], interval=0.25).start()
    time.sleep(max(0.0, start + duration - time.time()))
    cpu.stop()
    for proc, _ in gens:
        if proc.wait(60 + duration) != 0:
            raise SystemExit(f"a generator exited with {proc.returncode}")
    hist = HdrHistogram(1, 60_000_000, 3)
    ok, failed = 0, dict[str, int]()
    for _, out in gens:
        s = orjson.loads(out.read_bytes())
        ok += s["ok"]
        for k, v in s["failed"].items():
            failed[k] = failed.get(k, 0) + v
        hist.add(HdrHistogram.decode(s["histogram"]))

    by_process = cpu.cores_by_process()
    mean = cpu.summary()["mean_cores"]
    return {
        "rate": round(ok / duration, 1), "ok": ok, "failed": failed,
        "latency_ms": {f"p{p:g}": round(hist.get_value_at_percentile(p) / 1000, 3)
                       for p in (50, 99, 99.9)},
        "cores": {
            "loader": by_process.get("loader", 0.0),
            "workers": [v for k, v in by_process.items() if k.startswith("worker ")],
            "builder": round(sum(v for k, v in by_process.items()
                                 if k != "loader" and not k.startswith("worker ")), 2),
            "generators": mean.get("generator", 0.0),
            "box_busy_fraction": round(1 - (mean.get("idle", 0.0) + mean.get("steal", 0.0))
                                       / max(sum(mean.values()), 1e-9), 3),
        },
    }


def measure(args: argparse.Namespace, counts: list[int]) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="duckswap-scale-"))
    results: list[dict[str, Any]] = []
    try:
        source = work / "source"
        write_export(source, 1, args.size)
        for rnd in range(1, args.rounds + 1):
            for n in counts if rnd % 2 else counts[::-1]:
                server = Server(source, args.server_cpus, args.threads, n)
                try:
                    server.wait_ready()
                    label = f"w{n}-r{rnd}"
                    if args.warmup > 0:
                        closed_loop(args, server, work, label + "-warmup", args.warmup)
                    r = closed_loop(args, server, work, label, args.duration)
                finally:
                    server.stop()
                r.update(workers=n, round=rnd)
                results.append(r)
                c = r["cores"]
                print(f"workers {n} round {rnd}: {r['rate']:,.0f} answers/s, failed "
                      f"{sum(r['failed'].values())}, p50 {r['latency_ms']['p50']} ms, "
                      f"p99 {r['latency_ms']['p99']} ms; cores: workers {c['workers']}, "
                      f"loader {c['loader']}, generators {c['generators']}", flush=True)
    finally:
        log = work / "server.log"
        if log.exists():
            shutil.copyfile(log, args.out / "scale-server.log")
        shutil.rmtree(work, ignore_errors=True)
    return results


def summarise(results: list[dict[str, Any]], counts: list[int]) -> list[dict[str, Any]]:
    """Per worker count: median rate over the rounds, and the median of each round's ratio to
    that round's one-worker rate (or the smallest count's)."""
    base = min(counts)
    by_round = {(r["round"], r["workers"]): r for r in results}
    rows = []
    for n in counts:
        runs = [r for r in results if r["workers"] == n]
        ratios = [r["rate"] / by_round[(r["round"], base)]["rate"] for r in runs
                  if by_round[(r["round"], base)]["rate"]]
        rows.append({
            "workers": n,
            "rates": [r["rate"] for r in runs],
            "rate": statistics.median(r["rate"] for r in runs),
            "ratio": round(statistics.median(ratios), 2) if ratios else None,
            "failed": sum(sum(r["failed"].values()) for r in runs),
            "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in runs),
            "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in runs),
            "worker_cores": round(statistics.median(sum(r["cores"]["workers"]) for r in runs),
                                  2),
            "generator_cores": statistics.median(r["cores"]["generators"] for r in runs),
        })
    return rows


def table(rows: list[dict[str, Any]], base: int) -> str:
    lines = [f"| workers | answers/s (median) | each round | x {base} worker(s), same round "
             "| failed | p50 / p99 ms | worker cores | generator cores |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['rate']:,.0f} | "
            f"{' / '.join(f'{x:,.0f}' for x in r['rates'])} | {r['ratio']}x | {r['failed']} | "
            f"{r['p50_ms']} / {r['p99_ms']} | {r['worker_cores']:.2f} | "
            f"{r['generator_cores']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["workers"] for r in rows]
    base = rows[0]["rate"] / rows[0]["workers"]
    ax.plot(xs, [r["rate"] for r in rows], "o-", label="measured (median)")
    ax.plot(xs, [base * x for x in xs], ":", color="grey", label="linear")
    ax.set_xlabel("HTTP workers")
    ax.set_ylabel("answers / s (closed loop, cache hits)")
    ax.set_xticks(xs)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2", help="worker counts, e.g. 1,2,4,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per count")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before each")
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--mix", type=Path, default=DEFAULT_MIX)
    p.add_argument("--threads", type=int, default=2, help="server query threads")
    p.add_argument("--server-cpus", help="taskset CPU list for the server")
    p.add_argument("--loadgen-cpus", help="CPUs for the generators: one process pinned to each")
    p.add_argument("--generators", type=int, default=1,
                   help="generator processes without --loadgen-cpus")
    p.add_argument("--connections", type=int, default=16, help="per generator process")
    p.add_argument("--lead", type=float, default=2.0,
                   help="seconds the generators get to start and connect")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    counts = [int(x) for x in args.workers.split(",")]
    results = measure(args, counts)
    rows = summarise(results, counts)
    (args.out / "scale.json").write_text(json.dumps({"runs": results, "summary": rows},
                                                    indent=2))
    plot(rows, args.out / "scale.png",
         f"duckswap closed loop, size {args.size}, server CPUs {args.server_cpus or 'all'}, "
         f"generators on {args.loadgen_cpus or 'the same CPUs'}")
    print("\n" + table(rows, min(counts)))
    print(f"\nresults: {args.out}/scale.json, {args.out}/scale.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
