"""Runs at once: how much sooner does a sweep finish? (``python -m bench.perf concurrency``)

Runs the same sweep (default: the packaged ``digits-linear`` on one worker per run: 7 short runs)
through ``bench.runner`` several ways, each into a fresh results folder, interleaved round by
round (the order reversed every other round, so drift hits every side alike). A side is

``1``          ``max_concurrent_runs: 1``: one lane, started once for the whole sweep;
``2`` (``N``)  N lanes at once, each started once and fed runs until none is left (the pool);
``auto``       as many lanes as the cluster's workers hold;
``2/per-run``  N at once, but a fresh worker group for every run (what one TorchTrainer or one
               Ray Tune trial per run costs: one start-up per run).

Per side: the sweep's wall-clock (``run_sweep``; Ray is up before the first side), the sum of its
runs' own times (each run's ``init_start`` to ``run_stop`` in its event log: its set-up, training
and evaluation, without the worker group's start-up), the lanes' start-ups, and the goal of
issue 16: wall-clock <= 1.10 x (sum of run times / runs that fit at once). In a pool that is
1 + start-up x at_once / sum of run times, plus whatever the lanes wait for each other: the goal
holds once the runs add up to ten start-ups per lane. ``--two-nodes`` runs every side on a Ray cluster of
two worker nodes simulated on this machine (``ray.cluster_utils.Cluster``: a head with no CPUs
and two nodes of ``--cpus-per-node``), joined through the cluster file's ``address``.

``--paper RESULTS/SWEEP --gpus 64`` measures nothing: from a committed sweep's run times (e.g. the
H200 runs in ``results/shapes-gpu``) and a measured worker-group start-up (``--startup-from``
overhead JSONs of the same machine, or ``--startup-s``) it works out the sweep's wall-clock on a
cluster of that many GPUs one run at a time and with as many runs at once as the GPUs hold, pool
and one start per run, and the GPU-hours the cluster is held for each way.

Timings on a loaded machine are not performance figures. Reaches Ray only through bench.runner /
bench.launcher (``--two-nodes`` also starts ``ray.cluster_utils.Cluster``).
"""

from __future__ import annotations

import argparse
import heapq
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

GOAL_RATIO = 1.10


def makespan(run_s: list[float], lanes: int, startup_s: float, *, per_run_start: bool = False) -> float:
    """Wall-clock of runs taken in plan order by ``lanes`` lanes that start together: each lane
    takes the next run as soon as it is free (what the run book does). The pool pays
    ``startup_s`` once per lane; ``per_run_start`` pays it before every run."""
    if not run_s:
        return 0.0
    free_at = [0.0 if per_run_start else startup_s] * max(1, min(lanes, len(run_s)))
    heapq.heapify(free_at)
    for seconds in run_s:
        heapq.heappush(free_at, heapq.heappop(free_at) + seconds + (startup_s if per_run_start else 0.0))
    return max(free_at)


def lane_time_s(events_path: Path) -> float:
    """How long a run held its lane: init_start (before its data and model are set up) to
    run_stop, from its event log. summary.json's wall_time_s starts after the set-up."""
    from bench import events as ev

    times = {e["key"]: e["time_ms"] for e in ev.read_events(events_path) if e["key"] in (ev.INIT_START, ev.RUN_STOP)}
    return (times[ev.RUN_STOP] - times[ev.INIT_START]) / 1000.0


def parse_side(text: str) -> tuple[int | str, bool]:
    """'2' -> (2, False); 'auto' -> ('auto', False); '2/per-run' -> (2, True)."""
    setting, _, mode = text.partition("/")
    if mode not in ("", "per-run") or not (setting == "auto" or setting.isdigit() and int(setting) >= 1):
        raise ValueError(f"side {text!r}: give N, auto, N/per-run or auto/per-run")
    return (setting if setting == "auto" else int(setting)), mode == "per-run"


def build_sweep(args: argparse.Namespace, setting: int | str):
    from bench.config import SweepConfig, load_sweep

    sweep, _ = load_sweep(args.sweep)
    overrides: dict[str, Any] = {"max_concurrent_runs": setting, "num_workers": [args.num_workers]}
    if args.no_telemetry:
        overrides["telemetry"] = {"enabled": False}
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.global_batch_sizes:
        overrides["global_batch_sizes"] = args.global_batch_sizes
    return SweepConfig.model_validate({**sweep.model_dump(mode="json"), **overrides})


def run_side(args: argparse.Namespace, side: str, cluster, results: Path) -> dict[str, Any]:
    """One sweep into a fresh folder: wall-clock, the runs' own times, the lanes' start-ups."""
    from bench import launcher
    from bench.plan import plan_sweep
    from bench.runner import run_sweep
    from bench.store import SweepDir

    setting, per_run = parse_side(side)
    sweep = build_sweep(args, setting)
    at_once = launcher.concurrency(setting, cluster, plan_sweep(sweep)).at_once
    outcome = run_sweep(sweep, cluster, results, say=lambda _: None, progress=False,
                        runs_per_lane=1 if per_run else None)
    bad = {rid: s for rid, s in outcome.statuses.items() if s not in ("success", "diverged")}
    if bad:
        raise RuntimeError(f"runs did not finish: {bad}")
    runs = [SweepDir(outcome.sweep_dir).run(rid) for rid in outcome.statuses]
    summaries = [r.read_summary() for r in runs]
    starts = [g.start_s for g in outcome.groups if g.start_s is not None]
    run_s = sum(lane_time_s(r.events_path) for r in runs)
    return {"side": side, "wall_s": outcome.wall_s, "run_s": run_s, "train_s": sum(s.train_time_s for s in summaries),
            "num_runs": len(summaries), "at_once": at_once, "num_lanes": len(outcome.groups), "start_s": starts,
            "goal_ratio": outcome.wall_s / (run_s / at_once)}


def summarise(rounds: list[dict[str, dict]]) -> dict[str, dict[str, float]]:
    """Per side, medians over the rounds; speed-up against side ``1`` when it was measured."""
    out = {}
    for side in rounds[0]:
        got = [r[side] for r in rounds]
        starts = [s for g in got for s in g["start_s"]]
        out[side] = {"wall_s": statistics.median(g["wall_s"] for g in got),
                     "run_s": statistics.median(g["run_s"] for g in got), "at_once": got[0]["at_once"],
                     "num_lanes": statistics.median(g["num_lanes"] for g in got),
                     "start_s": statistics.median(starts) if starts else float("nan"),
                     "goal_ratio": statistics.median(g["goal_ratio"] for g in got)}
    if "1" in out:
        for side in out:
            out[side]["speedup"] = out["1"]["wall_s"] / out[side]["wall_s"]
    return out


def table(stats: dict[str, dict[str, float]]) -> str:
    lines = [f"{'side':>10} {'wall_s':>8} {'runs_s':>8} {'at_once':>7} {'lanes':>5} {'start_s':>7} "
             f"{'speedup':>7} {'wall/(runs/at_once)':>19}"]
    for side, s in stats.items():
        verdict = "ok" if s["goal_ratio"] <= GOAL_RATIO else f"> {GOAL_RATIO:g}"
        lines.append(f"{side:>10} {s['wall_s']:8.1f} {s['run_s']:8.1f} {s['at_once']:7d} {s['num_lanes']:5.0f} "
                     f"{s['start_s']:7.1f} {s.get('speedup', float('nan')):7.2f} {s['goal_ratio']:13.2f} {verdict:>5}")
    return "\n".join(lines)


# --- on paper ------------------------------------------------------------------------------------

def median_startup(paths: list[Path]) -> float:
    """The median worker-group start-up in ``bench.perf overhead`` JSON files (pairs[].batchscale.group_start_s)."""
    found = []
    for path in paths:
        data = json.loads(path.read_text())
        found += [p["batchscale"]["group_start_s"] for p in data.get("pairs", [])
                  if isinstance(p.get("batchscale", {}).get("group_start_s"), (int, float))]
    if not found:
        raise ValueError(f"no group_start_s in {', '.join(map(str, paths))}")
    return statistics.median(found)


def paper(run_s: list[float], gpus_per_run: int, gpus: int, startup_s: float) -> dict[str, dict[str, float]]:
    """The sweep on ``gpus`` GPUs: one run at a time, and as many at once as the GPUs hold; the
    cluster is held (and paid) for the whole wall-clock either way."""
    lanes = max(1, min(gpus // gpus_per_run, len(run_s)))  # no more lanes than runs
    ways = {"1": (1, False), f"{lanes}": (lanes, False), f"{lanes}/per-run": (lanes, True)}
    out = {}
    for name, (k, per_run) in ways.items():
        wall_s = makespan(run_s, k, startup_s, per_run_start=per_run)
        out[name] = {"lanes": min(k, len(run_s)), "wall_s": wall_s, "gpu_hours_held": gpus * wall_s / 3600.0}
    for name in out:
        out[name]["gpu_hours_saved"] = out["1"]["gpu_hours_held"] - out[name]["gpu_hours_held"]
    return out


def main_paper(args: argparse.Namespace) -> int:
    from bench.store import SweepDir

    summaries = [d.read_summary() for d in SweepDir(args.paper).run_dirs()]
    summaries = [s for s in summaries if s is not None]
    if not summaries:
        print(f"error: no complete run in {args.paper}", file=sys.stderr)
        return 2
    per_run = {s.hardware.num_workers for s in summaries if s.hardware}
    gpus_per_run = max(per_run) if per_run else 1  # one GPU per worker, as in the committed cluster files
    startup_s = args.startup_s if args.startup_s is not None else median_startup(args.startup_from)
    run_s = [s.wall_time_s for s in sorted(summaries, key=lambda s: s.run_id)]
    ways = paper(run_s, gpus_per_run, args.gpus, startup_s)
    print(f"{args.paper}: {len(run_s)} runs of {gpus_per_run} GPU, {sum(run_s):.1f} s of runs in all; worker-group "
          f"start-up {startup_s:.1f} s; a cluster of {args.gpus} GPUs")
    for name, w in ways.items():
        print(f"  {name:>12} at once: wall-clock {w['wall_s']:8.1f} s, cluster held {w['gpu_hours_held']:.3f} "
              f"GPU-hours, saved {w['gpu_hours_saved']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"paper": str(args.paper), "gpus": args.gpus, "startup_s": startup_s,
                                         "run_s": run_s, "ways": ways}, indent=1) + "\n")
    return 0


# --- measuring -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.perf concurrency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", default="digits-linear", help="packaged sweep name or YAML (default digits-linear)")
    p.add_argument("--sides", nargs="+", default=["1", "2", "2/per-run"], help="default: 1 2 2/per-run")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--num-workers", type=int, default=1, help="workers per run (default 1)")
    p.add_argument("--epochs", type=int, help="override the sweep's epochs (a quick check)")
    p.add_argument("--global-batch-sizes", type=int, nargs="+", help="override the sweep's batch sizes")
    p.add_argument("--no-telemetry", action="store_true", help="sampler off")
    p.add_argument("--two-nodes", action="store_true", help="on a simulated Ray cluster of two worker nodes")
    p.add_argument("--cpus-per-node", type=int, default=1, help="with --two-nodes (default 1)")
    p.add_argument("--paper", type=Path, help="a sweep's results folder: the estimate on --gpus GPUs, no runs")
    p.add_argument("--gpus", type=int, default=64, help="with --paper (default 64)")
    p.add_argument("--startup-s", type=float, help="with --paper: worker-group start-up in seconds")
    p.add_argument("--startup-from", type=Path, nargs="+",
                   default=[Path("results/h200/overhead-r18.json"), Path("results/h200/overhead-r50.json")],
                   help="with --paper: overhead JSONs whose median group_start_s is the start-up")
    p.add_argument("--json", type=Path, help="write the rounds and the summary here")
    args = p.parse_args(argv)
    try:
        for side in args.sides:
            parse_side(side)
    except ValueError as err:
        p.error(str(err))
    if args.rounds < 1 or args.num_workers < 1 or args.cpus_per_node < 1 or args.gpus < 1:
        p.error("--rounds, --num-workers, --cpus-per-node and --gpus must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.paper:
        return main_paper(args)
    from bench import launcher
    from bench.config import ClusterConfig, default_cluster

    simulated = None
    if args.two_nodes:
        import ray
        from ray.cluster_utils import Cluster

        simulated = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        for _ in range(2):
            simulated.add_node(num_cpus=args.cpus_per_node)
        simulated.wait_for_nodes()
        ray.init(address=simulated.address, log_to_driver=False, logging_level="ERROR")
        cluster = ClusterConfig(name="two-nodes", address=simulated.address)
    else:
        cluster, _ = default_cluster()
    where = f"two simulated nodes of {args.cpus_per_node} CPU" if simulated else "a local Ray"
    print(f"concurrency: {args.sweep}, {args.num_workers} worker(s) per run, sides {' '.join(args.sides)}, "
          f"{args.rounds} round(s), on {where}", flush=True)
    rounds: list[dict[str, dict]] = []
    try:
        launcher.connect(cluster, args.num_workers)  # Ray is up before the first side is timed
        with tempfile.TemporaryDirectory(prefix="batchscale-concurrency-") as tmp:
            for i in range(args.rounds):
                order = args.sides if i % 2 == 0 else list(reversed(args.sides))
                got = {}
                for j, side in enumerate(order):
                    got[side] = run_side(args, side, cluster, Path(tmp) / f"r{i}-{j}")
                    g = got[side]
                    print(f"round {i + 1}/{args.rounds} side {side}: wall {g['wall_s']:.1f} s, runs {g['run_s']:.1f} s "
                          f"({g['num_runs']} runs, {g['at_once']} at once, {g['num_lanes']} lane starts), "
                          f"wall/(runs/at_once) {g['goal_ratio']:.2f}", flush=True)
                rounds.append({side: got[side] for side in args.sides})
    finally:
        launcher.shutdown()
        if simulated is not None:
            import ray

            ray.shutdown()
            simulated.shutdown()
    stats = summarise(rounds)
    print(table(stats))
    if args.json:
        args.json.write_text(json.dumps({"sweep": args.sweep, "two_nodes": args.two_nodes, "sides": args.sides,
                                         "rounds": rounds, "summary": stats, "goal_ratio": GOAL_RATIO},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
