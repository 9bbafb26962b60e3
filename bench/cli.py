"""`python -m bench run | ci | sweep`: drive overlay load at a fixed rate while exports swap."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cpu import CpuSampler, pss_kb, tree
from bench.mix import DEFAULT_MIX
from bench.ports import free_port
from bench.report import Phase, Swap, plot, read_rows, summarise, table
from data.generate import DATASETS, SIZES, next_seq, write_export

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "data" / "demo.toml"


def _get_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except OSError:
        return 0, None


def _metrics(url: str) -> list[Any] | None:
    """The server's /metrics, parsed; None if not exposed."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=2.0) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    return list(text_string_to_metric_families(text))


def cache_lookups(families: list[Any] | None) -> dict[str, dict[str, float]] | None:
    """endpoint -> {"hit", "miss": count} of the server's response cache."""
    if families is None:
        return None
    counts: dict[str, dict[str, float]] = {}
    for family in families:
        if family.name == "duckswap_cache_lookups":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    per = counts.setdefault(sample.labels["endpoint"],
                                            {"hit": 0.0, "miss": 0.0})
                    per[sample.labels["result"]] = sample.value
    return counts


def loop_lag(families: list[Any] | None) -> dict[float, float] | None:
    """Upper bound (s) -> cumulative count of the server's event-loop lag histogram."""
    for family in families or []:
        if family.name == "duckswap_event_loop_lag_seconds":
            return {float(s.labels["le"]): s.value for s in family.samples
                    if s.name.endswith("_bucket")}
    return None


def lag_summary(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """Quantiles of the lag observed between two scrapes, as the bucket bound they fall under
    (ms; None past the last finite bound), and how many probes saw more than 10 ms."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0

    def under(q: float) -> float | None:
        for bound, n in zip(bounds, counts, strict=True):
            if n >= q * total:
                return None if bound == float("inf") else round(bound * 1000, 1)
        return None

    over_10ms = total - next((n for b, n in zip(bounds, counts, strict=True) if b >= 0.01), total)
    return {"probes": int(total), "p99_under_ms": under(0.99), "p99.9_under_ms": under(0.999),
            "max_under_ms": under(1.0), "over_10ms": int(over_10ms)}


def _taskset(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


class Server:
    """A duckswap server on the demo config, in its own process. `data_dir` defaults to a
    folder beside the source; `env` overrides more keys (`DUCKSWAP_...`)."""

    def __init__(self, source: Path, cpus: str | None, threads: int, workers: int = 0,
                 data_dir: Path | None = None, env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ, DUCKSWAP_SOURCE__URL=f'"file://{source}"',
                        DUCKSWAP_SERVER__PORT=str(self.port),
                        DUCKSWAP_SERVER__THREADS=str(threads),
                        DUCKSWAP_SERVER__WORKERS=str(workers),
                        # the access log is off: INFO is a few lines per swap (build, warm, publish)
                        DUCKSWAP_SERVER__LOG_LEVEL="INFO",
                        # versions live with the run's temporary files, removed with them
                        DUCKSWAP_SERVER__DATA_DIR=f'"{data_dir or source.parent / "data"}"',
                        **(env or {}))
        self.cmd = [*_taskset(cpus), sys.executable, "-m", "serving.cli", "serve",
                    "--config", str(DEMO_CONFIG)]
        self.log_path = log or source.parent / "server.log"
        self.start()

    def start(self) -> None:
        """Start it (again: same port, same data dir)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}")
            if _get_json(self.url + "/readyz")[0] == 200:
                return
            time.sleep(0.05)
        raise SystemExit("server did not become ready")

    def pss_kb(self) -> int:
        """The total PSS of the server's processes (loader, workers, build process)."""
        return pss_kb(tree(self.proc.pid))

    def watch_memory(self, stop: threading.Event, interval: float = 0.5) -> list[int]:
        """Sample `pss_kb` until `stop` (on a thread of its own); returns the samples list,
        filled as it goes."""
        samples: list[int] = []

        def run() -> None:
            while not stop.is_set():
                samples.append(self.pss_kb())
                stop.wait(interval)

        threading.Thread(target=run, daemon=True, name="bench-pss").start()
        return samples

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, and SIGKILL past `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self, timeout: float = 10) -> None:
        """kill -9 of the loader; returns once every process of the server is gone (the
        workers and build processes exit on their own when the loader dies)."""
        pids = tree(self.proc.pid)
        self.proc.kill()
        self.proc.wait()
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in pids):
            if time.monotonic() > deadline:
                raise SystemExit(f"processes {pids} outlived their loader")
            time.sleep(0.02)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its new parent to reap it does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def run_loadgen(url: str, rate: float, duration: float, out: Path, args: argparse.Namespace,
                path: str | None = None, seed: int = 1) -> subprocess.Popen[bytes]:
    cmd = [*_taskset(args.loadgen_cpus), sys.executable, "-m", "bench.loadgen", "--url", url,
           "--rate", str(rate), "--duration", str(duration), "--out", str(out),
           "--mix", str(args.mix), "--champions", str(SIZES[args.size].champions),
           "--timeout", str(args.timeout), "--seed", str(seed), "--engine", args.generator]
    if path:
        cmd += ["--path", path]
    if args.unique:
        # Past every value an earlier generator of this bench sent (the warm-up, a sweep's
        # lower rates): the same URLs again would be answers the server has cached or warmed.
        start = getattr(args, "unique_from", 1)
        args.unique_from = start + max(1, int(rate * duration))
        cmd += ["--unique", "--unique-from", str(start)]
    return subprocess.Popen(cmd)


def swapper(source: Path, staging: Path, url: str, interval: float, stop: threading.Event,
            swaps: list[Swap], first: int, pss: Callable[[], int | None] | None = None,
            between: list[int] | None = None) -> None:
    """Every `interval` s rename a staged export into the source and time until it is served.
    `pss`: the server's memory, sampled into `between` before each swap once one was served
    (then the server holds what it holds between swaps: the served version and the one it
    replaced, whose answers `?v=` URLs still get)."""
    seq = first
    while not stop.wait(interval):
        seq += 1
        staged = [staging / ds / f"export-{seq:06d}" for ds in DATASETS]
        if not all(p.exists() for p in staged):
            return
        if pss is not None and between is not None and swaps and swaps[-1].served_at:
            sample = pss()
            if sample:
                between.append(sample)
        _, before = _get_json(url + "/readyz")
        old = (before or {}).get("versions", {}).get("champion_stats")
        swap = Swap(seq, time.time())
        for ds, p in zip(DATASETS, staged, strict=True):
            (source / ds).mkdir(parents=True, exist_ok=True)
            p.rename(source / ds / p.name)
        swap.marker_at = time.time()
        swaps.append(swap)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not stop.is_set():
            _, body = _get_json(url + "/readyz")
            if body and body.get("versions", {}).get("champion_stats") not in (None, old):
                swap.served_at = time.time()
                break
            time.sleep(0.02)


def one_run(args: argparse.Namespace, rate: float, work: Path, server: Server | None,
            url: str, source: Path | None, staging: Path, first: int,
            label: str, warmup: float) -> dict[str, Any]:
    floor = None
    if args.floor_seconds > 0:
        out = work / f"{label}-healthz.jsonl"
        run_loadgen(url, rate, args.floor_seconds, out, args, path="/healthz").wait()
        floor = Phase("healthz", rate, args.floor_seconds, read_rows(out))
    warm = None
    if warmup > 0:  # the same mix, another seed: a cold process learns what is popular
        out = work / f"{label}-warmup.jsonl"
        run_loadgen(url, rate, warmup, out, args, seed=0).wait()
        warm = Phase("warmup", rate, warmup, read_rows(out))
    steady = server.pss_kb() if server else None  # after the warm-up, before any swap
    out = work / f"{label}-load.jsonl"
    swaps: list[Swap] = []
    between: list[int] = []
    stop = threading.Event()
    thread = None
    if source is not None and args.swap_every > 0:
        thread = threading.Thread(target=swapper, args=(
            source, staging, url, args.swap_every, stop, swaps, first,
            server.pss_kb if server else None, between), daemon=True)
    scraped = _metrics(url)
    before, lag_before = cache_lookups(scraped), loop_lag(scraped)
    gen = run_loadgen(url, rate, args.duration, out, args)
    memory = server.watch_memory(stop) if server else []
    cpu = CpuSampler(server.proc.pid if server else None, [gen.pid]).start()
    if thread:
        thread.start()
    gen.wait()
    cpu.stop()
    stop.set()
    if thread:
        thread.join()
    phase = Phase("load", rate, args.duration, read_rows(out))
    summary = summarise(phase, swaps, max(memory, default=0) or None, floor, warm)
    if steady and summary["peak_rss_mb"]:
        summary["steady_rss_mb"] = round(steady / 1024, 1)
        summary["peak_over_steady_rss"] = round(summary["peak_rss_mb"] * 1024 / steady, 2)
    if between and summary["peak_rss_mb"]:
        middle = statistics.median(between)
        summary["between_swaps_rss_mb"] = round(middle / 1024, 1)
        summary["peak_over_between_swaps"] = round(summary["peak_rss_mb"] * 1024 / middle, 2)
    scraped = _metrics(url)
    after, lag_after = cache_lookups(scraped), loop_lag(scraped)
    if lag_before is not None and lag_after:
        summary["event_loop_lag"] = lag_summary(lag_before, lag_after)
    if before is not None and after:
        delta = {e: {k: v - before.get(e, {}).get(k, 0.0) for k, v in c.items()}
                 for e, c in after.items()}
        hits, misses = (sum(c.get(k, 0.0) for c in delta.values()) for k in ("hit", "miss"))
        looked = hits + misses
        summary["cache"] = {"hits": int(hits), "misses": int(misses),
                            "hit_ratio": round(hits / looked, 4) if looked else None,
                            "misses_by_endpoint": {e: int(c["miss"]) for e, c in
                                                   sorted(delta.items()) if c.get("miss")}}
    if cpu.samples:
        end = time.time()
        summary["cpu"] = cpu.summary([(s.marker_at, s.served_at or end) for s in swaps])
    summary["label"] = label
    summary["generator"] = args.generator
    if phase.rows:
        plot(phase, swaps, cpu.samples, args.out / f"{label}.png",
             f"duckswap {label}: {rate:.0f} req/s, size {args.size}, swaps every "
             f"{args.swap_every:g}s")
    return summary


def prepare(args: argparse.Namespace, source: Path, staging: Path, rounds: int) -> int:
    """Stage the exports the swapper will rename in; returns the last sequence already served."""
    first = next_seq(source) - 1
    if first == 0:
        write_export(source, 1, args.size)
        first = 1
    per_run = int(args.duration // args.swap_every) + 1 if args.swap_every > 0 else 0
    for seq in range(first + 1, first + 1 + per_run * rounds):
        write_export(staging, seq, args.size)
    return first


def execute(args: argparse.Namespace, rates: list[float]) -> list[dict[str, Any]]:
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="duckswap-bench-"))
    server = None
    results: list[dict[str, Any]] = []
    try:
        staging = work / "staging"
        source = args.source if args.url else work / "source"
        first = prepare(args, source, staging, len(rates)) if source is not None else 0
        if args.url:
            url = args.url.rstrip("/")
        else:
            server = Server(source, args.server_cpus, args.threads, args.workers)
            server.wait_ready()
            url = server.url
        per_run = int(args.duration // args.swap_every) + 1 if args.swap_every > 0 else 0
        for i, rate in enumerate(rates):
            label = f"{args.mode}-{rate:.0f}"
            s = one_run(args, rate, work, server, url, source, staging, first + i * per_run,
                        label, args.warmup if i == 0 else 0.0)
            print(f"\n== {label} ==\n{table(s)}", flush=True)
            results.append(s)
            if args.mode == "sweep" and not holds(s, args.max_p99_ms):
                break
    finally:
        if server:
            server.stop()
            log = work / "server.log"
            if log.exists():  # the server's own account of each swap (build, warm, publish)
                shutil.copyfile(log, args.out / f"{args.mode}-server.log")
        shutil.rmtree(work, ignore_errors=True)
    (args.out / f"{args.mode}.json").write_text(json.dumps(results, indent=2))
    return results


def holds(s: dict[str, Any], max_p99: float) -> bool:
    errors = s["errors"]["total"] + s.get("warmup_errors", {}).get("total", 0)
    return bool(s["latency_ms"]["p99"] < max_p99 and errors == 0)


def gate(s: dict[str, Any], args: argparse.Namespace) -> list[str]:
    failed = []
    if s["latency_ms"]["p99"] >= args.max_p99_ms:
        failed.append(f"p99 {s['latency_ms']['p99']} ms >= bound {args.max_p99_ms} ms")
    errors = s["errors"]["total"] + s.get("warmup_errors", {}).get("total", 0)
    if errors > args.max_errors:
        failed.append(f"{errors} failed requests > bound {args.max_errors}: "
                      f"{s['errors']} {s['error_statuses']} warm-up {s.get('warmup_errors')}")
    if s["swaps"] < args.min_swaps:
        failed.append(f"{s['swaps']} swaps served < bound {args.min_swaps}")
    if s["send_rate"] < args.rate * 0.9:
        failed.append(f"generator sent {s['send_rate']} req/s, under 90% of {args.rate}")
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("mode", choices=["run", "ci", "sweep"])
    p.add_argument("--url", help="target a running server instead of starting one")
    p.add_argument("--source", type=Path, help="with --url: its source folder, for swaps")
    p.add_argument("--size", choices=sorted(SIZES), default=None)
    p.add_argument("--rate", type=float, default=None, help="target arrival rate (req/s)")
    p.add_argument("--duration", type=float, default=None, help="seconds of load per rate")
    p.add_argument("--swap-every", type=float, default=10.0)
    p.add_argument("--floor-seconds", type=float, default=None,
                   help="seconds of /healthz at the same rate first (the floor reference)")
    p.add_argument("--generator", choices=["auto", "k6", "lean", "python"], default="auto",
                   help="load engine (auto: lean when httptools and uvloop are installed, "
                   "else k6 when its binary is, else python)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds of the mix before the measured run (reported apart; its "
                   "failed requests count against --max-errors)")
    p.add_argument("--mix", type=Path, default=DEFAULT_MIX)
    p.add_argument("--unique", action="store_true", help="every request distinct")
    p.add_argument("--timeout", type=float, default=5.0, help="per-request timeout (s)")
    p.add_argument("--threads", type=int, default=2, help="server query threads")
    p.add_argument("--workers", type=int, default=0,
                   help="server HTTP workers (default 0: one per CPU, as `server.workers`)")
    p.add_argument("--max-p99-ms", type=float, default=None)
    p.add_argument("--max-errors", type=int, default=0)
    p.add_argument("--min-swaps", type=int, default=None)
    p.add_argument("--rates", default="100,200,300,400,600,800,1200,1600,2400,3200",
                   help="sweep: rising rates")
    p.add_argument("--server-cpus", help="taskset CPU list for the server")
    p.add_argument("--loadgen-cpus", help="taskset CPU list for the load generator")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args(argv)
    defaults = {  # mode: size, rate, duration, floor seconds, p99 bound, min swaps, warm-up
        "run": ("default", 200.0, 60.0, 10.0, 100.0, 1, 10.0),
        "ci": ("medium", 500.0, 45.0, 8.0, 100.0, 3, 6.0),
        "sweep": ("default", 0.0, 20.0, 5.0, 10.0, 0, 10.0),
    }[args.mode]
    for name, value in zip(("size", "rate", "duration", "floor_seconds", "max_p99_ms",
                            "min_swaps", "warmup"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.url and args.source is None:
        args.swap_every = 0
    if args.generator == "auto":
        lean = all(importlib.util.find_spec(m) for m in ("httptools", "uvloop"))
        args.generator = "lean" if lean else "k6" if shutil.which("k6") else "python"
    rates = ([float(r) for r in args.rates.split(",")] if args.mode == "sweep"
             else [args.rate])
    results = execute(args, rates)
    print(f"\nresults: {args.out}/{args.mode}.json, {args.out}/*.png"
          + ("" if args.url else f" and the server log {args.out}/{args.mode}-server.log"))
    if args.mode == "sweep":
        held = [s for s in results if holds(s, args.max_p99_ms)]
        if held:
            best = held[-1]
            print(f"highest rate holding p99 < {args.max_p99_ms} ms with no errors: "
                  f"{best['target_rate']:.0f} req/s (p50 {best['latency_ms']['p50']} ms, "
                  f"p99 {best['latency_ms']['p99']} ms, p99.9 {best['latency_ms']['p99.9']} ms)")
        else:
            print(f"no rate held p99 < {args.max_p99_ms} ms")
        return 0
    failed = gate(results[0], args) if args.mode == "ci" else []
    if failed:
        print("BENCH GATE FAILED: " + "; ".join(failed))
        return 1
    if args.mode == "ci":
        print("bench gate passed")
    return 0
