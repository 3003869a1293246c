"""The report's language-model parts: batches in tokens, a loss target, the noise scale through training.

Owns, for sweeps whose batch unit is the token (workload lm):
- ``fig_loss_curves``: validation loss against tokens and against steps, per global batch;
- ``fig_to_target``: steps and tokens to the target loss against the global batch in tokens,
  with the critical-batch fit (steps(B) = S_min (1 + B_crit / B), so tokens(B) = S_min (B +
  B_crit): the fewest tokens, E_min = S_min B_crit, at small batches) and computed captions;
- ``fig_noise``: the in-run gradient noise scale B_simple (tokens) against the validation loss
  at which it was measured, beside Kaplan et al.'s B_crit(L) = B* / L^(1/alpha_B) and the
  fitted B_crit at the target, on log axes, with the caveat that Kaplan's fit is for GPT-2
  BPE tokens (about 4 bytes each), so on a byte-level loss the curve shows a slope, not a
  prediction;
- ``batch_table_html``: the per-batch summary in tokens and loss (image sweeps keep
  bench.report_tables'), and ``in_tokens``: the shared figures relabelled (global batch in
  tokens, tokens/s).

Crossings are drawn as bench.report_scaling draws them (its ``steps_panel``: first crossing
with its resolution, sustained hollow, the fit, points left out). Must not import: torch, ray, pyplot, bench.store.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter

from bench import analysis as an
from bench import report_figures as rf
from bench import report_scaling as rs
from bench import report_tables as rt
from bench.fit import caveats
from bench.lm.tokenplan import KAPLAN_ALPHA_B, KAPLAN_B_STAR_TOKENS, kaplan_critical_batch_tokens
from bench.report_text import esc
from bench.spread import Sample, compare

TOKEN_LABELS = (("global batch size", "global batch (tokens)"), ("per-worker batch size", "per-worker batch (tokens)"),
                ("samples/s", "tokens/s"), ("target accuracy", "target loss"))


def is_token_sweep(runs: pd.DataFrame) -> bool:
    return "batch_unit" in runs and len(runs) > 0 and runs["batch_unit"].eq("tokens").all()


def in_tokens(result: rf.FigureResult) -> rf.FigureResult:
    """A shared figure (throughput, memory, time, capacity) with its batch axis and rates in tokens."""
    if result.figure is not None:
        for ax in result.figure.axes:
            for old, new in TOKEN_LABELS:
                ax.set_xlabel(ax.get_xlabel().replace(old, new))
                ax.set_ylabel(ax.get_ylabel().replace(old, new))
    caption, title = result.caption, result.title
    for old, new in TOKEN_LABELS[2:]:
        caption, title = caption.replace(old, new), title.replace(old, new)
    return rf.FigureResult(result.key, title, result.figure, caption)


def _target(runs: pd.DataFrame) -> float:
    known = runs["target_loss"].dropna() if "target_loss" in runs else pd.Series(dtype=float)
    return float(known.iloc[0]) if len(known) else math.nan


# --- learning curves -------------------------------------------------------------------------

def fig_loss_curves(curves: pd.DataFrame, runs: pd.DataFrame, style: rf.Style) -> rf.FigureResult:
    title = "Validation loss against tokens and against optimizer steps"
    curves = curves.dropna(subset=["test_loss"])
    if curves.empty:
        return rf.FigureResult("curves", title, None, "No evaluation was logged, so there are no learning curves.")
    fig, axes = rf.new_figure(2, legend_in=0.35)
    target, multi = _target(runs), curves["sweep"].nunique() > 1
    floor = runs["entropy_floor_nats"].dropna() if "entropy_floor_nats" in runs else pd.Series(dtype=float)
    for ax, x, label in ((axes[0, 0], "samples", "tokens seen"), (axes[0, 1], "step", "optimizer steps")):
        for (sweep, batch), g in curves[curves[x] > 0].groupby(["sweep", "global_batch_size"]):
            agg = g.groupby(x)["test_loss"].agg(["mean", "min", "max"])
            ax.fill_between(agg.index, agg["min"], agg["max"], color=style.colour(batch), alpha=0.25, lw=0)
            ax.plot(agg.index, agg["mean"], color=style.colour(batch), ls=style.sweep_line[sweep], lw=1.3,
                    label=f"B={batch} tokens" + rf.sweep_label(sweep, multi))
        if math.isfinite(target):
            ax.axhline(target, color="firebrick", ls="--", lw=1, label=f"target {target:g}")
        if len(floor):
            ax.axhline(floor.min(), color="0.3", ls=":", lw=1, label=f"entropy floor {floor.min():.3g}")
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log)")
        ax.set_ylabel("validation loss (nats per token)")
    rf.legend_below(fig, axes[0, 0], ncol=5)
    final = curves.sort_values("step").groupby(["sweep", "global_batch_size", "run_id"]).tail(1)
    means = final.groupby(["sweep", "global_batch_size"])["test_loss"].mean()
    caption = "Bands span the seeds (min to max)."
    if len(means) > 1:
        (hs, hb), (ls_, lb) = means.idxmin(), means.idxmax()
        finals = {k: Sample.of(g["test_loss"]) for k, g in final.groupby(["sweep", "global_batch_size"])}
        caption = (f"Batch {hb} tokens{rf.caption_label(hs, multi)} ends lowest at {means.min():.3f} nats and batch "
                   f"{lb}{rf.caption_label(ls_, multi)} highest at {means.max():.3f}: "
                   f"{compare(finals[(hs, hb)], finals[(ls_, lb)], unit='nats').phrase}. " + caption)
    return rf.FigureResult("curves", title, fig, caption)


# --- steps and tokens to the target ------------------------------------------------------------

def fig_to_target(runs: pd.DataFrame, speed: pd.DataFrame, fits: dict, style: rf.Style) -> rf.FigureResult:
    title = "Steps and tokens to the target loss vs global batch (tokens)"
    if runs["steps_to_target"].isna().all():
        return rf.FigureResult("steps", title, None,
                               "No run reached the target loss, so there are no steps- or tokens-to-target to plot.")
    fig, axes = rf.new_figure(2, legend_in=0.8)
    rs.steps_panel(fig, axes, runs, speed, fits, style)
    rs._crossings(axes[0, 1], runs, "tokens_to_target", style)
    for sweep, fit in fits.items():
        if math.isfinite(fit.get("S_min", math.nan)):
            grid = np.geomspace(runs["global_batch_size"].min(), runs["global_batch_size"].max(), 100)
            axes[0, 1].plot(grid, fit["S_min"] * (grid + fit["B_crit"]), color="0.2", lw=1, ls=style.sweep_line[sweep])
    axes[0, 1].set_ylabel("tokens to target" + rf.log_y(axes[0, 1], runs["tokens_to_target"]))
    for ax, col in zip(axes.flat, ("steps_to_target", "tokens_to_target")):
        rf.batch_axis(ax, runs["global_batch_size"])
        ax.set_xlabel("global batch (tokens)")
        rs._not_reached_marks(ax, runs, col)
    return rf.FigureResult("steps", title, fig, _to_target_caption(runs, speed, fits))


def _to_target_caption(runs: pd.DataFrame, speed: pd.DataFrame, fits: dict) -> str:
    sentences, multi, target = [], runs["sweep"].nunique() > 1, _target(runs)
    for sweep, g in speed.groupby("sweep"):
        r = runs[runs["sweep"] == sweep]
        ok = g.dropna(subset=["steps_to_target"])
        missing = g.loc[g["steps_to_target"].isna(), "global_batch_size"].astype(int).tolist()
        if ok.empty:
            sentences.append(f"No batch reached loss {target:g}{rf.caption_label(sweep, multi)}.")
            continue
        b0, top = ok.iloc[0], ok.iloc[-1]
        text = (f"Batch {b0.global_batch_size:.0f} tokens reached loss {target:g} in "
                f"{r.loc[r['global_batch_size'] == b0.global_batch_size, 'tokens_to_target'].mean():,.0f} tokens")
        if top.global_batch_size != b0.global_batch_size:
            t_top = r.loc[r["global_batch_size"] == top.global_batch_size, "tokens_to_target"].mean()
            text += (f"; batch {top.global_batch_size:.0f} in {t_top:,.0f} tokens and {top.speedup:.2f}x fewer steps "
                     f"(perfect scaling: {top.perfect_speedup:.0f}x){rf.caption_label(sweep, multi)}: "
                     + an.compare_batches(r, "steps_to_target", b0.global_batch_size, top.global_batch_size,
                                          unit="steps").phrase)
        fit = fits.get(sweep, {})
        if math.isfinite(fit.get("B_crit", math.nan)):
            text += (f"; fitted S_min = {rf.fmt(fit['S_min'])} steps, B_crit = {rf.fmt(fit['B_crit'])} tokens "
                     f"({rs._interval(fit)}), so E_min = S_min x B_crit = {fit['S_min'] * fit['B_crit']:,.0f} tokens"
                     + "".join(f"; {c}" for c in caveats(fit)))
        else:
            text += f"; no B_crit: {fit.get('reason') or 'no fit'}"
        text += "".join(f"; batch {b} never reached it" for b in missing)
        sentences.append(text + ".")
    return (" ".join(sentences) + " Filled points: first crossing, with an error bar down to the evaluation before "
            "it; hollow: sustained crossing. Right: tokens = steps x batch; the fit's curve there is S_min (B + B_crit).")


# --- the noise scale through training -----------------------------------------------------------

def fig_noise(noise: pd.DataFrame, runs: pd.DataFrame, fits: dict, style: rf.Style) -> rf.FigureResult:
    title = "Gradient noise scale through training against Kaplan et al.'s B_crit(L)"
    noise = noise.dropna(subset=["b_simple_tokens", "eval_loss"])
    noise = noise[(noise["b_simple_tokens"] > 0) & (noise["eval_loss"] > 0)]
    if noise.empty:
        return rf.FigureResult("noise", title, None,
                               "No run measured the gradient noise scale after an evaluation (set "
                               "noise_scale_every_steps; one worker also needs gradient accumulation).")
    fig, axes = rf.new_figure(1, width=7, legend_in=0.35)
    ax = axes[0, 0]
    for (sweep, batch, run), g in noise.groupby(["sweep", "global_batch_size", "run_id"]):
        g = g.sort_values("step")
        ax.plot(g["eval_loss"], g["b_simple_tokens"], "o-", ms=2.5, lw=0.8, alpha=0.8, color=style.colour(batch),
                label=f"B_simple, batch {batch}" if run == noise.loc[noise["global_batch_size"] == batch, "run_id"].iloc[0]
                else None)
    losses = np.geomspace(noise["eval_loss"].min(), noise["eval_loss"].max(), 50)
    ax.plot(losses, [kaplan_critical_batch_tokens(v) for v in losses], "k--", lw=1,
            label=f"Kaplan B_crit(L) = {KAPLAN_B_STAR_TOKENS:.0e} / L^(1/{KAPLAN_ALPHA_B})")
    target = _target(runs)
    for sweep, fit in fits.items():
        if math.isfinite(fit.get("B_crit", math.nan)) and math.isfinite(target):
            lo, hi = fit.get("B_crit_lo", math.nan), fit.get("B_crit_hi", math.nan)
            err = ([[fit["B_crit"] - lo], [hi - fit["B_crit"]]] if math.isfinite(lo) and math.isfinite(hi) and lo < hi
                   else None)
            ax.errorbar([target], [fit["B_crit"]], yerr=err, fmt="D", color="firebrick", ms=6, capsize=3,
                        label=f"fitted B_crit at the target {target:g}" + rf.sweep_label(sweep, len(fits) > 1))
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):  # 2.5, 3, 4: not 3 x 10^0
        axis(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.invert_xaxis()  # training proceeds to the right, as the loss falls
    ax.set_xlabel("validation loss (nats per token, log; falls to the right)")
    ax.set_ylabel("batch (tokens, log)")
    rf.legend_below(fig, ax, ncol=2)
    return rf.FigureResult("noise", title, fig, _noise_caption(noise))


def _noise_caption(noise: pd.DataFrame) -> str:
    late, early = noise["eval_loss"].min(), noise["eval_loss"].max()
    at_late = noise.loc[noise["eval_loss"] == late, "b_simple_tokens"].median()
    at_early = noise.loc[noise["eval_loss"] == early, "b_simple_tokens"].median()
    text = (f"B_simple goes from {rf.fmt(at_early)} tokens at loss {early:.3g} to {rf.fmt(at_late)} tokens at loss "
            f"{late:.3g} ({len(noise)} estimates from {noise['run_id'].nunique()} run(s))")
    if noise["eval_loss"].nunique() >= 3 and early / late > 1.05:
        slope = np.polyfit(np.log(noise["eval_loss"]), np.log(noise["b_simple_tokens"]), 1)[0]
        text += f"; a power-law fit over these points gives B_simple ~ L^{slope:.2f}, Kaplan's trend is L^{-1 / KAPLAN_ALPHA_B:.2f}"
    kaplan = kaplan_critical_batch_tokens(late)
    return (text + f". Kaplan's B_crit at loss {late:.3g} would be {_approx_tokens(kaplan)} tokens, but "
            "their fit is for GPT-2's BPE tokens (about 4 bytes each) on WebText2: a byte-level loss per token is on "
            "another scale and their tokens carry more text, so on these axes the curve shows the trend's slope, "
            "not a prediction for this corpus, and the two levels are not compared. B_simple assumes a "
            "well-conditioned Hessian (McCandlish et al. 2018).")


def _approx_tokens(tokens: float) -> str:
    """A token count to two significant figures, in words past a million: '2.9 million'."""
    for scale, word in ((1e9, "billion"), (1e6, "million")):
        if tokens >= scale:
            return f"about {tokens / scale:.2g} {word}"
    return f"about {tokens:,.0f}" if tokens >= 100 else f"about {tokens:.2g}"


# --- the learning-rate schedule ------------------------------------------------------------------

def fig_lr(lr: pd.DataFrame, records: list, style: rf.Style) -> rf.FigureResult:
    """The planned schedule of each batch's first run (bench.plan.RunPlan.lr at every step) against
    tokens, with the LR values the run logged as points (the worker logs every step of the first
    epoch, then each epoch's first step)."""
    from bench.plan import RunPlan

    title = "Learning rate against tokens: planned schedule (lines) and logged values (points)"
    plans = {}
    for r in records:
        key = (r.sweep, (r.plan or {}).get("global_batch_size"))
        if r.plan and key not in plans:
            plans[key] = (r.run_id, RunPlan.from_dict(r.plan))
    if not plans:
        return rf.FigureResult("lr", title, None, "No run plan to draw the schedule from.")
    fig, axes = rf.new_figure(1, width=7)
    ax, multi = axes[0, 0], len({s for s, _ in plans}) > 1
    for (sweep, batch), (run_id, plan) in sorted(plans.items()):
        steps = np.arange(plan.total_steps)
        ax.plot((steps + 1) * batch, [plan.lr(int(s)) for s in steps], color=style.colour(batch),
                ls=style.sweep_line[sweep], lw=1.2, label=f"B={batch} tokens" + rf.sweep_label(sweep, multi))
        logged = lr[(lr["sweep"] == sweep) & (lr["run_id"] == run_id)]
        ax.scatter((logged["step"] + 1) * batch, logged["lr"], s=4, color=style.colour(batch), zorder=3)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("learning rate")
    ax.legend(fontsize=7)
    peaks = {batch: plan.peak_lr for (_, batch), (_, plan) in plans.items()}
    (b0, p0), (b1, p1) = min(peaks.items()), max(peaks.items())
    first = next(iter(plans.values()))[1]
    caption = (f"Peak LR goes from {rf.fmt(p0)} at batch {b0} tokens to {rf.fmt(p1)} at batch {b1} "
               f"({p1 / p0:.3g}x the LR at {b1 / b0:.3g}x the batch: the {first.scaling} rule), a {first.schedule} "
               f"decay to {first.min_lr_ratio:g} x the peak after a warmup from "
               f"{'zero' if first.warmup_from == 'zero' else 'the reference LR'}.")
    return rf.FigureResult("lr", title, fig, caption)


# --- the per-batch table ---------------------------------------------------------------------------

HEADERS = ["sweep", "global batch (tokens)", "workers", "per-worker (tokens)", "peak LR", "runs",
           "reached / held / ended above", "final validation loss", "steps to target", "steps, sustained",
           "eval interval (steps)", "tokens to target", "steps speed-up (regime)", "vs smallest batch",
           "vs previous batch", "time to target (s)", "tokens/s", "MFU", "B_simple (tokens)", "vs fitted B_crit"]


def batch_table_html(table: pd.DataFrame, speed: pd.DataFrame, fits: dict[str, dict]) -> str:
    if table.empty:
        return '<p class="note">No run to summarise.</p>'
    cols = ["sweep", "global_batch_size", "speedup", "regime", "speedup_noise", "regime_noise"]
    table = table.merge(speed[cols], how="left", on=["sweep", "global_batch_size"]) if len(speed) else \
        table.assign(speedup=math.nan, regime=None, speedup_noise=None, regime_noise=None)
    rows = []
    for t in table.itertuples():
        speedup = "—" if pd.isna(t.speedup) else f"{t.speedup:.2f}x" + (f" ({t.regime})" if isinstance(t.regime, str) else "")
        mfu = getattr(t, "mfu_mean", math.nan)
        rows.append("".join([
            rt.text_cell(t.sweep), rt.num_cell(t.global_batch_size, 9), rt.num_cell(t.num_workers),
            rt.num_cell(t.per_worker_batch_size, 9), rt.num_cell(t.peak_lr), rt.text_cell(f"{t.n_runs} ({t.statuses})"),
            f'<td data-v="{t.n_reached}">{t.n_reached} / {t.n_sustained} / {t.n_ends_below} of {t.n_runs}</td>',
            rt.num_cell(t.final_test_loss_mean, std=t.final_test_loss_std, decimals=3),
            rt.num_cell(t.steps_to_target_mean, 4, t.steps_to_target_std),
            rt.num_cell(t.steps_to_target_sustained_mean, 4, t.steps_to_target_sustained_std),
            rt.num_cell(t.steps_to_target_resolution_mean, 3),
            rt.num_cell(t.samples_to_target_mean, 9, t.samples_to_target_std),
            f'<td data-v="{"" if pd.isna(t.speedup) else t.speedup}">{esc(speedup)}</td>',
            rt.text_cell(t.speedup_noise if isinstance(t.speedup_noise, str) else "—"),
            rt.text_cell(t.regime_noise if isinstance(t.regime_noise, str) else "—"),
            rt.num_cell(t.time_to_target_s_mean, 3, t.time_to_target_s_std), rt.num_cell(t.samples_per_s_mean, 4),
            rt.text_cell("—" if pd.isna(mfu) else f"{mfu:.1%}"),
            rt.num_cell(t.noise_scale_b_simple_mean, 3, t.noise_scale_b_simple_std),
            rt.text_cell(rt.versus_b_crit(t.global_batch_size, fits.get(t.sweep, {})))]))
    note = ('<p class="meta">Batches, B_simple and B_crit in tokens (loss terms); the target is a validation loss, '
            'reached when the loss is at or below it. MFU: tokens/s x the model\'s training FLOPs per token (6 N) over '
            'the GPUs\' dense bf16 peak; — on a CPU or an unlisted GPU.</p>')
    return note + rt.sortable(HEADERS, rows)
