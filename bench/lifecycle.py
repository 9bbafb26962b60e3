"""Marker to served through a real GCS emulator: how long each step of a load takes.

    python -m bench.lifecycle [--size default] [--rounds 3] [--poll 1]

Starts fake-gcs-server and a duckswap server (demo config, `gs://` source) in their own
processes, uploads demo exports one after another (parts first, the markers last), and times
each from its last marker to `/v1/version` naming it. The server's own split per dataset comes
from the admin API: list, download, validate, build, publish (publish: warm + swap, shared by
the datasets published together). Prints medians over the rounds, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.emulator import BUCKET, Emulator
from bench.ports import free_port
from data.generate import DATASETS, write_export

REPO = Path(__file__).resolve().parent.parent
PREFIX = "demo"
STEPS = ("list", "download", "validate", "build", "publish")


def _get(url: str, token: str | None = None) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token
                                 else {})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def _upload(emulator: Emulator, folders: dict[str, Path]) -> float:
    """Parts of every dataset, then every marker; returns when the last marker landed."""
    markers = []
    for name, folder in folders.items():
        base = f"{BUCKET}/{PREFIX}/{name}/{folder.name}"
        for path in sorted(folder.iterdir()):
            if path.name.startswith("_"):
                markers.append((path, f"{base}/{path.name}"))
            else:
                emulator.fs.put_file(str(path), f"{base}/{path.name}")
    for path, target in markers:
        emulator.fs.put_file(str(path), target)
    return time.perf_counter()


def _wait(check: Any, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return time.perf_counter()
        except OSError:
            pass  # not up yet
        time.sleep(0.01)
    raise SystemExit(f"timed out after {timeout}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lifecycle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="default")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--poll", type=float, default=1.0, help="source.poll_seconds")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="duckswap-lifecycle-"))
    emulator = Emulator(work / "gcs")
    emulator.start()
    token, port = secrets.token_hex(16), free_port()
    env = dict(os.environ,
               DUCKSWAP_SOURCE__URL=f'"gs://{BUCKET}/{PREFIX}"',
               DUCKSWAP_SOURCE__ENDPOINT_URL=f'"{emulator.url}"',
               DUCKSWAP_SOURCE__TOKEN='"anon"',
               DUCKSWAP_SOURCE__POLL_SECONDS=str(args.poll),
               DUCKSWAP_SERVER__PORT=str(port), DUCKSWAP_SERVER__ADMIN_TOKEN=f'"{token}"',
               DUCKSWAP_SERVER__DATA_DIR=f'"{work / "data"}"',
               DUCKSWAP_SERVER__LOG_LEVEL="WARNING")
    url = f"http://127.0.0.1:{port}"
    log = (work / "server.log").open("wb")
    server = None
    rounds: list[dict[str, Any]] = []
    try:
        _upload(emulator, write_export(work / "exports", 1, args.size))
        server = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "serve", "--config",
             str(REPO / "data" / "demo.toml")], env=env, stdout=log, stderr=subprocess.STDOUT)
        _wait(lambda: _get(f"{url}/readyz")["status"] == "ready", 300)
        for seq in range(2, 2 + args.rounds):
            folders = write_export(work / "exports", seq, args.size)
            export_id = folders[DATASETS[0]].name
            marked = _upload(emulator, folders)
            served = _wait(lambda: all(
                d["export_id"] == export_id  # noqa: B023
                for d in _get(f"{url}/v1/version")["datasets"].values()), 300)
            listing = _get(f"{url}/admin/datasets", token)["datasets"]
            per = {d["name"]: d["served"]["timings_s"] for d in listing}
            rounds.append({
                "export_id": export_id,
                "marker_to_served_s": round(served - marked, 3),
                "datasets": per,
                "sum_s": {s: round(sum(t.get(s, 0.0) for t in per.values()), 3)
                          for s in STEPS if s != "publish"}
                | {"publish": max(t.get("publish", 0.0) for t in per.values())},
            })
            print(f"{export_id}: marker -> served {served - marked:.2f}s; "
                  + ", ".join(f"{s} {v:.3f}s" for s, v in rounds[-1]["sum_s"].items()))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        log.close()
        emulator.stop()
    summary = {
        "size": args.size, "poll_seconds": args.poll, "rounds": rounds,
        "median_marker_to_served_s": statistics.median(r["marker_to_served_s"] for r in rounds),
        "median_s": {s: statistics.median(r["sum_s"][s] for r in rounds) for s in STEPS},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lifecycle.json").write_text(json.dumps(summary, indent=1))
    print(f"median over {len(rounds)} rounds: marker -> served "
          f"{summary['median_marker_to_served_s']:.2f}s (poll every {args.poll:g}s); "
          + ", ".join(f"{s} {v:.3f}s" for s, v in summary["median_s"].items())
          + " (list/download/validate/build summed over the datasets)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
