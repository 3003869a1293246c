"""The capacity plan in words and numbers for people: the recommendation sentences of
``bench.planner`` (each comparison with its seed spread and resolution, bench.spread), the
descriptions of a row, and the formatting every number of the plan goes through.

Owns: ``amount`` (3 significant figures, positional, thousands separated: never "7.7e-06"),
``time_unit`` / ``duration`` (seconds, minutes or hours by magnitude), ``device_time`` (GPU- or
worker-seconds, -minutes, -hours), ``count`` ("1 worker", "2 GPUs"), ``versus``, ``describe`` and
``recommendation``. A row is a dict of a plan table's row (``bench.planner``'s columns); the
word for what a worker is ("GPU" or "worker") is passed in.

Must not import: torch, ray, pandas, bench.planner (it imports this module).
"""

from __future__ import annotations

import math
from typing import Any

from bench.spread import Sample, compare

# (seconds per unit, short name, long name), smallest first; a unit is used from 1 of it upwards,
# minutes from 2 min and hours from 2 h so that "90 s" and "90 min" stay as people say them.
_UNITS = ((1.0, "s", "seconds"), (60.0, "min", "minutes"), (3600.0, "h", "hours"))
_FROM = {1.0: 0.0, 60.0: 120.0, 3600.0: 7200.0}


def amount(x: float, digits: int = 3) -> str:
    """x to `digits` significant figures, written out (0.0000278, 49,200, 0.654); '-' when unknown."""
    if x is None or not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    exponent = math.floor(math.log10(abs(x)))
    decimals = digits - 1 - exponent
    rounded = round(x, decimals)
    if rounded and math.floor(math.log10(abs(rounded))) > exponent:  # 9.996 -> 10.0: one digit fewer
        decimals -= 1
        rounded = round(x, decimals)
    if decimals <= 0:
        return f"{rounded:,.0f}"
    return f"{rounded:,.{decimals}f}".rstrip("0").rstrip(".")


def time_unit(seconds: float) -> tuple[float, str, str]:
    """(seconds per unit, short, long) for showing `seconds`: seconds below 2 min, minutes below 2 h."""
    chosen = _UNITS[0]
    for unit in _UNITS:
        if math.isfinite(seconds) and abs(seconds) >= _FROM[unit[0]]:
            chosen = unit
    return chosen


def duration(seconds: float) -> str:
    """'0.0278 s', '10.2 min', '3.5 h'."""
    per, short, _ = time_unit(seconds)
    return f"{amount(seconds / per)} {short}"


def device_time(device_seconds: float, device: str) -> str:
    """GPU (or worker) time for people: '0.0278 GPU-seconds', '10.2 worker-minutes', '3.5 GPU-hours'."""
    per, _, long = time_unit(device_seconds)
    return f"{amount(device_seconds / per)} {device}-{long}"


def count(n: Any, device: str) -> str:
    """'1 worker', '2 GPUs'."""
    n = int(n)
    return f"{n} {device}{'s' * (n != 1)}"


def versus(a: dict, b: dict | None, col: str = "time_to_target_s", device: str = "GPU") -> str:
    """Whether row a's time (or device time, col="gpu_hours") differs from row b's beyond the
    seed spread and the evaluation interval (bench.spread), in a unit chosen for the gap."""
    if b is None:
        return "no other configuration to compare with"
    if a["source"] != "measured" or b["source"] != "measured":
        return "an extrapolated row has no seed spread, so the difference from the next option is not established"
    per_run = (lambda row: row["num_gpus"]) if col == "gpu_hours" else (lambda row: 1.0)  # device-seconds per second
    runs_a = [t * per_run(a) for t in a["time_runs_s"]]
    runs_b = [t * per_run(b) for t in b["time_runs_s"]]
    widths = [row["time_resolution_s"] * per_run(row) for row in (a, b)]
    resolution = max((w for w in widths if math.isfinite(w)), default=math.nan)
    gap = abs(Sample.of(runs_a).mean - Sample.of(runs_b).mean)
    per, short, long = time_unit(gap if math.isfinite(gap) and gap > 0 else max(runs_a + runs_b, default=1.0))
    unit = f"{device}-{long}" if col == "gpu_hours" else short
    return compare(Sample.of(t / per for t in runs_a), Sample.of(t / per for t in runs_b), unit=unit,
                   resolution=resolution / per).phrase


def describe(row: dict, device: str, price: float | None) -> str:
    """'global batch 450 on 1 worker: 0.0278 s to target, 0.0278 worker-seconds [measured]'."""
    cost = f", cost {amount(row['cost'])} per run at {price:g} per {device}-hour" if price is not None else ""
    n = row.get("num_nodes")
    nodes = f" ({n:.0f} node{'s' * (n > 1)})" if n is not None and math.isfinite(n) and n > 0 else ""
    return (f"global batch {row['global_batch_size']} on {count(row['num_gpus'], device)}{nodes}: "
            f"{duration(row['time_to_target_s'])} to target, "
            f"{device_time(row['gpu_hours'] * 3600.0, device)}{cost} [{label(row)}]")


def label(row: dict) -> str:
    if row["source"] == "extrapolated":
        return row["note"]
    return "measured" + (f"; {row['note']}" if row["note"] else "")


def _other(other: dict | None, device: str) -> str:
    return f"batch {other['global_batch_size']} on {count(other['num_gpus'], device)}" if other else "none"


def _same(a: dict, b: dict | None) -> bool:
    return b is not None and (a["global_batch_size"], a["num_gpus"]) == (b["global_batch_size"], b["num_gpus"])


def recommendation(r: Any, lines: list[tuple[str, dict, dict | None]], min_speedup: float) -> str:
    """One line per choice of a plan (``bench.planner.PlanResult`` r): cheapest, fastest, where more
    workers stop helping; each against its runner-up, with the seed spread."""
    goal = f"within {duration(r.deadline_s)}" if r.deadline_s else "(no deadline)"
    device = r.device
    out = [] if r.cheapest else [f"nothing reaches {r.target_text} {goal}; the fastest option is below"]
    for kind, row, other in lines:
        if kind == "cheapest":
            out.append(f"cheapest {goal}: {describe(row, device, r.gpu_hour_price)}; against the next cheapest "
                       f"({_other(other, device)}): {versus(row, other, 'gpu_hours', device)}")
        elif kind == "fastest":
            what = ("the same configuration" if _same(row, r.cheapest)
                    else describe(row, device, r.gpu_hour_price))
            out.append(f"fastest: {what}; against the next fastest ({_other(other, device)}): "
                       f"{versus(row, other, device=device)}")
        else:
            out.append(f"more {device}s stop helping beyond {count(r.gpus_stop_helping, device)}: doubling them "
                       f"speeds the best configuration up by less than {min_speedup:g}x "
                       f"({versus(row, other, device=device)})")
    return "\n".join(out)
