"""Programs from Debian's packages that the tests and the bench drive (HAProxy, Chromium)."""

from __future__ import annotations

import os
import shutil
import subprocess


def debian_program(names: tuple[str, ...], package: str) -> str:
    """The first of `names` on PATH, after `apt-get install package` (as root, or with sudo)
    where none is: the README's test command needs nothing else."""
    found = next((p for n in names if (p := shutil.which(n))), None)
    if found is None and shutil.which("apt-get"):
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]):
            subprocess.run([*sudo, *cmd], env=env, check=False, capture_output=True,
                           timeout=600)
        found = next((p for n in names if (p := shutil.which(n))), None)
    if found is None:
        raise RuntimeError(f"no {names[0]}, and `apt-get install {package}` did not give one")
    return found
