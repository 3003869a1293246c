"""Command line: `batchscale` (also `python -m bench`).

Owns: argument parsing, turning user mistakes into one line on stderr with exit
code 2 (config) or 1 (cluster / store / runtime), and Ctrl-C / SIGTERM into a
clean stop (exit 130). Heavy imports (torch, ray, pandas) happen inside commands.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

from bench.config import default_cluster, load_cluster, load_sweep
from bench.errors import (EXIT_FAILED, EXIT_INTERRUPTED, BatchscaleError, ConfigError, PlanError,
                          StoreError, UserError)
from bench.plan import plan_sweep

def _one_line(msg: str) -> str:
    """Messages quote user input, which may hold line breaks or control characters."""
    flat = " ".join(str(msg).split())
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in flat)


def _err(msg: str) -> None:
    print(f"batchscale: error: {_one_line(msg)}", file=sys.stderr, flush=True)


def _warn(msg: str) -> None:
    print(f"batchscale: warning: {_one_line(msg)}", file=sys.stderr, flush=True)


def _load(args: argparse.Namespace):
    try:
        sweep, sweep_path = load_sweep(args.sweep)
        if args.cluster:
            cluster, cluster_path = load_cluster(args.cluster)
        else:
            cluster, cluster_path = default_cluster()
        plans = plan_sweep(sweep, max_micro_batch_size=_auto_micro_batch(sweep, args, cluster.use_gpu))
    except PlanError as err:
        raise UserError(f"{locals().get('sweep_path', args.sweep)}: {err}") from None
    except ConfigError as err:
        raise UserError(str(err)) from None
    return sweep, sweep_path, cluster, cluster_path, plans


def _auto_micro_batch(sweep, args: argparse.Namespace, use_gpu: bool) -> dict[int, int] | None:
    """`max_micro_batch_size: auto` reads the memory probe's answer for this sweep's setup and
    device kind: a micro-batch per per-worker batch."""
    if sweep.max_micro_batch_size != "auto":
        return None
    from bench.memprobe import ProbeMismatch, micro_batch_for_auto

    try:
        micro, _path = micro_batch_for_auto(sweep, Path(getattr(args, "results_dir", "results")), use_gpu=use_gpu)
    except ProbeMismatch as err:
        raise UserError(f"{args.sweep}: {err}") from None
    return micro


# --- commands -----------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    sweep, sweep_path, cluster, cluster_path, plans = _load(args)
    if args.dry_run:
        print(f"sweep {sweep.name} from {sweep_path} on cluster {cluster.name}: {len(plans)} runs")
        for p in plans:
            print(f"  {p.run_id}: per-worker {p.per_worker_batch_size} = {p.grad_accum_steps} x "
                  f"{p.micro_batch_size}, {p.steps_per_epoch} steps/epoch x {p.epochs} epochs, "
                  f"peak lr {p.peak_lr:.6g}, warmup {p.warmup_steps} steps")
        return 0
    from bench import launcher
    from bench.runner import run_sweep

    try:
        outcome = run_sweep(sweep, cluster, Path(args.results_dir), plans=plans,
                            cluster_file=str(cluster_path) if cluster_path else None)
    except StoreError as err:
        raise UserError(str(err), EXIT_FAILED) from None
    except launcher.LauncherError as err:
        raise UserError(str(err), EXIT_FAILED) from None
    finally:
        launcher.shutdown()
    counts: dict[str, int] = {}
    for status in outcome.statuses.values():
        counts[status] = counts.get(status, 0) + 1
    starts = ", ".join(f"{g.start_s:.1f} s" if g.start_s is not None else "?" for g in outcome.groups)
    print(f"sweep {sweep.name} done in {outcome.wall_s:.1f} s: "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
          + f"; {len(outcome.groups)} worker-group start(s){' (' + starts + ')' if starts else ''}")
    print(f"results: {outcome.sweep_dir}   next: batchscale results {outcome.sweep_dir}")
    return 0 if counts.get("incomplete", 0) == 0 else EXIT_FAILED


def _runs_frame(paths: Sequence[str]):
    from bench import analysis
    from bench.store import load_results

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            records = load_results([Path(p) for p in paths])
        except StoreError as err:
            raise UserError(str(err)) from None
    for w in caught:
        _warn(str(w.message))
    if not records:
        raise UserError(f"no runs found under {', '.join(paths)}", EXIT_FAILED)
    return analysis.runs_frame(records)


def cmd_results(args: argparse.Namespace) -> int:
    df = _runs_frame(args.paths)
    if not args.all_columns:
        from bench.analysis import RUN_COLUMNS

        df = df[list(RUN_COLUMNS)]
    if args.format == "csv":
        df.to_csv(sys.stdout, index=False)
    elif args.format == "json":
        print(json.dumps(json.loads(df.to_json(orient="records")), indent=1))
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250):
            print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench.report import write_report

    for p in args.paths:
        if not Path(p).is_dir():
            raise UserError(f"no results folder at {p}")
    out = Path(args.output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        path = write_report([Path(p) for p in args.paths], out, target_accuracy=args.target_accuracy,
                            title=args.title)
    except StoreError as err:
        raise UserError(str(err)) from None
    print(f"report: {path}")
    return 0


# --- parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchscale", description=(
        "Sweep global batch sizes on Ray Train; measure time-to-accuracy and generalisation."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a sweep (a YAML file, or the name of a packaged sweep)")
    p.add_argument("sweep", help="sweep YAML, or a packaged name: seed-blobs, digits-linear, ...")
    p.add_argument("--cluster", help="cluster YAML (default: clusters/local.yaml: local Ray, CPU, gloo)")
    p.add_argument("--results-dir", default="results", help="results root (default: ./results)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("results", help="one row per run")
    p.add_argument("paths", nargs="+", help="a sweep's results folder, or a folder of them")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--all-columns", action="store_true", help="also losses, gaps, memory, ...")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("report", help="write one self-contained HTML report")
    p.add_argument("paths", nargs="+", help="results folders (several: compared side by side)")
    p.add_argument("-o", "--output", required=True, help="HTML file to write, e.g. reports/seed-blobs.html")
    p.add_argument("--target-accuracy", type=float, help="override the sweeps' target accuracy")
    p.add_argument("--title")
    p.set_defaults(func=cmd_report)

    for register in _extra_commands():
        register(sub)
    return parser


# submit / check / compare (bench.submission) and plan (bench.planner) add their own parsers.
def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    from bench import memprobe, planner, submission

    return [submission.register, planner.register, memprobe.register]


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except BatchscaleError as err:
        _err(str(err))
        return err.code
    except KeyboardInterrupt:
        _err("interrupted; completed runs are kept, the run in progress is incomplete "
             "and will be redone by the same command")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
