"""Report figures: each one a function of analysis DataFrames -> a matplotlib Figure and a caption.

Owns: the colour per global batch size (one palette shared by every figure), the marker and
line style per sweep, the shared axes helpers, the figures of learning curves, generalisation
and the LR schedule (scaling to the target: bench.report_scaling; throughput, memory and
telemetry: bench.report_hardware),
and the caption computed from the data each plot shows; a caption that compares batches says
whether the difference exceeds the seed spread (bench.spread). A figure whose data is absent
comes back without a Figure and with the caption saying why, so the page shows a note instead.

Text from folders and configs enters a figure only through ``tex`` (a '$' in a sweep name is
printed, not read as maths); matplotlib's own maths stays on, so log-axis tick labels render.

Uses matplotlib's object API (``matplotlib.figure.Figure``, rendered by Agg), never pyplot, so
nothing global changes and no display is needed. The look is seaborn's "whitegrid" style at its
"paper" scale (``rc()``, read from seaborn's public ``axes_style``/``plotting_context`` and applied
per figure with ``matplotlib.rc_context``) with the viridis palette. seaborn is imported when the
first figure is drawn, not with this module: measured with ``python -X importtime``, it adds
0.5-1.0 s over pandas + matplotlib + scipy.optimize, which a report pays once.
Must not import: torch, ray, bench.store (it sees DataFrames only), pyplot.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from bench import analysis as an
from bench.spread import Sample, compare

_RC_OVERRIDES = {  # smaller than seaborn's "paper" scale, and no font the machine may lack
    "font.sans-serif": ["DejaVu Sans"], "font.size": 9, "axes.labelsize": 9, "axes.titlesize": 9.5,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 8, "legend.title_fontsize": 8,
    "legend.frameon": True, "legend.framealpha": 0.85,
}


@functools.lru_cache(maxsize=1)
def rc() -> dict:
    """matplotlib rc for every report figure: seaborn's "whitegrid" + "paper" context, smaller fonts."""
    import seaborn as sns  # here, not at module level: only drawing a figure pays its import

    params = dict(sns.axes_style("whitegrid"))
    params.update(sns.plotting_context("paper"))
    params.update(_RC_OVERRIDES)
    return params
MARKERS = ("o", "s", "^", "D", "v", "P")
LINESTYLES = ("-", "--", ":", "-.")
REGIME_SHORT = {"perfect scaling": "perfect", "diminishing returns": "diminishing",
                "maximal data parallelism": "maximal"}


@dataclass
class FigureResult:
    key: str
    title: str
    figure: Figure | None  # None: skipped, and caption says why
    caption: str


@dataclass
class Style:
    """Colour per global batch size, marker/line style per sweep (the same in every figure)."""

    batch_colour: dict[int, tuple]
    sweep_marker: dict[str, str]
    sweep_line: dict[str, str]

    @classmethod
    def for_runs(cls, runs: pd.DataFrame) -> "Style":
        batches = sorted(int(b) for b in runs["global_batch_size"].dropna().unique())
        # viridis, stopping short of its pale yellow end so the largest batch stays visible on white
        colours = [tuple(colormaps["viridis"](x)[:3]) for x in np.linspace(0.0, 0.85, max(len(batches), 1))]
        sweeps = sorted(runs["sweep"].unique())
        return cls(dict(zip(batches, colours)),
                   {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(sweeps)},
                   {s: LINESTYLES[i % len(LINESTYLES)] for i, s in enumerate(sweeps)})

    def colour(self, batch) -> tuple:
        return self.batch_colour.get(int(batch), (0.5, 0.5, 0.5))


def tex(text: object) -> str:
    """Text from a folder or config, safe to put in a figure: '$' printed, never read as maths."""
    return str(text).replace("$", r"\$")


def fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def batch_axis(ax, batches) -> None:
    batches = sorted({int(b) for b in batches})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches], rotation=45 if len(batches) > 8 else 0)
    ax.minorticks_off()
    ax.set_xlim(batches[0] / 2**0.4, batches[-1] * 2**0.4)  # every batch, reached or not, has a place
    ax.set_xlabel("global batch size")


def log_y(ax, values, *, force: bool = False) -> str:
    """Log y with plain-number ticks at 1, 2, 5 x 10^k; linear when the data span under one decade
    (unless force). Returns the axis-label suffix."""
    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    v = v[v > 0]
    if v.empty or (not force and v.max() / v.min() < 10):
        return ""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: fmt(y)))
    ax.yaxis.set_minor_formatter(NullFormatter())
    return " (log)"


def new_figure(ncols: int = 2, nrows: int = 1, width: float = 10.0, height: float = 3.6, *,
                sharey: bool = False, top_in: float = 0.3, legend_in: float = 0.0):
    """Figure with fixed margins in inches (constrained layout doubled the render time);
    legend_in: extra room at the bottom for a legend under the axes (``legend_below``)."""
    fig = Figure(figsize=(width, height * nrows + legend_in))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)
    total_h, left_in, right_in, bottom_in = height * nrows + legend_in, 0.8, 0.15, 0.5 + legend_in
    gap_w_in, gap_h_in = (0.2 if sharey else 0.9), 0.75
    axes_w = (width - left_in - right_in - gap_w_in * (ncols - 1)) / ncols
    axes_h = (total_h - top_in - bottom_in - gap_h_in * (nrows - 1)) / nrows
    fig.subplots_adjust(left=left_in / width, right=1 - right_in / width, bottom=bottom_in / total_h,
                        top=1 - top_in / total_h, wspace=gap_w_in / axes_w, hspace=gap_h_in / axes_h)
    return fig, axes


def legend_below(fig, ax, ncol: int = 3) -> None:
    """The axes' legend under the figure's axes, where it hides no data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower left", bbox_to_anchor=(0.07, 0.0), ncol=ncol, fontsize=7,
                   frameon=False)


def sweep_label(sweep: str, multi: bool) -> str:
    """' (sweep)' after a label when several sweeps share a figure (escaped: see ``tex``)."""
    return f" ({tex(sweep)})" if multi else ""


def caption_label(sweep: str, multi: bool) -> str:
    """The same for a caption (HTML-escaped by the page, not by matplotlib)."""
    return f" ({sweep})" if multi else ""


def versus(runs: pd.DataFrame, col: str, a: float, b: float, unit: str = "") -> str:
    """The seed-spread phrase for one column between two global batches (bench.spread)."""
    return an.compare_batches(runs, col, a, b, unit=unit).phrase


def _mean_lines(ax, runs: pd.DataFrame, col: str, style: Style, label: str = "", open_marker=False) -> None:
    """Per-run points coloured by batch, and mean ± std per batch as a line per sweep."""
    multi = runs["sweep"].nunique() > 1
    known = runs.dropna(subset=[col])
    ax.scatter(known["global_batch_size"], known[col], s=12, alpha=0.6, zorder=3,
               c=[style.colour(b) for b in known["global_batch_size"]])
    for sweep, g in known.groupby("sweep"):
        stats = an.seed_stats(g, col, by=("global_batch_size",))
        ax.errorbar(stats["global_batch_size"], stats["mean"], yerr=stats["std"].fillna(0), color="0.3",
                    ls=style.sweep_line[sweep], marker=style.sweep_marker[sweep], ms=5, capsize=3,
                    mfc="white" if open_marker else "0.3", label=label + sweep_label(sweep, multi))


# --- (1) learning curves ----------------------------------------------------------------------

def fig_learning_curves(curves: pd.DataFrame, style: Style) -> FigureResult:
    title = "Learning curves: train (dashed) and test (solid) accuracy per epoch"
    if curves.empty or curves["test_acc"].isna().all():
        return FigureResult("curves", title, None, "No evaluation was logged, so there are no learning curves.")
    panels = sorted(curves.groupby(["sweep", "global_batch_size"]).groups)
    multi = curves["sweep"].nunique() > 1
    ncols = min(len(panels), 5)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = new_figure(ncols, nrows, width=min(12.0, 2.6 * ncols + 1), height=2.4 + 0.2 * multi, sharey=True,
                           top_in=0.5 if multi else 0.3)
    for ax, (sweep, batch) in zip(axes.flat, panels):
        g = curves[(curves["sweep"] == sweep) & (curves["global_batch_size"] == batch)]
        colour = style.colour(batch)
        for col, ls in (("test_acc", "-"), ("train_acc", "--")):
            agg = g.groupby("epoch")[col].agg(["mean", "min", "max"])
            ax.fill_between(agg.index, agg["min"], agg["max"], color=colour, alpha=0.25, lw=0)
            ax.plot(agg.index, agg["mean"], ls=ls, color=colour, lw=1.4)
        ax.set_title(f"B={batch}, {g['run_id'].nunique()} run(s)" + (f"\n{tex(sweep)}" if multi else ""), fontsize=8)
        ax.set_xlabel("epoch")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    final = curves.sort_values("epoch").groupby(["sweep", "global_batch_size", "run_id"]).tail(1)
    best = final.groupby(["sweep", "global_batch_size"])["test_acc"].mean().dropna()
    caption = "All panels share one y axis; bands span the seeds (min to max)."
    if len(best) > 1:
        (hs, hb), (ls_, lb) = best.idxmax(), best.idxmin()
        finals = {k: Sample.of(g["test_acc"]) for k, g in final.groupby(["sweep", "global_batch_size"])}
        caption = (f"Batch {hb}{caption_label(hs, multi)} ends highest at {best.max():.3f} mean test accuracy and "
                   f"batch {lb}{caption_label(ls_, multi)} lowest at {best.min():.3f}: "
                   f"{compare(finals[(hs, hb)], finals[(ls_, lb)]).phrase}; " + caption[0].lower() + caption[1:])
    return FigureResult("curves", title, fig, caption)


# --- (2) generalisation -----------------------------------------------------------------------

def fig_generalisation(runs: pd.DataFrame, style: Style) -> FigureResult:
    title = "Final train vs test accuracy and the generalisation gap"
    done = runs.dropna(subset=["final_test_acc"])
    if done.empty:
        return FigureResult("gap", title, None, "No run finished with a final accuracy, so there is no gap to show.")
    fig, axes = new_figure(2)
    _mean_lines(axes[0, 0], done, "final_train_acc", style, "train", open_marker=True)
    _mean_lines(axes[0, 0], done, "final_test_acc", style, "test")
    axes[0, 0].set_ylabel("final accuracy")
    axes[0, 0].legend(loc="best")
    _mean_lines(axes[0, 1], done, "gap_acc", style)
    axes[0, 1].set_ylabel("train − test accuracy")
    for ax in axes.flat:
        batch_axis(ax, runs["global_batch_size"])
    sentences, multi = [], runs["sweep"].nunique() > 1
    for sweep, g in done.groupby("sweep"):
        test = g.groupby("global_batch_size")[["final_test_acc", "gap_acc"]].mean()
        lo, hi = test.index.min(), test.index.max()
        if lo == hi:
            continue
        sentences.append(f"Final test accuracy goes from {test.loc[lo, 'final_test_acc']:.3f} at batch {lo} to "
                         f"{test.loc[hi, 'final_test_acc']:.3f} at batch {hi}{caption_label(sweep, multi)} "
                         f"({versus(g, 'final_test_acc', lo, hi)}) and the gap from {test.loc[lo, 'gap_acc']:+.3f} "
                         f"to {test.loc[hi, 'gap_acc']:+.3f} ({versus(g, 'gap_acc', lo, hi)}).")
    return FigureResult("gap", title, fig, " ".join(sentences) or "Only one global batch finished: nothing to compare.")


def by_workers(ax, df: pd.DataFrame, col: str, style: Style, ylabel: str) -> None:
    """One line per (sweep, batch) over num_workers, for the sweeps that vary it."""
    df = df[df.groupby("sweep")["num_workers"].transform("nunique") > 1].dropna(subset=[col])
    multi = df["sweep"].nunique() > 1
    for (sweep, batch), g in df.groupby(["sweep", "global_batch_size"]):
        m = g.groupby("num_workers")[col].mean()
        ax.plot(m.index, m.values, marker=style.sweep_marker[sweep], ls=style.sweep_line[sweep],
                color=style.colour(batch), label=f"B={batch}" + sweep_label(sweep, multi))
    workers = sorted(int(w) for w in df["num_workers"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(workers, [str(w) for w in workers])
    ax.minorticks_off()
    ax.margins(x=0.08)
    ax.set_xlabel("num_workers")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=2)


# --- (6) learning-rate schedule ---------------------------------------------------------------

def fig_lr(lr: pd.DataFrame, runs: pd.DataFrame, style: Style) -> FigureResult:
    title = "Learning rate actually applied (from the event log)"
    if lr.empty or lr["lr"].isna().all():
        return FigureResult("lr", title, None, "No opt_learning_rate events were logged.")
    first = lr.sort_values(["seed", "num_workers"]).groupby(["sweep", "global_batch_size"])["run_id"].first()
    fig, axes = new_figure(1, width=7)
    ax = axes[0, 0]
    for (sweep, batch), run in first.items():
        g = lr[lr["run_id"].eq(run) & lr["sweep"].eq(sweep)].sort_values("step")
        ax.plot(g["epoch"], g["lr"], drawstyle="steps-post", color=style.colour(batch), ls=style.sweep_line[sweep],
                label=f"B={batch}" + sweep_label(sweep, lr['sweep'].nunique() > 1))
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate" + log_y(ax, lr["lr"]))
    ax.legend(fontsize=7, ncol=2)
    return FigureResult("lr", title, fig, _lr_caption(lr, runs))


def _lr_caption(lr: pd.DataFrame, runs: pd.DataFrame) -> str:
    """Planned peaks (the plan's, not the largest LR applied: a run that diverged in warmup never
    applied its peak) and where the largest batch reached its peak, or did not."""
    peaks = runs.groupby("global_batch_size")["peak_lr"].first().dropna()
    if peaks.empty:
        return "The LR each batch applied, as logged."
    b0, p0, b1, p1 = peaks.index[0], peaks.iloc[0], peaks.index[-1], peaks.iloc[-1]
    text = (f"Planned peak LR goes from {fmt(p0)} at batch {b0} to {fmt(p1)} at batch {b1} "
            f"({p1 / p0:.3g}x for a {b1 / b0:.3g}x larger batch)")
    top = runs[runs["global_batch_size"] == b1]
    warm = top[top["failure_before_peak"].eq(True)] if "failure_before_peak" in top else top.iloc[:0]
    applied = lr[lr["global_batch_size"] == b1]
    if len(warm) == len(top) and len(top):
        text += (f"; batch {b1} diverged during warmup at LR {fmt(warm['failure_lr'].max())}, before reaching it, "
                 "so it tests the warmup, not the scaling rule's peak")
    elif len(applied) and applied["lr"].max() >= 0.999 * p1:
        text += f", reached after {fmt(applied.loc[applied['lr'] >= 0.999 * p1, 'epoch'].min())} epoch(s) at batch {b1}"
    return text + "."
