"""Analysis of language-model runs (batch unit: tokens): targets, token columns, noise through training.

Owns: which target a run has (``target_spec``: a test accuracy, or a validation loss in nats per
token; an override wins), the columns only a token run has (``token_columns``), and
``noise_frame``: every gradient-noise-scale estimate of a run paired with the validation loss
of the latest evaluation at or before its step, beside Kaplan et al.'s B_crit(L) at that loss.

Token columns (docs/results.md): ``global_batch_tokens`` (= the plan's global batch, which a
token run counts in tokens), ``context_length``, ``tokens_to_target`` with its sustained value
and resolutions (= the crossing's samples columns: a token run's samples are tokens),
``tokens_per_s`` (training throughput over all workers), ``model_flops_per_token`` (6 N, as the
run logged it), ``mfu`` (tokens/s x FLOPs per token over the workers' summed dense bf16 peak,
``bench.lm.tokenplan.PEAK_BF16_FLOPS``; a CPU or an unlisted GPU: NaN, never a guess) and
``entropy_floor_nats`` (generated corpora: the best achievable loss).

Input is ``bench.records.RunRecord`` values. Must not import: torch, ray, bench.analysis (which
imports this module).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from bench import crossing
from bench import events as ev
from bench.lm.tokenplan import kaplan_critical_batch_tokens, model_flops_utilisation, peak_bf16_flops

NOISE_COLUMNS = ["sweep", "run_id", "global_batch_size", "num_workers", "seed", "step", "b_simple_tokens",
                 "eval_loss", "eval_step", "kaplan_b_crit_tokens"]


def _num(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def is_token_run(record: Any) -> bool:
    plan = record.plan or {}
    summary = record.summary
    return plan.get("batch_unit") == "tokens" or (summary is not None and summary.batch_unit == "tokens")


def target_spec(record: Any, accuracy: float | None = None, loss: float | None = None) -> tuple[str, float]:
    """("accuracy", value) or ("loss", value): an override when given, else the sweep's target
    (config.yaml, falling back to summary.json); NaN when the run names none."""
    if accuracy is not None:
        return "accuracy", float(accuracy)
    if loss is not None:
        return "loss", float(loss)
    config, summary = record.config or {}, record.summary
    stored_loss = config.get("target_loss", summary.target_loss if summary is not None else None)
    if stored_loss is not None:
        return "loss", _num(stored_loss)
    return "accuracy", _num(config.get("target_accuracy", summary.target_accuracy if summary is not None else None))


def _logged(record: Any, key: str) -> float:
    return _num(next((e.get("value") for e in record.events if e.get("key") == key), None))


def _peak_flops(record: Any) -> float | None:
    """The summed dense bf16 peak of the GPUs the run used (None on a CPU or an unlisted GPU)."""
    hardware = record.summary.hardware if record.summary is not None else None
    if hardware is None or hardware.device_type != "cuda" or not hardware.gpus:
        return None
    peaks = {peak_bf16_flops(g.model) for g in hardware.gpus}
    if None in peaks or len(peaks) != 1:
        return None  # an unlisted GPU, or a mix whose sum is not one number per worker
    return peaks.pop() * hardware.num_workers


def token_columns(record: Any, row: dict[str, Any]) -> dict[str, Any]:
    """The columns of a token run, from its record and the run row built so far (its crossings
    and throughput); {} for a run counted in samples."""
    if not is_token_run(record):
        return {}
    plan = record.plan or {}
    out: dict[str, Any] = {"global_batch_tokens": plan.get("global_batch_size"),
                           "context_length": plan.get("context_length")}
    for name in crossing.columns():
        if name.startswith("samples_to_target"):
            out["tokens" + name[len("samples"):]] = row.get(name, math.nan)
    tokens_per_s = _num(row.get("samples_per_s"))
    flops = _logged(record, ev.MODEL_FLOPS_PER_TOKEN)
    mfu = (model_flops_utilisation(tokens_per_s, flops, _peak_flops(record))
           if math.isfinite(tokens_per_s) and math.isfinite(flops) else None)
    out.update(tokens_per_s=tokens_per_s, model_flops_per_token=flops, mfu=math.nan if mfu is None else mfu,
               entropy_floor_nats=_logged(record, ev.ENTROPY_FLOOR_NATS))
    return out


def noise_rows(record: Any) -> list[dict[str, Any]]:
    """One row per gradient_noise_scale event of a run: B_simple (tokens for a token run), the
    validation loss of the latest evaluation at or before that step (NaN before the first), and
    Kaplan's B_crit at that loss."""
    evals = sorted((_num((e.get("metadata") or {}).get("step")), _num(e.get("value")))
                   for e in record.events if e.get("key") == ev.EVAL_LOSS)
    plan = record.plan or {}
    rows = []
    for e in record.events:
        if e.get("key") != ev.GRADIENT_NOISE_SCALE:
            continue
        step = _num((e.get("metadata") or {}).get("step"))
        before = [(s, loss) for s, loss in evals if s <= step]
        eval_step, loss = before[-1] if before else (math.nan, math.nan)
        kaplan = kaplan_critical_batch_tokens(loss) if math.isfinite(loss) and loss > 0 else math.nan
        rows.append({"sweep": record.sweep, "run_id": record.run_id, "global_batch_size": plan.get("global_batch_size"),
                     "num_workers": plan.get("num_workers"), "seed": plan.get("seed"), "step": step,
                     "b_simple_tokens": _num(e.get("value")), "eval_loss": loss, "eval_step": eval_step,
                     "kaplan_b_crit_tokens": kaplan})
    return rows


def noise_frame(records: Iterable[Any]):
    """noise_rows of every run, as a DataFrame with NOISE_COLUMNS."""
    import pandas as pd

    return pd.DataFrame([row for r in records for row in noise_rows(r)], columns=NOISE_COLUMNS)
