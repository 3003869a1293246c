"""Caption wording shared by the report's figures: numbers, sweep labels, runs that stopped
early, comparisons of sweeps at a shared global batch, the LR schedule's caption and the
sentence that sets the in-run B_simple beside the fitted B_crit.

Every comparison is worded by bench.spread (seed spread, resolution, n on each side). Runs that
stopped early (status diverged or oom) are never pooled with completed ones: their last
evaluation or throughput is where they stopped, so they are named, with how and after how many
steps, and a stop by the v1 criterion (the evaluation-mode training loss) carries its caveat.

Must not import: torch, ray, matplotlib, bench.store (it sees DataFrames and dicts only).
"""

from __future__ import annotations

import math

import pandas as pd

from bench import analysis as an
from bench.fit import NOISE_AGREEMENT
from bench.run_facts import V1_CRITERION
from bench.spread import Sample, compare


def fmt(x: float, digits: int = 3) -> str:
    """A number for a caption or tick: `digits` significant figures below 1000, else 12,345."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def caption_label(sweep: str, multi: bool) -> str:
    """' (sweep)' after a label in a caption when several sweeps are shown (HTML-escaped by the page,
    not by matplotlib: a figure's labels use bench.report_figures.sweep_label)."""
    return f" ({sweep})" if multi else ""


def versus(runs: pd.DataFrame, col: str, a: float, b: float, unit: str = "") -> str:
    """The seed-spread phrase for one column between two global batches (bench.spread)."""
    return an.compare_batches(runs, col, a, b, unit=unit).phrase


# --- runs that stopped early ------------------------------------------------------------------

STOPPED = ("diverged", "oom")  # statuses of runs that stopped before their planned end
V1_CAVEAT = "by the v1 criterion on the evaluation-mode training loss, unreliable with BatchNorm early in training"


def stopped(df: pd.DataFrame) -> pd.Series:
    """True for runs that stopped early (diverged or out of memory)."""
    return df["status"].isin(STOPPED) if "status" in df else pd.Series(False, index=df.index)


def _how_stopped(r) -> str:
    """'diverged during warmup at LR 0.377, before its peak 1.6' / 'diverged at the peak LR 2.56' /
    the failure line's first clause (an OOM, or a v1 run whose LR is unknown)."""
    lr, peak = getattr(r, "failure_lr", math.nan), getattr(r, "failure_peak_lr", math.nan)
    if getattr(r, "failure_before_peak", None) is True and pd.notna(lr) and pd.notna(peak):
        return f"diverged during warmup at LR {fmt(lr)}, before its peak {fmt(peak)}"
    if r.status == "diverged" and pd.notna(lr) and pd.notna(peak) and math.isclose(lr, peak, rel_tol=1e-6):
        return f"diverged at the peak LR {fmt(peak)}"
    reason = getattr(r, "failure_reason", None)
    return str(reason).split(":")[0] if isinstance(reason, str) and reason else str(r.status)


def _is_v1(r) -> bool:
    reason = getattr(r, "failure_reason", None)
    return isinstance(reason, str) and V1_CRITERION in reason


def stopped_groups(runs: pd.DataFrame, before_peak_only: bool = False) -> list[dict]:
    """Per (sweep, global batch) with runs that stopped early: how many of how many, how they stopped,
    the steps they ran, and whether the v1 (evaluation-mode) criterion stopped them."""
    out = []
    runs = runs.reset_index(drop=True)  # one label per row, whatever frame the caller built
    flagged = stopped(runs)
    if before_peak_only:
        flagged &= runs["failure_before_peak"].eq(True) if "failure_before_peak" in runs else False
    for (sweep, batch), g in runs.groupby(["sweep", "global_batch_size"]):
        s = g[flagged.loc[g.index]]
        if s.empty:
            continue
        how = list(dict.fromkeys(_how_stopped(r) for r in s.itertuples()))
        steps = s["steps_completed"].dropna().astype(int).tolist() if "steps_completed" in s else []
        out.append({"sweep": sweep, "batch": int(batch), "k": len(s), "n": len(g), "how": "; ".join(how),
                    "steps": steps, "v1": all(_is_v1(r) for r in s.itertuples())})
    return out


def and_list(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def batch_of(batch: int, sweep: str, multi: bool, detail: str) -> str:
    """'batch 1024 (digits-huge-batch-warmup; 2 of 3 runs)': the sweep inside the parentheses."""
    return f"batch {batch} ({sweep + '; ' if multi else ''}{detail})"


def stopped_text(groups: list[dict], multi: bool, verb: str = "stopped early", then: str = "") -> str:
    """'Batch 4096 (1 of 1 run: diverged during warmup at LR 0.377, before its peak 1.6, after 13 steps)
    and ... stopped early, both by the v1 criterion ...: <then>.' ('' when none)."""
    if not groups:
        return ""
    every_v1 = all(g["v1"] for g in groups)
    items = []
    for g in groups:
        steps = sorted(set(g["steps"]))
        ran = (f", after {steps[0]} step{'s' if steps[0] != 1 else ''}{' each' if g['k'] > 1 else ''}"
               if len(steps) == 1 else f", after {and_list([str(x) for x in g['steps']])} steps" if steps else "")
        v1 = f", {V1_CAVEAT}" if g["v1"] and not every_v1 else ""
        items.append(batch_of(g["batch"], g["sweep"], multi,
                              f"{g['k']} of {g['n']} run{'s' if g['n'] > 1 else ''}: {g['how']}{ran}{v1}"))
    both = "both " if len(groups) == 2 else "all " if len(groups) > 2 else ""
    text = f"{and_list(items)} {verb}" + (f", {both}{V1_CAVEAT}" if every_v1 else "") + (f": {then}" if then else "")
    return text[0].upper() + text[1:] + "."


def mean_sd(s: Sample, digits: int = 3) -> str:
    """'0.607 ± 0.383 (n = 3)', or '0.297 (n = 1)'."""
    sd = f" ± {s.std:.{digits}f}" if s.n > 1 else ""
    return f"{s.mean:.{digits}f}{sd} (n = {s.n})"



# --- final accuracy -------------------------------------------------------------------------

def curves_caption(curves: pd.DataFrame, multi: bool) -> str:
    """Highest vs lowest final test accuracy among the completed runs; batches with runs that
    stopped early are named and left out (their last evaluation is where they stopped)."""
    final = curves.sort_values("epoch").groupby(["sweep", "global_batch_size", "run_id"]).tail(1)
    early = stopped(final)
    done = final[~early]
    best = done.groupby(["sweep", "global_batch_size"])["test_acc"].mean().dropna()
    caption = "All panels share one y axis; bands span the seeds (min to max)."
    among = "Among completed runs, b" if early.any() else "B"
    if len(best) > 1:
        (hs, hb), (ls_, lb) = best.idxmax(), best.idxmin()
        finals = {k: Sample.of(g["test_acc"]) for k, g in done.groupby(["sweep", "global_batch_size"])}
        caption = (f"{among}atch {hb}{caption_label(hs, multi)} ends highest at {best.max():.3f} mean "
                   f"test accuracy and batch {lb}{caption_label(ls_, multi)} lowest at {best.min():.3f}: "
                   f"{compare(finals[(hs, hb)], finals[(ls_, lb)]).phrase}; " + caption[0].lower() + caption[1:])
    if early.any():
        groups = [batch_of(b, s, multi, f"{int(early[g.index].sum())} of {len(g)} run{'s' if len(g) > 1 else ''}")
                  for (s, b), g in final.groupby(["sweep", "global_batch_size"]) if early[g.index].any()]
        caption += (f" Runs that stopped early (diverged or out of memory) are not compared: {and_list(groups)}; "
                    "the generalisation caption and the failures table say how and when.")
    return caption


def within_sweep(g: pd.DataFrame, sweep: str = "", completed: bool = False) -> str:
    """Smallest vs largest batch of one sweep's completed runs ('sweep: ' leads when given;
    completed: say 'of the completed runs', because some others stopped early)."""
    test = g.groupby("global_batch_size")[["final_test_acc", "gap_acc"]].mean()
    lo, hi = test.index.min(), test.index.max()
    if lo == hi:
        return ""
    return (f"{sweep + ': f' if sweep else 'F'}inal test accuracy{' of the completed runs' if completed else ''} goes from "
            f"{test.loc[lo, 'final_test_acc']:.3f} at batch {lo} to {test.loc[hi, 'final_test_acc']:.3f} at batch {hi} "
            f"({versus(g, 'final_test_acc', lo, hi)}) and the gap from {test.loc[lo, 'gap_acc']:+.3f} to "
            f"{test.loc[hi, 'gap_acc']:+.3f} ({versus(g, 'gap_acc', lo, hi)}).")


def _reached(g: pd.DataFrame) -> str:
    """'reached 0.9 in 1 of 3 runs' ('' when the runs have no accuracy target)."""
    target = g["target_accuracy"].dropna() if "target_accuracy" in g else pd.Series(dtype=float)
    if target.empty or "steps_to_target" not in g:
        return ""
    return f"reached {fmt(target.iloc[0])} in {int(g['steps_to_target'].notna().sum())} of {len(g)} runs"


def across_sweeps(done: pd.DataFrame) -> list[str]:
    """At each global batch that several sweeps ran: every sweep's final test accuracy over all its
    runs (and over its completed runs where some stopped early), how many reached the target, and
    the seed-spread verdict between each pair of sweeps."""
    out = []
    shared = done.groupby("global_batch_size")["sweep"].nunique()
    for batch in shared[shared > 1].index:
        at = {s: g for s, g in done[done["global_batch_size"] == batch].groupby("sweep")}
        names = sorted(at)
        parts = []
        for s in names:
            g, k = at[s], int(stopped(at[s]).sum())
            early = (f"; {k} of them stopped early and count at their last evaluation, the completed "
                     f"{'run' if len(g) - k == 1 else 'runs'}: {mean_sd(Sample.of(g.loc[~stopped(g), 'final_test_acc']))}"
                     if k else "")
            reached = _reached(g)
            parts.append(f"{s} {mean_sd(Sample.of(g['final_test_acc']))}{early}" + (f"; {reached}" if reached else ""))
        verdicts = []
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                pair = f"{a} vs {b}, " if len(names) > 2 else ""
                every = compare(Sample.of(at[a]["final_test_acc"]), Sample.of(at[b]["final_test_acc"])).phrase
                verdicts.append(f"{pair}all runs: {every}")
                if stopped(at[a]).any() or stopped(at[b]).any():
                    done_only = compare(*(Sample.of(at[x].loc[~stopped(at[x]), "final_test_acc"]) for x in (a, b)))
                    verdicts.append(f"{pair}completed runs only: {done_only.phrase}")
        out.append(f"At batch {batch}, final test accuracy by sweep: {' | '.join(parts)}. Between the sweeps, "
                   f"{'; '.join(verdicts)}.")
    return out


# --- learning rate ----------------------------------------------------------------------------

def lr_caption(lr: pd.DataFrame, runs: pd.DataFrame) -> str:
    """Per sweep: planned peaks (the plan's, not the largest LR applied: a run that diverged in warmup
    never applied its peak) and when the largest batch reached its peak, or that it did not; then
    every run that stopped before its peak and every run that diverged at it."""
    multi = runs["sweep"].nunique() > 1
    sentences = [t for sweep, g in runs.groupby("sweep")
                 if (t := _lr_sweep(lr[lr["sweep"] == sweep], g, sweep if multi else ""))]
    if not sentences:
        return "The LR each batch applied, as logged."
    before = stopped_text(stopped_groups(runs, before_peak_only=True), multi, "stopped before applying the peak LR",
                          "they test the warmup, not the scaling rule's peak")
    at_peak = [g for g in stopped_groups(runs) if g["how"].startswith("diverged at the peak")]
    sentences += [before] if before else []
    if at_peak:
        items = [batch_of(g["batch"], g["sweep"], multi, f"{g['k']} of {g['n']} runs") for g in at_peak]
        sentences.append(f"Diverged at the peak LR: {and_list(items)}.")
    return " ".join(sentences)


def _lr_sweep(lr: pd.DataFrame, runs: pd.DataFrame, sweep: str) -> str:
    peaks = runs.groupby("global_batch_size")["peak_lr"].first().dropna()
    if peaks.empty:
        return ""
    b0, p0, b1, p1 = peaks.index[0], peaks.iloc[0], peaks.index[-1], peaks.iloc[-1]
    text = (f"{sweep + ': p' if sweep else 'P'}lanned peak LR goes from {fmt(p0)} at batch {b0} to {fmt(p1)} at batch "
            f"{b1} ({p1 / p0:.3g}x the LR at {b1 / b0:.3g}x the batch)")
    before = runs["failure_before_peak"].eq(True) if "failure_before_peak" in runs else pd.Series(False, index=runs.index)
    reached = {}  # global batch -> first epoch at which a run of it applied its peak
    for batch, peak in peaks.items():
        applied = lr[(lr["global_batch_size"] == batch) & (lr["lr"] >= 0.999 * peak)]
        if len(applied):
            reached[batch] = applied["epoch"].min()
    def when(batch):
        return "from the first step" if reached[batch] == 0 else f"after {fmt(reached[batch])} epoch(s)"
    top = runs[runs["global_batch_size"] == b1]
    if len(top) and before[top.index].all():
        text += f"; batch {b1} never applied it (every run stopped in warmup)"
        below = [b for b in reached if b < b1]
        if below:
            text += f"; the largest batch that applied its peak is {max(below)}, {when(max(below))}"
    elif b1 in reached:
        text += f", applied at batch {b1} {when(b1)}"
    return text + "."


# --- B_simple beside B_crit ------------------------------------------------------------------

def noise_scale_text(c: dict) -> str:
    """'; in-run gradient noise scale B_simple = ... (what it rests on); ratio ...' for the critical-batch
    list, from bench.fit.critical_batch's dict. B_simple has no interval: it is given with its run
    count and its per-batch range, and called in agreement with B_crit only when every batch's mean
    B_simple lies within NOISE_AGREEMENT of B_crit (the pooled median alone depends on which batches
    were run)."""
    b_simple, b_crit = c.get("B_simple", math.nan), c.get("B_crit", math.nan)
    if not math.isfinite(b_simple):
        return f"; no agreement to report: {c['why_not']}" if c.get("why_not") else ""
    per = {b: Sample.of(v) for b, v in (c.get("B_simple_by_batch") or {}).items() if v}
    n_runs = sum(s.n for s in per.values())
    single = bool(per) and max(s.n for s in per.values()) == 1
    text = f"; in-run gradient noise scale B_simple = {fmt(b_simple)}"
    if per:
        lo, hi = min(per, key=lambda b: per[b].mean), max(per, key=lambda b: per[b].mean)
        spread = ("one run per batch: the spread between seeds is unknown" if single else
                  f"per-batch mean from {_mean_pm(per[lo])} at batch {lo:g} to {_mean_pm(per[hi])} at batch {hi:g}")
        text += (f" (median over {n_runs} run{'s' if n_runs > 1 else ''} at {len(per)} batch size"
                 f"{'s' if len(per) > 1 else ''}; no interval; {spread})")
    if not math.isfinite(b_crit):
        return text + (f"; no agreement to report: {c['why_not']}" if c.get("why_not") else "")
    ratio, k = b_simple / b_crit, NOISE_AGREEMENT
    factors = [per[b].mean / b_crit for b in per]
    if c.get("agree") and per and all(1 / k <= f <= k for f in factors):
        head = (f"; ratio B_simple / B_crit = {ratio:.2f}, and every batch's B_simple lies within {k:g}x of "
                f"B_crit ({min(factors):.3g}x to {max(factors):.3g}x)")
        if single:  # the same standard as everywhere: no finding from single runs
            return text + head + ("; from single runs (spread unknown) and a B_crit without an interval, so "
                                  "agreement is not established")
        return text + head + f": they agree within {k:g}x, as in McCandlish et al. (2018)"
    if c.get("agree"):
        where = (f"; per batch it ranges from {fmt(min(p.mean for p in per.values()))} to "
                 f"{fmt(max(p.mean for p in per.values()))} ({min(factors):.3g}x to {max(factors):.3g}x B_crit), "
                 "so the pooled value depends on which batches were run and no agreement is claimed" if per else "")
        return text + f"; ratio B_simple / B_crit = {ratio:.2f}: the pooled median is within {k:g}x of B_crit{where}"
    return text + (f"; no agreement to report: {c['why_not']}" if c.get("why_not") else "")


def _mean_pm(s: Sample) -> str:
    return f"{fmt(s.mean)} ± {fmt(s.std)} (n = {s.n})" if s.n > 1 else f"{fmt(s.mean)} (n = 1)"
