"""Capacity planner: measured runs -> time, GPU-hours and cost to reach a target (a test accuracy,
or a language model's validation loss) for each (global batch, number of GPUs), measured or
extrapolated, and what to rent. A language model's batches and samples are tokens throughout.
Runs on CPU workers are planned in workers and worker-hours (``plan_context``: the word is
"worker" unless every run's hardware record shows a GPU); the columns keep their names
(``num_gpus``, ``gpu_hours``: one worker each). The words and number formats are
bench.planner_text's.

Owns: the throughput model below, the extrapolation of steps-to-target (through the one fit,
``bench.fit.fit_sweep``), the choice of the cheapest configuration meeting a deadline, the
fastest one and where more GPUs stop helping (each compared with its runner-up, with the seed
spread: bench.spread), ``plan_context`` (what the records say beyond runs_frame: GPU or CPU
workers, the training-set size) and ``plan_figure``. The ``plan`` command lives in
bench.planner_cli. Input is ``bench.analysis.runs_frame`` output; nothing here reads files. Must not import: torch, ray. pandas/numpy/matplotlib are imported inside
functions (the CLI imports this module to build its parser).

Model (every row that uses an assumption says so in its ``note``; all are in ``assumptions``):
- GPUs = Ray Train workers (one accelerator per worker); W0 = the smallest measured worker count.
- **one time basis** for measured and extrapolated rows: training time to the first crossing of
  the target (``time_to_target_s``: evaluation excluded, the first epoch's start-up included).
  The throughput the model scales is the *to-target throughput* of the measured (B, W):
  mean samples-to-target / mean time-to-target over its runs that reached the target, so the
  model evaluated at a measured point gives back exactly the measured time.
- no global batch larger than the training set is planned (one step cannot take more samples than
  the training set holds; bench.plan refuses such runs too).
- steps(B): mean measured steps-to-target at B where a run reached the target, else the fit
  S_min (1 + B_crit / B) of ``bench.fit.fit_sweep`` (the report's B_crit, same excluded points);
  from the smallest global batch at which no measured run reached the target (diverged, say)
  upwards, nothing: steps depend on the global batch alone, and the fit cannot see past a failure.
- r(b): to-target samples/s per GPU with W0 workers at per-GPU batch b, interpolated linearly in
  log2(b). Below the smallest measured b the step time is held (latency bound); above the
  largest, samples/s per GPU is held.
- eff(W): measured per-GPU to-target throughput at (B, W) / r(B / W), averaged per W; eff(W0) = 1;
  interpolated in log2(W) between measured counts; below W0 (not measured) eff = 1: the W0 runs'
  per-GPU speed, all-reduce included, so the time is an upper bound, and the row says so. **Above the largest measured W nothing is known** until a
  communication model is given (``comm_model``, the seam for bench.comm): those rows have no time.
- memory headroom = GPU memory - peak memory (max over seeds; extrapolated linearly in b).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from bench import planner_text as words

MIN_SPEEDUP_PER_DOUBLING = 1.1  # below this, doubling the GPUs "stops helping" (as analysis' maximal regime)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|s)")

# The seam for a communication model (bench.comm): efficiency(num_gpus, per_gpu_batch_size) ->
# per-GPU throughput at num_gpus relative to W0's at the same per-GPU batch, or None if unknown.
CommModel = Callable[[int, float], Optional[float]]


def parse_duration_s(text: str) -> float:
    """'2h', '90m', '3600s', '1h30m' or a bare number of seconds -> seconds (> 0, finite)."""
    s = str(text).strip().lower()
    try:
        value = float(s)
    except ValueError:
        parts = _DURATION.findall(s)
        if not parts or _DURATION.sub("", s).strip():
            raise ValueError(f"duration {text!r}: use e.g. 2h, 90m, 3600s or 1h30m") from None
        value = sum(float(n) * {"h": 3600.0, "m": 60.0, "s": 1.0}[u] for n, u in parts)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"duration {text!r}: must be a positive, finite time, e.g. 2h, 90m, 3600s or 1h30m")
    return value


@dataclass
class PlanResult:
    table: Any  # pandas DataFrame, one row per (global_batch_size, num_gpus)
    target: float
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
    target_metric: str = "accuracy"  # or "loss" (reached when the validation loss is <= target)
    device: str = "GPU"  # what one worker is called in every sentence: "GPU" or "worker" (plan_context)
    scope: list[str] = field(default_factory=list)  # what the plan covers: workers, batch limit, beyond W_max

    @property
    def target_text(self) -> str:
        return f"{self.target:g}" if self.target_metric == "accuracy" else f"loss {self.target:g}"


def _span(lo: Any, hi: Any) -> str:
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _interp_log2(x: float, xs, ys) -> float:
    import numpy as np

    return float(np.interp(math.log2(x), np.log2(np.asarray(xs, float)), np.asarray(ys, float)))


class _Throughput:
    """r(b) and eff(W) on the to-target basis (see the module docstring)."""

    def __init__(self, measured, comm_model: CommModel | None = None, device: str = "GPU") -> None:
        self.comm_model, self.device = comm_model, device
        rated = measured.dropna(subset=["to_target_samples_per_s"])
        self.known = not rated.empty  # False: no run reached the target, nothing to scale
        rated = rated if self.known else measured.iloc[:1].assign(to_target_samples_per_s=math.nan)
        self.w0 = int(rated["num_workers"].min())
        base = rated[rated["num_workers"] == self.w0]
        per_gpu = (base["to_target_samples_per_s"] / self.w0).groupby(base["per_gpu_batch_size"]).mean().sort_index()
        self.b, self.r = per_gpu.index.to_numpy(float), per_gpu.to_numpy(float)
        effs: dict[int, list[float]] = {}
        for row in rated.itertuples():
            if row.num_workers != self.w0:
                effs.setdefault(int(row.num_workers), []).append(
                    row.to_target_samples_per_s / row.num_workers / self.rate(row.per_gpu_batch_size))
        self.w = [self.w0, *sorted(effs)]
        self.eff = [1.0, *(sum(effs[w]) / len(effs[w]) for w in sorted(effs))]

    def rate(self, b: float) -> float:
        if b < self.b[0]:
            return self.r[0] * b / self.b[0]
        return self.r[-1] if b > self.b[-1] else _interp_log2(b, self.b, self.r)

    def efficiency(self, w: int, b: float) -> float:
        if w > self.w[-1]:
            known = self.comm_model(w, b) if self.comm_model is not None else None
            return math.nan if known is None else float(known)
        return 1.0 if w < self.w[0] else _interp_log2(w, self.w, self.eff)

    def samples_per_s(self, batch: int, w: int) -> float:
        return w * self.rate(batch / w) * self.efficiency(w, batch / w)

    def notes(self, batch: int, w: int) -> list[str]:
        b, out, d = batch / w, [], self.device
        span = _span(f"{self.b[0]:g}", f"{self.b[-1]:g}")
        if b < self.b[0]:
            out.append(f"per-{d} batch {b:g} below measured {span}: step time held")
        elif b > self.b[-1]:
            out.append(f"per-{d} batch {b:g} above measured {span}: samples/s per {d} held")
        if w > self.w[-1]:
            beyond = f"{words.count(w, d)} beyond measured {_span(self.w[0], self.w[-1])}: "
            if self.comm_model is None:
                out.append(beyond + "nothing known (no communication model)")
            elif math.isnan(self.efficiency(w, b)):
                out.append(beyond + "nothing known (the communication model has no link for them)")
            else:
                out.append(beyond + "efficiency from the communication model")
        elif w < self.w[0]:
            out.append(f"{words.count(w, d)}: not measured (the runs used {self.w[0]}); the {self.w[0]}-{d} runs' "
                       f"per-{d} speed is assumed (efficiency 1), an upper bound on the time")
        return out


def _measured(runs_df):
    """One row per measured (B, W): means over the runs that reached the target, the to-target
    throughput on the same basis, the per-run times (for comparisons), peak memory max."""
    df = runs_df.copy()
    for col in ("peak_memory_gib", "samples_to_target"):
        df[col] = df[col] if col in df else math.nan
    df["samples_to_target"] = df["samples_to_target"].fillna(df["steps_to_target"] * df["global_batch_size"])
    g = df.groupby(["global_batch_size", "num_workers"], sort=True)
    out = g.agg(steps_to_target=("steps_to_target", "mean"), time_to_target_s=("time_to_target_s", "mean"),
                samples_to_target=("samples_to_target", "mean"), peak_memory_gib=("peak_memory_gib", "max"),
                n_runs=("run_id", "size"), n_reached=("time_to_target_s", "count")).reset_index()
    out["time_runs_s"] = [tuple(x.dropna()) for _, x in g["time_to_target_s"]]
    res = "time_to_target_resolution_s"
    out["time_resolution_s"] = g[res].mean().to_numpy() if res in df else math.nan
    out["to_target_samples_per_s"] = out["samples_to_target"] / out["time_to_target_s"]
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


def _grid(measured, max_gpus: int | None, batch_sizes: Sequence[int] | None, fit_ok: bool, comm: bool,
          max_global_batch_size: int | None = None) -> tuple[list[tuple[int, int]], list[int]]:
    """The (B, W) to plan, and the unmeasured batches left out for exceeding the training set."""
    measured_batches = set(int(b) for b in measured["global_batch_size"])
    batches = sorted(measured_batches)
    if batch_sizes:
        batches = sorted(set(batches) | {int(b) for b in batch_sizes})
    elif fit_ok:
        batches += [2 * batches[-1], 4 * batches[-1]]
    too_big = [b for b in batches if max_global_batch_size and b > max_global_batch_size and b not in measured_batches]
    batches = [b for b in batches if b not in too_big]
    largest = int(measured["num_workers"].max())
    top = max_gpus or (8 * largest if comm else largest)  # beyond the measured: only asked for, or modelled
    gpus = sorted({2 ** k for k in range(int(math.log2(top)) + 1)}
                  | {int(w) for w in measured["num_workers"] if w <= top})
    return [(b, w) for b in batches for w in gpus if b % w == 0], too_big


def _row(b: int, w: int, measured_at: dict, steps_at: dict, fit: dict, tp: _Throughput, mem, ranges: str,
         b_fail: int | None = None) -> dict:
    m = measured_at.get((b, w))
    if m is not None:
        note = f"{m['n_reached']} of {m['n_runs']} runs reached the target" if m["n_reached"] < m["n_runs"] else ""
        return {"global_batch_size": b, "num_gpus": w, "steps_to_target": m["steps_to_target"],
                "to_target_samples_per_s": m["to_target_samples_per_s"], "time_to_target_s": m["time_to_target_s"],
                "peak_memory_gib": m["peak_memory_gib"], "source": "measured", "note": note,
                "time_runs_s": m["time_runs_s"], "time_resolution_s": m["time_resolution_s"]}
    notes = tp.notes(b, w)
    steps = steps_at.get(b)
    if steps is None and b_fail is not None and b >= b_fail:
        # Data parallelism does not change the optimisation: a global batch that never reached
        # the target does not on more GPUs either, and the fit says nothing past a failure.
        steps = math.nan
        note = (f"global batch {b}: no measured run reached the target, on any {tp.device} count" if b == b_fail
                else f"beyond global batch {b_fail}, where no measured run reached the target") + ": not extrapolated"
    else:
        if steps is None:
            steps = fit["S_min"] * (1 + fit["B_crit"] / b)
            notes.insert(0, "steps from the fit S_min(1 + B_crit/B)")
        note = f"extrapolated from {ranges}" + "".join(f"; {n}" for n in notes)
    sps = tp.samples_per_s(b, w)
    return {"global_batch_size": b, "num_gpus": w, "steps_to_target": steps, "to_target_samples_per_s": sps,
            "time_to_target_s": steps * b / sps, "peak_memory_gib": mem(b / w) if mem else math.nan,
            "source": "extrapolated", "note": note, "time_runs_s": (), "time_resolution_s": math.nan}


def plan_context(records: Sequence[Any]) -> dict:
    """What plan_capacity needs from the stored runs beyond runs_frame (``bench.records.RunRecord``
    values, already read): ``device``, "GPU" when every run's hardware record shows a GPU, else
    "worker", with ``device_note`` saying why; ``max_global_batch_size``, the training-set size
    (the smallest over the runs, in the batch's unit: samples, or tokens for a language model)."""
    from bench.analysis import train_samples
    from bench.provenance import hardware_seen

    kinds = {(seen.device_type if seen is not None else None) for seen, _ in map(hardware_seen, records)}
    if kinds == {"cuda"}:
        device, note = "GPU", None
    elif kinds == {"cpu"}:
        device, note = "worker", ("the runs ran on CPU workers (no GPU in their hardware record), so the plan "
                                  "counts workers and worker-hours, one worker being one Ray Train worker process")
    else:
        device, note = "worker", ("not every run's hardware record shows a GPU, so the plan counts workers and "
                                  "worker-hours, one worker being one Ray Train worker")
    sizes = [s for s in map(train_samples, records) if math.isfinite(s) and s > 0]
    return {"device": device, "device_note": note, "max_global_batch_size": int(min(sizes)) if sizes else None}


def plan_capacity(runs_df, *, target_accuracy: float | None = None, target_loss: float | None = None,
                  deadline_s: float | None = None,
                  gpu_hour_price: float | None = None, max_gpus: int | None = None,
                  gpus_per_node: int | None = None, gpu_memory_gib: float | None = None,
                  batch_sizes: Sequence[int] | None = None, comm_model: CommModel | None = None,
                  comm_notes: Sequence[str] = (), device: str = "GPU", device_note: str | None = None,
                  max_global_batch_size: int | None = None) -> PlanResult:
    """Answer the capacity questions for one target, `target_accuracy` or `target_loss`, from
    runs_frame(records, target_accuracy=...) (or target_loss=...). ``device``, ``device_note``
    and ``max_global_batch_size`` come from ``plan_context(records)``; ``comm_model`` and
    ``comm_notes`` (its assumptions, or why there is none) from bench.stepmodel.planner_seam."""
    import pandas as pd

    from bench.analysis import trusted
    from bench.fit import fit_sweep

    runs_df = trusted(runs_df)
    if (target_accuracy is None) == (target_loss is None):
        raise ValueError("give one target: target_accuracy or target_loss")
    metric, target = ("accuracy", target_accuracy) if target_loss is None else ("loss", target_loss)
    column = f"target_{metric}"
    known = set(runs_df[column].dropna()) if column in runs_df else set()
    if known and known != {target}:
        raise ValueError(f"runs_df was computed for target {metric} {sorted(known)}; "
                         f"build it with runs_frame(records, {column}={target})")
    measured = _measured(runs_df)
    if measured.empty:
        raise ValueError("no runs: nothing to plan from")
    fit = fit_sweep(runs_df.assign(status=runs_df.get("status", "success")))
    fit_ok = math.isfinite(fit["S_min"]) and math.isfinite(fit["B_crit"])
    tp, mem = _Throughput(measured, comm_model, device), _memory_model(measured)
    reached_at = measured.dropna(subset=["steps_to_target"])
    steps_at = reached_at.groupby("global_batch_size")["steps_to_target"].mean().to_dict()
    measured_at = {(int(r["global_batch_size"]), int(r["num_workers"])): r for r in measured.to_dict("records")}
    mb = (int(measured["global_batch_size"].min()), int(measured["global_batch_size"].max()))
    mg = (int(measured["num_workers"].min()), int(measured["num_workers"].max()))
    ranges = f"measured batches {_span(*mb)}, {_span(*mg)} {device}{'s' * (mg[1] != 1)}"
    per_batch = measured.groupby("global_batch_size")["n_reached"].sum()
    never = sorted(int(b) for b, n in per_batch.items() if n == 0)
    b_fail = never[0] if never else None  # the smallest global batch at which no run reached it
    grid, too_big = _grid(measured, max_gpus, batch_sizes, fit_ok and b_fail is None, comm_model is not None,
                          max_global_batch_size)
    rows = [_row(b, w, measured_at, steps_at, fit, tp, mem, ranges, b_fail)
            for b, w in grid if (b, w) in measured_at or b in steps_at or fit_ok]
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
    unit = str(runs_df["batch_unit"].dropna().iloc[0]) if "batch_unit" in runs_df and runs_df["batch_unit"].notna().any() \
        else "samples"
    scope = [device_note] if device_note else []
    if too_big:
        scope.append(f"global batch{'es' * (len(too_big) > 1)} {' and '.join(map(str, too_big))} left out: larger "
                     f"than the training set ({max_global_batch_size:,} {unit}), which one step cannot exceed")
    beyond = table[table["num_gpus"] > mg[1]]
    scope.append(_beyond_measured(tp, comm_notes, modelled=bool(beyond["time_to_target_s"].notna().any())))
    result = PlanResult(table=table, target=target, target_metric=metric, fit=fit, measured_batches=mb, measured_gpus=mg,
                        deadline_s=deadline_s, gpu_hour_price=gpu_hour_price, gpu_memory_gib=gpu_memory_gib,
                        device=device, scope=scope,
                        assumptions=scope[:-1] + _assumptions(tp, fit, fit_ok, mem, gpu_memory_gib) + scope[-1:])
    _choose(result)
    return result


def _beyond_measured(tp: _Throughput, comm_notes: Sequence[str], modelled: bool) -> str:
    """One sentence: what the plan knows above the largest measured worker count, the
    communication model named once and its assumptions listed after it. ``modelled``: the model
    gave a time to at least one row there."""
    d, w = tp.device, _span(tp.w[0], tp.w[-1])
    if tp.comm_model is None:
        why = "; ".join(n.removeprefix("no communication model: ") for n in comm_notes)
        return f"{d} counts above the measured {w}: nothing known (no communication model), so no time is given there" \
            + (f": {why}" if why else "")
    model, assumes = "the communication model (bench.stepmodel, docs/communication.md)", "; ".join(comm_notes)
    if not modelled:
        return f"{d} counts above the measured {w}: no time is given, since {model} has no link for them; it assumes: {assumes}"
    return (f"{d} counts above the measured {w}: efficiency = modelled 1-worker step / modelled step, from {model}, "
            f"which assumes: {assumes}; where it has no link, no time is given")


def _assumptions(tp: _Throughput, fit: dict, fit_ok: bool, mem, gpu_memory_gib) -> list[str]:
    from bench.fit import caveats

    if not tp.known:
        return ["no run reached the target: there is no to-target throughput to scale and nothing to plan"]
    d = tp.device
    out = [("one GPU per Ray Train worker; " if d == "GPU" else "")
           + "every time (measured or extrapolated) is training time to the first crossing of the target, "
           "evaluation excluded and the first epoch included; extrapolation scales the measured runs' to-target "
           "throughput (samples to target / time to target)",
           f"per-{d} batch outside measured {tp.b[0]:g}-{tp.b[-1]:g}: step time held below, "
           f"samples/s per {d} held above"]
    if tp.w[0] > 1:
        out.append(f"fewer {d}s than the measured {tp.w[0]} were not measured: those rows assume the "
                   f"{tp.w[0]}-{d} runs' per-{d} speed (efficiency 1), an upper bound on their time")
    if fit_ok:
        lo, hi = fit.get("B_crit_lo", math.nan), fit.get("B_crit_hi", math.nan)
        interval = (f", 95 % bootstrap interval of B_crit {words.amount(lo)} to {words.amount(hi)}"
                    if math.isfinite(lo) and math.isfinite(hi) and lo != hi
                    else f" (no interval: {fit.get('interval_reason') or 'unknown'})")
        out.append(f"steps(B) = {words.amount(fit['S_min'])} (1 + {words.amount(fit['B_crit'])} / B) fitted over "
                   f"{fit['n_batches']} batches (bench.fit: per-batch means, log least squares){interval}"
                   + "".join(f"; {c}" for c in caveats(fit)))
    else:
        out.append(f"no steps(B) fit ({fit.get('reason')}): only measured batches are planned")
    if fit.get("excluded"):
        out.append(f"left out of the fit (coarsely resolved crossings): {'; '.join(fit['excluded'])}")
    if gpu_memory_gib is None:
        out.append(f"memory capacity per {d} unknown: no memory headroom")
    elif mem is None:
        out.append(f"peak memory measured at fewer than two per-{d} batches: extrapolated memory unknown")
    return out


def _choose(result: PlanResult) -> None:
    t = result.table
    ok = t[t["time_to_target_s"].notna() & t["fits_memory"]]
    if ok.empty:
        result.recommendation = "no configuration reaches the target in the measured or extrapolated data"
        return
    ranked = ok.sort_values(["time_to_target_s", "num_gpus"])
    result.fastest = ranked.iloc[0].to_dict()
    lines = [("fastest", result.fastest, ranked.iloc[1].to_dict() if len(ranked) > 1 else None)]
    best = ok.loc[ok.groupby("num_gpus")["time_to_target_s"].idxmin()]
    for (_, r0), (_, r1) in zip(best.iterrows(), list(best.iterrows())[1:]):
        w0, w1 = r0["num_gpus"], r1["num_gpus"]
        if (r0["time_to_target_s"] / r1["time_to_target_s"]) ** (1 / math.log2(w1 / w0)) < MIN_SPEEDUP_PER_DOUBLING:
            result.gpus_stop_helping = int(w0)
            lines.append(("stop", r0.to_dict(), r1.to_dict()))
            break
    meeting = ok[ok["meets_deadline"]].sort_values(["gpu_hours", "time_to_target_s"])
    if not meeting.empty:
        result.cheapest = meeting.iloc[0].to_dict()
        lines.insert(0, ("cheapest", result.cheapest, meeting.iloc[1].to_dict() if len(meeting) > 1 else None))
    result.recommendation = words.recommendation(result, lines, MIN_SPEEDUP_PER_DOUBLING)


from bench.planner_figure import plan_figure  # noqa: E402,F401  (the plan's figure; callers import it from here)
