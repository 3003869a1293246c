"""Pieces the benchmark scripts share: the device check and scratch folder around the rounds,
the per-round ratio summary and its table.

Must not import: ray.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def run_rounds_on_device(args, prefix: str, run_rounds: Callable[[Any, torch.device, Path], dict]
                         ) -> tuple[str, dict, dict[str, dict[str, float]]] | None:
    """The shared frame of the interleaved-rounds scripts: resolve ``args.device`` (None, with
    one line on stderr, when CUDA is asked for and torch sees none), call ``run_rounds(args,
    device, scratch_dir)`` in a temporary folder, and summarise its ``step_ms``. Returns
    (device name to print, the rounds' result, the summary)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return None
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(prefix=f"batchscale-{prefix}-") as tmp:
        result = run_rounds(args, device, Path(tmp))
    return name, result, summarise(result["step_ms"])


def summarise(step_ms: dict[str, list[float]], base: str = "off") -> dict[str, dict[str, float]]:
    """Per setting: median/min/max step time (ms) and the per-round ratios against ``base``
    (the spread between rounds can be as large as the effect, so ratios are paired per round)."""
    reference = step_ms[base]
    stats = {}
    for label, values in step_ms.items():
        ratios = [v / b for v, b in zip(values, reference)]
        stats[label] = {"median_ms": statistics.median(values), "min_ms": min(values), "max_ms": max(values),
                        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                        "ratio_max": max(ratios)}
    return stats


def format_table(stats: dict[str, dict[str, float]], counts: dict[str, int], *, label: str, count: str,
                 base: str = "off") -> str:
    """The stats as a fixed-width table (one row per setting, with a count column), then one
    line ``overhead ratio SETTING=RATIO ...`` of the median ratios against ``base``."""
    width = max(len(label), *(len(k) for k in stats))
    lines = [f"{label:>{width}} {'median_ms':>10} {'min_ms':>9} {'max_ms':>9} {'ratio_median':>13} "
             f"{'ratio_min':>10} {'ratio_max':>10} {count:>8}"]
    for name, s in stats.items():
        lines.append(f"{name:>{width}} {s['median_ms']:10.3f} {s['min_ms']:9.3f} {s['max_ms']:9.3f} "
                     f"{s['ratio_median']:13.4f} {s['ratio_min']:10.4f} {s['ratio_max']:10.4f} "
                     f"{counts.get(name, 0):8d}")
    lines.append("overhead ratio " + " ".join(f"{k.replace(' ', '')}={s['ratio_median']:.4f}"
                                              for k, s in stats.items() if k != base))
    return "\n".join(lines)
