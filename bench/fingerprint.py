"""Environment fingerprint of the driver: what code and software made a result.

Owns: git sha and dirty flag, package versions, host and CPU description. Reads
versions through importlib.metadata so it imports neither torch nor ray.

Where the code runs from a copy of the working tree (a lent GPU machine), git there may be
missing or tell another story: the lent H200 held a .git at the last *landed* commit with
this tree as uncommitted changes. So ``BATCHSCALE_GIT_SHA`` in the environment, when set,
names the commit and wins; ``git_sha_from`` says where ``git_sha`` came from, and
``git_checkout_sha`` / ``git_dirty`` keep what git itself said there.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def fingerprint(cluster_file: str | None = None) -> dict:
    status = _git("status", "--porcelain", "--untracked-files=no")
    sha = _git("rev-parse", "HEAD")
    given = os.environ.get("BATCHSCALE_GIT_SHA", "").strip() or None
    return {
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_sha": given or sha,
        "git_sha_from": "BATCHSCALE_GIT_SHA" if given else ("git" if sha else None),
        "git_checkout_sha": sha,
        "git_dirty": None if status is None else bool(status),
        "python": sys.version.split()[0],
        "batchscale": _version("batchscale"),
        "torch": _version("torch"),
        "ray": _version("ray"),
        "numpy": _version("numpy"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cluster_file": cluster_file,
        "argv": sys.argv[1:],
    }
