"""What do checkpoints cost? (``python -m bench.perf checkpoint-cost``)

Runs the same sweep (default: the packaged ``digits-linear``, 7 runs x 30 epochs on two gloo
workers, as in issue 14's report) through ``bench.runner`` on the local cluster two ways, in
fresh results folders, interleaved round by round (A B, then B A, so drift hits both alike):

A  ``checkpoint_every_epochs: 0``: no checkpoints;
B  ``checkpoint_every_epochs: N`` (``--every``, default 2): rank 0 writes ``checkpoint.pt``
   into the run folder every N epochs (bench.groupstate.CheckpointWriter).

Per side it sums, over the sweep's runs, the training time (``train_time_s``: the timed epochs)
and the run time (``wall_time_s``: training + evaluation + checkpoints, without the worker group's
start-up), and for B the time rank 0 spent writing checkpoints (torch.save + fsync + rename,
reported by the group loop). Two costs, per round and as the median over rounds:

- direct: checkpoint seconds / training seconds of B;
- end to end: (run time of B - run time of A) / training time of A; noisier (it also holds the
  difference between two runs of the same work), and what a user waits for.

The target is at most 5 % of training time. Timings on a loaded machine are not performance figures.
Reaches Ray only through bench.runner / bench.launcher.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

TARGET_PCT = 5.0


def sweep_and_cluster(args: argparse.Namespace, every: int):
    from bench.config import ClusterConfig, SweepConfig, default_cluster, load_sweep

    sweep, _ = load_sweep(args.sweep)
    overrides: dict[str, Any] = {"telemetry": {"enabled": False}} if args.no_telemetry else {}
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.global_batch_sizes:
        overrides["global_batch_sizes"] = args.global_batch_sizes
    sweep = SweepConfig.model_validate({**sweep.model_dump(mode="json"), **overrides})
    cluster, _ = default_cluster()
    cluster = ClusterConfig.model_validate({**cluster.model_dump(mode="json"), "checkpoint_every_epochs": every})
    return sweep, cluster


def run_side(args: argparse.Namespace, every: int, results: Path) -> dict[str, float]:
    """One sweep into a fresh folder: summed training, run and checkpoint seconds."""
    from bench.runner import run_sweep
    from bench.store import SweepDir

    sweep, cluster = sweep_and_cluster(args, every)
    outcome = run_sweep(sweep, cluster, results, say=lambda _: None, progress=False)
    bad = {rid: s for rid, s in outcome.statuses.items() if s != "success"}
    if bad:
        raise RuntimeError(f"runs did not succeed: {bad}")
    summaries = [SweepDir(outcome.sweep_dir).run(rid).read_summary() for rid in outcome.statuses]
    leftover = [rid for rid in outcome.statuses if SweepDir(outcome.sweep_dir).run(rid).checkpoint_path.exists()]
    if leftover:
        raise RuntimeError(f"checkpoints left in complete runs: {leftover}")
    return {"train_s": sum(s.train_time_s for s in summaries), "run_s": sum(s.wall_time_s for s in summaries),
            "checkpoint_s": sum(g.checkpoint_s for g in outcome.groups),
            "num_checkpoints": sum(g.num_checkpoints for g in outcome.groups), "num_runs": len(summaries)}


def costs(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """One round's costs in % of training time (see the module docstring)."""
    return {"direct_pct": 100.0 * b["checkpoint_s"] / b["train_s"],
            "end_to_end_pct": 100.0 * (b["run_s"] - a["run_s"]) / a["train_s"]}


def summarise(rounds: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median, min and max of each cost over the rounds."""
    return {key: {"median": statistics.median(r[key] for r in rounds), "min": min(r[key] for r in rounds),
                  "max": max(r[key] for r in rounds)} for key in rounds[0]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.perf checkpoint-cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", default="digits-linear", help="packaged sweep name or YAML (default digits-linear)")
    p.add_argument("--every", type=int, default=2, help="checkpoint_every_epochs of side B (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved A/B rounds (default 3)")
    p.add_argument("--epochs", type=int, help="override the sweep's epochs (a quick check)")
    p.add_argument("--global-batch-sizes", type=int, nargs="+", help="override the sweep's batch sizes")
    p.add_argument("--no-telemetry", action="store_true", help="sampler off on both sides")
    p.add_argument("--json", type=Path, help="write the rounds and the summary here")
    args = p.parse_args(argv)
    if args.every < 1 or args.rounds < 1:
        p.error("--every and --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from bench import launcher

    args = parse_args(argv)
    rounds, sides = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="batchscale-checkpoint-cost-") as tmp:
            for i in range(args.rounds):
                order = ("A", "B") if i % 2 == 0 else ("B", "A")
                got = {side: run_side(args, 0 if side == "A" else args.every, Path(tmp) / f"r{i}{side}")
                       for side in order}
                rounds.append(costs(got["A"], got["B"]))
                sides.append(got)
                print(f"round {i + 1}/{args.rounds} ({' '.join(order)}): train A {got['A']['train_s']:.2f} s, "
                      f"B {got['B']['train_s']:.2f} s; {got['B']['num_checkpoints']} checkpoints in "
                      f"{got['B']['checkpoint_s']:.3f} s = {rounds[-1]['direct_pct']:.2f} % direct, "
                      f"{rounds[-1]['end_to_end_pct']:+.2f} % end to end", flush=True)
    finally:
        launcher.shutdown()
    stats = summarise(rounds)
    verdict = "within" if stats["direct_pct"]["median"] <= TARGET_PCT else "ABOVE"
    print(f"checkpoint cost ({args.sweep}, every {args.every} epochs, {args.rounds} rounds): direct "
          f"{stats['direct_pct']['median']:.2f} % (min {stats['direct_pct']['min']:.2f}, max "
          f"{stats['direct_pct']['max']:.2f}), end to end {stats['end_to_end_pct']['median']:+.2f} % of training "
          f"time: {verdict} the {TARGET_PCT:g} % target")
    if args.json:
        args.json.write_text(json.dumps({"sweep": args.sweep, "every": args.every, "rounds": rounds, "sides": sides,
                                         "summary": stats, "target_pct": TARGET_PCT}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
