"""Report figures of scaling to the target: steps and epochs to target against the global batch
(with the critical-batch fit) and training time to target, each with its computed caption.

Owns: how a crossing is drawn (a filled point at the first crossing with an error bar down to
the evaluation before it, since the true crossing lies in between; a hollow point at the
sustained crossing beside it; a grey cross over a point the fit left out) and the sentences
that compare batches, each saying whether the difference exceeds the seed spread
(bench.spread through ``bench.analysis.compare_batches``).

Shared look and helpers come from bench.report_figures. Must not import: torch, ray,
bench.store, pyplot, seaborn.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bench import analysis as an
from bench import crossing
from bench import regimes
from bench import report_figures as rf
from bench.fit import BOOTSTRAP_RESAMPLES, CONFIDENCE, MAX_RESOLUTION_FRACTION, caveats
from bench.spread import Sample, compare

SUSTAINED_SHIFT = 2**0.12  # hollow sustained markers sit just right of their batch


def _crossings(ax, runs: pd.DataFrame, col: str, style: rf.Style) -> None:
    """Per run: first crossing with its resolution as a downward error bar; sustained crossing hollow."""
    res_col, held_col = crossing.resolution_of(col), col.replace("_to_target", "_to_target_sustained")
    for batch, g in runs.dropna(subset=[col]).groupby("global_batch_size"):
        colour = style.colour(batch)
        lower = g[res_col].fillna(0).to_numpy() if res_col in g else np.zeros(len(g))
        ax.errorbar(g["global_batch_size"], g[col], yerr=[lower, np.zeros(len(g))], fmt="o", ms=4, color=colour,
                    ecolor=colour, elinewidth=1, capsize=2, alpha=0.8, zorder=3)
        if held_col in g:
            held = g.dropna(subset=[held_col])
            ax.scatter(held["global_batch_size"] * SUSTAINED_SHIFT, held[held_col], s=22, facecolors="none",
                       edgecolors=[colour], linewidths=1, zorder=3)
    for sweep, g in runs.groupby("sweep"):
        stats = an.seed_stats(g, col, by=("global_batch_size",))
        full = stats[stats["n"] == stats["n_total"]]
        ax.plot(full["global_batch_size"], full["mean"], color="0.3", ls=style.sweep_line[sweep], lw=1,
                marker=style.sweep_marker[sweep], ms=3, label="mean, all runs reached"
                + rf.sweep_label(sweep, runs["sweep"].nunique() > 1))
        for row in stats[(stats["n"] > 0) & (stats["n"] < stats["n_total"])].itertuples():
            ax.annotate(f"{row.n}/{row.n_total}\nreached", (row.global_batch_size, row.mean), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=7, color="firebrick")
    ax.scatter([], [], s=22, facecolors="none", edgecolors="0.3", label="sustained crossing")


def _not_reached_marks(ax, runs: pd.DataFrame, col: str) -> None:
    by_batch = runs.groupby("global_batch_size")[col].apply(lambda s: s.notna().any())
    for b in (int(b) for b, ok in by_batch.items() if not ok):
        diverged = (runs.loc[runs["global_batch_size"] == b, "status"] == "diverged").all()
        ax.annotate("diverged" if diverged else "not\nreached", (b, 0.02), xycoords=ax.get_xaxis_transform(),
                    ha="center", fontsize=7, color="firebrick")


def _plot_fit(ax, runs: pd.DataFrame, speed: pd.DataFrame, fits: dict, style: rf.Style) -> None:
    multi = speed["sweep"].nunique() > 1
    for sweep, g in speed.groupby("sweep"):
        ok = g.dropna(subset=["steps_to_target"])
        if ok.empty:
            continue
        b0, s0 = ok["global_batch_size"].iloc[0], ok["steps_to_target"].iloc[0]
        grid = np.geomspace(g["global_batch_size"].min(), g["global_batch_size"].max(), 100)
        ax.plot(grid, s0 * b0 / grid, color="0.6", lw=1, ls=":",
                label="perfect scaling" if sweep == speed["sweep"].iloc[0] else None)
        fit = fits.get(sweep, {})
        if math.isfinite(fit.get("S_min", math.nan)):
            ax.plot(grid, fit["S_min"] * (1 + fit["B_crit"] / grid), color="0.2", lw=1, ls=style.sweep_line[sweep],
                    label=f"fit B_crit={rf.fmt(fit['B_crit'])} {_interval(fit, short=True)}" + rf.sweep_label(sweep, multi))
        left_out = runs[(runs["sweep"] == sweep) & runs["global_batch_size"].isin(fit.get("excluded_batches", []))]
        if len(left_out):
            ax.scatter(left_out["global_batch_size"], left_out["steps_to_target"], marker="x", s=40, color="0.45",
                       zorder=4, label=f"left out of the fit (resolution > {MAX_RESOLUTION_FRACTION:.0%})")
        _regime_labels(ax, ok, sorted(speed["sweep"].unique()).index(sweep))


def regime_spans(ok: pd.DataFrame) -> list[tuple[float, float, float, float, str]]:
    """(b_start, b_end, steps_start, steps_end, regime) per run of consecutive segments with one
    stated regime (bench.regimes), from one sweep's reached speedup_frame rows in batch order.
    The smallest batch starts the first segment and carries no regime of its own."""
    spans: list[list] = []
    rows = ok.sort_values("global_batch_size")
    for prev, row in zip(rows.itertuples(), list(rows.itertuples())[1:]):
        if spans and spans[-1][4] == row.regime:
            spans[-1][1], spans[-1][3] = row.global_batch_size, row.steps_to_target
        else:
            spans.append([prev.global_batch_size, row.global_batch_size, prev.steps_to_target, row.steps_to_target,
                          row.regime])
    return [tuple(x) for x in spans]


def _regime_labels(ax, ok: pd.DataFrame, sweep_index: int) -> None:
    """Each run of one regime labelled at its middle (geometric, as the axes are log), above and
    below the curve in turn so that neighbours never overlap; centred, so none runs off the axes."""
    for i, (b0, b1, s0, s1, regime) in enumerate(regime_spans(ok)):
        above = (i + sweep_index) % 2 == 0
        ax.annotate(rf.REGIME_SHORT.get(regime, regime or ""), (math.sqrt(b0 * b1), math.sqrt(s0 * s1)),
                    textcoords="offset points", xytext=(0, 7 if above else -9), ha="center",
                    va="bottom" if above else "top", fontsize=7, color="0.35")


def _interval(fit: dict, *, short: bool = False) -> str:
    lo, hi = fit.get("B_crit_lo", math.nan), fit.get("B_crit_hi", math.nan)
    if (not math.isfinite(lo) and not math.isfinite(hi)) or lo == hi:
        return "(no interval)" if short else f"no interval: {fit.get('interval_reason') or 'unknown'}"
    top = rf.fmt(hi) if math.isfinite(hi) else "open"
    if short:
        return f"[{rf.fmt(lo)}, {top}]"
    return (f"{CONFIDENCE:.0%} bootstrap interval {rf.fmt(lo)} to {top} (resampling runs within each batch, "
            f"{fit.get('resamples', BOOTSTRAP_RESAMPLES):,} resamples, {fit.get('n_batches_with_spread', 0)} of "
            f"{fit.get('n_batches', 0)} batches with two or more seeds)")


def _mark_critical(axes, runs: pd.DataFrame, fits: dict) -> None:
    """Shade the batches beyond the fitted B_crit; a dotted line at the in-run B_simple."""
    top = runs["global_batch_size"].max()
    for sweep, g in runs.groupby("sweep"):
        b_crit = fits.get(sweep, {}).get("B_crit", math.nan)
        b_simple = g["noise_scale_b_simple"].median()
        for i, ax in enumerate(axes):
            if math.isfinite(b_crit) and b_crit < top:
                ax.axvspan(b_crit, top, color="0.85", alpha=0.35, lw=0,
                           label="beyond B_crit" if i == 0 and sweep == runs["sweep"].iloc[0] else None)
            if math.isfinite(b_simple):
                ax.axvline(b_simple, color="tab:purple", lw=1, ls=":",
                           label=f"B_simple={b_simple:.3g}" if i == 0 else None)


def fig_steps_to_target(runs: pd.DataFrame, speed: pd.DataFrame, fits: dict, style: rf.Style) -> rf.FigureResult:
    title = "Steps and epochs to the target accuracy vs global batch size"
    if runs["steps_to_target"].isna().all():
        return rf.FigureResult("steps", title, None,
                               "No run reached the target accuracy, so there are no steps- or epochs-to-target to plot.")
    fig, axes = rf.new_figure(2, legend_in=0.8)
    steps_panel(fig, axes, runs, speed, fits, style)
    _crossings(axes[0, 1], runs, "epochs_to_target", style)
    axes[0, 1].set_ylabel("epochs to target")
    for ax, col in zip(axes.flat, ("steps_to_target", "epochs_to_target")):
        rf.batch_axis(ax, runs["global_batch_size"])
        _not_reached_marks(ax, runs, col)
    return rf.FigureResult("steps", title, fig, _steps_caption(runs, speed, fits))


def steps_panel(fig, axes, runs: pd.DataFrame, speed: pd.DataFrame, fits: dict, style: rf.Style) -> None:
    """The left panel of a steps-to-target figure (also bench.report_lm's): each run's crossings,
    perfect scaling and the fit, the batches beyond B_crit shaded on every panel, the legend."""
    _crossings(axes[0, 0], runs, "steps_to_target", style)
    _plot_fit(axes[0, 0], runs, speed, fits, style)
    _mark_critical(axes.flat, runs, fits)
    axes[0, 0].set_ylabel("steps to target" + rf.log_y(axes[0, 0], runs["steps_to_target"], force=True))
    _fit_to_data(axes[0, 0], runs)
    rf.legend_below(fig, axes[0, 0], ncol=4)


def _fit_to_data(ax, runs: pd.DataFrame) -> None:
    """Y limits from the measured crossings (and the bottoms of their error bars), so that the
    perfect-scaling guide does not stretch the axis by decades."""
    lows = runs["steps_to_target"] - runs.get("steps_to_target_resolution", 0)
    values = pd.concat([lows[lows > 0], runs["steps_to_target"],
                        runs.get("steps_to_target_sustained", pd.Series(dtype=float))]).dropna()
    if len(values):
        ax.set_ylim(values.min() / 1.4, values.max() * 1.4)


def _failed_batches(g: pd.DataFrame, batches: list[int]) -> list[str]:
    """'batch 256 never reached it' / 'batch 4096 diverged during warmup (...)' per batch."""
    out = []
    for b in batches:
        runs = g[g["global_batch_size"] == b]
        if (runs["status"] == "diverged").all():
            warm = runs["failure_before_peak"].eq(True).all() if "failure_before_peak" in runs else False
            out.append(f"batch {b} diverged during warmup, before its peak LR, so it says nothing about the peak "
                       "LR the scaling rule chose" if warm else f"batch {b} diverged (see the failures table)")
        else:
            out.append(f"batch {b} never reached it")
    return out


def _run_outcome(run) -> str:
    """'seed 1 ended at 0.681 (best 0.708)' / 'seed 0 diverged' for a run that never reached."""
    if run.status == "diverged":
        return f"seed {run.seed:g} diverged"
    if run.status != "success":
        return f"seed {run.seed:g} is {run.status}"
    return f"seed {run.seed:g} ended at {run.final_test_acc:.3f} (best {run.best_test_acc:.3f})"


def partial_sentence(r: pd.DataFrame, batch: float, target_text: str) -> str:
    """'batch 1024 reached 0.90 test accuracy in 1 of 3 runs (seed 0, epoch 18); the other 2 never
    did (seed 1 ended at 0.681 (best 0.708); seed 2 ...): its steps are that run's alone and stand
    for no batch mean' for a batch where some but not all runs reached."""
    g = r[r["global_batch_size"] == batch].sort_values("seed")
    hit, miss = g[g["steps_to_target"].notna()], g[g["steps_to_target"].isna()]
    which = ", ".join(f"seed {x.seed:g}, epoch {x.epochs_to_target:.3g}" for x in hit.itertuples())
    alone = "that run's alone" if len(hit) == 1 else "those runs' alone"
    others = "the other run" if len(miss) == 1 else f"the other {len(miss)}"
    return (f"batch {batch:g} reached {target_text} in {len(hit)} of {len(g)} runs ({which}); {others} "
            f"never did ({'; '.join(_run_outcome(x) for x in miss.itertuples())}): its steps-to-target are {alone} "
            "and are not compared as the batch's")


def _speedup_sentence(r: pd.DataFrame, base, top, target_text: str) -> str:
    """The largest batch where every run reached, against the smallest reached batch, with both
    crossings' evaluation intervals and the seed-spread verdict."""
    at_top = r[r["global_batch_size"] == top.global_batch_size]
    fewer = f"{top.speedup:.1f}x fewer" if top.speedup >= 1 else f"{1 / top.speedup:.1f}x more"
    res = [r.loc[r["global_batch_size"] == b, "steps_to_target_resolution"].mean() if "steps_to_target_resolution" in r
           else math.nan for b in (base.global_batch_size, top.global_batch_size)]
    resolved = (f" (crossings resolved to {res[0]:.3g} of {base.steps_to_target:.4g} steps at batch "
                f"{base.global_batch_size:g} and {res[1]:.3g} of {top.steps_to_target:.4g} at batch "
                f"{top.global_batch_size:g})" if all(math.isfinite(x) for x in res) else "")
    every = "its one run" if len(at_top) == 1 else f"all {len(at_top)} runs"
    return (f"Batch {top.global_batch_size:.0f} reached {target_text} in {at_top['epochs_to_target'].mean():.3g} epochs "
            f"in {every}, {fewer} steps than batch {base.global_batch_size:.0f} (perfect scaling: "
            f"{top.perfect_speedup:.0f}x fewer){resolved}: "
            + an.compare_batches(r, "steps_to_target", base.global_batch_size, top.global_batch_size, unit="steps").phrase)


def regime_sentence(g: pd.DataFrame) -> str:
    """How far perfect scaling holds from the smallest batch (every segment up to it stated as
    perfect: bench.regimes.perfect_span), then each segment's regime with its evidence."""
    span, phrases = regimes.perfect_span(g)
    if not phrases:
        return ""
    if span is None:
        head = "no segment from the smallest batch is resolved as perfect scaling"
    else:
        upto = g[(g["global_batch_size"] <= span) & g["previous_batch"].notna()]
        unknown = upto["regime_noise"].astype(str).str.contains("spread unknown").any()
        head = (f"perfect scaling from batch {g['baseline_batch'].iloc[0]:g} up to batch {span:g} (every segment "
                f"≥ {regimes.PERFECT_MIN_SPEEDUP}x per doubling"
                + ("; one run on a side of some segment, so the spread is unknown and this is not established)"
                   if unknown else ", beyond the seed spread and the evaluation interval)"))
    return f"{head}; per segment (regime: steps speed-up per doubling; evidence): " + "; ".join(phrases)


def _steps_caption(runs: pd.DataFrame, speed: pd.DataFrame, fits: dict) -> str:
    sentences = []
    multi = runs["sweep"].nunique() > 1
    for sweep, g in speed.groupby("sweep"):
        r = runs[runs["sweep"] == sweep]
        label = rf.caption_label(sweep, multi)
        ok = g.dropna(subset=["steps_to_target"])
        missing = g.loc[g["steps_to_target"].isna(), "global_batch_size"].astype(int).tolist()
        if ok.empty:
            sentences.append(f"No batch reached the target{label}"
                             + "".join(f"; {t}" for t in _failed_batches(r, missing)) + ".")
            continue
        target_text = f"{r['target_accuracy'].iloc[0]:.2f} test accuracy"
        full = ok[ok["n_reached"] == ok["n_runs"]]
        base = ok.iloc[0]
        parts = []
        if len(full) and full.iloc[-1].global_batch_size != base.global_batch_size:
            parts.append(_speedup_sentence(r, base, full.iloc[-1], target_text) + label)
        elif len(full):
            parts.append(f"Only batch {base.global_batch_size:g} reached {target_text} in every run "
                         f"({r.loc[r['global_batch_size'] == base.global_batch_size, 'epochs_to_target'].mean():.3g} "
                         f"epochs){label}")
        else:
            parts.append(f"No batch reached {target_text} in every run{label}")
        parts += [partial_sentence(r, b, target_text) for b in ok.loc[ok["n_reached"] < ok["n_runs"], "global_batch_size"]]
        parts.append(regime_sentence(ok))
        parts.append(_fit_text(r, fits.get(sweep, {})))
        parts += _failed_batches(r, missing)
        sentences.append("; ".join(p for p in parts if p) + ".")
    hold = int(runs["target_hold_evals"].dropna().iloc[0]) if "target_hold_evals" in runs and \
        runs["target_hold_evals"].notna().any() else crossing.DEFAULT_HOLD_EVALS
    return (" ".join(sentences) + " Filled points: first crossing, with an error bar down to the evaluation before it "
            f"(the crossing lies in between); hollow points: sustained crossing (held for {hold} evaluations in a row); "
            "'k/n reached': only k of the batch's n runs reached the target. The fit uses one point per batch (the mean "
            "over the runs that reached) and least squares on log(steps).")


def _fit_text(r: pd.DataFrame, fit: dict) -> str:
    if math.isfinite(fit.get("B_crit", math.nan)):
        text = (f"fitted S_min = {rf.fmt(fit['S_min'])} steps, B_crit = {rf.fmt(fit['B_crit'])} "
                f"({_interval(fit)})" + "".join(f"; {c}" for c in caveats(fit)))
    else:
        text = f"no B_crit: {fit.get('reason') or 'no fit'}"
    text += regimes.fit_rests_on(r, fit)
    if fit.get("excluded"):
        text += (f"; left out of the fit, resolved more coarsely than {MAX_RESOLUTION_FRACTION:.0%} of their mean "
                 "steps-to-target: " + "; ".join(fit["excluded"]))
    noise = r["noise_scale_b_simple"].median()
    if math.isfinite(noise):
        text += f"; in-run gradient noise scale B_simple ≈ {rf.fmt(noise)}"
    return text


def fig_time_to_target(runs: pd.DataFrame, style: rf.Style) -> rf.FigureResult:
    title = "Training time to the target accuracy (evaluation excluded)"
    ok = runs.dropna(subset=["time_to_target_s"])
    if ok.empty:
        return rf.FigureResult("time", title, None, "No run reached the target accuracy, so there is no time-to-target.")
    varied = runs.groupby("sweep")["num_workers"].nunique().max() > 1
    fig, axes = rf.new_figure(2 if varied else 1, width=10 if varied else 5.5, legend_in=0.35)
    _crossings(axes[0, 0], ok, "time_to_target_s", style)
    rf.legend_below(fig, axes[0, 0], ncol=2)
    rf.batch_axis(axes[0, 0], runs["global_batch_size"])
    _not_reached_marks(axes[0, 0], runs, "time_to_target_s")
    axes[0, 0].set_ylabel("time to target (s)" + rf.log_y(axes[0, 0], ok["time_to_target_s"]))
    if varied:
        rf.by_workers(axes[0, 1], ok, "time_to_target_s", style, "time to target (s)")
    return rf.FigureResult("time", title, fig, _time_caption(runs, ok))


def _time_caption(runs: pd.DataFrame, ok: pd.DataFrame) -> str:
    keys = ["sweep", "global_batch_size", "num_workers"]
    groups = {k: g for k, g in ok.groupby(keys)}
    ranked = sorted(groups, key=lambda k: groups[k]["time_to_target_s"].mean())
    (sweep, batch, workers), best = ranked[0], groups[ranked[0]]
    multi = runs["sweep"].nunique() > 1
    caption = (f"Fastest to target: batch {batch} on {workers} worker(s) in {best['time_to_target_s'].mean():.3g} s of "
               f"training time (mean of {len(best)} run(s) that reached it){rf.caption_label(sweep, multi)}")
    if len(ranked) > 1:
        s2, b2, w2 = ranked[1]
        second = groups[ranked[1]]
        res_col = "time_to_target_resolution_s"
        widths = [g[res_col].mean() for g in (best, second) if res_col in g]
        verdict = compare(Sample.of(best["time_to_target_s"]), Sample.of(second["time_to_target_s"]), unit="s",
                          resolution=max((w for w in widths if math.isfinite(w)), default=math.nan))
        caption += (f"; next, batch {b2} on {w2} worker(s) in {second['time_to_target_s'].mean():.3g} s"
                    f"{rf.caption_label(s2, multi)}: {verdict.phrase}")
    return caption + ". Error bars run down to the evaluation before the crossing; hollow points: sustained crossing."
