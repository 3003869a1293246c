"""Names that become folder names: sweeps, clusters and run ids.

Owns: the rule for a safe folder name, and the run id's format (``gbs000256-w008-s1``; an LR-search
trial away from the rule's LR carries a tag: ``gbs000256-w008-s1-lr2x`` for 2 x the rule's LR,
``gbs000256-w008-s1-lr0.1`` for an absolute peak LR of 0.1) in both directions. Must not import: anything from bench but bench.errors; torch, ray, pandas.
"""

from __future__ import annotations

import re
from decimal import Decimal

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RUN_ID = re.compile(r"^gbs(\d{6,})-w(\d{3,})-s(\d+)(?:-lr(\d+(?:\.\d+)?)(x?))?$")


def check_name(name: str, what: str = "name") -> str:
    """Sweep and run names become folder names: letters, digits, '.', '_', '-' only,
    not starting with '.', so no name can escape the results folder."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")
    return name


def _plain_number(value: float) -> str:
    """A positive float as the shortest decimal that reads back as it, without an exponent:
    0.25 -> '0.25', 2.0 -> '2', 1e-05 -> '0.00001' (only digits and '.' go into a folder name)."""
    return format(Decimal(repr(float(value))).normalize(), "f")


def lr_tag(*, factor: float | None = None, peak_lr: float | None = None) -> str:
    """The run-id tag of an LR-search trial: '-lr2x' (factor x the rule's LR) or '-lr0.1' (an
    absolute peak LR); '' for the rule's LR itself (factor 1), whose run keeps the plain id."""
    if (factor is None) == (peak_lr is None):
        raise ValueError("lr_tag: give exactly one of factor and peak_lr")
    value = factor if factor is not None else peak_lr
    if not value > 0:
        raise ValueError(f"lr_tag: {value!r} is not a positive number")
    if factor == 1:
        return ""
    return f"-lr{_plain_number(value)}{'x' if factor is not None else ''}"


def run_id(global_batch_size: int, num_workers: int, seed: int, tag: str = "") -> str:
    """'gbs000256-w008-s1', with an LR-search trial's ``lr_tag`` appended when given."""
    return f"gbs{global_batch_size:06d}-w{num_workers:03d}-s{seed}{tag}"


def parse_run_id(name: str) -> tuple[int, int, int] | None:
    """(global_batch_size, num_workers, seed) of a run id, plain or with an LR tag, or None if it
    is not one: what a run folder says about itself when its files cannot be read."""
    m = _RUN_ID.match(name)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def parse_lr_tag(name: str) -> tuple[str, float] | None:
    """('factor', 2.0) for '...-lr2x', ('peak_lr', 0.1) for '...-lr0.1'; None for a plain run id
    (the rule's LR) or a name that is not a run id."""
    m = _RUN_ID.match(name)
    if not m or m[4] is None:
        return None
    return ("factor" if m[5] else "peak_lr", float(m[4]))
