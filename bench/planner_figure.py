"""The capacity plan's figure: time to target against GPUs (or workers), or against the global
batch when times are known at one count only, with a log time axis whose labels let every
point be read.

Owns: ``plan_figure`` (bench.planner re-exports it) and ``readable_log_y``.
Must not import: torch, ray, pyplot, bench.planner (it imports this module); matplotlib inside
the functions (the CLI imports the planner to build its parser).
"""

from __future__ import annotations

import math

from bench import planner_text as words

# Log-axis tick sets, sparsest first: the first that puts 5 labels in view is used, and the view is
# widened to the nearest labels below and above the data, so every point lies between two labels.
_MIN_LABELS = 5
_LOG_SUBS = ((1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0, 7.0), tuple(float(k) for k in range(1, 10)))


def readable_log_y(ax, values, margin: float = 1.15) -> None:
    """A log y axis whose labels let every plotted value be read: plain numbers (no 10^k), at
    1-2-5 x 10^k, or denser (1-2-3-5-7, then every integer) when the data span under a decade or
    two; the view widened to a label below the smallest value and one above the largest."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    v = [float(x) for x in values if x is not None and math.isfinite(x) and x > 0]
    if not v:
        return
    lo, hi = min(v) / margin, max(v) * margin
    candidates = (((1.0,),) if hi / lo > 1e6 else ()) + _LOG_SUBS  # over six decades: powers of ten
    subs = next((c for c in candidates
                 if sum(lo <= t <= hi for t in LogLocator(base=10, subs=c).tick_values(lo, hi)) >= _MIN_LABELS),
                _LOG_SUBS[-1])
    ticks = LogLocator(base=10, subs=subs).tick_values(lo / 10, hi * 10)
    edge = margin ** 0.5  # the least room between a point and the frame
    lo = min(max((t for t in ticks if t <= min(v)), default=lo), min(v) / edge)
    hi = max(min((t for t in ticks if t >= max(v)), default=hi), max(v) * edge)
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: words.amount(y)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())


def plan_figure(result):
    """A ``bench.planner.PlanResult`` drawn: time to target against GPUs (or workers), one line per
    global batch; filled markers measured, hollow extrapolated; the deadline dashed. With times
    known at one count only, time against the global batch instead (one line). A matplotlib
    Figure (no pyplot state); times in seconds, minutes or hours by magnitude, tick labels plain
    numbers (``readable_log_y``), and the data keep a margin from the frame."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=(8.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    t = result.table.dropna(subset=["time_to_target_s"])
    d = result.device
    per, short, _ = words.time_unit(float(t["time_to_target_s"].max()) if not t.empty else 1.0)
    by_batch = t["num_gpus"].nunique() == 1
    x, series = ("global_batch_size", "num_gpus") if by_batch else ("num_gpus", "global_batch_size")
    for key, g in t.groupby(series):
        (line,) = ax.plot(g[x], g["time_to_target_s"] / per, "-", lw=1,
                          label=words.count(key, d) if by_batch else f"batch {key}")
        for source, fill in (("measured", line.get_color()), ("extrapolated", "none")):
            s = g[g["source"] == source]
            ax.plot(s[x], s["time_to_target_s"] / per, "o", color=line.get_color(), mfc=fill, ls="none")
    if result.deadline_s:
        ax.axhline(result.deadline_s / per, color="k", ls="--", lw=1, label="deadline")
    if result.cheapest:
        ax.plot(result.cheapest[x], result.cheapest["time_to_target_s"] / per, "*", ms=14, color="k",
                label="cheapest meeting the deadline" if result.deadline_s else "cheapest")
    ax.set(xscale="log", xlabel="global batch size" if by_batch else f"{d}s",
           ylabel=f"time to {result.target_text}{' accuracy' if result.target_metric == 'accuracy' else ''} ({short})",
           title="Capacity plan (filled: measured, hollow: extrapolated)"
           + (f"; times known on {words.count(t['num_gpus'].iloc[0], d)} only" if by_batch else ""))
    readable_log_y(ax, [*(t["time_to_target_s"] / per), *([result.deadline_s / per] if result.deadline_s else [])])
    ax.margins(x=0.08)
    ticks = sorted(t[x].unique())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(ticks, labels=[str(int(v)) for v in ticks])
    if ax.get_legend_handles_labels()[0]:  # nothing reached the target: no line to name
        fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize="small")  # hides no data
    return fig
