"""Command line: `batchscale` (also `python -m bench`).

Owns: argument parsing, turning user mistakes into one line on stderr with exit
code 2 (config) or 1 (cluster / store / runtime), and Ctrl-C / SIGTERM into a
clean stop (exit 130). Heavy imports (torch, ray, pandas) happen inside commands.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

from bench.config import check_ray_address, default_cluster, load_cluster, load_sweep
from bench.errors import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, BatchscaleError, ConfigError, PlanError,
                          StoreError, UserError)
from bench.memprobe import resolve_micro_batch
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
    """Everything `run` checks without Ray: both files, the environment's Ray address, and the
    plan (with ``max_micro_batch_size: auto`` resolved from the memory probe). One line, exit 2."""
    sweep_path = args.sweep
    try:
        sweep, sweep_path = load_sweep(args.sweep)
        if args.cluster:
            cluster, cluster_path = load_cluster(args.cluster)
        else:
            cluster, cluster_path = default_cluster()
        _check_env_address(cluster)
        micro = resolve_micro_batch(sweep, results_dir=Path(getattr(args, "results_dir", "results")),
                                    use_gpu=cluster.use_gpu)
        plans = plan_sweep(sweep, max_micro_batch_size=micro)
    except PlanError as err:
        raise UserError(f"{sweep_path}: {err}") from None
    except ConfigError as err:
        raise UserError(str(err)) from None
    return sweep, sweep_path, cluster, cluster_path, plans


def _check_env_address(cluster) -> None:
    """A cluster file without ``address`` joins the cluster in RAY_ADDRESS when it is set (as
    under ``ray job submit``); that address is held to the same rules as the file's."""
    env = os.environ.get("RAY_ADDRESS")
    if cluster.address is None and env:
        try:
            check_ray_address(env)
        except ValueError as err:
            raise ConfigError(f"environment variable RAY_ADDRESS: {err}") from None


def _check_results_dir(path: Path) -> None:
    """--results-dir must be a folder or not exist yet (it is made); under a file it never can be."""
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise UserError(f"--results-dir {path}: {folder} is not a folder")
            return


# --- commands -----------------------------------------------------------------------------------

def _print_plans(plans) -> None:
    for p in plans:
        unit = " tokens" if p.batch_unit == "tokens" else ""  # a language model counts its batches in tokens
        print(f"  {p.run_id}: per-worker {p.per_worker_batch_size}{unit} = {p.grad_accum_steps} x "
              f"{p.micro_batch_size}, {p.steps_per_epoch} steps/epoch x {p.epochs} epochs"
              f"{f' ({p.total_steps} steps)' if unit else ''}, peak lr {p.peak_lr:.6g}, warmup {p.warmup_steps} steps")


def _dry_run_search(sweep, plans) -> None:
    """An lr_search sweep's two stages: stage 1 in full; stage 2 as the rule's runs plus, per
    batch, the LR chosen after stage 1 (bench.lrsearch)."""
    from bench import lrsearch

    stage1 = lrsearch.search_plans(sweep, plans)
    print(f"  stage 1 (LR search): {len(stage1)} trials")
    _print_plans(stage1)
    seeds = set(lrsearch.search_seeds(sweep))
    more = [p for p in plans if p.seed not in seeds]
    print(f"  stage 2 (every seed at the LR chosen after stage 1 and at the rule's LR): {len(more)} runs at "
          f"the rule's LR below, plus up to {len(more)} at the chosen LRs (none where the rule's LR wins); "
          "at the search seeds both are stage-1 runs")
    _print_plans(more)
    print(f"  chosen after stage 1 by: {lrsearch.CRITERION}")


def cmd_run(args: argparse.Namespace) -> int:
    sweep, sweep_path, cluster, cluster_path, plans = _load(args)
    if args.dry_run:
        if sweep.lr_search is None:
            print(f"sweep {sweep.name} from {sweep_path} on cluster {cluster.name}: {len(plans)} runs")
            _print_plans(plans)
        else:
            print(f"sweep {sweep.name} from {sweep_path} on cluster {cluster.name}: an LR search in two stages")
            _dry_run_search(sweep, plans)
        return 0
    _check_results_dir(Path(args.results_dir))  # the rest of the folder checks: runner, before Ray
    from bench import launcher, lrsearch
    from bench.runner import run_sweep

    try:
        cluster_file = str(cluster_path) if cluster_path else None
        if sweep.lr_search is None:
            outcome = run_sweep(sweep, cluster, Path(args.results_dir), plans=plans, cluster_file=cluster_file)
        else:
            outcome = lrsearch.run_search(sweep, cluster, Path(args.results_dir), rule_plans=plans,
                                          cluster_file=cluster_file)
    except StoreError as err:
        raise UserError(str(err), EXIT_FAILED) from None
    except launcher.LauncherError as err:
        raise UserError(str(err), EXIT_FAILED) from None
    finally:
        launcher.shutdown()
    counts: dict[str, int] = {}
    for status in outcome.statuses.values():
        counts[status] = counts.get(status, 0) + 1
    stages = [outcome] if sweep.lr_search is None else [o for o in (outcome.stage1, outcome.stage2) if o]
    groups = [g for o in stages for g in o.groups]
    starts = ", ".join(f"{g.start_s:.1f} s" if g.start_s is not None else "?" for g in groups)
    print(f"sweep {sweep.name} done in {outcome.wall_s:.1f} s: "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
          + f"; {len(groups)} worker-group start(s){' (' + starts + ')' if starts else ''}")
    print(f"results: {stages[0].sweep_dir}   next: batchscale results {stages[0].sweep_dir}")
    return 0 if counts.get("incomplete", 0) == 0 else EXIT_FAILED


def _check_results_paths(paths: Sequence[str]) -> list[Path]:
    """Every path given to `results`/`report` is an existing folder."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise UserError(f"{p}: no such results folder")
        if not path.is_dir():
            raise UserError(f"{p}: not a folder (give a sweep's results folder, or a folder of them)")
        out.append(path)
    return out


def _records(paths: Sequence[str]):
    from bench.records import load_results

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            records = load_results(_check_results_paths(paths))
        except StoreError as err:
            raise UserError(str(err)) from None
    for w in caught:
        _warn(str(w.message))
    if not records:
        raise UserError(f"no runs found under {', '.join(paths)}", EXIT_FAILED)
    return records


def cmd_results(args: argparse.Namespace) -> int:
    """One row per run, damaged runs included (status 'damaged', each also warned about on
    stderr). Exit 0, or 1 when every run found is damaged (nothing readable is left)."""
    from bench import analysis

    records = _records(args.paths)
    df = analysis.runs_frame(records)
    if not args.all_columns:
        df = df[list(analysis.RUN_COLUMNS)]
    if args.format == "csv":
        df.to_csv(sys.stdout, index=False)
    elif args.format == "json":
        print(json.dumps(json.loads(df.to_json(orient="records")), indent=1))
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250):
            print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if all(r.damage is not None for r in records):
        _err(f"every run found under {', '.join(args.paths)} is damaged (listed above)")
        return EXIT_FAILED
    return 0


def _check_output(path: Path) -> None:
    """-o: a new or regular file, in a folder that exists (or can be made) and is writable."""
    if path.is_dir():
        raise UserError(f"-o {path}: is a folder; give the HTML file to write, e.g. {path / 'report.html'}")
    if (path.exists() or path.is_symlink()) and not path.is_file():
        raise UserError(f"-o {path}: exists and is not a regular file")
    for folder in path.parents:
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise UserError(f"-o {path}: {folder} is not a folder")
            if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
                raise UserError(f"-o {path}: not writable here ({folder} is not writable)")
            return


def cmd_report(args: argparse.Namespace) -> int:
    from bench.report import write_report

    paths = _check_results_paths(args.paths)
    target = args.target_accuracy
    if target is not None and not (math.isfinite(target) and 0 < target <= 1):
        raise UserError(f"--target-accuracy {target:g}: must be a fraction in (0, 1], e.g. 0.9")
    loss = args.target_loss
    if loss is not None and (not (math.isfinite(loss) and loss > 0) or target is not None):
        raise UserError(f"--target-loss {loss:g}: must be a loss in nats > 0, e.g. 3.0, and not given "
                        "with --target-accuracy")
    out = Path(args.output)
    _check_output(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        path = write_report(paths, out, target_accuracy=target, target_loss=loss, title=args.title)
    except StoreError as err:
        raise UserError(str(err)) from None
    except OSError as err:
        raise UserError(f"-o {out}: cannot write ({err.strerror or type(err).__name__})") from None
    print(f"report: {path}")
    return 0


# --- parser -----------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse's errors in the house format: one line, exit 2 (no usage block; --help has it)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _err(f"{self.prog}: {message} (see {self.prog} --help)")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="batchscale", description=(
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
    p.add_argument("--target-loss", type=float, help="instead, a validation loss target (language models)")
    p.add_argument("--title")
    p.set_defaults(func=cmd_report)

    for register in _extra_commands():
        register(sub)
    return parser


# submit / check / compare (bench.submission) and plan (bench.planner) add their own parsers.
def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    from bench import memprobe, planner_cli, submission

    return [submission.register, planner_cli.register, memprobe.register]


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
