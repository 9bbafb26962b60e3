"""Where the box's CPU goes during a run, sampled from /proc (Linux): the server's processes by
role (the loader, the process `duckswap serve` starts; its HTTP workers; its build process,
which also runs the warm), the load generator with its children, everything else, idle and
steal (time the hypervisor gave to other guests). On a shared 2-core box a latency spike is
then one of: the server's own work, the generator, a neighbour, or the hypervisor."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

PARTS = ("loader", "workers", "builder", "generator", "other", "idle", "steal")
WORKER_PROCESS = "duckswap-http"  # an HTTP worker's name (`serving.worker.NAME`)
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_ticks(path: str) -> int:
    """utime + stime of a /proc stat file, in clock ticks (0 when it is gone)."""
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[11]) + int(fields[12])


def _box_ticks() -> list[int]:
    """The whole box's first 8 /proc/stat counters: user, nice, system, idle, iowait, irq,
    softirq, steal (clock ticks)."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def pss_kb(pids: list[int]) -> int:
    """Proportional set size of `pids`, summed (Linux): a page shared by n of them counts
    1/n in each, so the sum is what they hold together (the answers files and the version
    files each worker maps count once)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total


def tree(root: int) -> list[int]:
    """`root` and every process below it."""
    return [root, *_tree(root, _children())]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _tree(root: int, kids: dict[int, list[int]]) -> list[int]:
    out, todo = [], list(kids.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


class CpuSampler:
    """Samples every `interval` s in a thread until `stop()`; `samples` are (seconds since the
    epoch, {part: cores over the interval before})."""

    def __init__(self, server: int | None, generators: list[int],
                 interval: float = 0.5) -> None:
        self.server, self.generators, self.interval = server, generators, interval
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._seen: dict[str, int] = {}  # "pid" or "pid/tid" -> ticks at the last sample
        self._by_process: dict[str, int] = {}  # "worker 1234" -> ticks over the samples
        self._span = 0.0  # seconds the samples cover

    def start(self) -> CpuSampler:
        if Path("/proc/stat").exists():
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _delta(self, key: str, ticks: int) -> int:
        before = self._seen.get(key)
        self._seen[key] = ticks
        return 0 if before is None else max(0, ticks - before)

    def _count(self, label: str, pid: int) -> int:
        """Ticks process `pid` used since the last read, also counted under `label`."""
        ticks = self._delta(str(pid), process_ticks(f"/proc/{pid}/stat"))
        self._by_process[label] = self._by_process.get(label, 0) + ticks
        return ticks

    def _read(self) -> tuple[dict[str, int], list[int]]:
        """Ticks each part used since the last read, and the box's /proc/stat counters."""
        used = dict.fromkeys(PARTS[:4], 0)
        kids = _children()
        if self.server is not None:
            used["loader"] += self._count("loader", self.server)
            for pid in _tree(self.server, kids):
                # Every child but the workers is a build process's (one just started is still
                # named "python" for its first ~0.5 s) or multiprocessing's, which takes none.
                worker = _process_name(pid) == WORKER_PROCESS
                used["workers" if worker else "builder"] += self._count(
                    f"{'worker' if worker else 'build'} {pid}", pid)
        for gen in self.generators:
            for pid in [gen, *_tree(gen, kids)]:
                used["generator"] += self._delta(str(pid), process_ticks(f"/proc/{pid}/stat"))
        return used, _box_ticks()

    def _run(self) -> None:
        _, box0 = self._read()
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            used, box = self._read()
            now = time.monotonic()
            elapsed = now - last
            self._span += elapsed
            d = [b - a for a, b in zip(box0, box, strict=True)]
            total_busy = sum(d) - d[3] - d[4] - d[7]  # all but idle, iowait and steal
            cores = {k: v / TICK / elapsed for k, v in used.items()}
            cores["other"] = max(0.0, total_busy / TICK / elapsed - sum(cores.values()))
            cores["idle"] = (d[3] + d[4]) / TICK / elapsed
            cores["steal"] = d[7] / TICK / elapsed
            self.samples.append((time.time(), {k: round(v, 3) for k, v in cores.items()}))
            box0, last = box, now

    def cores_by_process(self) -> dict[str, float]:
        """Mean cores of each server process over the samples ("loader", "worker PID",
        "build PID", ...)."""
        span = self._span or 1.0
        return {k: round(v / TICK / span, 2) for k, v in self._by_process.items()}

    def summary(self, windows: list[tuple[float, float]] | None = None) -> dict[str, Any]:
        """Mean cores per part over the run, and over the samples inside `windows` (the
        swaps: from an export written to it served)."""
        def mean(samples: list[dict[str, float]]) -> dict[str, float]:
            return {k: round(sum(s.get(k, 0.0) for s in samples) / len(samples), 2)
                    for k in PARTS} if samples else {}

        out: dict[str, Any] = {"samples": len(self.samples),
                               "mean_cores": mean([s for _, s in self.samples])}
        if self._span:  # each server process, busiest first ("build" processes come and go)
            out["mean_cores_by_process"] = dict(sorted(
                ((k, v) for k, v in self.cores_by_process().items() if v >= 0.01),
                key=lambda kv: -kv[1]))
        if windows:
            inside = [s for t, s in self.samples if any(a <= t <= b for a, b in windows)]
            out["mean_cores_during_swaps"] = mean(inside)
        return out
