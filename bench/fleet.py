"""A fleet on one machine: duckswap replicas, each with its own data dir, watching one source
folder behind a real HAProxy (Debian's package) on loopback, under open-loop load while a new
export arrives every few seconds; one replica at a time is restarted, then one is killed -9.

`python -m bench.fleet` prints the figures (`docs/benchmarks.md`); `tests/test_fleet.py` runs the
same scenario, shorter, and asserts on its report. HAProxy is installed with apt-get where it is
missing. The HAProxy config is `deploy/haproxy/haproxy.cfg`, its servers filled in.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.cli import Server, _get_json
from bench.debian import debian_program
from bench.ports import free_port
from bench.report import latency, read_rows
from data.generate import DATASETS, SIZES, write_export

# The repository's file (not part of the installed package): run from the repository's root.
HAPROXY_CFG = Path("deploy") / "haproxy" / "haproxy.cfg"
# Answers checked under `?v=` through the balancer: one per endpoint kind of the overlay.
VERSIONED = {
    "champion_stats": "/v1/champions/3/stats?role=mid&rank=gold&region=kr",
    "tier_list": "/v1/tierlist/mid?ranks=gold&region=euw",
    "champion_builds": "/v1/champions/5/builds?role=bot",
}


class Haproxy:
    """HAProxy in the foreground on a free loopback port, its backend the replicas."""

    def __init__(self, work: Path, replicas: dict[str, Server], config: Path = HAPROXY_CFG
                 ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sock = work / "haproxy.sock"
        servers = "\n".join(f"    server {name} 127.0.0.1:{r.port} check"
                            for name, r in replicas.items())
        text = config.read_text()
        text = text.replace("bind :8080", f"bind 127.0.0.1:{self.port}")
        # no global maxconn: HAProxy derives one from this process's open-file limit
        text = text.replace("    maxconn 50000\n", "")
        text = text.replace("stats socket /run/haproxy/admin.sock",
                            f"stats socket {self.sock}")
        head, tail = text.split("    server-template ", 1)
        text = head + servers + "\n" + tail.split("\n", 1)[1]
        cfg = work / "haproxy.cfg"
        cfg.write_text(text)
        binary = debian_program(("haproxy",), "haproxy")
        subprocess.run([binary, "-c", "-q", "-f", str(cfg)], check=True)
        self.log = (work / "haproxy.log").open("wb")
        self.proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def stats(self) -> dict[str, dict[str, str]]:
        """`show stat` of the backend's servers, by name (status, scur, qcur, wretr, ...)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(self.sock))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        head = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(head, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r for r in rows if r["pxname"] == "replicas"}

    def wait(self, name: str, status: str, timeout: float = 30) -> float:
        """Poll until server `name` is `status` (UP or DOWN); returns when (time.time())."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"haproxy exited {self.proc.returncode}: see {self.log.name}")
            try:
                if self.stats()[name]["status"] == status:
                    return time.time()
            except (OSError, KeyError, IndexError):
                pass
            time.sleep(0.02)
        raise TimeoutError(f"HAProxy did not see {name} {status} within {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@dataclass
class Watch:
    """What each replica's `/v1/version` said, polled every 50 ms."""
    first_seen: dict[str, dict[str, float]] = field(default_factory=dict)  # replica: export: t
    version_of: dict[str, dict[tuple[str, str], str]] = field(default_factory=dict)
    tokens_of: dict[str, dict[tuple[Any, ...], dict[str, str]]] = field(default_factory=dict)


def watch(replicas: dict[str, Server], w: Watch, stop: threading.Event) -> None:
    for name in replicas:
        w.first_seen[name], w.version_of[name], w.tokens_of[name] = {}, {}, {}
    while not stop.wait(0.05):
        for name, r in replicas.items():
            status, body = _get_json(r.url + "/v1/version", timeout=1)
            if status != 200 or not body:
                continue
            datasets = body["datasets"]
            if "champion_stats" not in datasets:  # still loading its first version
                continue
            export = datasets["champion_stats"]["export_id"]
            w.first_seen[name].setdefault(export, time.time())
            for ds, d in datasets.items():
                w.version_of[name][(ds, d["export_id"])] = d["version"]
            served = tuple(sorted((ds, d["version"]) for ds, d in datasets.items()))
            w.tokens_of[name][served] = {e: v["token"] for e, v in body["endpoints"].items()}


@dataclass
class Versioned:
    """`?v=` requests through the balancer: answered with that version's bytes, redirected
    (307, the rule for a version a replica does not hold), or wrong."""
    exact: int = 0
    redirected: int = 0
    pointer_regressions: int = 0  # /v1/version named an older export than it did before
    wrong: list[str] = field(default_factory=list)
    bodies: dict[tuple[str, str], bytes] = field(default_factory=dict)


def check_versioned(lb: str, v: Versioned, stop: threading.Event) -> None:
    host = urllib.parse.urlsplit(lb)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=5)

    def get(path: str) -> tuple[int, dict[str, str], bytes]:
        nonlocal conn
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, {k.lower(): x for k, x in resp.getheaders()}, resp.read()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            conn = http.client.HTTPConnection(host.hostname, host.port, timeout=5)
            return 0, {}, repr(e).encode()

    newest = ""
    while not stop.wait(0.02):
        status, _, body = get("/v1/version")
        if status != 200:
            v.wrong.append(f"/v1/version answered {status}: {body[:200]!r}")
            continue
        pointer = orjson.loads(body)
        export = pointer["datasets"]["champion_stats"]["export_id"]
        if export < newest:
            v.pointer_regressions += 1
        newest = max(newest, export)
        for endpoint, path in VERSIONED.items():
            token = pointer["endpoints"][endpoint]["token"]
            status, headers, answer = get(f"{path}&v={token}")
            if status == 307:
                target = urllib.parse.parse_qs(urllib.parse.urlsplit(
                    headers.get("location", "")).query).get("v", [""])[0]
                if target == token or headers.get("cache-control") != "no-store":
                    v.wrong.append(f"{path} v={token}: 307 to v={target}, "
                                   f"{headers.get('cache-control')}")
                v.redirected += 1
                continue
            if status != 200:
                v.wrong.append(f"{path} v={token}: {status} {answer[:200]!r}")
                continue
            meta = orjson.loads(answer)["meta"]
            if meta["token"] != token:
                v.wrong.append(f"{path} v={token}: answered token {meta['token']}")
            # the same URL gets the same bytes from whichever replica answers
            seen = v.bodies.setdefault((path, token), answer)
            if seen != answer:
                v.wrong.append(f"{path} v={token}: two different answers")
            v.exact += 1
    conn.close()


def swap_exports(source: Path, staging: Path, first: int, every: float, size: str,
                 stop: threading.Event, written: dict[str, float]) -> None:
    """Every `every` s write the next demo export aside, then rename it into the source."""
    seq = first
    while not stop.wait(every):
        seq += 1
        write_export(staging, seq, size)
        for ds in DATASETS:
            (staging / ds / f"export-{seq:06d}").rename(source / ds / f"export-{seq:06d}")
        written[f"export-{seq:06d}"] = time.time()


def _recorded(f: Any, args: tuple[Any, ...], errors: list[str]) -> None:
    """Run a checker thread; what it raises is part of the report (a checker that died would
    otherwise check nothing, silently)."""
    try:
        f(*args)
    except Exception as e:  # noqa: BLE001
        errors.append(f"{f.__name__}: {e!r}")


def rolling_restart(lb: Haproxy, replicas: dict[str, Server]) -> None:
    """One replica at a time: SIGTERM (its drain takes it out of HAProxy), start again on its
    data dir, wait until HAProxy has it back in."""
    for name, r in replicas.items():
        r.stop(timeout=30)
        r.start()
        lb.wait(name, "UP", timeout=60)


def scenario(work: Path, duration: float = 60, rate: float = 200, every: float = 3,
             size: str = "small", workers: int = 1, haproxy_cfg: Path = HAPROXY_CFG
             ) -> dict[str, Any]:
    """Run the whole scenario in `work`; returns the report."""
    source, staging = work / "source", work / "staging"
    write_export(source, 1, size)
    env = {"DUCKSWAP_SERVER__DRAIN_SECONDS": "1", "DUCKSWAP_SERVER__SHUTDOWN_SECONDS": "5",
           "DUCKSWAP_SOURCE__DEBOUNCE_MS": "50"}
    replicas = {f"r{i}": Server(source, None, 1, workers, data_dir=work / f"data-r{i}",
                                env=env, log=work / f"r{i}.log") for i in (1, 2)}
    lb = None
    stop = threading.Event()
    errors: list[str] = []
    threads: list[threading.Thread] = []
    try:
        for r in replicas.values():
            r.wait_ready()
        lb = Haproxy(work, replicas, haproxy_cfg)
        for name in replicas:
            lb.wait(name, "UP")
        w, v, written = Watch(), Versioned(), {"export-000001": 0.0}
        threads = [threading.Thread(target=_recorded, args=(f, a, errors), daemon=True)
                   for f, a in (
            (watch, (replicas, w, stop)), (check_versioned, (lb.url, v, stop)),
            (swap_exports, (source, staging, 1, every, size, stop, written)))]
        for t in threads:
            t.start()
        out = work / "load.jsonl"
        gen = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen", "--url", lb.url,
             "--rate", str(rate), "--duration", str(duration), "--out", str(out),
             "--champions", str(SIZES[size].champions), "--engine", "lean",
             "--connections", "64"])
        t0 = time.time()
        time.sleep(min(5.0, duration / 10))  # the load settles, a swap or two
        rolling = (time.time(), 0.0)
        rolling_restart(lb, replicas)
        rolling = (rolling[0], time.time())
        time.sleep(2)
        stats = lb.stats()["r1"]
        in_flight = int(stats["scur"] or 0) + int(stats["qcur"] or 0)
        killed = time.time()
        replicas["r1"].kill()
        down = lb.wait("r1", "DOWN")
        replicas["r1"].start()
        up = lb.wait("r1", "UP", timeout=60)
        kill = (killed, up)
        if gen.wait(duration + 60) != 0:
            raise SystemExit(f"load generator exited {gen.returncode}")
        stop.set()
        ended = time.time()
        for t in threads:
            t.join(10)
        final = lb.stats()
        # An export written while a replica was down (or just before, unloaded yet) may be
        # skipped by it for a newer one, and the last one may land as the watch ends.
        skippable = [(rolling[0] - every, rolling[1]), (kill[0] - every, kill[1]),
                     (ended - 5.0, ended)]
        return report(read_rows(out), t0, rate, rolling, kill, in_flight, down - killed,
                      up - killed, w, v, written, final, errors, skippable)
    finally:
        stop.set()
        if lb is not None:
            lb.stop()
        for r in replicas.values():
            r.stop()


def report(rows: list[dict[str, Any]], t0: float, rate: float, rolling: tuple[float, float],
           kill: tuple[float, float], in_flight: int, down_s: float, up_s: float, w: Watch,
           v: Versioned, written: dict[str, float], final: dict[str, dict[str, str]],
           errors: list[str], skippable: list[tuple[float, float]]) -> dict[str, Any]:
    def during(r: dict[str, Any], span: tuple[float, float]) -> bool:
        # a request counts for a span when it was in flight at any moment of it
        return r["t"] <= span[1] and r["t"] + max(r["lat_us"], 5_000_000) / 1e6 >= span[0]

    failed = [r for r in rows if r["kind"] != "ok"]
    names = sorted(w.first_seen)
    spread, fresh = [], {n: [] for n in names}
    for export, at in written.items():
        seen = [w.first_seen[n].get(export) for n in names]
        if at and all(seen):
            spread.append(max(seen) - min(seen))  # type: ignore[type-var,operator]
            for n, s in zip(names, seen, strict=True):
                fresh[n].append(s - at)  # type: ignore[operator]
    a, b = names
    same_versions = [k for k in w.version_of[a] if k in w.version_of[b]]
    same_served = [k for k in w.tokens_of[a] if k in w.tokens_of[b]]
    return {
        "requests": len(rows), "target_rate": rate,
        "achieved_rate": round(len(rows) / max(1e-9, max(r["t"] for r in rows) - t0), 1)
        if rows else 0.0,
        "latency_ms": latency([r for r in rows if r["kind"] == "ok"]),
        "failed": len(failed), "failed_kinds": dict(Counter(r["kind"] for r in failed)),
        "failed_in_rolling_restart": sum(during(r, rolling) for r in failed),
        "failed_in_kill": sum(during(r, kill) for r in failed),
        "failed_elsewhere": sum(not during(r, rolling) and not during(r, kill)
                                for r in failed),
        "in_flight_at_kill": in_flight,
        "rolling_restart_s": round(rolling[1] - rolling[0], 2),
        "kill_marked_down_s": round(down_s, 2), "kill_back_in_s": round(up_s, 2),
        "exports_written": len(written) - 1,
        "exports_served_by_both": len(spread),
        # written while both replicas ran, and not served by both: none should be
        "exports_missed": sorted(
            e for e, at in written.items()
            if at and not all(e in w.first_seen[n] for n in names)
            and not any(lo <= at <= hi for lo, hi in skippable)),
        "freshness_s": {n: _spread(fresh[n]) for n in names},
        "freshness_spread_s": _spread(spread),
        "version_ids_compared": len(same_versions),
        "version_ids_differing": [k for k in same_versions
                                  if w.version_of[a][k] != w.version_of[b][k]],
        "token_sets_compared": len(same_served),
        "tokens_differing": [k for k in same_served if w.tokens_of[a][k] != w.tokens_of[b][k]],
        "versioned": {"exact": v.exact, "redirected": v.redirected,
                      "pointer_regressions": v.pointer_regressions, "wrong": v.wrong[:20],
                      "wrong_count": len(v.wrong)},
        "harness_errors": errors,
        "haproxy": {n: {k: s.get(k, "") for k in ("status", "stot", "wretr", "wredis",
                                                  "eresp", "econ", "chkdown")}
                    for n, s in final.items() if n in names},
    }


def _spread(xs: list[float]) -> dict[str, float | int] | None:
    if not xs:
        return None
    return {"n": len(xs), "median": round(statistics.median(xs), 3),
            "max": round(max(xs), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--rate", type=float, default=200.0, help="req/s through HAProxy")
    p.add_argument("--every", type=float, default=3.0, help="seconds between exports")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--workers", type=int, default=1, help="HTTP workers per replica")
    p.add_argument("--haproxy-cfg", type=Path, default=HAPROXY_CFG,
                   help="the HAProxy config whose bind and server lines are replaced")
    p.add_argument("--out", type=Path, default=Path("bench-results") / "fleet.json")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="duckswap-fleet-") as tmp:
        r = scenario(Path(tmp), a.duration, a.rate, a.every, a.size, a.workers, a.haproxy_cfg)
        for log in Path(tmp).glob("*.log"):
            a.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, a.out.parent / f"fleet-{log.name}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2, default=str))
    print(json.dumps(r, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
