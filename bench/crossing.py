"""When a run reached its target: first and sustained crossings, each with its resolution.

Owns: the definitions of every *-to-target value (docs/results.md says them in words). A target
is a test accuracy (reached when the accuracy is >= it) or, for a language model, a validation
loss (reached when the loss is <= it); "reaches" below means whichever applies:

- **first crossing** (MLPerf; Shallue et al. 2018): the first evaluation that reaches the target;
- **sustained crossing**: the first evaluation that starts a run of ``hold_evals`` consecutive
  evaluations that all reach the target (the sweep's ``target_hold_evals``, default 3). A run whose
  streak is cut short by its end has no sustained crossing (it was not seen to hold);
- **resolution** of either: the interval between that evaluation and the evaluation before it
  (the start of training when there is none). The true crossing lies in (previous, crossing];
- **ends below target**: the run crossed once but its last evaluation no longer reaches the
  target (for a loss target: ends above it).

Each crossing is reported in steps (optimizer steps done), samples (training samples consumed),
epochs (samples / training-set size: fractional for step-based evaluation, the whole epoch for
an epoch-end evaluation of a full epoch), training seconds (evaluation excluded) and wall seconds
since run_start (no resolution: it includes the evaluations).

Input is the list of evaluation dicts ``bench.analysis.evaluations`` builds; pure functions,
nothing here reads a file. Must not import: torch, ray, pandas.
"""

from __future__ import annotations

import math
from typing import Sequence

DEFAULT_HOLD_EVALS = 3  # bench.config.SweepConfig.target_hold_evals' default

# position key in an evaluation dict -> column stem; each gets "<stem>" and "<stem>_resolution"
# (time: "time_to_target_s" / "time_to_target_resolution_s": the unit ends the name)
_MEASURES = (("step", "steps_to_target"), ("epoch", "epochs_to_target"),
             ("samples", "samples_to_target"), ("train_time_s", "time_to_target"))
_START = {"step": 0.0, "epoch": 0.0, "samples": 0.0, "train_time_s": 0.0}


def column(stem: str, *, sustained: bool = False, resolution: bool = False) -> str:
    """The runs_frame column of one to-target value, e.g. column("time_to_target", sustained=True,
    resolution=True) == "time_to_target_sustained_resolution_s"."""
    name = stem + ("_sustained" if sustained else "") + ("_resolution" if resolution else "")
    return name + "_s" if stem == "time_to_target" else name


def resolution_of(name: str) -> str:
    """The resolution column of a to-target column ("time_to_target_s" -> "time_to_target_resolution_s")."""
    return name[:-2] + "_resolution_s" if name.endswith("_s") else name + "_resolution"


def columns() -> list[str]:
    """Every column ``crossings`` returns, first and sustained side by side."""
    out = []
    for _, stem in _MEASURES:
        for sustained in (False, True):
            out += [column(stem, sustained=sustained), column(stem, sustained=sustained, resolution=True)]
    return out + ["elapsed_to_target_s", "elapsed_to_target_sustained_s", "ends_below_target"]


METRIC_KEY = {"accuracy": "test_acc", "loss": "test_loss"}  # target metric -> evaluation key


def reaches(value: float, target: float, lower_is_better: bool = False) -> bool:
    """value >= target (accuracy), or value <= target (loss); NaN never reaches."""
    return value <= target if lower_is_better else value >= target


def first_index(accs: Sequence[float], target: float, *, lower_is_better: bool = False) -> int | None:
    """Index of the first evaluation that reaches the target (NaN never counts)."""
    if math.isnan(target):
        return None
    return next((i for i, a in enumerate(accs) if reaches(a, target, lower_is_better)), None)


def sustained_index(accs: Sequence[float], target: float, hold_evals: int, *,
                    lower_is_better: bool = False) -> int | None:
    """Index of the first evaluation that starts ``hold_evals`` consecutive evaluations reaching the target."""
    if math.isnan(target) or hold_evals < 1:
        return None
    streak = 0
    for i, a in enumerate(accs):
        streak = streak + 1 if reaches(a, target, lower_is_better) else 0
        if streak == hold_evals:
            return i - hold_evals + 1
    return None


def _at(evals: Sequence[dict], index: int | None, *, sustained: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    hit = evals[index] if index is not None else None
    before = (evals[index - 1] if index else _START) if index is not None else None
    for key, stem in _MEASURES:
        value = hit[key] if hit is not None else math.nan
        width = value - before[key] if hit is not None else math.nan
        out[column(stem, sustained=sustained)] = value
        out[column(stem, sustained=sustained, resolution=True)] = width
    out["elapsed_to_target_sustained_s" if sustained else "elapsed_to_target_s"] = (
        hit["elapsed_s"] if hit is not None else math.nan)
    return out


def crossings(evals: Sequence[dict], target: float, *, hold_evals: int = DEFAULT_HOLD_EVALS,
              metric: str = "accuracy") -> dict:
    """First and sustained crossing of ``target`` with their resolutions, and whether the run ends
    short of a target it once reached. ``evals`` are in training order, each with the keys step,
    epoch, samples, train_time_s, elapsed_s and test_acc (``metric`` "accuracy") or test_loss
    ("loss": reached when <= target). Unknown (never reached) is NaN."""
    low = metric == "loss"
    values = [e[METRIC_KEY[metric]] for e in evals]
    first = first_index(values, target, lower_is_better=low)
    held = sustained_index(values, target, hold_evals, lower_is_better=low)
    last = next((a for a in reversed(values) if not math.isnan(a)), math.nan)
    return {**_at(evals, first, sustained=False), **_at(evals, held, sustained=True),
            "ends_below_target": bool(first is not None and not reaches(last, target, low))}
