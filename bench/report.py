"""The HTML report: result folders -> one self-contained HTML page.

Owns: the page (header saying what was run and on what with provenance warnings, the per-batch
summary table, the critical batch, "rule vs tuned" for an LR search (bench.report_lrsearch), runs that ended below a target they had reached, failed,
incomplete and damaged runs with their reasons, the figures with their computed captions, all
runs), inline CSS and a small inline table-sorting script, and ``write_report``'s checks of its
output path and target. Figures are inline base64 PNGs; the page makes no request of any kind.
Text from a config or a result is HTML-escaped (``bench.report_text.esc``) and, in figures,
kept from being read as maths (``bench.report_figures.tex``).

Damaged runs (a missing or corrupt file) are listed in the failures table with their reason and
left out of every table above it, every figure and every fit; the page says so. In an LR search
only the runs at the rule's LR enter those (bench.analysis.trusted); the other trials appear in
their own section, the failures table and the list of all runs. A telemetry
file that cannot be read is named in one line and skipped; the other runs' telemetry is drawn.

A language model's sweep (batches in tokens, a loss target) gets its own curves, steps and tokens
to target, noise scale through training and per-batch table (``bench.report_lm``); the shared
figures show its batches in tokens.

Reads results only through ``bench.records.load_results`` and numbers only through
``bench.analysis`` (and ``bench.analysis_lm``); plots live in ``bench.report_figures``,
``bench.report_scaling``, ``bench.report_lm`` and ``bench.report_hardware``, tables in
``bench.report_tables``, the header in ``bench.report_text``.
Must not import: torch, ray, pyplot.
"""

from __future__ import annotations

import base64
import io
import math
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import matplotlib
import pandas as pd

from bench import analysis as an
from bench import analysis_lm
from bench import report_figures as rf
from bench import report_hardware as rh
from bench import report_lm as rlm
from bench import report_lrsearch as rl
from bench import report_scaling as rs
from bench import report_tables as rt
from bench.errors import UserError
from bench.report_text import all_env_keys, environment, esc, kv_table, provenance_warnings, run_setup
from bench.report_text import train_eval as _train_eval  # noqa: F401 (tests/test_feed.py imports it from here)
from bench.spread import RULE
from bench.store import atomic_write_text
from bench.records import RunRecord, load_results

DPI = 80  # modest: a 100-run report stays well under 5 MB


def check_target(target_accuracy: float | None) -> None:
    """A target accuracy override must be a finite number in (0, 1]."""
    if target_accuracy is None:
        return
    if isinstance(target_accuracy, bool) or not isinstance(target_accuracy, (int, float)) or \
            not math.isfinite(target_accuracy) or not 0 < target_accuracy <= 1:
        raise UserError(f"--target-accuracy {target_accuracy!r}: must be a number in (0, 1], e.g. 0.93")


def check_output(out: Path) -> None:
    """The report's path must name a file in a folder we can write (created if missing)."""
    if out.is_dir():
        raise UserError(f"-o {out}: is a folder; give a file name, e.g. {out / 'report.html'}")
    if out.exists() and not os.access(out, os.W_OK):
        raise UserError(f"-o {out}: the file exists and is not writable")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"-o {out}: cannot create its folder ({err.strerror or err})") from None
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise UserError(f"-o {out}: its folder {out.parent} is not writable")


def write_report(paths: list[Path], out: Path, *, target_accuracy: float | None = None,
                 title: str | None = None, target_loss: float | None = None) -> Path:
    """Read every run under `paths` (a damaged folder comes back marked, and the store warns),
    render the report and write it atomically to `out`. Returns `out`. A bad output path or
    target raises UserError before anything is read or written."""
    out = Path(out)
    check_target(target_accuracy)
    check_output(out)
    page = render_report(load_results(paths), target_accuracy=target_accuracy, target_loss=target_loss, title=title,
                         sources=[str(p) for p in paths])
    try:
        atomic_write_text(out, page)
        out.chmod(0o644)  # the temp file behind the atomic write is private; a report is for sharing
    except OSError as err:
        raise UserError(f"-o {out}: cannot write the report ({err.strerror or err})") from None
    return out


# --- figures ------------------------------------------------------------------------------

def critical_batches(runs: pd.DataFrame) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per sweep: the steps(B) fit (bench.fit.fit_sweep), and its B_crit beside the in-run B_simple."""
    fits = {s: an.fit_sweep(g) for s, g in runs.groupby("sweep")}
    return fits, {s: an.critical_batch(g, fits[s]) for s, g in runs.groupby("sweep")}


def build_figures(records: list[RunRecord], runs: pd.DataFrame, speed: pd.DataFrame,
                  fits: dict[str, dict] | None = None, telemetry: pd.DataFrame | None = None
                  ) -> list[rf.FigureResult]:
    """Every figure of the report, in page order, from trusted records and runs. One that raises
    becomes a visible note."""
    style = rf.Style.for_runs(runs)
    fits = critical_batches(runs)[0] if fits is None else fits
    tele = an.telemetry_frame(records) if telemetry is None else telemetry
    makers: list[tuple[str, str, Callable[[], rf.FigureResult]]] = [
        ("curves", "Learning curves", lambda: rf.fig_learning_curves(an.curves_frame(records), style)),
        ("gap", "Generalisation gap", lambda: rf.fig_generalisation(runs, style)),
        ("steps", "Steps to target", lambda: rs.fig_steps_to_target(runs, speed, fits, style)),
        ("time", "Time to target", lambda: rs.fig_time_to_target(runs, style)),
        ("throughput", "Throughput", lambda: rh.fig_throughput(runs, an.scaling_efficiency(runs), style)),
        ("memory", "Memory", lambda: rh.fig_memory(runs, style)),
        ("telemetry", "Telemetry", lambda: rh.fig_telemetry(tele, style)),
        ("lr", "Learning-rate schedule", lambda: rf.fig_lr(an.lr_frame(records), runs, style)),
        ("capacity", "Capacity plan: time to target against GPUs", lambda: _capacity_figure(runs, records)),
    ]
    if rlm.is_token_sweep(runs):  # a language model: loss, tokens, the noise scale through training
        makers = [("curves", "Validation loss", lambda: rlm.fig_loss_curves(an.curves_frame(records), runs, style)),
                  ("steps", "Steps and tokens to the target loss", lambda: rlm.fig_to_target(runs, speed, fits, style)),
                  ("noise", "Gradient noise scale through training",
                   lambda: rlm.fig_noise(analysis_lm.noise_frame(records), runs, fits, style)),
                  *[(key, name, lambda make=make: rlm.in_tokens(make())) for key, name, make in makers
                    if key not in ("curves", "gap", "steps", "lr")],
                  ("lr", "Learning-rate schedule", lambda: rlm.fig_lr(an.lr_frame(records), records, style))]
    out = []
    with matplotlib.rc_context(rf.rc()):
        for key, name, make in makers:
            try:
                out.append(make())
            except Exception as err:  # a broken figure must not cost the whole report
                warnings.warn(f"report figure {key!r} failed: {err!r}", RuntimeWarning, stacklevel=2)
                why = f"This figure could not be drawn ({type(err).__name__}: {err})."
                out.append(rf.FigureResult(key, name, None, why))
    return out


def _capacity_figure(runs: pd.DataFrame, records) -> rf.FigureResult:
    """bench.planner on these runs, at each sweep's target: the same numbers `batchscale plan` prints
    (with the step model of bench.stepmodel where the runs record their gradient size and the
    cluster file names its interconnect; no all-reduce measurement is passed here)."""
    from bench import planner
    from bench.stepmodel import planner_seam

    context = planner.plan_context(records)
    title = f"Capacity plan: time to target against {context['device']}s"
    if runs["sweep"].nunique() != 1:
        return rf.FigureResult("capacity", title, None, f"this report shows {runs['sweep'].nunique()} sweeps and capacity "
                               "planning is per sweep: run `batchscale plan RESULTS_FOLDER` on one sweep's folder.")
    metric = runs["target_metric"].dropna().iloc[0] if "target_metric" in runs else "accuracy"
    target = float(runs[f"target_{metric}"].dropna().iloc[0])
    comm_model, comm_notes = planner_seam(records)
    result = planner.plan_capacity(runs, **{f"target_{metric}": target}, comm_model=comm_model, comm_notes=comm_notes,
                                   **context)
    if result.table is None or not result.table["time_to_target_s"].notna().any():
        return rf.FigureResult("capacity", title, None, result.recommendation or "nothing to plan from")
    recommendation = result.recommendation.replace("\n", "; ").rstrip(".")
    scope = " ".join(f"{s[0].upper()}{s[1:]}." for s in result.scope)
    drawn = result.table.dropna(subset=["time_to_target_s"])
    markers = ("Hollow markers are extrapolated." if drawn["source"].eq("extrapolated").any()
               else "Every point is measured.")
    return rf.FigureResult("capacity", title, planner.plan_figure(result),
                           f"At target {result.target_text}: {recommendation}. {markers} {scope}")


def _png(fig) -> tuple[str, int, int]:
    buf = io.BytesIO()
    with matplotlib.rc_context(rf.rc()):
        fig.savefig(buf, format="png", dpi=DPI)
    width, height = (fig.get_size_inches() * DPI).round().astype(int)
    return base64.b64encode(buf.getvalue()).decode("ascii"), int(width), int(height)


def _figure_html(result: rf.FigureResult) -> str:
    head = f'<section class="fig" id="fig-{esc(result.key)}"><h3>{esc(result.title)}</h3>'
    if result.figure is None:
        return head + f'<p class="note">Not shown: {esc(result.caption)}</p></section>'
    data, width, height = _png(result.figure)
    return (head + f'<figure><img src="data:image/png;base64,{data}" width="{width}" height="{height}" '
            f'alt="{esc(result.title)}"><figcaption>{esc(result.caption)}</figcaption></figure></section>')


# --- the page -------------------------------------------------------------------------------

CSS = """body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1240px;
padding:0 16px;color:#1d1d1f}h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
h3{font-size:15px}table{border-collapse:collapse;margin:8px 0;font-size:12.5px}th,td{border:1px solid #ddd;
padding:3px 7px;text-align:left;vertical-align:top}thead th{background:#f3f4f6}table.sortable thead th{cursor:pointer}
table.sortable thead th:hover{background:#e5e7eb}.note{color:#8a4b08;background:#fff7e6;padding:6px 10px;
border-left:3px solid #f0a020}figure{margin:0}figure img{max-width:100%;height:auto}
figcaption{color:#444;margin-top:4px}.meta{color:#555}.scroll{overflow-x:auto}
table.sortable td{white-space:nowrap}table.runs td:last-child{white-space:normal}
table.sortable td.t{white-space:normal;min-width:9em}
table.kv{table-layout:fixed;width:100%}table.kv td,table.kv th{overflow-wrap:anywhere}
.cols{display:flex;flex-wrap:wrap;gap:0 40px}.cols>div{flex:1 1 420px;min-width:0}"""

SORT_JS = """document.querySelectorAll('table.sortable thead th').forEach(function(th){
th.addEventListener('click',function(){var body=th.closest('table').tBodies[0],i=th.cellIndex,
asc=th.getAttribute('data-dir')!=='asc';th.setAttribute('data-dir',asc?'asc':'desc');
Array.prototype.slice.call(body.rows).sort(function(a,b){var x=a.cells[i].getAttribute('data-v'),
y=b.cells[i].getAttribute('data-v'),nx=parseFloat(x),ny=parseFloat(y);
var c=(isNaN(nx)||isNaN(ny))?String(x).localeCompare(String(y)):nx-ny;return asc?c:-c;})
.forEach(function(r){body.appendChild(r);});});});"""


def _notes(lines: list[str]) -> list[str]:
    return [f'<p class="note">{esc(line)}</p>' for line in lines]


def _body(records: list[RunRecord], all_runs: pd.DataFrame) -> list[str]:
    good = [r for r in records if r.damage is None]
    runs = an.trusted(all_runs)
    damaged = len(records) - len(good)
    left_out = ([f"{damaged} damaged run(s) (a file missing or corrupt) are listed in the failures table with the "
                 "reason, and left out of every summary, figure and fit."] if damaged else [])
    parts = _notes(left_out)
    sweeps = sorted(runs["sweep"].unique()) if len(runs) else []
    by_sweep = {s: [r for r in good if r.sweep == s] for s in sweeps}
    parts += ['<div class="cols"><div><h2>What was run</h2>', kv_table({s: run_setup(rs_) for s, rs_ in by_sweep.items()}),
              "</div><div><h2>On what</h2>", kv_table({s: environment(rs_) for s, rs_ in by_sweep.items()}),
              *_notes([f"Provenance: {w}" for w in provenance_warnings(good)]), all_env_keys(good), "</div></div>"]
    speed = an.speedup_frame(runs)
    fits, critical = critical_batches(runs) if len(runs) else ({}, {})
    parts += ["<h2>Summary per global batch size</h2>",
              f'<p class="meta">Means ± std over the runs of each cell (n in "runs"). How comparisons are worded, '
              f'here and in every caption: {esc(RULE)}.</p>', '<div class="scroll">',
              (rlm.batch_table_html if rlm.is_token_sweep(runs) else rt.batch_table_html)(an.batch_table(runs), speed, fits)
              if len(runs) else "", "</div>",
              "<h2>Critical batch size</h2>", rt.critical_html(critical, fits, runs),
              *(['<p class="meta">Language model: every batch, B_crit and B_simple here is in tokens; S_min x B_crit '
                 "is the fewest tokens the fit allows (E_min).</p>"] if rlm.is_token_sweep(runs) else []),
              *rl.section(all_runs, _figure_html),
              f"<h2>{esc(rt.ended_heading(runs))}</h2>", '<div class="scroll">',
              rt.ended_below_html(runs), "</div>",
              "<h2>Failed, diverged, out-of-memory, incomplete and damaged runs, and runs that never reached the "
              "target</h2>",
              '<div class="scroll">', rt.runs_table_html(all_runs, failed_only=True), "</div>", "<h2>Figures</h2>"]
    shown = set(zip(runs["sweep"], runs["run_id"]))  # LR-search trials off the rule's LR: their own section
    rule = [r for r in good if (r.sweep, r.run_id) in shown]
    if rule:
        problems: list[str] = []
        tele = an.telemetry_frame(rule, problems)
        parts += _notes(left_out + problems)
        parts += [_figure_html(f) for f in build_figures(rule, runs, speed, fits, tele)]
    else:
        parts += _notes(["No undamaged run to draw."])
    parts += ["<h2>All runs</h2>", f"<details><summary>{len(all_runs)} runs</summary><div class=\"scroll\">",
              rt.runs_table_html(all_runs, failed_only=False), "</div></details>"]
    return parts


def render_report(records: list[RunRecord], *, target_accuracy: float | None = None, title: str | None = None,
                  sources: list[str] | None = None, target_loss: float | None = None) -> str:
    """The whole page as a string."""
    all_runs = an.runs_frame(records, target_accuracy=target_accuracy, target_loss=target_loss)
    sweeps = sorted(all_runs["sweep"].unique()) if len(all_runs) else []
    title = title or f"batchscale report: {', '.join(sweeps) or 'no runs'}"
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<h1>{esc(title)}</h1>",
             f'<p class="meta">Generated {esc(now)} from {esc(", ".join(sources or []) or "records")}'
             + (f"; target accuracy overridden to {esc(target_accuracy)}" if target_accuracy is not None else "")
             + (f"; target loss overridden to {esc(target_loss)}" if target_loss is not None else "")
             + ".</p>"]
    if not records:
        parts.append('<p class="note">No runs were found in these result folders.</p>')
    else:
        parts += _body(records, all_runs)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(parts) + f"\n<script>{SORT_JS}</script>\n</body></html>\n")
