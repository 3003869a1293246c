"""The report's "rule vs tuned" section for sweeps with an ``lr_search`` (bench.lrsearch).

Owns: which runs are "the rule's" and which "the tuned" ones (``search_view``: the rule's = every
seed at factor 1; the tuned = every seed at the LR stage 2 ran, or, where stage 2 had no other
seed to run, the LR the criterion picks from stage 1), and the section: the search itself (every
trial's steps to target and final test accuracy, the choice and why), steps to target and the
B_crit fit at both LRs, final test accuracy and the train-test gap at the tuned LR per batch,
where the optimum sits relative to the rule, the search's cost against a plain sweep, and the
answer, stated on the data with the seed spread (bench.spread), to "did a larger batch lose test
accuracy once its LR was tuned?".

Every other part of the report uses only the runs at the rule's LR (bench.analysis.trusted).
Must not import: torch, ray, pyplot, bench.store.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.ticker import NullFormatter

from bench import analysis as an
from bench import lrsearch
from bench import report_figures as rf
from bench.fit import caveats, fit_sweep
from bench.names import parse_lr_tag
from bench.report_tables import num_cell, sortable, text_cell
from bench.report_text import esc
from bench.spread import RULE, Sample, compare


@dataclass
class SearchView:
    """One sweep and worker count of an LR search, split for the section."""

    sweep: str
    num_workers: int
    target: float
    trials: pd.DataFrame  # stage-1 runs (every LR at the search seeds)
    choices: dict[int, lrsearch.Choice]  # by global batch: the criterion on ``trials``
    tuned_factor: dict[int, float]  # by global batch: the LR whose seeds are "tuned"
    rule: pd.DataFrame  # every seed at the rule's LR
    tuned: pd.DataFrame  # every seed at the tuned LR
    notes: list[str] = field(default_factory=list)


def searched(runs: pd.DataFrame) -> pd.DataFrame:
    """The undamaged runs of sweeps that ran an LR search (stage > 0)."""
    if "stage" not in runs or runs.empty:
        return runs.iloc[0:0]
    ok = runs[runs["status"].ne("damaged")]
    sweeps = ok.loc[pd.to_numeric(ok["stage"], errors="coerce").fillna(0) > 0, "sweep"].unique()
    return ok[ok["sweep"].isin(sweeps)]


def search_view(g: pd.DataFrame, sweep: str, num_workers: int) -> SearchView:
    """``g``: one sweep's undamaged runs at one worker count."""
    target = float(g["target_accuracy"].dropna().iloc[0]) if g["target_accuracy"].notna().any() else math.nan
    trials = g[g["stage"] == lrsearch.STAGE_SEARCH]
    rule = g[g["lr_factor"] == 1.0]
    rule_lrs = {(int(b), num_workers): float(x) for b, x in rule.groupby("global_batch_size")["peak_lr"].first().items()}
    picked = {c.global_batch_size: c for c in lrsearch.choices(
        [lrsearch.trial_of(r) for r in trials.to_dict("records")], rule_lrs, target)}
    ran = g[(g["stage"] == lrsearch.STAGE_FINAL) & (g["lr_factor"] != 1.0)]
    tuned_factor, notes = {}, []
    for batch in sorted(int(b) for b in g["global_batch_size"].unique()):
        stage2 = sorted(ran.loc[ran["global_batch_size"] == batch, "lr_factor"].unique())
        choice = picked.get(batch)
        wanted = choice.lr_factor if choice is not None else None
        if stage2:
            tuned_factor[batch] = float(stage2[0])
            if wanted != stage2[0]:
                notes.append(f"batch {batch}: stage 2 ran {lrsearch.label(stage2[0])}, but at this report's target "
                             f"the criterion picks {lrsearch.label(wanted) if wanted else 'nothing'}; "
                             "the tuned runs are the ones stage 2 ran")
        elif wanted is not None:
            tuned_factor[batch] = wanted
    keep = [f == tuned_factor.get(int(b)) for b, f in zip(g["global_batch_size"], g["lr_factor"])]
    return SearchView(sweep, num_workers, target, trials, picked, tuned_factor, rule, g[keep], notes)


def section(all_runs: pd.DataFrame, figure_html: Callable[[rf.FigureResult], str]) -> list[str]:
    """The HTML of the section (nothing when no sweep ran an LR search); ``figure_html`` is the
    page's markup for a figure (bench.report)."""
    runs = searched(all_runs)
    if runs.empty:
        return []
    parts = ["<h2>Rule vs tuned learning rate</h2>",
             f'<p class="meta">The LR search (docs/lr-search.md) tried several LRs at every batch (stage 1) and ran '
             f'every seed at the chosen LR and at the rule\'s LR (stage 2). Chosen by: {esc(lrsearch.CRITERION)}. '
             f'Comparisons: {esc(RULE)}. Everywhere else on this page only the runs at the rule\'s LR are '
             'used; runs at different LRs of one batch are never averaged together.</p>']
    multi = runs["sweep"].nunique() > 1 or runs["num_workers"].nunique() > 1
    for (sweep, workers), g in runs.groupby(["sweep", "num_workers"], sort=True):
        view = search_view(g, sweep, int(workers))
        if multi:
            parts.append(f"<h3>{esc(sweep)}, {int(workers)} worker(s)</h3>")
        parts += [f'<p class="note">{esc(n)}</p>' for n in view.notes]
        parts += [f"<p><b>{esc(verdict(view))}</b></p>", f'<p class="meta">{esc(cost_line(view, g))}</p>',
                  "<h3>The search</h3>", '<div class="scroll">', search_table(view), "</div>",
                  "<h3>Every seed at the rule's and at the tuned LR</h3>", '<div class="scroll">',
                  compare_table(view), "</div>", figure_html(_safe_figure(view))]
    return parts


# --- words --------------------------------------------------------------------------------------

def _acc(df: pd.DataFrame, batch: int) -> Sample:
    return Sample.of(df.loc[df["global_batch_size"] == batch, "final_test_acc"])


def _losses(df: pd.DataFrame) -> tuple[int | None, list[tuple[int, str, object]]]:
    """(the smallest batch, [(batch, kind, Verdict)]) of final test accuracy against the smallest
    batch; kind: lost | gained | within | unknown."""
    batches = sorted(int(b) for b in df.dropna(subset=["final_test_acc"])["global_batch_size"].unique())
    if len(batches) < 2:
        return (batches[0] if batches else None), []
    base, out = batches[0], []
    for b in batches[1:]:
        v = compare(_acc(df, base), _acc(df, b))
        kind = v.kind if v.kind != "beyond" else ("lost" if _acc(df, b).mean < _acc(df, base).mean else "gained")
        out.append((b, kind, v))
    return base, out


def _answer(df: pd.DataFrame, where: str) -> tuple[str, str]:
    """(yes | no | cannot tell, the sentence) for one set of runs."""
    base, rows = _losses(df)
    if not rows:
        return "cannot tell", f"at {where} fewer than two batch sizes have a final test accuracy"
    ref = _acc(df, base)
    head = f"against batch {base} ({ref.mean:.4f} ± {_std(ref)}, n = {ref.n})"
    lost = [r for r in rows if r[1] == "lost"]
    if lost:
        b, _, v = max(lost, key=lambda r: r[2].gap)
        return "yes", (f"at {where}, {_batches([r[0] for r in lost])} lost test accuracy {head} beyond the seed spread; the largest "
                       f"loss is at batch {b} ({_acc(df, b).mean:.4f} ± {_std(_acc(df, b))}): {v.phrase}")
    unknown = [r for r in rows if r[1] == "unknown"]
    if unknown:
        return "cannot tell", (f"at {where} the data cannot tell: {_batches([r[0] for r in unknown])} "
                               f"{'has' if len(unknown) == 1 else 'have'} one seed ({unknown[0][2].phrase})")
    b, _, v = max(rows, key=lambda r: r[2].gap)
    gained = [r[0] for r in rows if r[1] == "gained"]
    return "no", (f"at {where} no larger batch lost test accuracy {head} beyond the seed spread"
                  + (f" ({_batches(gained)} gained)" if gained else "")
                  + f"; the largest gap is at batch {b} ({_acc(df, b).mean:.4f} ± {_std(_acc(df, b))}): {v.phrase}")


def _batches(batches: list[int]) -> str:
    """'batch 64', 'batches 16 and 64', 'batches 16, 32 and 64'."""
    names = [str(b) for b in batches]
    if len(names) == 1:
        return f"batch {names[0]}"
    return f"batches {', '.join(names[:-1])} and {names[-1]}"


def _std(s: Sample) -> str:
    return f"{s.std:.4f}" if math.isfinite(s.std) else "? (one seed)"


def verdict(view: SearchView) -> str:
    """The answer to "did a larger batch lose test accuracy once its LR was tuned?", on the data."""
    answer, tuned = _answer(view.tuned, "the tuned LR")
    _, rule = _answer(view.rule, "the rule's LR")
    opening = {"yes": "Yes", "no": "No", "cannot tell": "The data cannot tell"}[answer]
    epochs = sorted({int(x) for x in view.rule.get("epochs_completed", pd.Series(dtype=float)).dropna()})
    budget = (f" Every run trained for the same {epochs[-1]} epochs, so a larger batch also took fewer steps."
              if len(epochs) == 1 else "")
    same = [b for b, f in sorted(view.tuned_factor.items()) if f == 1.0]
    shared = (f" At {_batches(same)} the search chose the rule's LR, so there the tuned and the rule's runs are "
              "the same runs." if same else "")
    return (f"Did a larger batch lose test accuracy once its LR was tuned? {opening}: {tuned}. "
            f"For comparison, {rule}.{shared}{budget}{_best_trials(view)}")


def _search_basis(view: SearchView) -> str:
    """What the choice of LR rests on: stage 1's seeds."""
    seeds = sorted(int(s) for s in view.trials["seed"].unique())
    if len(seeds) == 1:
        return (f"chosen in stage 1 from seed {seeds[0]} alone, so whether another seed would choose the same LR "
                "is unknown")
    return f"chosen in stage 1 from the mean over seeds {', '.join(map(str, seeds))}"


def _best_trials(view: SearchView) -> str:
    """The most accurate stage-1 trial at the smallest and the largest batch: whether some other LR
    of the grid would have closed the gap (the criterion tunes for steps, not for accuracy)."""
    ok = view.trials[view.trials["status"] == "success"].dropna(subset=["final_test_acc"])
    if ok["global_batch_size"].nunique() < 2:
        return ""
    means = ok.groupby(["global_batch_size", "lr_factor"])["final_test_acc"].mean()
    words = []
    for batch in (ok["global_batch_size"].min(), ok["global_batch_size"].max()):
        factor, acc = means[batch].idxmax(), means[batch].max()
        words.append(f"{acc:.4f} at batch {int(batch)} ({lrsearch.label(factor)})")
    seeds = sorted(int(s) for s in view.trials["seed"].unique())
    return (f" The criterion tunes for steps, not for accuracy; the most accurate LR of the grid in stage 1 "
            f"(seed {', '.join(map(str, seeds))} only, so without a spread) reached {words[0]} and {words[1]}.")


def cost_line(view: SearchView, g: pd.DataFrame) -> str:
    """The search's cost against the plain sweep it contains (every seed at the rule's LR), in
    training samples processed (load-independent) and training seconds; trials stopped early."""
    samples = pd.to_numeric(g["steps_completed"], errors="coerce") * g["global_batch_size"]
    rule = g["lr_factor"] == 1.0
    total, plain = samples.sum(), samples[rule].sum()
    secs, plain_s = g["train_time_s"].sum(), g.loc[rule, "train_time_s"].sum()
    failed = view.trials[view.trials["status"] != "success"]
    stopped = ", ".join(f"{n} {s}" for s, n in failed["status"].value_counts().sort_index().items())
    return (f"Cost: {len(g)} runs against the {int(rule.sum())} of a plain sweep (every seed at the rule's LR): "
            f"{total:,.0f} training samples processed against {plain:,.0f} ({total / plain:.2f}x), "
            f"{secs:.1f} s of training against {plain_s:.1f} s ({secs / plain_s:.2f}x; seconds depend on the "
            "machine's load, samples do not; worker-group start-ups are not included). No early stopping: "
            f"{len(failed)} of {len(view.trials)} stage-1 trials ({len(failed) / max(len(view.trials), 1):.0%}) "
            f"ended before their budget{' (' + stopped + ', stopped by the worker' + chr(39) + 's checks)' if stopped else ''}.")


# --- tables -------------------------------------------------------------------------------------

def _column(run_id: str) -> tuple[float, str]:
    """(sort key, header) of a trial's LR column: the rule's, a factor, or an absolute LR."""
    tag = parse_lr_tag(run_id)
    if tag is None:
        return (1.0, "1x (rule)")
    return (tag[1], f"{tag[1]:g}x" if tag[0] == "factor" else f"lr {tag[1]:g}")


def search_table(view: SearchView) -> str:
    t = view.trials.assign(col=[_column(r) for r in view.trials["run_id"]])
    cols = sorted(set(t["col"]), key=lambda c: (c[1].startswith("lr "), c[0]))
    rows = []
    for batch, gb in t.groupby("global_batch_size"):
        choice = view.choices.get(int(batch))
        cells = [num_cell(batch), num_cell(view.rule.loc[view.rule["global_batch_size"] == batch, "peak_lr"].max(), 4)]
        for col in cols:
            runs = gb[gb["col"] == col]
            chosen = choice is not None and len(runs) and runs["lr_factor"].iloc[0] == choice.lr_factor
            cells.append(_trial_cell(runs, bool(chosen)))
        factor = choice.lr_factor if choice else None
        cells += [text_cell(lrsearch.label(factor) if factor else "—"),
                  num_cell(choice.peak_lr if choice else None, 4),
                  f'<td style="white-space:normal;min-width:22em">{esc(choice.reason if choice else "—")}</td>']
        rows.append("".join(cells))
    headers = ["global batch", "rule's peak LR", *[f"{c[1]}: steps · acc" for c in cols], "chosen", "chosen peak LR",
               "why"]
    return sortable(headers, rows, "search")


def _trial_cell(runs: pd.DataFrame, chosen: bool) -> str:
    if runs.empty:
        return "<td></td>"
    bad = runs[runs["status"] != "success"]
    if len(bad):
        text = "/".join(bad["status"])
    else:
        steps, acc = runs["steps_to_target"].mean(), runs["final_test_acc"].mean()
        text = f"{rf.fmt(steps, 4) if math.isfinite(steps) else 'not reached'} · {acc:.3f}"
    body = f"<b>{esc(text)}</b>" if chosen else esc(text)
    return f'<td data-v="{esc(text)}">{body}</td>'


def _stat(df: pd.DataFrame, batch: int, col: str, digits: int = 3) -> str:
    v = df.loc[df["global_batch_size"] == batch, col]
    s = Sample.of(v)
    if col == "steps_to_target":
        return num_cell(s.mean, 4, s.std) .replace("</td>", f" ({s.n}/{len(v)} reached)</td>")
    return num_cell(s.mean, digits, s.std, decimals=4).replace("</td>", f" (n {s.n})</td>")


def compare_table(view: SearchView) -> str:
    rows = []
    for batch in sorted(int(b) for b in view.rule["global_batch_size"].unique()):
        factor = view.tuned_factor.get(batch)
        tuned = view.tuned[view.tuned["global_batch_size"] == batch]
        v = compare(_acc(view.rule, batch), _acc(view.tuned, batch)) if factor not in (None, 1.0) else None
        rows.append("".join([
            num_cell(batch), text_cell(lrsearch.label(factor) if factor else "—"),
            num_cell(tuned["peak_lr"].max() if len(tuned) else None, 4),
            _stat(view.rule, batch, "steps_to_target"), _stat(view.tuned, batch, "steps_to_target"),
            _stat(view.rule, batch, "final_test_acc"), _stat(view.tuned, batch, "final_test_acc"),
            _stat(view.tuned, batch, "gap_acc"),
            text_cell("same LR" if factor == 1.0 else v.short if v else "—")]))
    headers = ["global batch", "tuned factor", "tuned peak LR", "steps to target, rule", "steps to target, tuned",
               "final test acc, rule", "final test acc, tuned", "gap (train − test), tuned", "tuned vs rule (test acc)"]
    return sortable(headers, rows, "rule-vs-tuned")


# --- the figure ---------------------------------------------------------------------------------

SIDES = (("rule", "the rule's LR", "0.45", "o"), ("tuned", "tuned LR", "tab:orange", "s"))


def _fits(view: SearchView) -> dict[str, dict]:
    return {key: fit_sweep(getattr(view, key)) for key, *_ in SIDES}


def _fit_words(fit: dict) -> str:
    if not math.isfinite(fit.get("B_crit", math.nan)):
        return f"no fit ({fit.get('reason') or 'no points'})"
    lo, hi = fit.get("B_crit_lo", math.nan), fit.get("B_crit_hi", math.nan)
    interval = (f", {fit['confidence']:.0%} interval [{rf.fmt(lo, 3)}, {rf.fmt(hi, 3)}]"
                if math.isfinite(lo) else f" ({fit.get('interval_reason')})")
    notes = "; ".join(caveats(fit))
    return f"B_crit {rf.fmt(fit['B_crit'], 3)}{interval}" + (f"; {notes}" if notes else "")


def _safe_figure(view: SearchView) -> rf.FigureResult:
    try:
        with matplotlib.rc_context(rf.rc()):
            return figure(view)
    except Exception as err:  # a broken figure must not cost the section (the page shows why)
        warnings.warn(f"report figure 'lr-search' failed: {err!r}", RuntimeWarning, stacklevel=2)
        return rf.FigureResult("lr-search", "Rule vs tuned", None, f"{type(err).__name__}: {err}")


def figure(view: SearchView) -> rf.FigureResult:
    fits = _fits(view)
    fig, axes = rf.new_figure(ncols=3, width=13.0, height=3.8, legend_in=0.35, top_in=0.5)
    fig.subplots_adjust(right=1 - 0.45 / 13.0)  # room for the colour bar's labels
    batches = sorted(int(b) for b in view.rule["global_batch_size"].unique())
    steps_ax, acc_ax, grid_ax = axes[0]
    for key, name, colour, marker in SIDES:
        df = getattr(view, key)
        for ax, col in ((steps_ax, "steps_to_target"), (acc_ax, "final_test_acc")):
            known = df.dropna(subset=[col])
            ax.scatter(known["global_batch_size"], known[col], s=10, color=colour, alpha=0.45, marker=marker)
            stats = an.seed_stats(known, col, by=("global_batch_size",))
            ax.errorbar(stats["global_batch_size"], stats["mean"], yerr=stats["std"].fillna(0), color=colour,
                        marker=marker, ms=5, capsize=3, lw=1, label=f"{name} (mean ± std over seeds)"
                        if col == "final_test_acc" else None)
        fit = fits[key]
        if math.isfinite(fit.get("B_crit", math.nan)):
            b = np.geomspace(batches[0], batches[-1], 100)
            steps_ax.plot(b, fit["S_min"] * (1 + fit["B_crit"] / b), color=colour, ls="--", lw=1,
                          label=f"fit, {name}: B_crit {rf.fmt(fit['B_crit'], 3)}")
    steps_ax.set_ylabel("steps to target" + rf.log_y(steps_ax, pd.concat([view.rule, view.tuned])["steps_to_target"],
                                                      force=True))
    steps_ax.set_title(f"steps to {view.target:g} test accuracy")
    if math.isfinite(view.target):
        acc_ax.axhline(view.target, color="firebrick", lw=0.8, ls=":", label=f"target {view.target:g}")
    acc_ax.set_ylabel("final test accuracy")
    acc_ax.set_title("final test accuracy")
    _grid(grid_ax, view)
    for ax in (steps_ax, acc_ax, grid_ax):
        rf.batch_axis(ax, batches)
    handles = [h for ax in (steps_ax, acc_ax) for h in ax.get_legend_handles_labels()[0]]
    labels = [lab for ax in (steps_ax, acc_ax) for lab in ax.get_legend_handles_labels()[1]]
    fig.legend(handles, labels, loc="lower left", bbox_to_anchor=(0.05, 0.0), ncol=3, fontsize=7, frameon=False)
    return rf.FigureResult("lr-search", "Rule vs tuned: steps to target, final accuracy and the search",
                           fig, caption(view, fits))


def _grid(ax, view: SearchView) -> None:
    """Every stage-1 trial at (batch, factor): colour = steps to target; hollow: not reached; x: failed;
    ringed: chosen. The dotted line is the rule (factor 1)."""
    t = view.trials.groupby(["global_batch_size", "lr_factor"], as_index=False).agg(
        steps=("steps_to_target", lambda s: s.mean() if s.notna().all() else math.nan),
        ok=("status", lambda s: (s == "success").all()))
    good = t[t["ok"] & t["steps"].notna()]
    if len(good):
        norm = matplotlib_lognorm(good["steps"])
        points = ax.scatter(good["global_batch_size"], good["lr_factor"], c=good["steps"], cmap="viridis_r",
                            norm=norm, s=70, marker="s", zorder=3)
        bar = ax.figure.colorbar(points, ax=ax, pad=0.02, fraction=0.08)
        lo, hi = good["steps"].min(), good["steps"].max()
        ticks = [m * 10**k for k in range(int(math.floor(math.log10(lo))), int(math.ceil(math.log10(hi))) + 1)
                 for m in (1, 2, 5) if lo <= m * 10**k <= hi]
        bar.set_ticks(ticks or [lo, hi], labels=[rf.fmt(t) for t in ticks or [lo, hi]])
        bar.ax.yaxis.set_minor_formatter(NullFormatter())
    miss = t[t["ok"] & t["steps"].isna()]
    ax.scatter(miss["global_batch_size"], miss["lr_factor"], s=60, marker="s", facecolors="none",
               edgecolors="0.4", zorder=3)
    bad = t[~t["ok"]]
    ax.scatter(bad["global_batch_size"], bad["lr_factor"], s=50, marker="x", color="firebrick", zorder=3)
    chosen = [(b, c.lr_factor) for b, c in view.choices.items() if c.lr_factor is not None]
    if chosen:
        ax.scatter(*zip(*chosen), s=200, facecolors="none", edgecolors="tab:orange", linewidths=1.8, zorder=4)
    ax.axhline(1.0, color="0.3", ls=":", lw=1)
    ax.set_yscale("log", base=2)
    factors = sorted(t["lr_factor"].unique())
    ax.set_yticks(factors, [f"{f:g}x" for f in factors])
    ax.minorticks_off()
    ax.set_ylabel("LR / the rule's LR")
    ax.set_title("stage 1: colour = steps to target; chosen ringed;\n□ not reached, × failed", fontsize=8)


def matplotlib_lognorm(values: pd.Series):
    from matplotlib.colors import LogNorm, Normalize

    lo, hi = float(values.min()), float(values.max())
    return LogNorm(lo, hi) if lo > 0 and hi > lo else Normalize(lo - 1, hi + 1)


def caption(view: SearchView, fits: dict[str, dict]) -> str:
    moves = [f"{b}: {lrsearch.label(f)}" for b, f in sorted(view.tuned_factor.items())]
    above = sum(f > 1 for f in view.tuned_factor.values())
    below = sum(f < 1 for f in view.tuned_factor.values())
    return (f"Left: steps to target per run (faint) and mean ± std over seeds, at the rule's LR (grey) and the "
            f"tuned LR (orange); at the rule's LR {_fit_words(fits['rule'])}; at the tuned LR "
            f"{_fit_words(fits['tuned'])}. Middle: final test accuracy. Right: every stage-1 trial, LR as a factor "
            f"of the rule's. The optimum per batch ({'; '.join(moves) or 'none'}; {_search_basis(view)}) lies above "
            f"the rule at {above}, below it at {below} and on it at {len(view.tuned_factor) - above - below} of "
            f"{len(view.tuned_factor)} batch sizes.")
