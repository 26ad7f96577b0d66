"""apt-get install for the test harnesses (Slurm, PostgreSQL, podman), one at a time: the xdist workers start
them concurrently on a fresh machine, and a second apt-get fails at once on dpkg's lock."""
import fcntl
import os
import subprocess
import tempfile
from pathlib import Path

LOCK = Path(tempfile.gettempdir()) / "sft-tests-apt.lock"
# apt-get waits this long for dpkg's lock when an apt outside the suite holds it, instead of failing at once.
WAIT = ["-o", "DPkg::Lock::Timeout=600"]


def apt_install(*packages: str) -> None:
    """Install `packages`; when that fails, refresh the package index (a stale index is the usual cause) and retry."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", *WAIT, "install", "-y", "-q", *packages]
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if subprocess.run(install, capture_output=True, env=env).returncode == 0:
            return
        for command in (["apt-get", *WAIT, "update", "-q"], install):
            result = subprocess.run(command, capture_output=True, text=True, env=env)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed: {result.stderr[-2000:]}")
