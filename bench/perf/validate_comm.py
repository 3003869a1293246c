"""Validation of the step-time model (``python -m bench.perf validate-comm``): the multi-worker
step time predicted from 1-worker runs plus the measured all-reduce, against the measured one.

Input: a results folder holding 1-worker and multi-worker runs of one sweep at the same
per-worker batches (the packaged ``comm-validate`` sweep), and the all-reduce file
``python -m bench.perf allreduce`` wrote on the same machine. Per run: seconds per optimizer
step from its ``epoch_stop`` lines (``bench.stepmodel.step_time_from_events``: first epoch out,
evaluation out), mean over seeds. Gradient bytes and DDP's buckets from the sweep's model built
as the worker builds it (``bench.memprobe.device.input_spec`` + ``bench.models.build_model``).

For each multi-worker (b, W) with a 1-worker run at the same per-worker batch b, two predictions
(``bench.stepmodel``):
- ``no overlap``: compute(b) from the 1-worker run + the modelled all-reduce at W, nothing hidden;
- ``model``: the same minus the fitted overlap, phi fitted leave-one-out on the *other*
  multi-worker runs (so no prediction sees the run it is compared with) - what the planner does.
Both are compared with the measured step: ratio = predicted / measured, within ``--tolerance``
(default 20 %) or not. Exit 0 when every ``model`` prediction is within it, 1 otherwise, 2 for a
mistake in the input. Prints a table (``--format markdown`` for the README); ``--json`` keeps it.

Imports torch (to count the model's parameters); must not import ray.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from bench.comm import ddp_bucket_sizes
from bench.errors import BatchscaleError, UserError
from bench.interconnect import Links
from bench.stepmodel import StepPoint, fit_step_model, points_from_records

COLUMNS = ("global_batch_size", "per_worker_batch_size", "num_workers", "one_worker_step_ms", "allreduce_ms",
           "overlap_fraction", "no_overlap_ms", "model_ms", "measured_ms", "no_overlap_ratio", "model_ratio",
           "within_tolerance")


def measured_points(records) -> tuple[list[StepPoint], dict]:
    """``bench.stepmodel.points_from_records`` of the runs, and the sweep config they share
    (UserError when they are of different workloads or models, or none has a timed step)."""
    ok = [r for r in records if r.status == "success"]
    configs = {(r.config.get("workload"), r.config.get("model"), str(r.config.get("workload_options"))): r.config
               for r in ok}
    if len(configs) > 1:
        raise UserError(f"the runs are of {len(configs)} different workloads/models; give one sweep's folder")
    points = points_from_records(ok)
    if not points:
        raise UserError("no successful run with timed epochs in the given folders")
    return points, next(iter(configs.values()))


def gradient_buckets(config: dict) -> list[int]:
    """The bytes of each trainable parameter's gradient, in ``model.parameters()`` order, for the
    sweep's model on the workload's input shape."""
    from bench.config import SweepConfig
    from bench.memprobe.device import input_spec
    from bench.models import build_model

    sweep = SweepConfig.model_validate(config)
    spec = input_spec(sweep)
    model = build_model(sweep.model_name, spec.shape, spec.num_classes)
    return [p.numel() * p.element_size() for p in model.parameters() if p.requires_grad]


def compare(points: list[StepPoint], param_bytes: list[int], links: Links, tolerance: float) -> list[dict[str, Any]]:
    """One row per multi-worker point with a 1-worker twin (see the module docstring)."""
    gradient_bytes, buckets = sum(param_bytes), ddp_bucket_sizes(param_bytes)
    one = {p.per_worker_batch_size: p for p in points if p.num_workers == 1}
    ones = list(one.values())
    plain = fit_step_model(ones, gradient_bytes=gradient_bytes, links=links, bucket_bytes=buckets)
    rows = []
    for p in points:
        if p.num_workers == 1 or p.per_worker_batch_size not in one:
            continue
        others = [q for q in points if q.num_workers > 1 and q is not p]
        loo = fit_step_model(ones + others, gradient_bytes=gradient_bytes, links=links, bucket_bytes=buckets)
        a, m = plain.predict(p.per_worker_batch_size, p.num_workers), loo.predict(p.per_worker_batch_size, p.num_workers)
        if a.step_s is None or m.step_s is None:
            continue
        rows.append({"global_batch_size": int(p.per_worker_batch_size * p.num_workers),
                     "per_worker_batch_size": p.per_worker_batch_size, "num_workers": p.num_workers,
                     "one_worker_step_ms": 1e3 * one[p.per_worker_batch_size].step_s,
                     "allreduce_ms": 1e3 * a.allreduce_s,
                     "overlap_fraction": loo.overlap.fraction if loo.overlap else None,
                     "no_overlap_ms": 1e3 * a.step_s, "model_ms": 1e3 * m.step_s, "measured_ms": 1e3 * p.step_s,
                     "no_overlap_ratio": a.step_s / p.step_s, "model_ratio": m.step_s / p.step_s,
                     "within_tolerance": abs(m.step_s / p.step_s - 1) <= tolerance})
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def format_rows(rows: list[dict[str, Any]], markdown: bool) -> str:
    head = ["B", "b/worker", "W", "1-worker step ms", "all-reduce ms", "phi (LOO)", "no-overlap ms", "model ms",
            "measured ms", "no-overlap / measured", "model / measured", "within"]
    cells = [[_cell(r[c]) for c in COLUMNS] for r in rows]
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    return "\n".join(" ".join(f"{v:>{w}}" for v, w in zip(line, widths)) for line in [head, *cells])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.perf validate-comm", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="results folder(s) of one sweep with 1- and 2-worker runs")
    p.add_argument("--allreduce", type=Path, required=True, help="results/<system>/allreduce-gloo-w2.json")
    p.add_argument("--tolerance", type=float, default=0.2, help="allowed |predicted / measured - 1| (default 0.2)")
    p.add_argument("--format", choices=("table", "markdown"), default="table")
    p.add_argument("--json", type=Path, help="also write the rows and the link here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from bench import store
    from bench import records as stored
    from bench.perf.allreduce import load

    args = parse_args(argv)
    try:
        if not 0 < args.tolerance < 1:
            raise UserError(f"--tolerance {args.tolerance}: give a fraction between 0 and 1, e.g. 0.2")
        try:
            link = load(args.allreduce).link(str(args.allreduce))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", store.RunSkipped)
                records = stored.load_results(args.results)
        except (ValueError, store.StoreError) as err:
            raise UserError(str(err)) from None
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        points, config = measured_points(records)
        param_bytes = gradient_buckets(config)
        rows = compare(points, param_bytes, Links(link, None, None), args.tolerance)
        if not rows:
            raise UserError("no multi-worker run has a 1-worker run at the same per-worker batch to predict it from")
    except BatchscaleError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code
    print(f"link: {link.source}")
    print(f"gradients: {sum(param_bytes) / 1e6:.4g} MB in {len(ddp_bucket_sizes(param_bytes))} DDP bucket(s) "
          f"({', '.join(f'{b / 1e6:.3g}' for b in ddp_bucket_sizes(param_bytes))} MB)")
    print(format_rows(rows, args.format == "markdown"))
    within = sum(r["within_tolerance"] for r in rows)
    print(f"{within} of {len(rows)} model predictions within {100 * args.tolerance:g} % of the measured step")
    if args.json:
        from bench.store import atomic_write_json

        atomic_write_json(args.json, {"allreduce": str(args.allreduce), "link": link.source,
                                      "gradient_bytes": sum(param_bytes), "tolerance": args.tolerance, "rows": rows})
    return 0 if within == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
