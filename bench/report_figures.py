"""Report figures: each one a function of analysis DataFrames -> a matplotlib Figure and a caption.

Owns: the colour per global batch size (one palette shared by every figure), the marker and
line style per sweep, the shared axes helpers, the figures of learning curves, generalisation
and the LR schedule (scaling to the target: bench.report_scaling; throughput, memory and
telemetry: bench.report_hardware),
and the caption computed from the data each plot shows (its wording, shared by every figure:
bench.report_captions); a caption that compares batches says whether the difference exceeds the
seed spread (bench.spread), and runs that stopped early are drawn as red crosses, named, and left
out of means and comparisons. A figure whose data is absent
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
from bench import report_captions as rc_
from bench.report_captions import caption_label, fmt, versus  # noqa: F401 (shared: rf.fmt, rf.caption_label)

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


def _nice_125(x: float, up: bool) -> float:
    """The nearest of 1, 2, 5 x 10^k at or above x (up) or at or below it."""
    k = math.floor(math.log10(x))
    steps = [m * 10.0**e for e in (k - 1, k, k + 1) for m in (1, 2, 5)]
    return min(v for v in steps if v >= x * (1 - 1e-9)) if up else max(v for v in steps if v <= x * (1 + 1e-9))


def log_limits(ax, values, headroom: float = 1.1) -> None:
    """On a log y axis (``log_y``), limits at the 1-2-5 ticks just outside the data with at least
    `headroom` (a factor) to spare, so both ends carry a labelled tick and no point touches the frame."""
    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    v = v[v > 0]
    if ax.get_yscale() == "log" and len(v):
        ax.set_ylim(_nice_125(v.min() / headroom, up=False), _nice_125(v.max() * headroom, up=True))


def pad_linear_y(ax, values, frac: float = 0.05) -> None:
    """On a linear y axis, at least ±frac of the values' mean around them, so that a spread tiny next
    to the level (0.8905-0.8910 GiB) does not fill the axis and look like a trend."""
    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    if ax.get_yscale() != "linear" or v.empty or not math.isfinite(v.mean()) or v.mean() == 0:
        return
    mid, half = (v.max() + v.min()) / 2, max((v.max() - v.min()) / 2, frac * abs(v.mean()))
    lo, hi = ax.get_ylim()
    ax.set_ylim(min(lo, mid - half * 1.1), max(hi, mid + half * 1.1))


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
    return FigureResult("curves", title, fig, rc_.curves_caption(curves, multi))


# --- (2) generalisation -----------------------------------------------------------------------

def fig_generalisation(runs: pd.DataFrame, style: Style) -> FigureResult:
    title = "Final train vs test accuracy and the generalisation gap"
    done = runs.dropna(subset=["final_test_acc"])
    if done.empty:
        return FigureResult("gap", title, None, "No run finished with a final accuracy, so there is no gap to show.")
    completed, early = done[~rc_.stopped(done)], done[rc_.stopped(done)]
    fig, axes = new_figure(2)
    _mean_lines(axes[0, 0], completed, "final_train_acc", style, "train", open_marker=True)
    _mean_lines(axes[0, 0], completed, "final_test_acc", style, "test")
    _mean_lines(axes[0, 1], completed, "gap_acc", style)
    for ax, col in ((axes[0, 0], "final_test_acc"), (axes[0, 1], "gap_acc")):
        if len(early):
            ax.scatter(early["global_batch_size"], early[col], marker="x", s=30, color="tab:red", zorder=4,
                       label="stopped early (not in the means)")
    axes[0, 0].set_ylabel("final accuracy")
    axes[0, 0].legend(loc="best")
    axes[0, 1].set_ylabel("train − test accuracy")
    for ax in axes.flat:
        batch_axis(ax, runs["global_batch_size"])
    multi = runs["sweep"].nunique() > 1
    sentences = [t for sweep, g in completed.groupby("sweep")
                 if (t := rc_.within_sweep(g, sweep if multi else "", completed=len(early) > 0))]
    sentences += rc_.across_sweeps(done)
    note = rc_.stopped_text(rc_.stopped_groups(done), multi, then="their final accuracy is where they stopped, so "
                            "they are drawn as red crosses and left out of the within-sweep means and comparisons (the comparison "
                            "between sweeps, where there is one, gives both: all runs and completed runs only)")
    sentences += [note] if note else []
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
    return FigureResult("lr", title, fig, rc_.lr_caption(lr, runs))
