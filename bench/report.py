"""The HTML report: result folders -> one self-contained HTML page.

Owns: the page (header saying what was run and on what, the per-batch summary table, the
figures with their computed captions, failed/incomplete runs with their reasons, all runs),
inline CSS and a small inline table-sorting script. Figures are inline base64 PNGs; the page
makes no request of any kind. Every piece of text that comes from a config or a result is
HTML-escaped here, in one place (``_e``).

Reads results only through ``bench.store.load_results`` and numbers only through
``bench.analysis``; the plots live in ``bench.report_figures``.
Must not import: torch, ray, pyplot.
"""

from __future__ import annotations

import base64
import html
import io
import math
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import matplotlib
import pandas as pd

from bench import analysis as an
from bench import events as ev
from bench import report_figures as rf
from bench.store import RunRecord, atomic_write_text, load_results

DPI = 80  # modest: a 100-run report stays well under 5 MB
MAX_VALUES = 4  # distinct environment values shown per field before "and N more"


def _e(value: Any) -> str:
    """Escape anything for HTML text or attribute context; unknown (None/NaN) becomes 'unknown'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "unknown"
    return html.escape(str(value), quote=True)


def write_report(paths: list[Path], out: Path, *, target_accuracy: float | None = None,
                 title: str | None = None) -> Path:
    """Read every run under `paths` (corrupt folders are skipped with a warning by the store),
    render the report and write it atomically to `out`. Returns `out`."""
    records = [r for r in load_results(paths) if r.damage is None]  # damaged: warned about by the store
    page = render_report(records, target_accuracy=target_accuracy, title=title,
                         sources=[str(p) for p in paths])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    out.chmod(0o644)  # the temp file behind the atomic write is private; a report is for sharing
    return out


# --- figures ------------------------------------------------------------------------------

def critical_batches(runs: pd.DataFrame) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per sweep: the steps(B) fit, and its B_crit set beside the in-run B_simple."""
    fits = {s: an.fit_steps_curve(g["global_batch_size"], g["steps_to_target"]) for s, g in runs.groupby("sweep")}
    return fits, {s: an.critical_batch(g, fits[s]) for s, g in runs.groupby("sweep")}


def _critical_html(critical: dict[str, dict], fits: dict[str, dict]) -> str:
    items = []
    for sweep, c in critical.items():
        known = [f"B_crit from the steps-to-target fit = {rf.fmt(c['B_crit'])} ± {rf.fmt(fits[sweep]['B_crit_err'], 2)}"
                 if math.isfinite(c["B_crit"]) else None,
                 f"in-run gradient noise scale B_simple = {rf.fmt(c['B_simple'])}" if math.isfinite(c["B_simple"])
                 else None]
        text = "; ".join(k for k in known if k) or "no estimate"
        if c["agree"]:
            text += (f"; ratio B_simple / B_crit = {c['ratio']:.2f}: they agree within {an.NOISE_AGREEMENT:g}x, "
                     "as in McCandlish et al. (2018)")
        elif c["why_not"]:
            text += f"; no agreement to report: {c['why_not']}"
        items.append(f"<li><b>{_e(sweep)}</b>: {_e(text)}.</li>")
    return "<ul>" + "".join(items) + "</ul>"


def build_figures(records: list[RunRecord], runs: pd.DataFrame, speed: pd.DataFrame,
                  fits: dict[str, dict] | None = None) -> list[rf.FigureResult]:
    """Every figure of the report, in page order. One that raises becomes a visible note."""
    style = rf.Style.for_runs(runs)
    fits = critical_batches(runs)[0] if fits is None else fits
    makers: list[tuple[str, str, Callable[[], rf.FigureResult]]] = [
        ("curves", "Learning curves", lambda: rf.fig_learning_curves(an.curves_frame(records), style)),
        ("gap", "Generalisation gap", lambda: rf.fig_generalisation(runs, style)),
        ("steps", "Steps to target", lambda: rf.fig_steps_to_target(runs, speed, fits, style)),
        ("time", "Time to target", lambda: rf.fig_time_to_target(runs, style)),
        ("throughput", "Throughput", lambda: rf.fig_throughput(runs, an.scaling_efficiency(runs), style)),
        ("memory", "Memory", lambda: rf.fig_memory(runs, style)),
        ("telemetry", "Telemetry", lambda: rf.fig_telemetry(an.telemetry_frame(records), style)),
        ("lr", "Learning-rate schedule", lambda: rf.fig_lr(an.lr_frame(records), style)),
        ("capacity", "Capacity plan: time to target against GPUs", lambda: _capacity_figure(runs)),
    ]
    out = []
    with matplotlib.rc_context(rf.RC):
        for key, name, make in makers:
            try:
                out.append(make())
            except Exception as err:  # a broken figure must not cost the whole report
                warnings.warn(f"report figure {key!r} failed: {err!r}", RuntimeWarning, stacklevel=2)
                why = f"This figure could not be drawn ({type(err).__name__}: {err})."
                out.append(rf.FigureResult(key, name, None, why))
    return out


def _capacity_figure(runs: pd.DataFrame) -> rf.FigureResult:
    """bench.planner on these runs, at each sweep's target: the same numbers `batchscale plan` prints."""
    from bench import planner

    title = "Capacity plan: time to target against GPUs"
    if runs["sweep"].nunique() != 1:
        return rf.FigureResult("capacity", title, None, "capacity planning is per sweep; run `batchscale plan` on one")
    target = float(runs["target_accuracy"].dropna().iloc[0])
    result = planner.plan_capacity(runs, target_accuracy=target)
    if result.table is None or not result.table["time_to_target_s"].notna().any():
        return rf.FigureResult("capacity", title, None, result.recommendation or "nothing to plan from")
    recommendation = result.recommendation.rstrip(".")
    return rf.FigureResult("capacity", title, planner.plan_figure(result),
                           f"At target {target:g}: {recommendation}. Hollow markers are extrapolated.")


def _png(fig) -> tuple[str, int, int]:
    buf = io.BytesIO()
    with matplotlib.rc_context(rf.RC):
        fig.savefig(buf, format="png", dpi=DPI)
    width, height = (fig.get_size_inches() * DPI).round().astype(int)
    return base64.b64encode(buf.getvalue()).decode("ascii"), int(width), int(height)


def _figure_html(result: rf.FigureResult) -> str:
    head = f'<section class="fig" id="fig-{_e(result.key)}"><h3>{_e(result.title)}</h3>'
    if result.figure is None:
        return head + f'<p class="note">Not shown: {_e(result.caption)}</p></section>'
    data, width, height = _png(result.figure)
    return (head + f'<figure><img src="data:image/png;base64,{data}" width="{width}" height="{height}" '
            f'alt="{_e(result.title)}"><figcaption>{_e(result.caption)}</figcaption></figure></section>')


# --- header: what was run, on what, when ----------------------------------------------------

def _get(d: dict | None, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        flat.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return flat


def _distinct(values: Iterable[Any]) -> str:
    seen = list(dict.fromkeys(str(v) for v in values if v not in (None, "", [])))
    if not seen:
        return "unknown"
    more = f" and {len(seen) - MAX_VALUES} more" if len(seen) > MAX_VALUES else ""
    return ", ".join(seen[:MAX_VALUES]) + more


def _setting(record: RunRecord, config_key: str, plan_key: str | None = None) -> Any:
    value = _get(record.config, config_key)
    return record.plan.get(plan_key) if value is None and plan_key else value


def _warmup(record: RunRecord) -> str | None:
    steps, epochs = _get(record.config, "lr.warmup_steps"), _get(record.config, "lr.warmup_epochs")
    if steps is not None:
        return f"{steps} steps"
    epochs = record.plan.get("warmup_epochs") if epochs is None else epochs
    return None if epochs is None else f"{epochs:g} epochs"


def _run_setup(records: list[RunRecord]) -> dict[str, str]:
    """What a sweep ran, from its config (the plan where the config lacks a key)."""
    def one(config_key: str, plan_key: str | None = None) -> str:
        return _distinct(_setting(r, config_key, plan_key) for r in records)

    def planned(key: str) -> str:
        return _distinct(sorted({r.plan.get(key) for r in records if r.plan.get(key) is not None}))

    return {
        "description": one("description"), "workload": one("workload", "workload"), "model": one("model", "model"),
        "optimizer": one("optimizer.name"), "LR scaling rule": one("lr.scaling", "scaling"),
        "reference LR at reference batch":
            f"{one('lr.reference_lr', 'reference_lr')} at {one('lr.reference_batch_size', 'reference_batch_size')}",
        "warmup": _distinct(_warmup(r) for r in records), "schedule": one("lr.schedule", "schedule"),
        "epochs": one("epochs", "epochs"), "target accuracy": one("target_accuracy"), "seeds": planned("seed"),
        "global batch sizes": planned("global_batch_size"), "num_workers": planned("num_workers"),
        "train metrics on": _distinct(_train_eval(r) for r in records), "runs": str(len(records)),
    }


def _train_eval(record: RunRecord) -> str:
    """How many training samples the train accuracy/loss (hence the gap) were measured on. Runs
    logged before the train_eval_samples event existed always scored the whole set."""
    total = record.plan.get("num_train")
    scored = next((e.get("value") for e in record.events if e.get("key") == ev.TRAIN_EVAL_SAMPLES), total)
    return "the whole training set" if scored == total else f"{scored} of {total} training samples"


ENV_FIELDS = {  # label -> key names looked up (last path component, any case) in worker_env, env, cluster
    "cluster": ("name",), "GPU model": ("gpu_model", "gpu_name", "accelerator_model_name"),
    "driver": ("driver", "driver_version", "nvidia_driver"), "CUDA": ("cuda", "cuda_version"),
    "torch": ("torch", "torch_version"), "ray": ("ray", "ray_version"), "python": ("python", "python_version"),
    "git sha": ("git_sha", "git_commit", "sha"), "git dirty": ("git_dirty",), "host": ("hostname", "host"),
    "CPU": ("cpu_model",), "device": ("device",), "created (UTC)": ("created_utc", "created"),
}


def _env_lookup(record: RunRecord, names: tuple[str, ...], label: str) -> Any:
    sources = [record.cluster] if label == "cluster" else [record.worker_env, record.env, record.cluster]
    for source in sources:
        for key, value in _flatten(source).items():
            if key.split(".")[-1].lower() in names and value not in (None, ""):
                return value
    return None


def _environment(records: list[RunRecord]) -> dict[str, str]:
    env = {label: _distinct(_env_lookup(r, names, label) for r in records) for label, names in ENV_FIELDS.items()}
    starts = [e["time_ms"] for r in records for e in r.events[:1] if isinstance(e.get("time_ms"), (int, float))]
    if starts:
        fmt_t = lambda ms: datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")  # noqa: E731
        env["runs started (UTC)"] = f"{fmt_t(min(starts))} to {fmt_t(max(starts))}"
    return env


def _kv_table(columns: dict[str, dict[str, str]]) -> str:
    """Rows = field names, one column per sweep."""
    fields = list(dict.fromkeys(f for d in columns.values() for f in d))
    head = "".join(f"<th>{_e(s)}</th>" for s in columns)
    rows = "".join(f"<tr><th>{_e(f)}</th>" + "".join(f"<td>{_e(d.get(f, 'unknown'))}</td>" for d in columns.values())
                   + "</tr>" for f in fields)
    return f'<table class="kv"><thead><tr><th></th>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _all_env_keys(records: list[RunRecord]) -> str:
    keys: dict[str, list] = {}
    for r in records:
        for name, source in (("env", r.env), ("worker_env", r.worker_env)):
            for k, v in _flatten(source).items():
                keys.setdefault(f"{name}.{k}", []).append(v)
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_distinct(v)[:300])}</td></tr>" for k, v in sorted(keys.items()))
    return f'<details><summary>All environment keys</summary><table class="kv">{rows}</table></details>'


# --- tables ---------------------------------------------------------------------------------

def _num_cell(value: Any, digits: int = 3, std: Any = None, decimals: int | None = None) -> str:
    """A number (sorts by its raw value); with std as "mean ± std", the std to the mean's decimals."""
    v = an.to_float(value)
    text = rf.fmt(v, digits) if decimals is None or math.isnan(v) else f"{v:.{decimals}f}"
    s = an.to_float(std)
    if std is not None and math.isfinite(s) and not math.isnan(v):
        places = decimals
        if places is None:
            places = len(text.split(".")[1]) if "." in text and "e" not in text else 0
        text += f" ± {s:.{places}f}"
    return f'<td data-v="{"" if math.isnan(v) else v}">{_e(text)}</td>'


def _text_cell(value: Any) -> str:
    return f'<td data-v="{_e(value)}">{_e(value)}</td>'


def _sortable(headers: list[str], rows: list[str], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return (f'<table class="sortable {cls}"><thead><tr>{head}</tr></thead><tbody>'
            + "".join(f"<tr>{r}</tr>" for r in rows) + "</tbody></table>")


def _batch_table_html(table: pd.DataFrame, speed: pd.DataFrame, critical: dict[str, dict] | None = None) -> str:
    headers = ["sweep", "global batch", "workers", "per-worker batch", "peak LR", "runs", "reached target",
               "final test acc", "gap (train − test)", "epochs to target", "olympic epochs", "steps to target",
               "steps speed-up (regime)", "time to target (s)", "samples/s", "peak memory (GiB)",
               "test acc std, last 20 %", "B_simple (in-run)", "vs fitted B_crit"]
    b_crit = {s: c["B_crit"] for s, c in (critical or {}).items()}
    if len(speed):
        table = table.merge(speed[["sweep", "global_batch_size", "speedup", "regime"]], how="left",
                            on=["sweep", "global_batch_size"])
    else:
        table = table.assign(speedup=float("nan"), regime=None)
    rows = []
    for t in table.itertuples():
        regime = f" ({t.regime})" if isinstance(t.regime, str) else ""
        speedup = "—" if pd.isna(t.speedup) else f"{t.speedup:.2f}x{regime}"
        rows.append("".join([
            _text_cell(t.sweep), _num_cell(t.global_batch_size, 9), _num_cell(t.num_workers),
            _num_cell(t.per_worker_batch_size, 9), _num_cell(t.peak_lr), _text_cell(f"{t.n_runs} ({t.statuses})"),
            f'<td data-v="{t.n_reached}">{t.n_reached} of {t.n_runs}</td>',
            _num_cell(t.final_test_acc_mean, std=t.final_test_acc_std, decimals=3),
            _num_cell(t.gap_acc_mean, std=t.gap_acc_std, decimals=3),
            _num_cell(t.epochs_to_target_mean, 3, t.epochs_to_target_std),
            _num_cell(t.epochs_to_target_olympic), _num_cell(t.steps_to_target_mean, 4, t.steps_to_target_std),
            f'<td data-v="{"" if pd.isna(t.speedup) else t.speedup}">{_e(speedup)}</td>',
            _num_cell(t.time_to_target_s_mean, 3, t.time_to_target_s_std), _num_cell(t.samples_per_s_mean, 4),
            _num_cell(t.peak_memory_gib_max), _num_cell(t.test_acc_std_last_k_mean, decimals=4),
            _num_cell(t.noise_scale_b_simple_mean, 3, t.noise_scale_b_simple_std),
            _text_cell(_versus(t.global_batch_size, b_crit.get(t.sweep, math.nan)))]))
    return _sortable(headers, rows)


def _versus(batch: float, b_crit: float) -> str:
    if not math.isfinite(b_crit):
        return "—"
    return "beyond B_crit" if batch > b_crit else "at or below"


def _runs_table_html(runs: pd.DataFrame, failed_only: bool) -> str:
    df = runs[runs["status"] != "success"] if failed_only else runs
    if df.empty:
        return '<p class="note">Every run finished with status success.</p>' if failed_only else ""
    headers = ["sweep", "run", "global batch", "workers", "seed", "status", "final test acc", "best test acc",
               "epochs to target", "time to target (s)", "samples/s", "reason"]
    rows = ["".join([_text_cell(r.sweep), _text_cell(r.run_id), _num_cell(r.global_batch_size, 9),
                     _num_cell(r.num_workers), _num_cell(r.seed, 9), _text_cell(r.status),
                     _num_cell(r.final_test_acc, decimals=3), _num_cell(r.best_test_acc, decimals=3),
                     _num_cell(r.epochs_to_target),
                     _num_cell(r.time_to_target_s), _num_cell(r.samples_per_s, 4),
                     _text_cell(r.failure_reason if isinstance(r.failure_reason, str) else "")])
            for r in df.itertuples()]
    return _sortable(headers, rows, "runs")


# --- the page -------------------------------------------------------------------------------

CSS = """body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1240px;
padding:0 16px;color:#1d1d1f}h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
h3{font-size:15px}table{border-collapse:collapse;margin:8px 0;font-size:12.5px}th,td{border:1px solid #ddd;
padding:3px 7px;text-align:left;vertical-align:top}thead th{background:#f3f4f6}table.sortable thead th{cursor:pointer}
table.sortable thead th:hover{background:#e5e7eb}.note{color:#8a4b08;background:#fff7e6;padding:6px 10px;
border-left:3px solid #f0a020}figure{margin:0}figure img{max-width:100%;height:auto}
figcaption{color:#444;margin-top:4px}.meta{color:#555}.scroll{overflow-x:auto}
table.sortable td{white-space:nowrap}table.runs td:last-child{white-space:normal}
.cols{display:flex;flex-wrap:wrap;gap:0 40px}.cols>div{flex:1 1 420px;min-width:0}"""

SORT_JS = """document.querySelectorAll('table.sortable thead th').forEach(function(th){
th.addEventListener('click',function(){var body=th.closest('table').tBodies[0],i=th.cellIndex,
asc=th.getAttribute('data-dir')!=='asc';th.setAttribute('data-dir',asc?'asc':'desc');
Array.prototype.slice.call(body.rows).sort(function(a,b){var x=a.cells[i].getAttribute('data-v'),
y=b.cells[i].getAttribute('data-v'),nx=parseFloat(x),ny=parseFloat(y);
var c=(isNaN(nx)||isNaN(ny))?String(x).localeCompare(String(y)):nx-ny;return asc?c:-c;})
.forEach(function(r){body.appendChild(r);});});});"""


def render_report(records: list[RunRecord], *, target_accuracy: float | None = None, title: str | None = None,
                  sources: list[str] | None = None) -> str:
    """The whole page as a string."""
    runs = an.runs_frame(records, target_accuracy=target_accuracy)
    sweeps = sorted(runs["sweep"].unique()) if len(runs) else []
    title = title or f"batchscale report: {', '.join(sweeps) or 'no runs'}"
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<h1>{_e(title)}</h1>",
             f'<p class="meta">Generated {_e(now)} from {_e(", ".join(sources or []) or "records")}'
             + (f"; target accuracy overridden to {_e(target_accuracy)}" if target_accuracy is not None else "")
             + ".</p>"]
    if not records:
        parts.append('<p class="note">No runs were found in these result folders.</p>')
    else:
        by_sweep = {s: [r for r in records if r.sweep == s] for s in sweeps}
        speed = an.speedup_frame(runs)
        fits, critical = critical_batches(runs)
        parts += ['<div class="cols"><div><h2>What was run</h2>',
                  _kv_table({s: _run_setup(rs) for s, rs in by_sweep.items()}),
                  "</div><div><h2>On what</h2>", _kv_table({s: _environment(rs) for s, rs in by_sweep.items()}),
                  _all_env_keys(records), "</div></div>",
                  "<h2>Summary per global batch size</h2>", '<div class="scroll">',
                  _batch_table_html(an.batch_table(runs), speed, critical),
                  "</div>", "<h2>Critical batch size</h2>", _critical_html(critical, fits),
                  "<h2>Failed, diverged, out-of-memory and incomplete runs</h2>",
                  '<div class="scroll">', _runs_table_html(runs, failed_only=True), "</div>", "<h2>Figures</h2>"]
        parts += [_figure_html(f) for f in build_figures(records, runs, speed, fits)]
        parts += ["<h2>All runs</h2>", f"<details><summary>{len(runs)} runs</summary><div class=\"scroll\">",
                  _runs_table_html(runs, failed_only=False), "</div></details>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(parts) + f"\n<script>{SORT_JS}</script>\n</body></html>\n")
