"""Comparing submissions: per global batch size, each submission's olympic means side by side
(``batchscale compare``), printed and optionally as one self-contained HTML page.

Owns: the comparison table and its HTML page. Packages are read with
bench.submission_files.load_submission (safe reads); a package with problems is still compared
on the runs that could be read (``check`` is the command that lists the problems).

Must not import: torch, ray; bench.compliance. pandas/scipy (via bench.analysis) only inside
functions, because the CLI imports bench.submission, which imports this module, to build its parser.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from bench import store
from bench.errors import UserError
from bench.submission_files import distinct, load_submission

COMPARE_METRICS = ("time_to_target_s", "epochs_to_target", "samples_per_s")


def compare_submissions(paths: Sequence[Path | str], out_html: Path | str | None = None):
    """Per global batch size and submission: olympic means of time- and epochs-to-target (a
    non-converged run counts as slowest: NaN if it survives the trimming), mean throughput.
    Prints the side-by-side table; writes a self-contained HTML page when out_html is given.
    Returns the long table (one row per submission and batch)."""
    import pandas as pd

    from bench.analysis import olympic_mean, runs_frame

    rows, names = [], []
    for path in map(Path, paths):
        name = path.resolve().name
        names.append(name if name not in names else f"{name} ({len(names) + 1})")
        package = load_submission(path)
        if not package.records:
            raise UserError(f"{path}: no runs in this submission "
                            f"({'; '.join(package.problems[:3]) or 'no results/ logs'})", 1)
        for b, g in runs_frame(package.records).groupby("global_batch_size"):
            rows.append({"submission": names[-1], "system": (package.system or {}).get("system_name"),
                         "global_batch_size": b, "num_workers": distinct(g["num_workers"]), "n_runs": len(g),
                         "n_reached": int(g["epochs_to_target"].notna().sum()),
                         "time_to_target_s": olympic_mean(g["time_to_target_s"], missing_as_worst=True),
                         "epochs_to_target": olympic_mean(g["epochs_to_target"], missing_as_worst=True),
                         "samples_per_s": g["samples_per_s"].mean()})
    long = pd.DataFrame(rows)
    wide = long.pivot(index="global_batch_size", columns="submission", values=list(COMPARE_METRICS))
    wide = wide.reorder_levels([1, 0], axis=1)[[(n, m) for n in names for m in COMPARE_METRICS]]
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(wide.to_string(float_format=lambda v: f"{v:.4g}", na_rep="-"))
    if out_html is not None:
        _write_html(Path(out_html), names, long, wide)
    return long


def _write_html(path: Path, names: list[str], long, wide) -> None:
    import html

    title = "batchscale: " + " vs ".join(names)
    body = wide.to_html(float_format=lambda v: f"{v:.4g}", na_rep="-", border=0, escape=True)
    detail = long.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-", border=0, escape=True)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>Per global batch size: olympic mean of time-to-target (s, training "
            "time) and epochs-to-target (a run that never reached the target counts as slowest; '-' = unknown), "
            f"mean throughput (samples/s).</p>{body}<h2>Details</h2>{detail}</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    store.atomic_write_text(path, page)


def cmd_compare(args: argparse.Namespace) -> int:
    missing = [p for p in args.submissions if not Path(p).is_dir()]
    if missing:
        raise UserError(f"no submission folder at {', '.join(missing)}")
    compare_submissions(args.submissions, args.output)
    if args.output:
        print(f"comparison: {args.output}")
    return 0
