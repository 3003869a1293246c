"""Report figures: each one a function of analysis DataFrames -> a matplotlib Figure and a caption.

Owns: the colour per global batch size (one palette shared by every figure), the marker and
line style per sweep, every plot of the report, and the one-sentence caption computed from the
data each plot shows. A figure whose data is absent comes back without a Figure and with the
caption saying why, so the page shows a note instead of crashing.

Uses matplotlib's object API (``matplotlib.figure.Figure``, rendered by Agg), never pyplot, so
nothing global changes and no display is needed. The look is seaborn's "whitegrid" style and
viridis palette, written out here: importing seaborn (it pulls in pyplot and scipy.stats) cost
~3 s of the 10 s budget for a report on 2 cores.
Must not import: torch, ray, bench.store (it sees DataFrames only), pyplot, seaborn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from bench import analysis as an

RC = {  # seaborn "whitegrid" at a small font scale
    "figure.facecolor": "white", "axes.facecolor": "white", "axes.edgecolor": ".8", "axes.grid": True,
    "axes.axisbelow": True, "axes.labelcolor": ".15", "grid.color": ".8", "grid.linewidth": 0.8,
    "text.color": ".15", "xtick.color": ".15", "ytick.color": ".15", "xtick.bottom": False, "ytick.left": False,
    "font.family": ["sans-serif"], "font.sans-serif": ["DejaVu Sans"], "font.size": 9, "axes.labelsize": 9,
    "axes.titlesize": 9.5, "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 8,
    "lines.solid_capstyle": "round", "legend.frameon": True, "legend.framealpha": 0.85,
    "text.parse_math": False,  # names from folders and configs print literally ('$' is not maths)
}
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


def fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def _batch_axis(ax, batches) -> None:
    batches = sorted({int(b) for b in batches})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches], rotation=45 if len(batches) > 8 else 0)
    ax.minorticks_off()
    ax.set_xlim(batches[0] / 2**0.4, batches[-1] * 2**0.4)  # every batch, reached or not, has a place
    ax.set_xlabel("global batch size")


def _log_y(ax, values, *, force: bool = False) -> str:
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


def _new_figure(ncols: int = 2, nrows: int = 1, width: float = 10.0, height: float = 3.6, *,
                sharey: bool = False, top_in: float = 0.3):
    """Figure with fixed margins in inches (constrained layout doubled the render time)."""
    fig = Figure(figsize=(width, height * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)
    total_h, left_in, right_in, bottom_in = height * nrows, 0.8, 0.15, 0.5
    gap_w_in, gap_h_in = (0.2 if sharey else 0.9), 0.75
    axes_w = (width - left_in - right_in - gap_w_in * (ncols - 1)) / ncols
    axes_h = (total_h - top_in - bottom_in - gap_h_in * (nrows - 1)) / nrows
    fig.subplots_adjust(left=left_in / width, right=1 - right_in / width, bottom=bottom_in / total_h,
                        top=1 - top_in / total_h, wspace=gap_w_in / axes_w, hspace=gap_h_in / axes_h)
    return fig, axes


def _sweep_label(sweep: str, multi: bool) -> str:
    return f" ({sweep})" if multi else ""


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
                    mfc="white" if open_marker else "0.3", label=label + _sweep_label(sweep, multi))


# --- (1) learning curves ----------------------------------------------------------------------

def fig_learning_curves(curves: pd.DataFrame, style: Style) -> FigureResult:
    title = "Learning curves: train (dashed) and test (solid) accuracy per epoch"
    if curves.empty or curves["test_acc"].isna().all():
        return FigureResult("curves", title, None, "No evaluation was logged, so there are no learning curves.")
    panels = sorted(curves.groupby(["sweep", "global_batch_size"]).groups)
    multi = curves["sweep"].nunique() > 1
    ncols = min(len(panels), 5)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _new_figure(ncols, nrows, width=min(12.0, 2.6 * ncols + 1), height=2.4, sharey=True)
    for ax, (sweep, batch) in zip(axes.flat, panels):
        g = curves[(curves["sweep"] == sweep) & (curves["global_batch_size"] == batch)]
        colour = style.colour(batch)
        for col, ls in (("test_acc", "-"), ("train_acc", "--")):
            agg = g.groupby("epoch")[col].agg(["mean", "min", "max"])
            ax.fill_between(agg.index, agg["min"], agg["max"], color=colour, alpha=0.25, lw=0)
            ax.plot(agg.index, agg["mean"], ls=ls, color=colour, lw=1.4)
        ax.set_title(f"B={batch}" + _sweep_label(sweep, multi) + f", {g['run_id'].nunique()} runs")
        ax.set_xlabel("epoch")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    final = curves.sort_values("epoch").groupby(["sweep", "global_batch_size", "run_id"]).tail(1)
    best = final.groupby(["sweep", "global_batch_size"])["test_acc"].mean().dropna()
    caption = "All panels share one y axis; bands span the seeds (min to max)."
    if len(best):
        (hs, hb), (ls_, lb) = best.idxmax(), best.idxmin()
        caption = (f"Batch {hb}{_sweep_label(hs, multi)} ends highest at {best.max():.3f} mean test accuracy and "
                   f"batch {lb}{_sweep_label(ls_, multi)} lowest at {best.min():.3f}; "
                   + caption[0].lower() + caption[1:])
    return FigureResult("curves", title, fig, caption)


# --- (2) generalisation -----------------------------------------------------------------------

def fig_generalisation(runs: pd.DataFrame, style: Style) -> FigureResult:
    title = "Final train vs test accuracy and the generalisation gap"
    done = runs.dropna(subset=["final_test_acc"])
    if done.empty:
        return FigureResult("gap", title, None, "No run finished with a final accuracy, so there is no gap to show.")
    fig, axes = _new_figure(2)
    _mean_lines(axes[0, 0], done, "final_train_acc", style, "train", open_marker=True)
    _mean_lines(axes[0, 0], done, "final_test_acc", style, "test")
    axes[0, 0].set_ylabel("final accuracy")
    axes[0, 0].legend(loc="best")
    _mean_lines(axes[0, 1], done, "gap_acc", style)
    axes[0, 1].set_ylabel("train − test accuracy")
    for ax in axes.flat:
        _batch_axis(ax, runs["global_batch_size"])
    sentences = []
    for sweep, g in done.groupby("sweep"):
        test = g.groupby("global_batch_size")[["final_test_acc", "gap_acc"]].mean()
        lo, hi = test.index.min(), test.index.max()
        sentences.append(f"Final test accuracy goes from {test.loc[lo, 'final_test_acc']:.3f} at batch {lo} to "
                         f"{test.loc[hi, 'final_test_acc']:.3f} at batch {hi} and the gap from "
                         f"{test.loc[lo, 'gap_acc']:+.3f} to {test.loc[hi, 'gap_acc']:+.3f}"
                         f"{_sweep_label(sweep, runs['sweep'].nunique() > 1)}.")
    return FigureResult("gap", title, fig, " ".join(sentences))


# --- (3) steps and epochs to target -----------------------------------------------------------

def _not_reached_marks(ax, runs: pd.DataFrame, col: str) -> list[int]:
    by_batch = runs.groupby("global_batch_size")[col].apply(lambda s: s.notna().any())
    missing = [int(b) for b, ok in by_batch.items() if not ok]
    for b in missing:
        ax.annotate("not\nreached", (b, 0.02), xycoords=ax.get_xaxis_transform(), ha="center",
                    fontsize=7, color="firebrick")
    return missing


def _plot_fit(ax, speed: pd.DataFrame, fits: dict, style: Style) -> None:
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
                    label=f"fit B_crit={fit['B_crit']:.3g}" + _sweep_label(sweep, speed['sweep'].nunique() > 1))
        shift = 6 - 12 * sorted(speed["sweep"].unique()).index(sweep)  # keep two sweeps' labels apart
        starts = ok[ok["regime"].ne(ok["regime"].shift())]  # label where each regime begins
        for row in starts.itertuples():
            ax.annotate(REGIME_SHORT.get(row.regime, "") + " →", (row.global_batch_size, row.steps_to_target),
                        textcoords="offset points", xytext=(4, shift), fontsize=7, color="0.35")


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


def fig_steps_to_target(runs: pd.DataFrame, speed: pd.DataFrame, fits: dict, style: Style) -> FigureResult:
    title = "Steps and epochs to the target accuracy vs global batch size"
    if runs["steps_to_target"].isna().all():
        return FigureResult("steps", title, None,
                            "No run reached the target accuracy, so there are no steps- or epochs-to-target to plot.")
    fig, axes = _new_figure(2)
    _mean_lines(axes[0, 0], runs, "steps_to_target", style)
    _plot_fit(axes[0, 0], speed, fits, style)
    _mark_critical(axes.flat, runs, fits)
    axes[0, 0].set_ylabel("steps to target" + _log_y(axes[0, 0], runs["steps_to_target"], force=True))
    axes[0, 0].legend(loc="best", fontsize=7)
    _mean_lines(axes[0, 1], runs, "epochs_to_target", style)
    axes[0, 1].set_ylabel("epochs to target")
    for ax, col in zip(axes.flat, ("steps_to_target", "epochs_to_target")):
        _batch_axis(ax, runs["global_batch_size"])
        _not_reached_marks(ax, runs, col)
    return FigureResult("steps", title, fig, _steps_caption(runs, speed, fits))


def _steps_caption(runs: pd.DataFrame, speed: pd.DataFrame, fits: dict) -> str:
    sentences = []
    multi = runs["sweep"].nunique() > 1
    for sweep, g in speed.groupby("sweep"):
        ok = g.dropna(subset=["steps_to_target"])
        if ok.empty:
            sentences.append(f"No batch reached the target{_sweep_label(sweep, multi)}.")
            continue
        top = ok.iloc[-1]
        r = runs[(runs["sweep"] == sweep) & (runs["global_batch_size"] == top.global_batch_size)]
        target = runs.loc[runs["sweep"] == sweep, "target_accuracy"].iloc[0]
        text = (f"Batch {top.global_batch_size:.0f} reached {target:.2f} test accuracy in "
                f"{r['epochs_to_target'].mean():.3g} epochs, {top.speedup:.1f}x fewer steps than batch "
                f"{top.baseline_batch:.0f} (perfect scaling: {top.perfect_speedup:.0f}x){_sweep_label(sweep, multi)}")
        perfect = ok.loc[ok["regime"] == "perfect scaling", "global_batch_size"]
        if len(perfect):
            text += f"; perfect scaling up to batch {perfect.max():.0f}"
        fit = fits.get(sweep, {})
        if math.isfinite(fit.get("B_crit", math.nan)):
            text += (f"; fitted S_min = {fmt(fit['S_min'])} ± {fmt(fit['S_min_err'], 2)} steps, "
                     f"B_crit = {fmt(fit['B_crit'])} ± {fmt(fit['B_crit_err'], 2)}")
        noise = runs.loc[runs["sweep"] == sweep, "noise_scale_b_simple"].median()
        if math.isfinite(noise):
            text += f"; in-run gradient noise scale B_simple ≈ {fmt(noise)}"
        missing = g.loc[g["steps_to_target"].isna(), "global_batch_size"].astype(int).tolist()
        if missing:
            text += f"; batch {', '.join(map(str, missing))} never reached it"
        sentences.append(text + ".")
    return " ".join(sentences)


# --- (4) time to target -----------------------------------------------------------------------

def fig_time_to_target(runs: pd.DataFrame, style: Style) -> FigureResult:
    title = "Training time to the target accuracy (evaluation excluded)"
    ok = runs.dropna(subset=["time_to_target_s"])
    if ok.empty:
        return FigureResult("time", title, None, "No run reached the target accuracy, so there is no time-to-target.")
    varied = runs.groupby("sweep")["num_workers"].nunique().max() > 1
    fig, axes = _new_figure(2 if varied else 1, width=10 if varied else 5.5)
    _mean_lines(axes[0, 0], ok, "time_to_target_s", style)
    _batch_axis(axes[0, 0], runs["global_batch_size"])
    _not_reached_marks(axes[0, 0], runs, "time_to_target_s")
    axes[0, 0].set_ylabel("time to target (s)" + _log_y(axes[0, 0], ok["time_to_target_s"]))
    if varied:
        _by_workers(axes[0, 1], ok, "time_to_target_s", style, "time to target (s)")
    mean = ok.groupby(["sweep", "global_batch_size", "num_workers"])["time_to_target_s"].agg(["mean", "size"])
    (sweep, batch, workers), best = mean["mean"].idxmin(), mean.loc[mean["mean"].idxmin()]
    caption = (f"Fastest to target: batch {batch} on {workers} worker(s) in {best['mean']:.3g} s of training time "
               f"(mean of {best['size']:.0f} run(s) that reached it)"
               f"{_sweep_label(sweep, runs['sweep'].nunique() > 1)}.")
    return FigureResult("time", title, fig, caption)


def _by_workers(ax, df: pd.DataFrame, col: str, style: Style, ylabel: str) -> None:
    """One line per (sweep, batch) over num_workers, for the sweeps that vary it."""
    df = df[df.groupby("sweep")["num_workers"].transform("nunique") > 1].dropna(subset=[col])
    multi = df["sweep"].nunique() > 1
    for (sweep, batch), g in df.groupby(["sweep", "global_batch_size"]):
        m = g.groupby("num_workers")[col].mean()
        ax.plot(m.index, m.values, marker=style.sweep_marker[sweep], ls=style.sweep_line[sweep],
                color=style.colour(batch), label=f"B={batch}" + _sweep_label(sweep, multi))
    workers = sorted(int(w) for w in df["num_workers"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(workers, [str(w) for w in workers])
    ax.minorticks_off()
    ax.margins(x=0.08)
    ax.set_xlabel("num_workers")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=2)


# --- (5) throughput, efficiency, memory, telemetry --------------------------------------------

def fig_throughput(runs: pd.DataFrame, eff: pd.DataFrame, style: Style) -> FigureResult:
    title = "Training throughput and scaling efficiency"
    if runs["samples_per_s"].isna().all():
        return FigureResult("throughput", title, None, "No run recorded a throughput (samples/s).")
    fig, axes = _new_figure(2)
    ax = axes[0, 0]
    for (sweep, workers), g in eff.dropna(subset=["samples_per_s"]).groupby(["sweep", "num_workers"]):
        ax.plot(g["global_batch_size"], g["samples_per_s"], marker=style.sweep_marker[sweep], color="0.3",
                ls=LINESTYLES[list(sorted(eff["num_workers"].unique())).index(workers) % 4],
                label=f"{workers} worker(s)" + _sweep_label(sweep, runs['sweep'].nunique() > 1))
    ax.scatter(runs["global_batch_size"], runs["samples_per_s"], s=12, zorder=3,
               c=[style.colour(b) for b in runs["global_batch_size"]])
    _batch_axis(ax, runs["global_batch_size"])
    ax.set_ylabel("samples/s" + _log_y(ax, runs["samples_per_s"]))
    ax.legend(fontsize=7)
    measured = eff[eff["num_workers"] > 1].dropna(subset=["scaling_efficiency"])
    ax = axes[0, 1]
    if measured.empty:
        ax.text(0.5, 0.5, "no batch ran on 1 and on more workers:\nscaling efficiency not measurable",
                ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_axis_off()
    else:
        _by_workers(ax, eff, "scaling_efficiency", style, "throughput per worker / 1 worker")
        ax.axhline(1.0, color="0.6", ls=":", lw=1)
    lo, hi = runs.groupby("global_batch_size")["samples_per_s"].mean().dropna().iloc[[0, -1]].items()
    caption = f"Throughput goes from {fmt(lo[1])} samples/s at batch {lo[0]} to {fmt(hi[1])} at batch {hi[0]}"
    if not measured.empty:
        worst = measured.loc[measured["scaling_efficiency"].idxmin()]
        caption += (f"; the lowest scaling efficiency is {worst.scaling_efficiency:.0%} at batch "
                    f"{worst.global_batch_size:.0f} on {worst.num_workers:.0f} workers")
    return FigureResult("throughput", title, fig, caption + ".")


def fig_memory(runs: pd.DataFrame, style: Style) -> FigureResult:
    title = "Peak memory vs per-worker batch size"
    cols = [c for c in ("peak_memory_gib", "torch_peak_reserved_gib") if runs[c].notna().any()]
    if not cols:
        return FigureResult("memory", title, None, "No memory was recorded (telemetry off and no CUDA).")
    fig, axes = _new_figure(1, width=5.5)
    ax = axes[0, 0]
    for col, marker, label in (("peak_memory_gib", "o", "telemetry peak (GPU: NVML device; CPU: process RSS)"),
                               ("torch_peak_reserved_gib", "x", "torch max reserved (GPU)")):
        known = runs.dropna(subset=[col]) if col in cols else runs.iloc[:0]
        if len(known):
            ax.scatter(known["per_worker_batch_size"], known[col], marker=marker, label=label,
                       c=[style.colour(b) for b in known["global_batch_size"]])
    _batch_axis(ax, runs["per_worker_batch_size"].dropna())
    ax.set_xlabel("per-worker batch size")
    ax.set_ylabel("GiB")
    ax.legend(fontsize=7)
    m = runs.groupby("per_worker_batch_size")[cols[0]].max().dropna()
    kinds = ", ".join(sorted(runs["telemetry_kind"].dropna().unique())) or "unknown"
    caption = (f"Peak memory ({kinds} telemetry) goes from {m.iloc[0]:.3g} GiB at per-worker batch {m.index[0]} "
               f"to {m.iloc[-1]:.3g} GiB at {m.index[-1]}.")
    return FigureResult("memory", title, fig, caption)


def _thin(g: pd.DataFrame, max_points: int = 300) -> pd.DataFrame:
    return g.iloc[:: max(1, len(g) // max_points)]


def fig_telemetry(tele: pd.DataFrame, style: Style) -> FigureResult:
    title = "Utilisation and power over time, per run"
    if tele.empty:
        return FigureResult("telemetry", title, None, "No telemetry was recorded for these runs.")
    gpu = tele[tele["kind"] == "gpu"] if "kind" in tele else tele.iloc[:0]
    metrics = [c for c in ("gpu_util_pct", "power_w", "mem_used_gib") if c in gpu and gpu[c].notna().any()]
    source, note = gpu, ""
    if not metrics:
        source, note = tele, "no GPU telemetry (CPU run): process CPU % and RSS shown"
        metrics = [c for c in ("cpu_pct", "rss_gib") if c in tele and tele[c].notna().any()]
        if not metrics:
            return FigureResult("telemetry", title, None, "No GPU telemetry (CPU run), and no CPU samples either.")
    elif (tele["kind"] == "cpu").any():
        note = f"{tele.loc[tele['kind'] == 'cpu', 'run_id'].nunique()} CPU run(s) have no GPU telemetry"
    fig, axes = _new_figure(len(metrics), width=min(12, 4 * len(metrics) + 1), height=3.0, top_in=0.45)
    for ax, col in zip(axes.flat, metrics):
        for (_, run, rank), g in source.groupby(["sweep", "run_id", "rank"]):
            g = _thin(g)
            ax.plot(g["t_s"], g[col], color=style.colour(g["global_batch_size"].iloc[0]), lw=0.8, alpha=0.7)
        ax.set_xlabel("seconds since the run's first sample")
        ax.set_ylabel(col)
    if note:
        fig.suptitle(note, fontsize=9, color="0.3")
    means = source.groupby("run_id")[metrics[0]].mean()
    caption = (f"Mean {metrics[0]} per run ranges from {fmt(means.min())} to {fmt(means.max())} over "
               f"{len(means)} run(s)" + (f"; {note}" if note else "") + "; colour = global batch size.")
    return FigureResult("telemetry", title, fig, caption)


# --- (6) learning-rate schedule ---------------------------------------------------------------

def fig_lr(lr: pd.DataFrame, style: Style) -> FigureResult:
    title = "Learning rate actually applied (from the event log)"
    if lr.empty or lr["lr"].isna().all():
        return FigureResult("lr", title, None, "No opt_learning_rate events were logged.")
    first = lr.sort_values(["seed", "num_workers"]).groupby(["sweep", "global_batch_size"])["run_id"].first()
    fig, axes = _new_figure(1, width=7)
    ax = axes[0, 0]
    rows = []
    for (sweep, batch), run in first.items():
        g = lr[lr["run_id"].eq(run) & lr["sweep"].eq(sweep)].sort_values("step")
        ax.plot(g["epoch"], g["lr"], drawstyle="steps-post", color=style.colour(batch), ls=style.sweep_line[sweep],
                label=f"B={batch}" + _sweep_label(sweep, lr['sweep'].nunique() > 1))
        peak = g["lr"].max()
        rows.append((batch, peak, g.loc[g["lr"] >= 0.999 * peak, "epoch"].min()))
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate" + _log_y(ax, lr["lr"]))
    ax.legend(fontsize=7, ncol=2)
    (b0, p0, _), (b1, p1, w1) = rows[0], rows[-1]
    caption = (f"Peak LR goes from {fmt(p0)} at batch {b0} to {fmt(p1)} at batch {b1} ({p1 / p0:.3g}x for a "
               f"{b1 / b0:.3g}x larger batch), reached after {fmt(w1)} epoch(s) at batch {b1}.")
    return FigureResult("lr", title, fig, caption)
