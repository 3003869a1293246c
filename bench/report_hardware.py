"""Report figures of what the hardware did: throughput and scaling efficiency, memory per run,
telemetry over time, each with its computed caption.

Owns: the memory figure's series (PyTorch training peaks, v2 from the summary and v1 from the
per-epoch events, labelled as an upper bound; NVML absolute and above the run's baseline; process
RSS on CPU) and their caption (bench.run_facts says where each figure comes from).

Shared look and helpers come from bench.report_figures. Must not import: torch, ray,
bench.store, pyplot, seaborn.
"""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.ticker import FuncFormatter

from bench import analysis as an
from bench.report_captions import caption_label, fmt, stopped, stopped_groups, stopped_text, versus
from bench.report_figures import (LINESTYLES, FigureResult, Style, batch_axis, by_workers, legend_below, log_limits,
                                  log_y, new_figure, pad_linear_y, sweep_label)
from bench.run_facts import V1_MEMORY, V1_RESERVED
from bench.spread import Sample, compare


def fig_throughput(runs: pd.DataFrame, eff: pd.DataFrame, style: Style) -> FigureResult:
    title = "Training throughput and scaling efficiency"
    if runs["samples_per_s"].isna().all():
        return FigureResult("throughput", title, None, "No run recorded a throughput (samples/s).")
    if stopped(runs).any():  # a run stopped after a few steps: its throughput stays out of the lines
        eff = an.scaling_efficiency(runs[~stopped(runs)])
    fig, axes = new_figure(2)
    ax = axes[0, 0]
    for (sweep, workers), g in eff.dropna(subset=["samples_per_s"]).groupby(["sweep", "num_workers"]):
        ax.plot(g["global_batch_size"], g["samples_per_s"], marker=style.sweep_marker[sweep], color="0.3",
                ls=LINESTYLES[list(sorted(eff["num_workers"].unique())).index(workers) % 4],
                label=f"{workers} worker(s)" + sweep_label(sweep, runs['sweep'].nunique() > 1))
    ax.scatter(runs["global_batch_size"], runs["samples_per_s"], s=12, zorder=3,
               c=[style.colour(b) for b in runs["global_batch_size"]])
    early = runs[stopped(runs)].dropna(subset=["samples_per_s"])
    if len(early):
        ax.scatter(early["global_batch_size"], early["samples_per_s"], marker="x", s=40, color="tab:red", zorder=4,
                   label="run stopped early (few steps)")
    batch_axis(ax, runs["global_batch_size"])
    ax.set_ylabel("samples/s" + log_y(ax, runs["samples_per_s"]))
    log_limits(ax, runs["samples_per_s"])
    pad_linear_y(ax, runs["samples_per_s"])
    if ax.get_yscale() == "linear":
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: fmt(y)))
    ax.legend(fontsize=7)
    measured = eff[eff["num_workers"] > 1].dropna(subset=["scaling_efficiency"])
    ax = axes[0, 1]
    if measured.empty:
        ax.text(0.5, 0.5, "no batch ran on 1 and on more workers:\nscaling efficiency not measurable",
                ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_axis_off()
    else:
        by_workers(ax, eff, "scaling_efficiency", style, "throughput per worker / 1 worker")
        ax.axhline(1.0, color="0.6", ls=":", lw=1)
    return FigureResult("throughput", title, fig, _throughput_caption(runs, measured))


def _throughput_caption(runs: pd.DataFrame, measured: pd.DataFrame) -> str:
    """Per sweep (never pooled): smallest vs largest batch with the seed-spread verdict; runs that
    stopped early are named, since their throughput comes from the few steps they ran."""
    multi = runs["sweep"].nunique() > 1
    sentences = []
    early = stopped(runs)
    of = " of the completed runs" if early.any() else ""
    for sweep, g in runs[~early].dropna(subset=["samples_per_s"]).groupby("sweep"):
        means = g.groupby("global_batch_size")["samples_per_s"].mean()
        lo, hi = means.index[0], means.index[-1]
        lead = f"{sweep}: throughput{of}" if multi else f"Throughput{of}"
        if lo == hi:
            sentences.append(f"{lead} is {fmt(means[lo])} samples/s at batch {lo}.")
            continue
        sentences.append(f"{lead} goes from {fmt(means[lo])} samples/s at batch {lo} to {fmt(means[hi])} at batch "
                         f"{hi} ({versus(g, 'samples_per_s', lo, hi, 'samples/s')}).")
    if not measured.empty:
        worst = measured.loc[measured["scaling_efficiency"].idxmin()]
        sentences.append(f"The lowest scaling efficiency is {worst.scaling_efficiency:.0%} at batch "
                         f"{worst.global_batch_size:.0f} on {worst.num_workers:.0f} workers"
                         f"{caption_label(worst.sweep, multi)}.")
    short = stopped_text(stopped_groups(runs), multi, then="their throughput (red crosses) comes from those steps "
                         "alone and is left out of the comparison")
    return " ".join(sentences + ([short] if short else []))


MEMORY_SERIES = (  # column, marker, filled, label
    ("train_peak_allocated_gib", "o", True, "PyTorch training peak, allocated"),
    ("train_peak_reserved_gib", "x", True, "PyTorch training peak, reserved"),
    ("nvml_peak_gib", "^", False, "NVML device memory, absolute"),
    ("nvml_peak_above_baseline_gib", "v", False, "NVML above the run's baseline"),
    ("rss_peak_gib", "s", False, "process RSS (CPU runs)"),
)


def _memory_frame(runs: pd.DataFrame) -> pd.DataFrame:
    df = runs.copy()
    cpu = df["telemetry_kind"].eq("cpu") if "telemetry_kind" in df else pd.Series(False, index=df.index)
    df["rss_peak_gib"] = df["peak_memory_gib"].where(cpu)
    for col, *_ in MEMORY_SERIES:
        df[col] = df[col] if col in df else math.nan
    return df


def fig_memory(runs: pd.DataFrame, style: Style) -> FigureResult:
    title = "Memory per run vs per-worker batch size"
    df = _memory_frame(runs)
    cols = [c for c, *_ in MEMORY_SERIES if df[c].notna().any()]
    if not cols:
        return FigureResult("memory", title, None, "No memory was recorded (telemetry off and no CUDA).")
    v1 = df["memory_source"].eq("v1") if "memory_source" in df else pd.Series(False, index=df.index)
    fig, axes = new_figure(1, width=7.5, legend_in=0.7)
    ax = axes[0, 0]
    for col, marker, filled, label in MEMORY_SERIES:
        for old, part in ((False, df[~v1]), (True, df[v1])):
            known = part.dropna(subset=[col])
            if known.empty:
                continue
            colours = [style.colour(b) for b in known["global_batch_size"]]
            label_v = label + (" (v1: upper bound, see caption)" if old and col.startswith("train_") else "")
            if marker == "x":  # a line marker: no face
                ax.scatter(known["per_worker_batch_size"], known[col], marker=marker, s=26, c=colours, label=label_v)
                continue
            hollow = (old and col.startswith("train_")) or not filled
            ax.scatter(known["per_worker_batch_size"], known[col], marker=marker, s=26, linewidths=1,
                       facecolors="none" if hollow else colours, edgecolors=colours, label=label_v)
    batch_axis(ax, df["per_worker_batch_size"].dropna())
    ax.set_xlabel("per-worker batch size")
    ax.set_ylabel("GiB")
    pad_linear_y(ax, df[cols].stack())
    legend_below(fig, ax, ncol=2)
    return FigureResult("memory", title, fig, _memory_caption(df, cols[0], v1))


def _memory_caption(df: pd.DataFrame, col: str, v1: pd.Series) -> str:
    label = next(label for c, _, _, label in MEMORY_SERIES if c == col)
    multi = df["sweep"].nunique() > 1
    text = "; ".join(_memory_sweep(g, col, f"{sweep}: {label}" if multi else label[0].upper() + label[1:])
                     for sweep, g in df.dropna(subset=[col]).groupby("sweep"))  # never pooled across sweeps
    notes = [text]
    if df["nvml_peak_gib"].notna().any():
        notes.append("NVML absolute is the whole device's memory in use (CUDA context, other processes and memory "
                     "still cached from earlier runs of the same worker group included); above the run's baseline "
                     "subtracts what was in use at the run's first sample, where the summary records it")
    if v1.any():
        notes += [f"runs with v1 summaries (hollow training peaks): {V1_MEMORY}", V1_RESERVED,
                  "their summaries' torch_peak_* covered only the final evaluation and are not plotted"]
    return "; ".join(notes) + ". Colour = global batch size."


def _memory_sweep(g: pd.DataFrame, col: str, lead: str) -> str:
    """Smallest vs largest per-worker batch of one sweep: 'flat within x MiB' when the per-batch means
    span at most 5 % of their level and the gap is not beyond the seed spread, else 'goes from'."""
    means = g.groupby("per_worker_batch_size")[col].mean()
    lo, hi = means.index[0], means.index[-1]
    if lo == hi:
        return f"{lead} is {means[lo]:.3g} GiB at per-worker batch {lo:g}"
    span = means.max() - means.min()
    mib = span < 0.1  # GiB: a small gap reads better in MiB
    scale, unit = (1024.0, "MiB") if mib else (1.0, "GiB")
    verdict = compare(*(Sample.of(g.loc[g["per_worker_batch_size"] == b, col] * scale) for b in (lo, hi)), unit=unit)
    if verdict.kind != "beyond" and span <= 0.05 * abs(means.mean()):
        return (f"{lead} stays flat within {span * 1024:.2g} MiB ({means.min():.4g} to {means.max():.4g} GiB over "
                f"per-worker batches {lo:g} to {hi:g}; smallest vs largest: {verdict.phrase})")
    text = f"{lead} goes from {means[lo]:.3g} GiB at per-worker batch {lo:g} to {means[hi]:.3g} GiB at {hi:g} ({verdict.phrase})"
    return text + ("; it does not grow at every step of the per-worker batch" if not means.is_monotonic_increasing else "")


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
    fig, axes = new_figure(len(metrics), width=min(12, 4 * len(metrics) + 1), height=3.0, top_in=0.45)
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
