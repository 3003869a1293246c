"""The report's tables and the critical-batch section, as HTML.

Owns: the per-batch summary table (first and sustained crossings, their evaluation interval,
speed-ups with their seed-spread verdict), the table of runs that ended below a target they had
reached, the failures table (diverged with the LR at failure, out-of-memory, incomplete and
damaged runs, each with its reason), the list of all runs, and the critical-batch section (the
fit's estimator, interval and excluded points beside the in-run B_simple). Every cell is
escaped with ``bench.report_text.esc``; every number cell carries its raw value for sorting.

Must not import: torch, ray, pyplot, bench.store.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from bench import analysis as an
from bench import report_figures as rf
from bench.fit import BOOTSTRAP_RESAMPLES, CONFIDENCE, MAX_RESOLUTION_FRACTION, caveats
from bench.report_captions import noise_scale_text
from bench.report_text import esc


def num_cell(value: Any, digits: int = 3, std: Any = None, decimals: int | None = None) -> str:
    """A number (sorts by its raw value); with std as "mean ± std", the std to the mean's decimals."""
    v = an.to_float(value)
    text = rf.fmt(v, digits) if decimals is None or math.isnan(v) else f"{v:.{decimals}f}"
    s = an.to_float(std)
    if std is not None and math.isfinite(s) and not math.isnan(v):
        places = decimals
        if places is None:
            places = len(text.split(".")[1]) if "." in text and "e" not in text else 0
        text += f" ± {s:.{places}f}"
    return f'<td data-v="{"" if math.isnan(v) else v}">{esc(text)}</td>'


def text_cell(value: Any) -> str:
    return f'<td data-v="{esc(value)}">{esc(value)}</td>'


def sortable(headers: list[str], rows: list[str], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    return (f'<table class="sortable {cls}"><thead><tr>{head}</tr></thead><tbody>'
            + "".join(f"<tr>{r}</tr>" for r in rows) + "</tbody></table>")


BATCH_HEADERS = ["sweep", "global batch", "workers", "per-worker batch", "peak LR", "runs",
                 "reached / held / ended below", "final test acc", "gap (train − test)", "epochs to target",
                 "epochs, sustained", "eval interval (epochs)", "olympic epochs", "steps to target", "steps, sustained",
                 "steps speed-up (regime)", "vs smallest batch", "vs previous batch", "time to target (s)", "samples/s",
                 "training peak allocated (GiB)", "peak memory (GiB)", "test acc std, last 20 %", "B_simple (in-run)",
                 "vs fitted B_crit"]


def batch_table_html(table: pd.DataFrame, speed: pd.DataFrame, fits: dict[str, dict]) -> str:
    if table.empty:
        return '<p class="note">No run to summarise.</p>'
    if len(speed):
        table = table.merge(speed[["sweep", "global_batch_size", "speedup", "regime", "speedup_noise",
                                   "regime_noise"]], how="left", on=["sweep", "global_batch_size"])
    else:
        table = table.assign(speedup=math.nan, regime=None, speedup_noise=None, regime_noise=None)
    rows = []
    for t in table.itertuples():
        regime = f" ({t.regime})" if isinstance(t.regime, str) else ""
        speedup = "—" if pd.isna(t.speedup) else f"{t.speedup:.2f}x{regime}"
        rows.append("".join([
            text_cell(t.sweep), num_cell(t.global_batch_size, 9), num_cell(t.num_workers),
            num_cell(t.per_worker_batch_size, 9), num_cell(t.peak_lr), text_cell(f"{t.n_runs} ({t.statuses})"),
            f'<td data-v="{t.n_reached}">{t.n_reached} / {t.n_sustained} / {t.n_ends_below} of {t.n_runs}</td>',
            num_cell(t.final_test_acc_mean, std=t.final_test_acc_std, decimals=3),
            num_cell(t.gap_acc_mean, std=t.gap_acc_std, decimals=3),
            num_cell(t.epochs_to_target_mean, 3, t.epochs_to_target_std),
            num_cell(t.epochs_to_target_sustained_mean, 3, t.epochs_to_target_sustained_std),
            num_cell(t.epochs_to_target_resolution_mean, 3),
            num_cell(t.epochs_to_target_olympic), num_cell(t.steps_to_target_mean, 4, t.steps_to_target_std),
            num_cell(t.steps_to_target_sustained_mean, 4, t.steps_to_target_sustained_std),
            f'<td data-v="{"" if pd.isna(t.speedup) else t.speedup}">{esc(speedup)}</td>',
            text_cell(t.speedup_noise if isinstance(t.speedup_noise, str) else "—"),
            text_cell(t.regime_noise if isinstance(t.regime_noise, str) else "—"),
            num_cell(t.time_to_target_s_mean, 3, t.time_to_target_s_std), num_cell(t.samples_per_s_mean, 4),
            num_cell(t.train_peak_allocated_gib_max), num_cell(t.peak_memory_gib_max),
            num_cell(t.test_acc_std_last_k_mean, decimals=4),
            num_cell(t.noise_scale_b_simple_mean, 3, t.noise_scale_b_simple_std),
            text_cell(versus_b_crit(t.global_batch_size, fits.get(t.sweep, {})))]))
    return sortable(BATCH_HEADERS, rows)


def versus_b_crit(batch: float, fit: dict) -> str:
    """Where a batch stands against the fitted B_crit, its interval included."""
    b_crit, lo, hi = (an.to_float(fit.get(k)) for k in ("B_crit", "B_crit_lo", "B_crit_hi"))
    if not math.isfinite(b_crit):
        return "—"
    if math.isnan(lo):
        return ("beyond B_crit" if batch > b_crit else "at or below B_crit") + " (no interval)"
    if batch > hi:
        return "beyond B_crit's interval"
    return "below B_crit's interval" if batch < lo else "within B_crit's interval"


def critical_html(critical: dict[str, dict], fits: dict[str, dict]) -> str:
    items = []
    for sweep, c in critical.items():
        fit = fits[sweep]
        if math.isfinite(c["B_crit"]):
            text = (f"B_crit from the steps-to-target fit = {rf.fmt(c['B_crit'])}, S_min = {rf.fmt(fit['S_min'])} steps "
                    f"({fit['n_batches']} batch sizes, {fit['n_points']} runs); ")
            lo, hi = fit["B_crit_lo"], fit["B_crit_hi"]
            lo = math.nan if lo == hi else lo  # a zero-width interval says nothing: give the reason instead
            text += (f"{CONFIDENCE:.0%} bootstrap interval {rf.fmt(lo)} to {rf.fmt(hi) if math.isfinite(hi) else 'open'}"
                     f" ({fit['resamples']:,} resamples of the runs within each batch size; {fit['n_batches_with_spread']}"
                     f" of {fit['n_batches']} batch sizes have two or more seeds)" if math.isfinite(lo)
                     else f"no interval: {fit['interval_reason']}")
            if fit.get("interval_reason") and math.isfinite(lo):
                text += f"; {fit['interval_reason']}"
            text += "".join(f"; {c}" for c in caveats(fit))
        else:
            text = f"no B_crit: {fit.get('reason') or 'no fit'}"
        if fit.get("excluded"):
            text += (f"; left out of the fit as resolved more coarsely than {MAX_RESOLUTION_FRACTION:.0%} of their "
                     "mean steps-to-target: " + "; ".join(fit["excluded"]))
        text += noise_scale_text(c)  # B_simple with its runs, per-batch range and no interval (bench.report_captions)
        items.append(f"<li><b>{esc(sweep)}</b>: {esc(text)}.</li>")
    how = ("Estimator: steps(B) = S_min (1 + B_crit / B) fitted to one point per batch size (the mean of its runs' "
           f"first crossings) by least squares on log(steps); interval: percentile bootstrap ({BOOTSTRAP_RESAMPLES:,} "
           "resamples, fixed RNG seed) over the runs within each batch size. With n seeds a bootstrap understates the "
           "spread of a mean by sqrt((n−1)/n): read the interval as a lower bound on the uncertainty. "
           "docs/results.md defines every number.")
    return "<ul>" + "".join(items) + f'</ul><p class="meta">{esc(how)}</p>'


def runs_table_html(runs: pd.DataFrame, failed_only: bool) -> str:
    df = runs[runs["status"] != "success"] if failed_only else runs
    if df.empty:
        return '<p class="note">Every run finished with status success.</p>' if failed_only else ""
    headers = ["sweep", "run", "global batch", "workers", "seed", "status", "final test acc", "best test acc",
               "epochs to target", "epochs, sustained", "time to target (s)", "samples/s", "reason"]
    rows = ["".join([text_cell(r.sweep), text_cell(r.run_id), num_cell(r.global_batch_size, 9),
                     num_cell(r.num_workers), num_cell(r.seed, 9), text_cell(r.status),
                     num_cell(r.final_test_acc, decimals=3), num_cell(r.best_test_acc, decimals=3),
                     num_cell(r.epochs_to_target), num_cell(getattr(r, "epochs_to_target_sustained", math.nan)),
                     num_cell(r.time_to_target_s), num_cell(r.samples_per_s, 4),
                     text_cell(r.failure_reason if isinstance(r.failure_reason, str) else "")])
            for r in df.itertuples()]
    return sortable(headers, rows, "runs")


def ended_below_html(runs: pd.DataFrame) -> str:
    """Runs whose last evaluation is below a target they had reached: MLPerf's first crossing
    credits them; the sustained crossing says whether the target held."""
    flag = runs["ends_below_target"].fillna(False).astype(bool) if "ends_below_target" in runs else None
    df = runs[flag] if flag is not None else runs.iloc[:0]
    if df.empty:
        return '<p class="meta">No run ended below a target it had reached.</p>'
    headers = ["sweep", "run", "global batch", "seed", "target", "first crossing (epochs)", "sustained (epochs)",
               "final test acc"]
    rows = ["".join([text_cell(r.sweep), text_cell(r.run_id), num_cell(r.global_batch_size, 9), num_cell(r.seed, 9),
                     num_cell(r.target_accuracy), num_cell(r.epochs_to_target),
                     num_cell(r.epochs_to_target_sustained) if math.isfinite(r.epochs_to_target_sustained)
                     else text_cell("never"), num_cell(r.final_test_acc, decimals=3)]) for r in df.itertuples()]
    return (f'<p class="note">{len(df)} run(s) ended below a target they had reached: the first crossing (MLPerf) '
            "credits them, the sustained crossing shows whether the target held.</p>" + sortable(headers, rows, "runs"))
