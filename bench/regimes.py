"""Scaling regimes and speed-ups per batch size, each with the evidence behind it.

Owns: the Shallue et al. (2018) regime of each segment between consecutive batch sizes that
reached the target (``scaling_regimes``: the measured labels; ``speedup_frame``: the labels a
report may state, after the seed spread, the evaluation interval and the runs that never reached
have had their say), the speed-up against the smallest batch, and ``perfect_span`` (how far
perfect scaling holds, contiguously, from the smallest batch). The report's table and captions
read these columns; none of them recomputes a verdict.

A segment's regime is stated only when (bench.spread's rule, ``RULE``) the step counts at its two
ends differ beyond the seed spread and the evaluation interval, and its speed-up per doubling is
also that far from the regime's boundaries (1.8x and 1.1x); otherwise it is "not resolved". With
one run on a side the spread is unknown: the segment is not resolved and the evidence gives the measured label. A
batch where only some runs reached the target has a mean over the survivors only, so no segment
touching it is labelled. The smallest batch has no segment ending at it: no regime, no "vs
previous batch".

Must not import: torch, ray, matplotlib, bench.store.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import pandas as pd

from bench import crossing
from bench.spread import Sample, Verdict, compare

PERFECT_MIN_SPEEDUP = 1.8  # steps speed-up per batch doubling at or above this: perfect scaling
MAXIMAL_MAX_SPEEDUP = 1.1  # at or below this: maximal data parallelism
PERFECT, DIMINISHING, MAXIMAL = "perfect scaling", "diminishing returns", "maximal data parallelism"
NOT_RESOLVED = "not resolved"


def regime_of(per_doubling: float, *, perfect_min: float = PERFECT_MIN_SPEEDUP,
              maximal_max: float = MAXIMAL_MAX_SPEEDUP) -> str | None:
    """>= 1.8 perfect scaling, <= 1.1 maximal data parallelism, else diminishing returns; NaN -> None."""
    if not math.isfinite(per_doubling):
        return None
    return PERFECT if per_doubling >= perfect_min else MAXIMAL if per_doubling <= maximal_max else DIMINISHING


def _mean_by_batch(batch: Iterable[float], steps: Iterable[float]) -> pd.Series:
    df = pd.DataFrame({"b": np.asarray(list(batch), float), "s": np.asarray(list(steps), float)})
    return df.groupby("b")["s"].mean().sort_index()


def scaling_regimes(batch: Iterable[float], steps: Iterable[float], *,
                    perfect_min: float = PERFECT_MIN_SPEEDUP, maximal_max: float = MAXIMAL_MAX_SPEEDUP
                    ) -> pd.DataFrame:
    """The measured regime of each batch size, from the mean steps per batch (NaN-only batches:
    None). Between consecutive reached batches the speed-up per doubling is
    (S_prev / S) ** (1 / log2(B / B_prev)); a batch carries the label of the segment that ends at
    it, so the smallest reached batch has none (no seed spread or resolution checked here:
    ``speedup_frame`` does that)."""
    mean = _mean_by_batch(batch, steps)
    reached = mean.dropna()
    per_doubling = pd.Series(math.nan, index=mean.index)
    for (b0, s0), (b1, s1) in zip(reached.items(), list(reached.items())[1:]):
        per_doubling[b1] = (s0 / s1) ** (1.0 / math.log2(b1 / b0))
    batches = mean.index.to_numpy()
    if np.all(np.mod(batches, 1) == 0):
        batches = batches.astype(int)
    return pd.DataFrame({"global_batch_size": batches, "steps_to_target": mean.values,
                         "speedup_per_doubling": per_doubling.values,
                         "regime": [regime_of(x, perfect_min=perfect_min, maximal_max=maximal_max)
                                    for x in per_doubling]})


def _resolution(g: pd.DataFrame, col: str) -> float:
    res_col = crossing.resolution_of(col)
    return float(g[res_col].mean()) if res_col in g and g[res_col].notna().any() else math.nan


def compare_batches(runs: pd.DataFrame, col: str, batch_a: float, batch_b: float, *, unit: str = "") -> Verdict:
    """bench.spread.compare of one column between two global batches of one sweep's runs; for a
    to-target column the evaluation interval (the larger mean resolution of the two) counts too."""
    a, b = (runs[runs["global_batch_size"] == x] for x in (batch_a, batch_b))
    widths = [w for w in (_resolution(a, col), _resolution(b, col)) if math.isfinite(w)]
    return compare(Sample.of(a[col]), Sample.of(b[col]), resolution=max(widths, default=math.nan), unit=unit)


def reached_note(g: pd.DataFrame, batch: float) -> str | None:
    """'batch 1024: 1 of 3 runs reached' when some but not all of a batch's runs reached the target."""
    n, k = len(g), int(g["steps_to_target"].notna().sum())
    return f"batch {batch:g}: {k} of {n} runs reached" if 0 < k < n else None


def segment_verdict(prev: pd.DataFrame, this: pd.DataFrame, batch_prev: float, batch: float) -> tuple[str | None, str]:
    """(regime to state, evidence) of the segment from batch_prev to batch (each a group of runs)."""
    partial = [t for t in (reached_note(prev, batch_prev), reached_note(this, batch)) if t]
    if partial:
        return NOT_RESOLVED, "; ".join(partial) + " (mean over those runs only)"
    col = "steps_to_target"
    a, b = Sample.of(prev[col]), Sample.of(this[col])
    res_a, res_b = _resolution(prev, col), _resolution(this, col)
    gap = compare(a, b, resolution=max([w for w in (res_a, res_b) if math.isfinite(w)], default=math.nan))
    doublings = math.log2(batch / batch_prev)
    per_doubling = (a.mean / b.mean) ** (1 / doublings)
    if gap.kind in ("within", "unresolved"):
        return NOT_RESOLVED, f"{per_doubling:.2f}x per doubling; gap {gap.short}"
    regime = regime_of(per_doubling)
    if gap.kind == "unknown":  # one run on a side: the measured label is not a finding
        return NOT_RESOLVED, f"{per_doubling:.2f}x per doubling (measured: {regime}); {gap.short}"
    bounds = {PERFECT: [PERFECT_MIN_SPEEDUP], MAXIMAL: [MAXIMAL_MAX_SPEEDUP],
              DIMINISHING: [PERFECT_MIN_SPEEDUP, MAXIMAL_MAX_SPEEDUP]}.get(regime, [])
    for c in bounds:  # the previous batch's steps as the boundary would predict them here
        f = c**doublings
        expected = Sample(a.mean / f, a.std / f, a.n)
        widths = [w for w in (res_b, res_a / f) if math.isfinite(w)]
        v = compare(expected, b, resolution=max(widths, default=math.nan))
        if v.kind in ("within", "unresolved"):
            return NOT_RESOLVED, f"{per_doubling:.2f}x per doubling; vs the {c:g}x boundary: {v.short}"
    return regime, f"{per_doubling:.2f}x per doubling; gap {gap.short}"


def speedup_frame(runs_df: pd.DataFrame) -> pd.DataFrame:
    """Per sweep and batch (the caller passes trusted runs): mean steps-to-target (runs that
    reached it), n_runs and n_reached, the speed-up vs the smallest batch that reached it
    (``baseline_batch``), the perfect-scaling speed-up B / B0, their ratio, ``speedup_noise``
    (bench.spread against the baseline; None at the baseline), ``previous_batch``, the measured
    ``speedup_per_doubling``, ``regime`` (the label a report may state: ``segment_verdict``) and
    ``regime_noise`` (its evidence). The baseline row has no regime and no previous batch."""
    frames = []
    for sweep, g in runs_df.groupby("sweep", sort=True):
        out = scaling_regimes(g["global_batch_size"], g["steps_to_target"]).drop(columns="regime")
        counts = g.groupby("global_batch_size").agg(n_runs=("run_id", "size"), n_reached=("steps_to_target", "count"))
        out = out.merge(counts, left_on="global_batch_size", right_index=True)
        order = list(out.dropna(subset=["steps_to_target"])["global_batch_size"])
        b0 = order[0] if order else math.nan
        s0 = out.loc[out["global_batch_size"] == b0, "steps_to_target"].iloc[0] if order else math.nan
        out.insert(0, "sweep", sweep)
        out["baseline_batch"] = b0
        out["speedup"] = s0 / out["steps_to_target"]
        out["perfect_speedup"] = out["global_batch_size"] / b0
        out["scaling_fraction"] = out["speedup"] / out["perfect_speedup"]
        group = {b: g[g["global_batch_size"] == b] for b in order}
        prev = {b: order[i - 1] for i, b in enumerate(order) if i > 0}
        out["previous_batch"] = [prev.get(b, math.nan) for b in out["global_batch_size"]]
        noise, regime, evidence = [], [], []
        for b in out["global_batch_size"]:
            if b not in prev:
                noise.append(None), regime.append(None), evidence.append(None)
                continue
            partial = [t for t in (reached_note(group[b0], b0), reached_note(group[b], b)) if t]
            noise.append("; ".join(partial) if partial else compare_batches(g, "steps_to_target", b0, b).short)
            label, why = segment_verdict(group[prev[b]], group[b], prev[b], b)
            regime.append(label), evidence.append(why)
        out["speedup_noise"], out["regime"], out["regime_noise"] = noise, regime, evidence
        frames.append(out)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def perfect_span(speed: pd.DataFrame) -> tuple[float | None, list[str]]:
    """One sweep's speedup_frame rows -> (the largest batch up to which every segment from the
    smallest reached batch is stated as perfect scaling, or None when the first segment is not),
    and one phrase per segment: 'b0→b1: not resolved (1.77x per doubling; vs the 1.8x boundary: ...)'."""
    rows = speed.dropna(subset=["previous_batch"]).sort_values("global_batch_size")
    phrases, span, contiguous = [], None, True
    for r in rows.itertuples():
        phrases.append(f"{r.previous_batch:g}→{r.global_batch_size:g}: {r.regime} ({r.regime_noise})")
        contiguous = contiguous and r.regime == PERFECT
        if contiguous:
            span = r.global_batch_size
    return span, phrases


def partial_batches(sweep_runs: pd.DataFrame, batches: Any = None) -> list[str]:
    """'batch 1024 (1 of 3 runs reached)' for each batch (of ``batches``, default all) where some
    but not all runs reached the target: a fit or a B_crit statement resting on it must say so."""
    out = []
    for b, g in sweep_runs.groupby("global_batch_size"):
        k, n = int(g["steps_to_target"].notna().sum()), len(g)
        if 0 < k < n and (batches is None or b in set(batches)):
            out.append(f"batch {b:g} ({k} of {n} runs reached)")
    return out


def fit_rests_on(sweep_runs: pd.DataFrame, fit: dict) -> str:
    """'; it rests on batch 1024 (1 of 3 runs reached), whose mean is over those runs only' or ''."""
    used = [b for b in sweep_runs["global_batch_size"].unique() if b not in set(fit.get("excluded_batches", []))]
    partial = partial_batches(sweep_runs, used)
    return (f"; this rests on {', '.join(partial)}, whose mean is over the runs that reached only"
            if partial else "")
