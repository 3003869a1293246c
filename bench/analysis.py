"""Analysis: stored runs -> tidy DataFrames and the scaling numbers behind the report.

Owns: one row per run (``runs_frame``: final/best accuracy, generalisation gap and
steps/epochs/samples/time-to-target read from the event log afterwards), per-eval
learning curves, the applied LR schedule, telemetry as numbers, seed statistics
(mean, std, n, MLPerf olympic mean), the per-batch summary table, the
Shallue/McCandlish fit steps(B) = S_min * (1 + B_crit / B), scaling regimes,
steps speed-up and throughput scaling efficiency.

Input is ``bench.store.RunRecord`` values (the caller loads them); nothing here
knows a file path. Must not import: torch, ray, matplotlib, seaborn.

Unknown stays NaN/None, never a guess: a run that never reaches the target keeps
its row with NaN to-target values; incomplete runs appear with status "incomplete".
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from bench import events as ev
from bench.store import RunRecord

RUN_COLUMNS = [
    "sweep", "run_id", "workload", "global_batch_size", "num_workers", "per_worker_batch_size",
    "grad_accum_steps", "seed", "peak_lr", "final_train_acc", "final_test_acc", "best_test_acc",
    "epochs_to_target", "steps_to_target", "time_to_target_s", "train_time_s", "samples_per_s", "status",
]
GROUP_KEYS = ("sweep", "global_batch_size", "num_workers")
LAST_FRACTION = 0.2  # test_acc_std_last_k: evaluations in the last 20 % of the epochs run
PERFECT_MIN_SPEEDUP = 1.8  # steps speed-up per batch doubling at or above this: perfect scaling
MAXIMAL_MAX_SPEEDUP = 1.1  # at or below this: maximal data parallelism
_METRIC_COLUMN = {ev.EVAL_ACCURACY: "test_acc", ev.EVAL_LOSS: "test_loss",
                  ev.TRAIN_ACCURACY: "train_acc", ev.TRAIN_LOSS: "train_loss"}


def to_float(value: Any) -> float:
    """A float, or NaN for None / text that is not a number ('nan' from a diverged loss stays NaN)."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
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
    }


def _summary_dict(record: RunRecord) -> dict[str, Any]:
    return record.summary.model_dump() if record.summary is not None else {}


def evaluations(record: RunRecord) -> list[dict[str, float]]:
    """One dict per evaluation (grouped by epoch_num and step), in log order."""
    rows: dict[tuple, dict[str, float]] = {}
    for event in record.events:
        column = _METRIC_COLUMN.get(event.get("key"))
        if column is None:
            continue
        md = event.get("metadata") or {}
        row = rows.setdefault((md.get("epoch_num"), md.get("step")), {
            "epoch": to_float(md.get("epoch_num")), "step": to_float(md.get("step")),
            "samples": to_float(md.get("samples_count")), "train_time_s": to_float(md.get("train_time_s")),
            "elapsed_s": to_float(md.get("elapsed_s")), "train_acc": math.nan, "test_acc": math.nan,
            "train_loss": math.nan, "test_loss": math.nan})
        row[column] = to_float(event.get("value"))
    return list(rows.values())


def target_of(record: RunRecord, override: float | None = None) -> float:
    if override is not None:
        return float(override)
    return to_float((record.config or {}).get("target_accuracy", _summary_dict(record).get("target_accuracy")))


def to_target(evals: list[dict[str, float]], target: float) -> dict[str, float]:
    """First evaluation whose test accuracy >= target (Shallue et al.); NaN when never reached."""
    hit = next((e for e in evals if not math.isnan(target) and e["test_acc"] >= target), None)
    if hit is None:
        return dict.fromkeys(("epochs_to_target", "steps_to_target", "samples_to_target",
                              "time_to_target_s", "elapsed_to_target_s"), math.nan)
    return {"epochs_to_target": hit["epoch"], "steps_to_target": hit["step"],
            "samples_to_target": hit["samples"], "time_to_target_s": hit["train_time_s"],
            "elapsed_to_target_s": hit["elapsed_s"]}


def _last_fluctuation(evals: list[dict[str, float]]) -> float:
    """Std (ddof 1) of test accuracy over the evaluations in the last 20 % of epochs; NaN if < 2."""
    trained = [e for e in evals if e["epoch"] > 0]
    if not trained:
        return math.nan
    last_epoch = max(e["epoch"] for e in trained)
    values = [e["test_acc"] for e in trained if e["epoch"] > (1 - LAST_FRACTION) * last_epoch]
    values = [v for v in values if not math.isnan(v)]
    return float(np.std(values, ddof=1)) if len(values) >= 2 else math.nan


def _noise_scale(record: RunRecord) -> float:
    """Median B_simple over the second half of the run's gradient-noise-scale estimates."""
    values = [to_float(e.get("value")) for e in record.events if e.get("key") == ev.GRADIENT_NOISE_SCALE]
    values = [v for v in values[len(values) // 2:] if math.isfinite(v)]
    return float(np.median(values)) if values else math.nan


def _failure_reason(record: RunRecord) -> str | None:
    if record.damage is not None:
        return f"damaged: {record.damage}"
    summary = _summary_dict(record) or None
    if summary is None:
        stops = [e for e in record.events if e.get("key") == ev.RUN_STOP]
        if stops:
            md = stops[-1].get("metadata") or {}
            return f"no summary.json; run_stop {md.get('status', '?')}: {md.get('reason', 'no reason given')}"
        epochs = [e for e in record.events if e.get("key") == ev.EPOCH_STOP]
        last = (epochs[-1].get("metadata") or {}).get("epoch_num") if epochs else 0
        return f"no summary.json (interrupted or still running; last epoch logged: {last})"
    failure = summary.get("failure")
    if summary.get("status", "success") == "success" and not failure:
        return None
    if isinstance(failure, dict):
        return str(failure.get("reason") or summary.get("status"))
    return str(failure or summary.get("status"))


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


def run_row(record: RunRecord, target_accuracy: float | None = None) -> dict[str, Any]:
    """Everything known about one run, flat. Final values come from summary.json only
    (NaN for incomplete runs); best and to-target values from the event log."""
    evals = evaluations(record)
    target = target_of(record, target_accuracy)
    plan = record.plan or {}
    row = {**_identity(record), **_summary_values(record, evals), **to_target(evals, target),
           "status": record.status, "test_acc_std_last_k": _last_fluctuation(evals),
           "micro_batch_size": plan.get("micro_batch_size"), "model": plan.get("model"),
           "target_accuracy": target, "failure_reason": _failure_reason(record),
           "noise_scale_b_simple": _noise_scale(record), "num_evals": len(evals),
           "steps_per_epoch": plan.get("steps_per_epoch"), "cluster": (record.cluster or {}).get("name")}
    return row


def runs_frame(records: Iterable[RunRecord], *, target_accuracy: float | None = None) -> pd.DataFrame:
    """One row per run: RUN_COLUMNS first, then the extra columns. Never drops a run."""
    rows = [run_row(r, target_accuracy) for r in records]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=RUN_COLUMNS)
    extra = [c for c in df.columns if c not in RUN_COLUMNS]
    df = df[RUN_COLUMNS + extra]
    return df.sort_values(["sweep", "num_workers", "global_batch_size", "seed"], kind="stable",
                          ignore_index=True)


def _tag(record: RunRecord) -> dict[str, Any]:
    ident = _identity(record)
    return {k: ident[k] for k in ("sweep", "run_id", "global_batch_size", "num_workers", "seed")}


def curves_frame(records: Iterable[RunRecord]) -> pd.DataFrame:
    """Tidy learning curves: one row per evaluation of every run."""
    rows = [{**_tag(r), "status": r.status, **e} for r in records for e in evaluations(r)]
    return pd.DataFrame(rows, columns=[*_tag_columns(), "status", "epoch", "step", "samples",
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


def telemetry_frame(records: Iterable[RunRecord]) -> pd.DataFrame:
    """Telemetry rows of every rank as numbers (empty cell -> NaN); t_s = seconds since the run's first sample."""
    frames = []
    for r in records:
        rows, _problems = r.read_telemetry()
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
                "time_to_target_s", "samples_per_s", "test_acc_std_last_k", "noise_scale_b_simple")


def batch_table(runs_df: pd.DataFrame) -> pd.DataFrame:
    """One row per (sweep, global batch, num_workers): counts, mean/std of each stat over the runs
    where it is known, and the MLPerf olympic mean of epochs-to-target (a non-reaching run counts
    as slowest)."""
    rows = []
    for key, g in runs_df.groupby(list(GROUP_KEYS), sort=True):
        row = {**dict(zip(GROUP_KEYS, key)), "per_worker_batch_size": g["per_worker_batch_size"].iloc[0],
               "peak_lr": g["peak_lr"].iloc[0], "n_runs": len(g), "n_success": int((g["status"] == "success").sum()),
               "n_reached": int(g["steps_to_target"].notna().sum()),
               "statuses": ", ".join(f"{n} {s}" for s, n in g["status"].value_counts().sort_index().items())}
        for col in _TABLE_STATS:
            row[f"{col}_mean"], row[f"{col}_std"], _ = _mean_std_n(g[col])
        row["epochs_to_target_olympic"] = olympic_mean(g["epochs_to_target"], missing_as_worst=True)
        row["peak_memory_gib_max"] = g["peak_memory_gib"].max() if "peak_memory_gib" in g else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


# --- scaling ------------------------------------------------------------------------------

def fit_steps_curve(batch: Iterable[float], steps: Iterable[float], *, relative: bool = True) -> dict[str, Any]:
    """Fit steps(B) = S_min * (1 + B_crit / B) (McCandlish et al. 2018; Shallue et al. 2018).

    Linear in 1/B: steps = S_min + (S_min * B_crit) / B, solved by (weighted) least squares.
    relative=True weights residuals by 1/steps (seed noise grows with the step count). Errors are
    1-sigma from the parameter covariance (residual variance, n - 2 dof); B_crit's by the delta
    method. Fewer than two distinct batches, or a fit with S_min <= 0 or B_crit <= 0, gives NaN.
    """
    b = np.asarray(list(batch), dtype=float)
    s = np.asarray(list(steps), dtype=float)
    ok = np.isfinite(b) & np.isfinite(s) & (b > 0) & (s > 0)
    b, s = b[ok], s[ok]
    out: dict[str, Any] = {"S_min": math.nan, "B_crit": math.nan, "S_min_err": math.nan,
                           "B_crit_err": math.nan, "n_points": int(b.size),
                           "n_batches": int(np.unique(b).size), "rel_rms": math.nan, "reason": None}
    if out["n_batches"] < 2:
        out["reason"] = "fewer than two batch sizes reached the target"
        return out
    w = 1.0 / s if relative else np.ones_like(s)
    design = np.column_stack([np.ones_like(b), 1.0 / b]) * w[:, None]
    coef, *_ = np.linalg.lstsq(design, s * w, rcond=None)
    s_min, slope = float(coef[0]), float(coef[1])
    if s_min <= 0 or slope <= 0:
        out["reason"] = f"fit has no plateau in the measured range (S_min={s_min:.3g}, slope={slope:.3g})"
        return out
    pred = s_min + slope / b
    dof = b.size - 2
    cov = np.full((2, 2), math.nan)
    if dof > 0:
        cov = float(np.sum((s * w - design @ coef) ** 2)) / dof * np.linalg.inv(design.T @ design)
    b_crit = slope / s_min
    var_b = cov[1, 1] / s_min**2 + slope**2 * cov[0, 0] / s_min**4 - 2 * slope * cov[0, 1] / s_min**3
    out.update(S_min=s_min, B_crit=b_crit, S_min_err=float(math.sqrt(cov[0, 0])),
               B_crit_err=float(math.sqrt(max(var_b, 0.0))) if np.isfinite(var_b) else math.nan,
               rel_rms=float(np.sqrt(np.mean(((s - pred) / s) ** 2))))
    return out


NOISE_AGREEMENT = 3.0  # McCandlish et al. 2018 found B_simple within about this factor of B_crit


def critical_batch(sweep_runs: pd.DataFrame, fit: dict[str, Any]) -> dict[str, Any]:
    """One sweep's two estimates of the critical batch: B_crit from the steps(B) fit and the in-run
    B_simple (median over runs of each run's late-training median), their ratio, whether they
    agree within NOISE_AGREEMENT, and otherwise why not (a sentence for the report)."""
    b_crit = to_float(fit.get("B_crit"))
    b_simple = to_float(sweep_runs["noise_scale_b_simple"].median()) if len(sweep_runs) else math.nan
    out = {"B_crit": b_crit, "B_simple": b_simple, "ratio": math.nan, "agree": None, "why_not": None}
    if not math.isfinite(b_simple):
        out["why_not"] = ("no run measured the gradient noise scale (set noise_scale_every_steps; one worker "
                          "also needs gradient accumulation, so that there are two batch sizes to compare)")
    elif not math.isfinite(b_crit):
        out["why_not"] = f"B_crit could not be fitted: {fit.get('reason') or 'no fit'}"
    else:
        out["ratio"] = b_simple / b_crit
        out["agree"] = 1 / NOISE_AGREEMENT <= out["ratio"] <= NOISE_AGREEMENT
        if not out["agree"]:
            out["why_not"] = (f"they differ by {max(out['ratio'], 1 / out['ratio']):.1f}x: B_simple is the noise "
                              "scale late in training under a simplifying isotropic-Hessian assumption, while B_crit "
                              "summarises the whole run to the target, whose accuracy also sets it")
    return out


def _mean_by_batch(batch: Iterable[float], steps: Iterable[float]) -> pd.Series:
    df = pd.DataFrame({"b": np.asarray(list(batch), float), "s": np.asarray(list(steps), float)})
    return df.groupby("b")["s"].mean().sort_index()


def scaling_regimes(batch: Iterable[float], steps: Iterable[float], *,
                    perfect_min: float = PERFECT_MIN_SPEEDUP, maximal_max: float = MAXIMAL_MAX_SPEEDUP
                    ) -> pd.DataFrame:
    """Label each batch size with its Shallue et al. (2018) regime from the measured curve.

    Steps are averaged per batch (NaN-only batches get regime None). Between consecutive reached
    batches the speed-up per doubling is (S_prev / S) ** (1 / log2(B / B_prev)); a batch is labelled
    by the segment that ends at it (the smallest batch by the segment that starts at it):
    >= 1.8 'perfect scaling', <= 1.1 'maximal data parallelism', otherwise 'diminishing returns'.
    """
    mean = _mean_by_batch(batch, steps)
    reached = mean.dropna()
    per_doubling = pd.Series(math.nan, index=mean.index)
    for (b0, s0), (b1, s1) in zip(reached.items(), list(reached.items())[1:]):
        per_doubling[b1] = (s0 / s1) ** (1.0 / math.log2(b1 / b0))

    def label(x: float) -> str | None:
        if math.isnan(x):
            return None
        return ("perfect scaling" if x >= perfect_min else
                "maximal data parallelism" if x <= maximal_max else "diminishing returns")

    regimes = [label(x) for x in per_doubling]
    if len(reached) >= 2:
        first = reached.index[0]
        regimes[list(mean.index).index(first)] = label(per_doubling[reached.index[1]])
    batches = mean.index.to_numpy()
    if np.all(np.mod(batches, 1) == 0):
        batches = batches.astype(int)
    return pd.DataFrame({"global_batch_size": batches, "steps_to_target": mean.values,
                         "speedup_per_doubling": per_doubling.values, "regime": regimes})


def speedup_frame(runs_df: pd.DataFrame) -> pd.DataFrame:
    """Per sweep and batch: mean steps-to-target (runs that reached it), speed-up vs the smallest
    batch that reached it, the perfect-scaling speed-up B / B0, their ratio, and the regime."""
    frames = []
    for sweep, g in runs_df.groupby("sweep", sort=True):
        regimes = scaling_regimes(g["global_batch_size"], g["steps_to_target"])
        counts = g.groupby("global_batch_size").agg(n_runs=("run_id", "size"),
                                                    n_reached=("steps_to_target", "count"))
        regimes = regimes.merge(counts, left_on="global_batch_size", right_index=True)
        reached = regimes.dropna(subset=["steps_to_target"])
        b0, s0 = (reached.iloc[0][["global_batch_size", "steps_to_target"]] if len(reached)
                  else (math.nan, math.nan))
        regimes.insert(0, "sweep", sweep)
        regimes["baseline_batch"] = b0
        regimes["speedup"] = s0 / regimes["steps_to_target"]
        regimes["perfect_speedup"] = regimes["global_batch_size"] / b0
        regimes["scaling_fraction"] = regimes["speedup"] / regimes["perfect_speedup"]
        frames.append(regimes)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def scaling_efficiency(runs_df: pd.DataFrame) -> pd.DataFrame:
    """Throughput scaling at a fixed global batch: speedup = samples/s(w) / samples/s(1 worker),
    efficiency = speedup / w. NaN where the sweep has no 1-worker run at that batch."""
    mean = (runs_df.groupby(list(GROUP_KEYS), sort=True)["samples_per_s"].mean().rename("samples_per_s")
            .reset_index())
    base = mean[mean["num_workers"] == 1][["sweep", "global_batch_size", "samples_per_s"]]
    out = mean.merge(base.rename(columns={"samples_per_s": "one_worker_samples_per_s"}),
                     on=["sweep", "global_batch_size"], how="left")
    out["samples_per_s_per_worker"] = out["samples_per_s"] / out["num_workers"]
    out["throughput_speedup"] = out["samples_per_s"] / out["one_worker_samples_per_s"]
    out["scaling_efficiency"] = out["throughput_speedup"] / out["num_workers"]
    return out
