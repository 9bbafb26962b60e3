"""The GCS emulator (bench/emulator.py) and a slow link in front of it, for the tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from bench.emulator import BUCKET, Emulator
from bench.ports import free_port

__all__ = ["BUCKET", "Emulator", "SlowProxy", "free_port"]


class SlowProxy:
    """A TCP proxy in front of the emulator that sends the emulator's answers at `rate`
    bytes per second, so that a download lasts long enough to kill a server in the middle of
    it (a slow network is a fault the emulator itself cannot produce). `stop` makes the bucket
    unreachable; `start` again listens on the same port."""

    def __init__(self, target_port: int, rate: int) -> None:
        self.target_port = target_port
        self.rate = rate
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []

    def start(self) -> None:
        listener = socket.socket()
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            deadline = time.monotonic() + 10
            while True:  # the port may be taken a moment by a loopback connection's end
                try:
                    listener.bind(("127.0.0.1", self.port))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            listener.listen(64)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        if self._listener is not None:
            # Linux keeps a socket listening while a thread is blocked in its accept(), close
            # or not: a start before the next connection came failed with EADDRINUSE.
            # shutdown() wakes that accept() up.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
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
            src.close()  # the other direction's thread closes the other end
