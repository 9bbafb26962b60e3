"""A child process's lifeline to the server that started it (the HTTP workers, the build
process): it exits when the server does, however the server ends."""

from __future__ import annotations

import os
import select
import signal
import threading
import time


def exit_with(server: int) -> None:
    """End this process when the server process (the loader) ends, and only then or when the
    server stops it. A server killed with SIGKILL (the OOM killer, a `kill -9`) runs no cleanup:
    its HTTP workers would go on serving stale data, and a build process would wait for work
    on its queue forever, holding its memory. SIGINT and SIGTERM are ignored: a terminal's
    Ctrl-C and systemd's stop signal the whole process group, and the server stops its
    children itself, in order."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        fd: int | None = os.pidfd_open(server)
    except (AttributeError, OSError):  # not Linux 5.3+, or already gone: poll instead
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])  # readable once the process has exited
        else:
            while True:
                try:
                    os.kill(server, 0)
                except ProcessLookupError:
                    break
                time.sleep(1.0)  # no pidfd: poll
        os._exit(1)

    threading.Thread(target=watch, name="duckswap-server-watch", daemon=True).start()
