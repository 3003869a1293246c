"""Capacity planner: measured runs -> time, GPU-hours and cost to reach a target accuracy for each
(global batch, number of GPUs), measured or extrapolated, and what to rent.

Owns: the throughput model below, the extrapolation of steps-to-target (through
``bench.analysis.fit_steps_curve``), the choice of the cheapest configuration meeting a deadline,
the fastest one and where more GPUs stop helping; the ``plan`` CLI command (``register``) and
``plan_figure``. Input is ``bench.analysis.runs_frame`` output; nothing here reads files.

Must not import: torch, ray. pandas/numpy/matplotlib are imported inside functions (the CLI
imports this module to build its parser).

Model (every row that uses an assumption says so in its ``note``; all are in ``assumptions``):
- GPUs = Ray Train workers (one accelerator per worker); W0 = the smallest measured worker count.
- steps(B): mean measured steps-to-target at B where a run reached the target, else the fit
  S_min (1 + B_crit / B) over all measured batches (Shallue et al. 2018, McCandlish et al. 2018);
  but from the smallest global batch at which no measured run reached the target (diverged,
  say) upwards, nothing: steps depend on the global batch alone, not on the GPU count, and the
  fit cannot see past a failure (shapes-gpu on an H200 diverged at 4096 while the fit, from
  128..2048, promised 117 steps there).
- r(b): samples/s per GPU with W0 workers at per-GPU batch b, interpolated linearly in log2(b)
  between measured per-GPU batches. Below the smallest measured b the step time is held (latency
  bound: r = r(b_min) b / b_min); above the largest, samples/s per GPU is held.
- eff(W): weak-scaling efficiency, measured per-GPU samples/s at (B, W) / r(B / W), averaged per
  W; eff(W0) = 1; interpolated in log2(W); beyond the largest measured W the last measured value
  is assumed (it usually falls further across nodes: an optimistic bound).
- samples/s(B, W) = W r(B / W) eff(W); time-to-target = steps(B) B / samples/s (training time,
  evaluation excluded, as analysis' time_to_target_s).
- Measured (B, W) rows are the runs_frame means over seeds (NaN skipped), exactly what analysis
  reports; memory headroom = GPU memory - peak memory (max over seeds; extrapolated linearly in b).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from bench.errors import UserError

MIN_SPEEDUP_PER_DOUBLING = 1.1  # below this, doubling the GPUs "stops helping" (as analysis' maximal regime)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|s)")


def parse_duration_s(text: str) -> float:
    """'2h', '90m', '3600s', '1h30m' or a bare number of seconds -> seconds."""
    s = str(text).strip().lower()
    try:
        return float(s)
    except ValueError:
        pass
    parts = _DURATION.findall(s)
    if not parts or _DURATION.sub("", s).strip():
        raise ValueError(f"duration {text!r}: use e.g. 2h, 90m, 3600s or 1h30m")
    return sum(float(n) * {"h": 3600.0, "m": 60.0, "s": 1.0}[u] for n, u in parts)


@dataclass
class PlanResult:
    table: Any  # pandas DataFrame, one row per (global_batch_size, num_gpus)
    target_accuracy: float
    fit: dict
    measured_batches: tuple[int, int]
    measured_gpus: tuple[int, int]
    deadline_s: float | None = None
    gpu_hour_price: float | None = None
    gpu_memory_gib: float | None = None
    fastest: dict | None = None
    cheapest: dict | None = None
    gpus_stop_helping: int | None = None
    assumptions: list[str] = field(default_factory=list)
    recommendation: str = ""


def _span(lo: Any, hi: Any) -> str:
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _interp_log2(x: float, xs, ys) -> float:
    import numpy as np

    return float(np.interp(math.log2(x), np.log2(np.asarray(xs, float)), np.asarray(ys, float)))


class _Throughput:
    """r(b) and eff(W) from the measured runs (see the module docstring)."""

    def __init__(self, measured) -> None:
        self.w0 = int(measured["num_workers"].min())
        base = measured[measured["num_workers"] == self.w0].dropna(subset=["samples_per_s"])
        per_gpu = (base["samples_per_s"] / self.w0).groupby(base["per_gpu_batch_size"]).mean().sort_index()
        self.b, self.r = per_gpu.index.to_numpy(float), per_gpu.to_numpy(float)
        effs: dict[int, list[float]] = {}
        for row in measured.dropna(subset=["samples_per_s"]).itertuples():
            if row.num_workers != self.w0:
                effs.setdefault(int(row.num_workers), []).append(
                    row.samples_per_s / row.num_workers / self.rate(row.per_gpu_batch_size))
        self.w = [self.w0, *sorted(effs)]
        self.eff = [1.0, *(sum(effs[w]) / len(effs[w]) for w in sorted(effs))]

    def rate(self, b: float) -> float:
        if b < self.b[0]:
            return self.r[0] * b / self.b[0]
        return self.r[-1] if b > self.b[-1] else _interp_log2(b, self.b, self.r)

    def efficiency(self, w: int) -> float:
        return self.eff[0] if w < self.w[0] else _interp_log2(w, self.w, self.eff)

    def samples_per_s(self, batch: int, w: int) -> float:
        return w * self.rate(batch / w) * self.efficiency(w)

    def notes(self, batch: int, w: int) -> list[str]:
        b, out = batch / w, []
        span = _span(f"{self.b[0]:g}", f"{self.b[-1]:g}")
        if b < self.b[0]:
            out.append(f"per-GPU batch {b:g} below measured {span}: step time held")
        elif b > self.b[-1]:
            out.append(f"per-GPU batch {b:g} above measured {span}: samples/s per GPU held")
        if w > self.w[-1]:
            out.append(f"{w} GPUs beyond measured {_span(self.w[0], self.w[-1])}: "
                       f"efficiency {self.eff[-1]:.3g} assumed")
        elif w < self.w[0]:
            out.append(f"{w} GPUs below measured {self.w[0]}: efficiency 1 assumed")
        return out


def _measured(runs_df):
    """One row per measured (B, W): runs_frame means over seeds (NaN skipped), peak memory max."""
    df = runs_df.copy()
    df["peak_memory_gib"] = df["peak_memory_gib"] if "peak_memory_gib" in df else math.nan
    g = df.groupby(["global_batch_size", "num_workers"], sort=True)
    out = g.agg(steps_to_target=("steps_to_target", "mean"), time_to_target_s=("time_to_target_s", "mean"),
                samples_per_s=("samples_per_s", "mean"), peak_memory_gib=("peak_memory_gib", "max"),
                n_runs=("run_id", "size"), n_reached=("time_to_target_s", "count")).reset_index()
    out["per_gpu_batch_size"] = out["global_batch_size"] / out["num_workers"]
    return out


def _memory_model(measured):
    """peak memory (GiB) as a + c b in the per-GPU batch b; None with fewer than two distinct b."""
    import numpy as np

    m = measured.dropna(subset=["peak_memory_gib"])
    if m["per_gpu_batch_size"].nunique() < 2:
        return None
    c, a = np.polyfit(m["per_gpu_batch_size"].astype(float), m["peak_memory_gib"].astype(float), 1)
    return lambda b: a + c * b


def _grid(measured, max_gpus: int | None, batch_sizes: Sequence[int] | None, fit_ok: bool):
    batches = sorted(set(int(b) for b in measured["global_batch_size"]))
    if batch_sizes:
        batches = sorted(set(batches) | {int(b) for b in batch_sizes})
    elif fit_ok:
        batches += [2 * batches[-1], 4 * batches[-1]]
    top = max_gpus or 8 * int(measured["num_workers"].max())
    gpus = sorted({2 ** k for k in range(int(math.log2(top)) + 1)}
                  | {int(w) for w in measured["num_workers"] if w <= top})
    return [(b, w) for b in batches for w in gpus if b % w == 0]


def _row(b: int, w: int, measured_at: dict, steps_at: dict, fit: dict, tp: _Throughput, mem, ranges: str,
         b_fail: int | None = None) -> dict:
    m = measured_at.get((b, w))
    if m is not None:
        note = f"{m['n_reached']} of {m['n_runs']} runs reached the target" if m["n_reached"] < m["n_runs"] else ""
        return {"global_batch_size": b, "num_gpus": w, "steps_to_target": m["steps_to_target"],
                "samples_per_s": m["samples_per_s"], "time_to_target_s": m["time_to_target_s"],
                "peak_memory_gib": m["peak_memory_gib"], "source": "measured", "note": note}
    notes = tp.notes(b, w)
    steps = steps_at.get(b)
    if steps is None and b_fail is not None and b >= b_fail:
        # Data parallelism does not change the optimisation: a global batch that never reached
        # the target does not on more GPUs either, and the fit says nothing past a failure.
        steps = math.nan
        note = (f"global batch {b}: no measured run reached the target, on any GPU count" if b == b_fail
                else f"beyond global batch {b_fail}, where no measured run reached the target") + ": not extrapolated"
    else:
        if steps is None:
            steps = fit["S_min"] * (1 + fit["B_crit"] / b)
            notes.insert(0, "steps from the fit S_min(1 + B_crit/B)")
        note = f"extrapolated from {ranges}" + "".join(f"; {n}" for n in notes)
    sps = tp.samples_per_s(b, w)
    return {"global_batch_size": b, "num_gpus": w, "steps_to_target": steps, "samples_per_s": sps,
            "time_to_target_s": steps * b / sps, "peak_memory_gib": mem(b / w) if mem else math.nan,
            "source": "extrapolated", "note": note}


def plan_capacity(runs_df, *, target_accuracy: float, deadline_s: float | None = None,
                  gpu_hour_price: float | None = None, max_gpus: int | None = None,
                  gpus_per_node: int | None = None, gpu_memory_gib: float | None = None,
                  batch_sizes: Sequence[int] | None = None) -> PlanResult:
    """Answer the capacity questions for `target_accuracy` from runs_frame(records, target_accuracy=...)."""
    import pandas as pd

    from bench.analysis import fit_steps_curve

    known = set(runs_df["target_accuracy"].dropna()) if "target_accuracy" in runs_df else set()
    if known and known != {target_accuracy}:
        raise ValueError(f"runs_df was computed for target accuracy {sorted(known)}; "
                         f"build it with runs_frame(records, target_accuracy={target_accuracy})")
    measured = _measured(runs_df)
    if measured.empty or measured["samples_per_s"].isna().all():
        raise ValueError("no run with a measured throughput: nothing to plan from")
    reached = runs_df.dropna(subset=["steps_to_target"])
    fit = fit_steps_curve(reached["global_batch_size"], reached["steps_to_target"])
    fit_ok = math.isfinite(fit["S_min"]) and math.isfinite(fit["B_crit"])
    tp, mem = _Throughput(measured), _memory_model(measured)
    reached_at = measured.dropna(subset=["steps_to_target"])
    steps_at = reached_at.groupby("global_batch_size")["steps_to_target"].mean().to_dict()
    measured_at = {(int(r["global_batch_size"]), int(r["num_workers"])): r for r in measured.to_dict("records")}
    mb = (int(measured["global_batch_size"].min()), int(measured["global_batch_size"].max()))
    mg = (int(measured["num_workers"].min()), int(measured["num_workers"].max()))
    ranges = f"measured batches {_span(*mb)}, {_span(*mg)} GPUs"
    per_batch = measured.groupby("global_batch_size")["n_reached"].sum()
    never = sorted(int(b) for b, n in per_batch.items() if n == 0)
    b_fail = never[0] if never else None  # the smallest global batch at which no run reached it
    rows = [_row(b, w, measured_at, steps_at, fit, tp, mem, ranges, b_fail)
            for b, w in _grid(measured, max_gpus, batch_sizes, fit_ok and b_fail is None)
            if (b, w) in measured_at or b in steps_at or fit_ok]
    table = pd.DataFrame(rows)
    table.insert(2, "per_gpu_batch_size", table["global_batch_size"] / table["num_gpus"])
    table.insert(3, "num_nodes", [math.ceil(w / gpus_per_node) if gpus_per_node else math.nan
                                  for w in table["num_gpus"]])
    table["gpu_hours"] = table["time_to_target_s"] * table["num_gpus"] / 3600.0
    table["cost"] = table["gpu_hours"] * gpu_hour_price if gpu_hour_price is not None else math.nan
    table["memory_headroom_gib"] = gpu_memory_gib - table["peak_memory_gib"] if gpu_memory_gib else math.nan
    table["fits_memory"] = ~(table["memory_headroom_gib"] < 0)
    time_s = table["time_to_target_s"]
    table["meets_deadline"] = time_s <= deadline_s if deadline_s else time_s.notna()
    table = table.sort_values(["global_batch_size", "num_gpus"], ignore_index=True)
    result = PlanResult(table=table, target_accuracy=target_accuracy, fit=fit, measured_batches=mb, measured_gpus=mg,
                        deadline_s=deadline_s, gpu_hour_price=gpu_hour_price, gpu_memory_gib=gpu_memory_gib,
                        assumptions=_assumptions(tp, fit, fit_ok, mem, gpu_memory_gib))
    _choose(result)
    return result


def _assumptions(tp: _Throughput, fit: dict, fit_ok: bool, mem, gpu_memory_gib) -> list[str]:
    out = ["one GPU per Ray Train worker; time-to-target is training time (evaluation excluded)",
           f"efficiency beyond {tp.w[-1]} GPUs: the last measured value {tp.eff[-1]:.3g} is assumed "
           "(usually lower across nodes: extrapolated times are optimistic there)" if len(tp.w) > 1 else
           f"only {tp.w0} GPU(s) measured: perfect scaling (efficiency 1) assumed for every other GPU count, "
           "an optimistic bound: measure at least two worker counts",
           f"per-GPU batch outside measured {tp.b[0]:g}-{tp.b[-1]:g}: step time held below, "
           "samples/s per GPU held above"]
    out.append(f"steps(B) = {fit['S_min']:.4g} (1 + {fit['B_crit']:.4g} / B) fitted over {fit['n_batches']} batches"
               if fit_ok else f"no steps(B) fit ({fit.get('reason')}): only measured batches are planned")
    if gpu_memory_gib is None:
        out.append("GPU memory capacity unknown: no memory headroom")
    elif mem is None:
        out.append("peak memory measured at fewer than two per-GPU batches: extrapolated memory unknown")
    return out


def _choose(result: PlanResult) -> None:
    t = result.table
    ok = t[t["time_to_target_s"].notna() & t["fits_memory"]]
    if ok.empty:
        result.recommendation = "no configuration reaches the target in the measured or extrapolated data"
        return
    result.fastest = ok.sort_values(["time_to_target_s", "num_gpus"]).iloc[0].to_dict()
    best = ok.groupby("num_gpus")["time_to_target_s"].min()
    for (w0, t0), (w1, t1) in zip(best.items(), list(best.items())[1:]):
        if (t0 / t1) ** (1 / math.log2(w1 / w0)) < MIN_SPEEDUP_PER_DOUBLING:
            result.gpus_stop_helping = int(w0)
            break
    meeting = ok[ok["meets_deadline"]]
    if not meeting.empty:
        result.cheapest = meeting.sort_values(["gpu_hours", "time_to_target_s"]).iloc[0].to_dict()
    result.recommendation = _recommendation(result)


def _describe(row: dict, price: float | None) -> str:
    cost = f", {row['cost']:.4g} per run at {price:g}/GPU-h" if price is not None else ""
    n = row.get("num_nodes")
    nodes = f" ({n:.0f} node{'s' * (n > 1)})" if n is not None and math.isfinite(n) and n > 0 else ""
    return (f"global batch {row['global_batch_size']} on {row['num_gpus']} GPU(s){nodes}: "
            f"{row['time_to_target_s']:.4g} s to target, {row['gpu_hours']:.4g} GPU-h{cost} "
            f"[{_label(row)}]")


def _label(row: dict) -> str:
    if row["source"] == "extrapolated":
        return row["note"]
    return "measured" + (f"; {row['note']}" if row["note"] else "")


def _recommendation(r: PlanResult) -> str:
    goal = f"within {r.deadline_s:g} s" if r.deadline_s else "(no deadline)"
    lines = [f"cheapest {goal}: {_describe(r.cheapest, r.gpu_hour_price)}" if r.cheapest
             else f"nothing reaches {r.target_accuracy:g} {goal}; the fastest option is below",
             f"fastest: {_describe(r.fastest, r.gpu_hour_price)}"]
    if r.gpus_stop_helping:
        lines.append(f"more GPUs stop helping beyond {r.gpus_stop_helping}: doubling them speeds the best "
                     f"configuration up by less than {MIN_SPEEDUP_PER_DOUBLING:g}x")
    return "\n".join(lines)


def plan_figure(result: PlanResult):
    """Time-to-target vs GPUs, one line per global batch; filled markers measured, hollow
    extrapolated; the deadline dashed. A matplotlib Figure (no pyplot state)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    t = result.table.dropna(subset=["time_to_target_s"])
    for b, g in t.groupby("global_batch_size"):
        (line,) = ax.plot(g["num_gpus"], g["time_to_target_s"], "-", lw=1, label=f"batch {b}")
        for source, fill in (("measured", line.get_color()), ("extrapolated", "none")):
            s = g[g["source"] == source]
            ax.plot(s["num_gpus"], s["time_to_target_s"], "o", color=line.get_color(), mfc=fill, ls="none")
    if result.deadline_s:
        ax.axhline(result.deadline_s, color="k", ls="--", lw=1, label="deadline")
    if result.cheapest:
        ax.plot(result.cheapest["num_gpus"], result.cheapest["time_to_target_s"], "*", ms=14, color="k",
                label="cheapest meeting the deadline" if result.deadline_s else "cheapest")
    ax.set(xscale="log", yscale="log", xlabel="GPUs", ylabel=f"time to {result.target_accuracy:g} accuracy (s)",
           title="Capacity plan (filled: measured, hollow: extrapolated)")
    gpus = sorted(t["num_gpus"].unique())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(gpus, labels=[str(int(w)) for w in gpus])
    if ax.get_legend_handles_labels()[0]:  # nothing reached the target: no line to name
        ax.legend(fontsize="small", ncols=2)
    return fig


# --- CLI ------------------------------------------------------------------------------------

PRINT_COLUMNS = ["global_batch_size", "num_gpus", "num_nodes", "per_gpu_batch_size", "steps_to_target",
                 "time_to_target_s", "gpu_hours", "cost", "memory_headroom_gib", "meets_deadline", "source", "note"]


def _cluster_defaults(records) -> tuple[float | None, int | None, float | None]:
    """(price per GPU-hour, GPUs per node, GPU memory GiB) when every run's cluster/worker agrees."""
    def one(values):
        known = {v for v in values if v is not None}
        return known.pop() if len(known) == 1 else None

    hardware = [(r.cluster or {}).get("hardware") or {} for r in records]
    return (one(h.get("price_per_gpu_hour") for h in hardware), one(h.get("gpus_per_node") or None for h in hardware),
            one((r.worker_env or {}).get("gpu_memory_gib") for r in records))


def cmd_plan(args: argparse.Namespace) -> int:
    import pandas as pd

    from bench import analysis, store

    try:
        deadline_s = parse_duration_s(args.deadline) if args.deadline else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", store.RunSkipped)
            records = store.load_results([Path(p) for p in args.results])
    except (ValueError, store.StoreError) as err:
        raise UserError(str(err)) from None
    for w in caught:
        print(f"batchscale: warning: {w.message}", file=sys.stderr)
    if not records:
        raise UserError(f"no runs found under {', '.join(args.results)}", 1)
    price, per_node, memory = _cluster_defaults(records)
    price = args.gpu_hour_price if args.gpu_hour_price is not None else price
    try:
        result = plan_capacity(analysis.runs_frame(records, target_accuracy=args.target_accuracy),
                               target_accuracy=args.target_accuracy, deadline_s=deadline_s, gpu_hour_price=price,
                               max_gpus=args.max_gpus, gpus_per_node=args.gpus_per_node or per_node,
                               gpu_memory_gib=memory)
    except ValueError as err:
        raise UserError(str(err), 1) from None
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.max_colwidth", 140):
        print(result.table[PRINT_COLUMNS].to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-"))
    print("\nassumptions:\n  " + "\n  ".join(result.assumptions))
    print("\n" + result.recommendation)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `plan` to the batchscale parser."""
    p = sub.add_parser("plan", help="time, GPU-hours and cost to reach an accuracy, per batch and GPU count")
    p.add_argument("results", nargs="+", help="results folders (a sweep's, or a folder of them)")
    p.add_argument("--target-accuracy", type=float, required=True, help="test accuracy to reach, e.g. 0.93")
    p.add_argument("--deadline", help="e.g. 2h, 90m, 3600s")
    p.add_argument("--gpu-hour-price", type=float, help="price per GPU-hour (default: the cluster file's)")
    p.add_argument("--max-gpus", type=int, help="largest GPU count to consider (default: 8 x the largest measured)")
    p.add_argument("--gpus-per-node", type=int, help="for node counts (default: the cluster file's)")
    p.set_defaults(func=cmd_plan)
