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
from bench import regimes
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


def text_cell(value: Any, wrap: bool = False) -> str:
    """A text cell; wrap=True lets a sentence-like cell wrap instead of widening its table."""
    cls = ' class="t"' if wrap else ""
    return f'<td data-v="{esc(value)}"{cls}>{esc(value)}</td>'


def sortable(headers: list[str], rows: list[str], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    return (f'<table class="sortable {cls}"><thead><tr>{head}</tr></thead><tbody>'
            + "".join(f"<tr>{r}</tr>" for r in rows) + "</tbody></table>")


BATCH_HEADERS = ["sweep", "global batch", "workers", "per-worker batch", "peak LR", "runs",
                 "reached / held / ended below", "final test acc", "gap (train − test)", "epochs to target",
                 "epochs, sustained", "eval interval (epochs)", "olympic epochs", "steps to target", "steps, sustained",
                 "steps speed-up (regime)", "vs smallest batch", "vs previous batch", "time to target (s)", "samples/s",
                 "training peak allocated (GiB, max over runs)", "peak memory (GiB, max over runs)", "test acc std, last 20 %", "B_simple (in-run)",
                 "vs fitted B_crit"]


def _reached_suffix(n_reached: int, n_runs: int) -> str:
    return f" ({n_reached} of {n_runs} runs)" if 0 < n_reached < n_runs else ""


def to_target_cell(mean: Any, std: Any, n_reached: int, n_runs: int, digits: int = 3) -> str:
    """A to-target mean ± std; where only some runs reached, '(k of n runs)' so that the mean over
    the survivors is not read as the batch's."""
    cell = num_cell(mean, digits, std)
    suffix = _reached_suffix(n_reached, n_runs)
    return cell.replace("</td>", esc(suffix) + "</td>") if suffix and not pd.isna(mean) else cell


def speedup_text(speedup: Any, regime: Any, previous_batch: Any) -> str:
    """'1.00x (baseline)' at the smallest reached batch; '1.77x (not resolved)' / '2.00x (perfect
    scaling)' where a segment ends; '—' where the batch never reached the target."""
    if pd.isna(speedup):
        return "—"
    if pd.isna(previous_batch):
        return f"{speedup:.2f}x (baseline)"
    return f"{speedup:.2f}x" + (f" ({regime})" if isinstance(regime, str) else "")


def merge_speed(table: pd.DataFrame, speed: pd.DataFrame) -> pd.DataFrame:
    """The per-batch table with bench.regimes' speed-up columns (one computation for table and captions)."""
    cols = ["speedup", "regime", "speedup_noise", "regime_noise", "previous_batch"]
    if len(speed):
        return table.merge(speed[["sweep", "global_batch_size", *cols]], how="left", on=["sweep", "global_batch_size"])
    return table.assign(**{c: math.nan if c in ("speedup", "previous_batch") else None for c in cols})


def batch_table_html(table: pd.DataFrame, speed: pd.DataFrame, fits: dict[str, dict]) -> str:
    if table.empty:
        return '<p class="note">No run to summarise.</p>'
    table = merge_speed(table, speed)
    rows = []
    for t in table.itertuples():
        speedup = speedup_text(t.speedup, t.regime, t.previous_batch)
        k, n = t.n_reached, t.n_runs
        rows.append("".join([
            text_cell(t.sweep), num_cell(t.global_batch_size, 9), num_cell(t.num_workers),
            num_cell(t.per_worker_batch_size, 9), num_cell(t.peak_lr), text_cell(f"{t.n_runs} ({t.statuses})"),
            f'<td data-v="{t.n_reached}">{t.n_reached} / {t.n_sustained} / {t.n_ends_below} of {t.n_runs}</td>',
            num_cell(t.final_test_acc_mean, std=t.final_test_acc_std, decimals=3),
            num_cell(t.gap_acc_mean, std=t.gap_acc_std, decimals=3),
            to_target_cell(t.epochs_to_target_mean, t.epochs_to_target_std, k, n),
            to_target_cell(t.epochs_to_target_sustained_mean, t.epochs_to_target_sustained_std, t.n_sustained, n),
            num_cell(t.epochs_to_target_resolution_mean, 3),
            num_cell(t.epochs_to_target_olympic), to_target_cell(t.steps_to_target_mean, t.steps_to_target_std, k, n, 4),
            to_target_cell(t.steps_to_target_sustained_mean, t.steps_to_target_sustained_std, t.n_sustained, n, 4),
            f'<td data-v="{"" if pd.isna(t.speedup) else t.speedup}" class="t">{esc(speedup)}</td>',
            text_cell(t.speedup_noise if isinstance(t.speedup_noise, str) else "—", wrap=True),
            text_cell(t.regime_noise if isinstance(t.regime_noise, str) else "—", wrap=True),
            to_target_cell(t.time_to_target_s_mean, t.time_to_target_s_std, k, n), num_cell(t.samples_per_s_mean, 4),
            num_cell(t.train_peak_allocated_gib_max), num_cell(t.peak_memory_gib_max),
            num_cell(t.test_acc_std_last_k_mean, decimals=4),
            num_cell(t.noise_scale_b_simple_mean, 3, t.noise_scale_b_simple_std),
            text_cell(versus_b_crit(t.global_batch_size, fits.get(t.sweep, {}), n_reached=k), wrap=True)]))
    return sortable(BATCH_HEADERS, rows)


def versus_b_crit(batch: float, fit: dict, *, n_reached: int | None = None) -> str:
    """Where a batch stands against the fitted B_crit, its interval included; '—' for a batch
    where no run reached the target (it has no steps-to-target to place), and for every batch
    when the fit carries a caveat (two points, or B_crit outside the batches fitted): then
    nothing measured tests B_crit."""
    b_crit, lo, hi = (an.to_float(fit.get(k)) for k in ("B_crit", "B_crit_lo", "B_crit_hi"))
    if not math.isfinite(b_crit) or n_reached == 0:
        return "—"
    if caveats(fit):
        return "— (B_crit untested: see Critical batch size)"
    if math.isnan(lo):
        return ("beyond B_crit" if batch > b_crit else "at or below B_crit") + " (no interval)"
    if batch > hi:
        return "beyond B_crit's interval"
    return "below B_crit's interval" if batch < lo else "within B_crit's interval"


def critical_html(critical: dict[str, dict], fits: dict[str, dict], runs: pd.DataFrame | None = None) -> str:
    items = []
    for sweep, c in critical.items():
        fit = fits[sweep]
        rests_on = regimes.fit_rests_on(runs[runs["sweep"] == sweep], fit) if runs is not None else ""
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
        text += rests_on
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


def is_loss_target(runs: pd.DataFrame) -> bool:
    """A language model's sweep: a loss target and batches (and throughput) in tokens."""
    if "target_metric" in runs and runs["target_metric"].eq("loss").any():
        return True
    return "batch_unit" in runs and len(runs) > 0 and runs["batch_unit"].eq("tokens").all()


def never_reached(runs: pd.DataFrame) -> pd.Series:
    """Runs that finished (status success) without ever reaching the target."""
    return runs["status"].eq("success") & runs["steps_to_target"].isna()


def _reason(r: Any, loss: bool) -> str:
    if isinstance(r.failure_reason, str) and r.failure_reason:
        return r.failure_reason
    if r.status != "success" or not pd.isna(r.steps_to_target):
        return ""
    if loss:
        return f"completed; never reached loss {rf.fmt(r.target_loss)} (final {rf.fmt(r.final_test_loss)})"
    return (f"completed; never reached {rf.fmt(r.target_accuracy)} test accuracy (final {r.final_test_acc:.3f}, "
            f"best {r.best_test_acc:.3f})")


def runs_table_html(runs: pd.DataFrame, failed_only: bool) -> str:
    """Every run, or (failed_only) those that did not finish and those that finished without
    reaching the target. A loss-target sweep shows validation loss, steps and tokens/s."""
    df = runs[runs["status"].ne("success") | never_reached(runs)] if failed_only else runs
    if df.empty:
        return ('<p class="note">Every run finished with status success and reached the target.</p>'
                if failed_only else "")
    loss = is_loss_target(runs)
    headers = ["sweep", "run", "global batch" + (" (tokens)" if loss else ""), "workers", "seed", "status"]
    headers += (["final validation loss", "steps to target", "steps, sustained", "time to target (s)", "tokens/s"] if loss
                else ["final test acc", "best test acc", "epochs to target", "epochs, sustained", "time to target (s)",
                      "samples/s"])
    rows = []
    for r in df.itertuples():
        head = [text_cell(r.sweep), text_cell(r.run_id), num_cell(r.global_batch_size, 9), num_cell(r.num_workers),
                num_cell(r.seed, 9), text_cell(r.status)]
        if loss:
            body = [num_cell(getattr(r, "final_test_loss", math.nan), decimals=3), num_cell(r.steps_to_target, 4),
                    num_cell(getattr(r, "steps_to_target_sustained", math.nan), 4)]
        else:
            body = [num_cell(r.final_test_acc, decimals=3), num_cell(r.best_test_acc, decimals=3),
                    num_cell(r.epochs_to_target), num_cell(getattr(r, "epochs_to_target_sustained", math.nan))]
        rows.append("".join([*head, *body, num_cell(r.time_to_target_s), num_cell(r.samples_per_s, 4),
                             text_cell(_reason(r, loss))]))
    return sortable([*headers, "reason"], rows, "runs")


def ended_heading(runs: pd.DataFrame) -> str:
    """The section heading: below an accuracy target, above a loss target."""
    return f"Runs that ended {'above' if is_loss_target(runs) else 'below'} a target they had reached"


def ended_below_html(runs: pd.DataFrame) -> str:
    """Runs whose last evaluation is on the wrong side of a target they had reached (below an
    accuracy, above a loss): MLPerf's first crossing credits them; the sustained crossing says
    whether the target held."""
    flag = runs["ends_below_target"].fillna(False).astype(bool) if "ends_below_target" in runs else None
    df = runs[flag] if flag is not None else runs.iloc[:0]
    loss = is_loss_target(runs)
    side = "above" if loss else "below"
    if df.empty:
        return f'<p class="meta">No run ended {side} a target it had reached.</p>'
    unit, final = ("steps", "final validation loss") if loss else ("epochs", "final test acc")
    headers = ["sweep", "run", "global batch", "seed", "target", f"first crossing ({unit})", f"sustained ({unit})", final]
    rows = []
    for r in df.itertuples():
        first, held = (r.steps_to_target, r.steps_to_target_sustained) if loss else \
            (r.epochs_to_target, r.epochs_to_target_sustained)
        rows.append("".join([text_cell(r.sweep), text_cell(r.run_id), num_cell(r.global_batch_size, 9),
                             num_cell(r.seed, 9), num_cell(r.target_loss if loss else r.target_accuracy),
                             num_cell(first), num_cell(held) if math.isfinite(held) else text_cell("never"),
                             num_cell(r.final_test_loss if loss else r.final_test_acc, decimals=3)]))
    return (f'<p class="note">{len(df)} run(s) ended {side} a target they had reached: the first crossing (MLPerf) '
            "credits them, the sustained crossing shows whether the target held.</p>" + sortable(headers, rows, "runs"))
