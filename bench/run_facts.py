"""What one stored run says about its failure and its memory, read the same way from summaries of
either schema version.

Owns: the divergence/OOM wording shown by ``batchscale results`` and the report's failures table
("diverged during warmup at LR x (peak y not reached)", "diverged at peak LR y"), and a run's
memory figures (PyTorch training peaks, NVML absolute and above the run's baseline) with the
label of where they come from.

Schema versions (bench.summary.SCHEMA_VERSION):
- v2 summaries carry ``failure.lr`` / ``peak_lr`` / ``in_warmup`` / ``criterion`` and ``memory``
  (per-run training peaks after the allocator was reset) and ``telemetry.baseline_memory_gib``.
- v1 summaries have none of these. A v1 ``failure.step`` counts the optimizer steps completed
  when an *epoch-end evaluation* found the evaluation-mode training loss above the limit, so the
  LR in force is the plan's LR of the last step taken, ``lr(step - 1)``, and the run was still in
  warmup if that step came before ``warmup_steps`` (the first step at the peak). v1 memory comes
  from the per-epoch ``torch_memory`` events (each peak covers one training epoch *and the
  evaluation before it*: an upper bound on the training peak); v1 ``torch_peak_*`` in the summary
  covered only the final evaluation and is never used as a training peak; v1 reserved memory can
  carry an earlier run's cache (runs of one worker group shared the allocator).

Must not import: torch, ray, pandas.
"""

from __future__ import annotations

import math
from typing import Any

from bench import events as ev
from bench.plan import RunPlan

V1_CRITERION = ("judged on the evaluation-mode training loss (criterion before 2026-12; unreliable with "
                "BatchNorm early in training)")
V1_MEMORY = ("v1: max of the per-epoch peaks, each covering a training epoch and the evaluation before it "
             "(an upper bound on the training peak)")
V1_RESERVED = "v1 reserved memory may include an earlier run's cache (runs of one worker group shared the allocator)"
V2_MEMORY = "this run's training epochs (allocator reset at the run's start)"
_CRITERIA = {"non_finite_loss": "non-finite training loss", "smoothed_loss": "smoothed training loss"}


def _num(value: Any) -> float:
    try:
        return float(value) if value is not None and not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        return math.nan


def failure_lr(record: Any) -> dict[str, Any]:
    """For a diverged run: lr (LR in force when it failed), peak_lr, in_warmup (within the warmup
    steps), before_peak (in warmup *and* below the peak: the peak LR was never applied) and
    from_plan (True: derived from the plan because the summary is v1). Empty dict otherwise."""
    summary = record.summary
    if summary is None or summary.status != "diverged" or summary.failure is None:
        return {}
    f = summary.failure
    if f.lr is not None:
        at = {"lr": f.lr, "peak_lr": f.peak_lr if f.peak_lr is not None else summary.peak_lr,
              "in_warmup": f.in_warmup, "from_plan": False}
    else:
        try:
            plan = RunPlan.from_dict(record.plan)
        except (TypeError, ValueError):
            return {"lr": math.nan, "peak_lr": summary.peak_lr, "in_warmup": None, "before_peak": None,
                    "from_plan": True}
        last_step = max(f.step - 1, 0)
        at = {"lr": plan.lr(last_step), "peak_lr": plan.peak_lr, "in_warmup": last_step < plan.warmup_steps,
              "from_plan": True}
    # A warmup that starts at the peak (a batch at or below the reference batch) is at its peak
    # from step 0: such a run did test the peak LR, in warmup or not.
    at["before_peak"] = bool(at["in_warmup"]) and not _at_peak(at["lr"], at["peak_lr"])
    return at


def _at_peak(lr: float, peak: float) -> bool:
    return math.isfinite(lr) and math.isfinite(peak) and math.isclose(lr, peak, rel_tol=1e-6)


def _lr_phrase(at: dict[str, Any]) -> str:
    lr, peak = at.get("lr", math.nan), at.get("peak_lr", math.nan)
    if at.get("before_peak"):
        return f"diverged during warmup at LR {lr:.3g} (peak {peak:.3g} not reached)"
    if _at_peak(lr, peak):
        return f"diverged at peak LR {peak:.3g}" + (" (its warmup starts at the peak)" if at.get("in_warmup") else "")
    if math.isfinite(lr):
        return f"diverged after warmup at LR {lr:.3g} (peak {peak:.3g})"
    return "diverged (LR unknown: the plan could not be read)"


def describe_failure(record: Any) -> str | None:
    """One line on why a run is not a success, or None for a success."""
    if record.damage is not None:
        return f"damaged: {record.damage}"
    summary = record.summary
    if summary is None:
        stops = [e for e in record.events if e.get("key") == ev.RUN_STOP]
        if stops:
            md = stops[-1].get("metadata") or {}
            return f"no summary.json; run_stop {md.get('status', '?')}: {md.get('reason', 'no reason given')}"
        epochs = [e for e in record.events if e.get("key") == ev.EPOCH_STOP]
        last = (epochs[-1].get("metadata") or {}).get("epoch_num") if epochs else 0
        return f"no summary.json (interrupted or still running; last epoch logged: {last})"
    f = summary.failure
    if summary.status == "success" and f is None:
        return None
    if f is None:
        return summary.status
    if summary.status == "oom":
        where = f" at micro-batch {f.micro_batch_size}" if f.micro_batch_size else ""
        held = f" with {f.memory_reserved_gib:.3g} GiB reserved" if f.memory_reserved_gib is not None else ""
        return f"out of memory{where}{held} after {f.step} steps: {f.reason}"
    if summary.status != "diverged":
        return f.reason
    at = failure_lr(record)
    if at.get("from_plan"):
        return f"{_lr_phrase(at)}: {f.reason}; {V1_CRITERION}"
    criterion = _CRITERIA.get(f.criterion or "", f.criterion or "loss")
    if f.loss is not None and f.limit is not None:
        detail = f"{criterion} {f.loss:.4g} above the limit {f.limit:.4g} at step {f.step}"
    elif f.criterion == "non_finite_loss":
        detail = f"{criterion} at step {f.step}"
    else:
        detail = f.reason
    return f"{_lr_phrase(at)}: {detail}"


def memory_figures(record: Any) -> dict[str, Any]:
    """A run's memory, for runs_frame: PyTorch training peaks (allocated, reserved) and where they
    come from, NVML device memory (absolute, baseline, above baseline). NaN where unknown."""
    summary = record.summary
    out: dict[str, Any] = {"train_peak_allocated_gib": math.nan, "train_peak_reserved_gib": math.nan,
                           "memory_source": None, "nvml_peak_gib": math.nan, "nvml_baseline_gib": math.nan,
                           "nvml_peak_above_baseline_gib": math.nan}
    tele = summary.telemetry if summary is not None else None
    if tele is not None and tele.kind == "gpu":
        out["nvml_peak_gib"] = _num(tele.peak_memory_gib)
        out["nvml_baseline_gib"] = _num(tele.baseline_memory_gib)
        out["nvml_peak_above_baseline_gib"] = _num(tele.peak_memory_above_baseline_gib)
    if summary is not None and summary.memory is not None:
        out.update(train_peak_allocated_gib=summary.memory.train_peak_allocated_gib,
                   train_peak_reserved_gib=summary.memory.train_peak_reserved_gib, memory_source="v2")
        return out
    epochs = [e.get("metadata") or {} for e in record.events if e.get("key") == ev.TORCH_MEMORY]
    allocated = [_num(m.get("max_allocated_gib")) for m in epochs]
    reserved = [_num(m.get("max_reserved_gib")) for m in epochs]
    if any(math.isfinite(a) for a in allocated):
        out.update(train_peak_allocated_gib=max(a for a in allocated if math.isfinite(a)),
                   train_peak_reserved_gib=max((r for r in reserved if math.isfinite(r)), default=math.nan),
                   memory_source="v1")
    return out
