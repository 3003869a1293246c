"""Analysis: stored runs -> tidy DataFrames and the scaling numbers behind the report.

Owns: one row per run (``runs_frame``: final/best accuracy, generalisation gap, first and
sustained steps/epochs/samples/time-to-target with their resolutions (bench.crossing), failure
wording and memory figures (bench.run_facts), hardware warnings (bench.provenance)), per-eval
learning curves, the applied LR schedule, telemetry as numbers, seed statistics (mean, std, n,
MLPerf olympic mean), the per-batch summary table and throughput scaling efficiency; scaling
regimes and steps speed-ups with their evidence live in bench.regimes (re-exported here). The steps(B) fit lives in bench.fit (re-exported here); what only
a language model's runs have (a loss target, token columns, the noise scale through training)
in bench.analysis_lm.

Input is ``bench.records.RunRecord`` values (the caller loads them); nothing here knows a file
path. Must not import: torch, ray, matplotlib, seaborn.

Unknown stays NaN/None, never a guess: a run that never reaches the target keeps its row with
NaN to-target values; incomplete and damaged runs keep their rows (status "incomplete" /
"damaged"), and every aggregate below leaves damaged runs out (``trusted``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from bench import analysis_lm, crossing, regimes
from bench import events as ev
from bench.fit import NOISE_AGREEMENT, critical_batch, fit_steps_curve, fit_sweep  # noqa: F401 (re-exported)
from bench.provenance import hardware_mismatches
from bench.run_facts import describe_failure, failure_lr, memory_figures
from bench.regimes import (MAXIMAL_MAX_SPEEDUP, PERFECT_MIN_SPEEDUP, compare_batches,  # noqa: F401 (re-exported)
                            scaling_regimes)
from bench.records import RunRecord

RUN_COLUMNS = [
    "sweep", "run_id", "workload", "global_batch_size", "num_workers", "per_worker_batch_size",
    "grad_accum_steps", "seed", "peak_lr", "final_train_acc", "final_test_acc", "best_test_acc",
    "epochs_to_target", "steps_to_target", "time_to_target_s", "train_time_s", "samples_per_s", "status",
]
# --all-columns: after RUN_COLUMNS, these first (first and sustained crossings side by side)
LEAD_COLUMNS = [*crossing.columns(), "target_hold_evals", "target_accuracy", "target_loss", "failure_reason", "failure_lr",
                "failure_peak_lr", "failure_in_warmup", "failure_before_peak", "train_peak_allocated_gib",
                "train_peak_reserved_gib", "memory_source", "nvml_peak_gib", "nvml_baseline_gib", "nvml_peak_above_baseline_gib",
                "hardware_warnings"]
GROUP_KEYS = ("sweep", "global_batch_size", "num_workers")
LAST_FRACTION = 0.2  # test_acc_std_last_k: evaluations in the last 20 % of the epochs run
_METRIC_COLUMN = {ev.EVAL_ACCURACY: "test_acc", ev.EVAL_LOSS: "test_loss",
                  ev.TRAIN_ACCURACY: "train_acc", ev.TRAIN_LOSS: "train_loss"}


def to_float(value: Any) -> float:
    """A float, or NaN for None / text that is not a number ('nan' from a diverged loss stays NaN)."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):  # 10**400 in a log is not a number we can use
        return math.nan


def _identity(record: RunRecord) -> dict[str, Any]:
    """Who a run is: from run.json (the plan), falling back to summary.json."""
    plan, summary = record.plan or {}, _summary_dict(record)

    def pick(key: str, summary_key: str | None = None) -> Any:
        value = plan.get(key)
        return summary.get(summary_key or key) if value is None else value

    return {
        "sweep": record.sweep, "run_id": record.run_id, "workload": pick("workload"),
        "global_batch_size": pick("global_batch_size"), "num_workers": pick("num_workers"),
        "per_worker_batch_size": pick("per_worker_batch_size"), "grad_accum_steps": pick("grad_accum_steps"),
        "seed": pick("seed"), "peak_lr": pick("peak_lr"),
        # LR search (bench.lrsearch): 1.0 and 0 for every run of a plain sweep
        "lr_factor": to_float(plan.get("lr_factor", 1.0)), "stage": plan.get("stage", 0),
    }


def _summary_dict(record: RunRecord) -> dict[str, Any]:
    return record.summary.model_dump() if record.summary is not None else {}


def train_samples(record: RunRecord) -> float:
    """Samples in one epoch of the training set: the train_samples event, else the plan's num_train."""
    logged = next((e.get("value") for e in record.events if e.get("key") == ev.TRAIN_SAMPLES), None)
    return to_float(logged if logged is not None else (record.plan or {}).get("num_train"))


def evaluations(record: RunRecord) -> list[dict[str, float]]:
    """One dict per evaluation, in training order: step, samples, epoch (= samples / training-set
    size, fractional for step-based evaluation), epoch_num (as logged: display only),
    train_time_s, elapsed_s and the four metrics. One evaluation per optimizer step count."""
    per_epoch = train_samples(record)
    rows: dict[tuple, dict[str, float]] = {}
    for event in record.events:
        column = _METRIC_COLUMN.get(event.get("key"))
        if column is None:
            continue
        md = event.get("metadata") or {}
        step, samples, epoch_num = to_float(md.get("step")), to_float(md.get("samples_count")), md.get("epoch_num")
        key = ("step", step) if not math.isnan(step) else ("epoch", epoch_num)
        if key not in rows:
            epoch = samples / per_epoch if per_epoch > 0 and not math.isnan(samples) else to_float(epoch_num)
            rows[key] = {"epoch": epoch, "epoch_num": to_float(epoch_num), "step": step, "samples": samples,
                         "train_time_s": to_float(md.get("train_time_s")), "elapsed_s": to_float(md.get("elapsed_s")),
                         "train_acc": math.nan, "test_acc": math.nan, "train_loss": math.nan, "test_loss": math.nan}
        rows[key][column] = to_float(event.get("value"))
    return list(rows.values())


def target_of(record: RunRecord, override: float | None = None) -> float:
    """The run's target accuracy (NaN for a run with a loss target: bench.analysis_lm.target_spec)."""
    metric, value = analysis_lm.target_spec(record, override)
    return value if metric == "accuracy" else math.nan


def hold_evals_of(record: RunRecord) -> int:
    """The sweep's target_hold_evals (consecutive evaluations for a sustained crossing)."""
    value = (record.config or {}).get("target_hold_evals")
    return int(value) if isinstance(value, int) and value >= 1 else crossing.DEFAULT_HOLD_EVALS


def _last_fluctuation(evals: list[dict[str, float]], key: str = "test_acc") -> float:
    """Std (ddof 1) of test accuracy (or ``key``) over the evaluations in the last 20 % of epochs; NaN if < 2."""
    trained = [e for e in evals if e["epoch"] > 0]
    if not trained:
        return math.nan
    last_epoch = max(e["epoch"] for e in trained)
    values = [e[key] for e in trained if e["epoch"] > (1 - LAST_FRACTION) * last_epoch]
    values = [v for v in values if not math.isnan(v)]
    return float(np.std(values, ddof=1)) if len(values) >= 2 else math.nan


def _noise_scale(record: RunRecord) -> float:
    """Median B_simple over the second half of the run's gradient-noise-scale estimates."""
    values = [to_float(e.get("value")) for e in record.events if e.get("key") == ev.GRADIENT_NOISE_SCALE]
    values = [v for v in values[len(values) // 2:] if math.isfinite(v)]
    return float(np.median(values)) if values else math.nan


def _summary_values(record: RunRecord, evals: list[dict[str, float]]) -> dict[str, Any]:
    s = _summary_dict(record)
    telemetry = s.get("telemetry") or {}
    best = max((e["test_acc"] for e in evals if not math.isnan(e["test_acc"])), default=math.nan)
    final = {k: to_float(s.get(k)) for k in ("final_train_acc", "final_test_acc", "final_train_loss",
                                          "final_test_loss", "train_time_s", "samples_per_s")}
    summary_best = to_float(s.get("best_test_acc"))
    return {**final, "best_test_acc": best if math.isnan(summary_best) else summary_best,
            "gap_acc": final["final_train_acc"] - final["final_test_acc"],
            "gap_loss": final["final_test_loss"] - final["final_train_loss"],
            "wall_time_s": to_float(s.get("wall_time_s")), "epochs_completed": to_float(s.get("epochs_completed")),
            "steps_completed": to_float(s.get("steps_completed")),
            "peak_memory_gib": to_float(telemetry.get("peak_memory_gib")),
            "torch_peak_reserved_gib": to_float(s.get("torch_peak_reserved_gib")),
            "mean_util_pct": to_float(telemetry.get("mean_util_pct")),
            "mean_power_w": to_float(telemetry.get("mean_power_w")), "energy_j": to_float(telemetry.get("energy_j")),
            "telemetry_kind": telemetry.get("kind"), "telemetry_error": telemetry.get("error")}


def run_row(record: RunRecord, target_accuracy: float | None = None, target_loss: float | None = None) -> dict[str, Any]:
    """Everything known about one run, flat. Final values come from summary.json only
    (NaN for incomplete runs); best and to-target values from the event log. A target override
    (accuracy or loss) replaces the run's own."""
    evals = evaluations(record)
    (metric, target), hold = analysis_lm.target_spec(record, target_accuracy, target_loss), hold_evals_of(record)
    plan = record.plan or {}
    at = failure_lr(record)
    row = {**_identity(record), **_summary_values(record, evals),
           **crossing.crossings(evals, target, hold_evals=hold, metric=metric),
           "status": record.status, "test_acc_std_last_k": _last_fluctuation(evals),
           "test_loss_std_last_k": _last_fluctuation(evals, "test_loss"), "batch_unit": plan.get("batch_unit", "samples"),
           "micro_batch_size": plan.get("micro_batch_size"), "model": plan.get("model"), "target_metric": metric,
           "target_accuracy": target if metric == "accuracy" else math.nan,
           "target_loss": target if metric == "loss" else math.nan,
           "target_hold_evals": hold, "failure_reason": describe_failure(record),
           "failure_lr": at.get("lr", math.nan), "failure_peak_lr": at.get("peak_lr", math.nan),
           "failure_in_warmup": at.get("in_warmup"), "failure_before_peak": at.get("before_peak"),
           **memory_figures(record),
           "hardware_warnings": "; ".join(hardware_mismatches(record)) or None,
           "noise_scale_b_simple": _noise_scale(record), "num_evals": len(evals),
           "steps_per_epoch": plan.get("steps_per_epoch"), "cluster": (record.cluster or {}).get("name")}
    return {**row, **analysis_lm.token_columns(record, row)}


def runs_frame(records: Iterable[RunRecord], *, target_accuracy: float | None = None,
               target_loss: float | None = None) -> pd.DataFrame:
    """One row per run: RUN_COLUMNS first, then LEAD_COLUMNS, then the rest. Never drops a run."""
    rows = [run_row(r, target_accuracy, target_loss) for r in records]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=RUN_COLUMNS)
    lead = [c for c in LEAD_COLUMNS if c in df.columns and c not in RUN_COLUMNS]
    extra = [c for c in df.columns if c not in RUN_COLUMNS and c not in lead]
    df = df[RUN_COLUMNS + lead + extra]
    return df.sort_values(["sweep", "num_workers", "global_batch_size", "seed"], kind="stable",
                          ignore_index=True)


def trusted(runs_df: pd.DataFrame) -> pd.DataFrame:
    """The rows every aggregate, figure and fit may use: all but damaged runs and, in an LR search,
    all but the runs away from the rule's LR (runs at different LRs of one batch are never averaged
    together; bench.report_lrsearch compares rule and tuned)."""
    keep = runs_df["status"].ne("damaged") if "status" in runs_df else pd.Series(True, index=runs_df.index)
    if "lr_factor" in runs_df:
        keep &= runs_df["lr_factor"].isna() | runs_df["lr_factor"].eq(1.0)
    return runs_df[keep]


def _tag(record: RunRecord) -> dict[str, Any]:
    ident = _identity(record)
    return {k: ident[k] for k in ("sweep", "run_id", "global_batch_size", "num_workers", "seed")}


def curves_frame(records: Iterable[RunRecord]) -> pd.DataFrame:
    """Tidy learning curves: one row per evaluation of every run."""
    rows = [{**_tag(r), "status": r.status, **e} for r in records for e in evaluations(r)]
    return pd.DataFrame(rows, columns=[*_tag_columns(), "status", "epoch", "epoch_num", "step", "samples",
                                       "train_time_s", "elapsed_s", "train_acc", "test_acc",
                                       "train_loss", "test_loss"])


def _tag_columns() -> list[str]:
    return ["sweep", "run_id", "global_batch_size", "num_workers", "seed"]


def lr_frame(records: Iterable[RunRecord]) -> pd.DataFrame:
    """The LR actually applied (opt_learning_rate events); epoch = step / steps_per_epoch."""
    rows = []
    for r in records:
        spe = to_float((r.plan or {}).get("steps_per_epoch"))
        for e in r.events:
            if e.get("key") == ev.OPT_LEARNING_RATE:
                step = to_float((e.get("metadata") or {}).get("step"))
                rows.append({**_tag(r), "step": step, "epoch": step / spe if spe > 0 else math.nan,
                             "lr": to_float(e.get("value"))})
    return pd.DataFrame(rows, columns=[*_tag_columns(), "step", "epoch", "lr"])


_TEXT_TELEMETRY = ("sweep", "run_id", "node", "kind", "gpu_uuid")


def telemetry_frame(records: Iterable[RunRecord], problems: list[str] | None = None) -> pd.DataFrame:
    """Telemetry rows of every rank as numbers (empty cell -> NaN); t_s = seconds since the run's
    first sample. A telemetry file that cannot be read is left out (the others are kept) and, when
    ``problems`` is given, named there in one line (file, run and reason; never its content)."""
    frames = []
    for r in records:
        rows, unread = r.read_telemetry()
        if problems is not None:
            problems.extend(f"{r.sweep}/{r.run_id}: telemetry file skipped: "
                            + p.replace(f"{r.path}/", "").replace(str(r.path), r.run_id) for p in unread)
        if rows:
            tag = {**_tag(r), "per_worker_batch_size": _identity(r)["per_worker_batch_size"]}
            frames.append(pd.DataFrame(rows).assign(**tag))
    if not frames:
        return pd.DataFrame(columns=[*_tag_columns(), "t_s"])
    df = pd.concat(frames, ignore_index=True)
    for column in df.columns.difference(_TEXT_TELEMETRY):
        df[column] = pd.to_numeric(df[column], errors="coerce")
    if "time_ms" in df:
        df["t_s"] = (df["time_ms"] - df.groupby(["sweep", "run_id"])["time_ms"].transform("min")) / 1000.0
    return df


# --- aggregation --------------------------------------------------------------------------

def olympic_mean(values: Iterable[float], *, missing_as_worst: bool = False) -> float:
    """Mean after dropping one best and one worst value when n >= 3 (MLPerf); plain mean below 3.

    missing_as_worst: NaN means "never converged" and counts as slowest (infinite), as MLPerf
    scores one non-converging run; if a non-converged run survives the trimming the result is NaN.
    """
    v = np.asarray(list(values), dtype=float)
    v = np.where(np.isnan(v), np.inf, v) if missing_as_worst else v[~np.isnan(v)]
    if v.size == 0:
        return math.nan
    v = np.sort(v)
    if v.size >= 3:
        v = v[1:-1]
    return float(v.mean()) if np.all(np.isfinite(v)) else math.nan


def _mean_std_n(values: Iterable[float]) -> tuple[float, float, int]:
    v = np.asarray(list(values), dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def seed_stats(df: pd.DataFrame, value_col: str, by: Sequence[str] = GROUP_KEYS, *,
               missing_as_worst: bool = False) -> pd.DataFrame:
    """Per group: mean, std (ddof 1), n (non-NaN values), n_total and olympic_mean of value_col."""
    rows = []
    for key, group in df.groupby(list(by), sort=True, dropna=False):
        mean, std, n = _mean_std_n(group[value_col])
        rows.append({**dict(zip(by, key)), "mean": mean, "std": std, "n": n, "n_total": len(group),
                     "olympic_mean": olympic_mean(group[value_col], missing_as_worst=missing_as_worst)})
    return pd.DataFrame(rows, columns=[*by, "mean", "std", "n", "n_total", "olympic_mean"])


_TABLE_STATS = ("final_train_acc", "final_test_acc", "gap_acc", "steps_to_target", "epochs_to_target",
                "time_to_target_s", "steps_to_target_sustained", "epochs_to_target_sustained",
                "time_to_target_sustained_s", "steps_to_target_resolution", "epochs_to_target_resolution",
                "samples_per_s", "test_acc_std_last_k", "noise_scale_b_simple",
                "final_test_loss", "samples_to_target", "samples_to_target_sustained", "test_loss_std_last_k", "mfu")


def batch_table(runs_df: pd.DataFrame) -> pd.DataFrame:
    """One row per (sweep, global batch, num_workers) over the trusted (not damaged) runs:
    counts, mean/std of each stat over the runs where it is known, the MLPerf olympic mean of
    epochs-to-target (a non-reaching run counts as slowest), runs that ended below a target they
    had reached, and the largest memory figures."""
    rows = []
    for key, g in trusted(runs_df).groupby(list(GROUP_KEYS), sort=True):
        row = {**dict(zip(GROUP_KEYS, key)), "per_worker_batch_size": g["per_worker_batch_size"].iloc[0],
               "peak_lr": g["peak_lr"].iloc[0], "n_runs": len(g), "n_success": int((g["status"] == "success").sum()),
               "n_reached": int(g["steps_to_target"].notna().sum()),
               "n_sustained": int(g.get("steps_to_target_sustained", pd.Series(dtype=float)).notna().sum()),
               "n_ends_below": int(g.get("ends_below_target", pd.Series(dtype=bool)).fillna(False).astype(bool).sum()),
               "statuses": ", ".join(f"{n} {s}" for s, n in g["status"].value_counts().sort_index().items())}
        for col in _TABLE_STATS:
            row[f"{col}_mean"], row[f"{col}_std"], _ = _mean_std_n(g[col]) if col in g else (math.nan,) * 3
        row["epochs_to_target_olympic"] = olympic_mean(g["epochs_to_target"], missing_as_worst=True)
        for col in ("peak_memory_gib", "train_peak_allocated_gib", "nvml_peak_gib"):
            row[f"{col}_max"] = g[col].max() if col in g else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


# --- scaling ------------------------------------------------------------------------------

def speedup_frame(runs_df: pd.DataFrame) -> pd.DataFrame:
    """bench.regimes.speedup_frame over the trusted runs: per sweep and batch the steps speed-up,
    the regime a report may state and the evidence for each (seed spread, evaluation interval,
    runs that never reached)."""
    return regimes.speedup_frame(trusted(runs_df))


def scaling_efficiency(runs_df: pd.DataFrame) -> pd.DataFrame:
    """Throughput scaling at a fixed global batch: speedup = samples/s(w) / samples/s(1 worker),
    efficiency = speedup / w. NaN where the sweep has no 1-worker run at that batch."""
    mean = (trusted(runs_df).groupby(list(GROUP_KEYS), sort=True)["samples_per_s"].mean().rename("samples_per_s")
            .reset_index())
    base = mean[mean["num_workers"] == 1][["sweep", "global_batch_size", "samples_per_s"]]
    out = mean.merge(base.rename(columns={"samples_per_s": "one_worker_samples_per_s"}),
                     on=["sweep", "global_batch_size"], how="left")
    out["samples_per_s_per_worker"] = out["samples_per_s"] / out["num_workers"]
    out["throughput_speedup"] = out["samples_per_s"] / out["one_worker_samples_per_s"]
    out["scaling_efficiency"] = out["throughput_speedup"] / out["num_workers"]
    return out
