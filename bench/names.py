"""Names that become folder names: sweeps, clusters and run ids.

Owns: the rule for a safe folder name, and the run id's format (``gbs000256-w008-s1``) in both
directions. Must not import: anything from bench but bench.errors; torch, ray, pandas.
"""

from __future__ import annotations

import re

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RUN_ID = re.compile(r"^gbs(\d{6,})-w(\d{3,})-s(\d+)$")


def check_name(name: str, what: str = "name") -> str:
    """Sweep and run names become folder names: letters, digits, '.', '_', '-' only,
    not starting with '.', so no name can escape the results folder."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")
    return name


def run_id(global_batch_size: int, num_workers: int, seed: int) -> str:
    return f"gbs{global_batch_size:06d}-w{num_workers:03d}-s{seed}"


def parse_run_id(name: str) -> tuple[int, int, int] | None:
    """(global_batch_size, num_workers, seed) of a run id, or None if it is not one: what a run
    folder says about itself when its files cannot be read."""
    m = _RUN_ID.match(name)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None
