"""Driver side of `batchscale run`: from validated configs to complete run folders.

Owns: the order of things on the driver, cheapest refusal first — plan; check the results folder
(read-only) and what the cluster can offer without Ray in this process; claim and lock the sweep's
folder; only then start or join Ray (and check the live cluster); write each pending run's inputs,
show progress, launch the worker groups, and report what happened. The lock is released on every
way out (an error, Ctrl-C / SIGTERM; a SIGKILL releases it with the process). Reaches Ray only
through bench.launcher.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench import launcher
from bench.config import ClusterConfig, SweepConfig
from bench.fingerprint import fingerprint
from bench.plan import RunPlan, plan_sweep
from bench.progress import SweepProgress
from bench.store import SweepDir


@dataclass
class SweepOutcome:
    sweep_dir: Path
    num_planned: int
    num_skipped: int
    statuses: dict[str, str]
    groups: list[launcher.GroupStart]
    wall_s: float


def describe_group(index: int, g: launcher.GroupStart) -> str:
    """One line per worker group: start-up, then restarts apart from it, e.g. 'worker group 1
    (2 workers, 1 run): start-up 9.1 s; 1 restart after a worker failure (ActorDiedError), 12.3 s
    to resume; 3 checkpoints written in 41 ms'."""
    secs = f"{g.start_s:.1f} s" if g.start_s is not None else "unknown"
    line = (f"worker group {index} ({g.num_workers} worker{'s' * (g.num_workers != 1)}, "
            f"{g.num_runs} run{'s' * (g.num_runs != 1)}): start-up {secs}")
    if g.restarts:
        n = len(g.restarts)
        causes = sorted({r.cause for r in g.restarts if r.cause})
        resumes = ", ".join(f"{r.resume_s:.1f} s" if r.resume_s is not None else "? s" for r in g.restarts)
        line += (f"; {n} restart{'s' * (n > 1)} after a worker failure"
                 f"{' (' + ', '.join(causes) + ')' if causes else ''}, {resumes} to resume")
    if g.num_checkpoints:
        took = f"{g.checkpoint_s:.1f} s" if g.checkpoint_s >= 1 else f"{1000 * g.checkpoint_s:.0f} ms"
        line += f"; {g.num_checkpoints} checkpoint{'s' * (g.num_checkpoints > 1)} written in {took}"
    return line


def run_sweep(sweep: SweepConfig, cluster: ClusterConfig, results_root: Path, *,
              cluster_file: str | None = None, plans: list[RunPlan] | None = None,
              say: Callable[[str], None] = print, progress: bool | None = None) -> SweepOutcome:
    t0 = time.perf_counter()
    plans = plans if plans is not None else plan_sweep(sweep)
    sweep_dir = SweepDir(Path(results_root) / sweep.name)
    pending = [p for p in plans if not sweep_dir.run(p.run_id).is_complete()]
    # Unwritable or foreign folder, or leftovers that cannot be cleared: refused, nothing written.
    sweep_dir.verify(sweep.config_hash(), [p.run_id for p in pending])
    if pending:  # no Ray here yet: a local Ray that could not hold the workers, or a cluster that
        # does not answer as Ray within connect_timeout_s, is refused before anything is written
        launcher.preflight(cluster, max(p.num_workers for p in pending))
    sweep_dir.claim(sweep.name, sweep.config_hash())
    sweep_dir.lock()  # a second driver is refused here, before it starts any Ray
    try:
        pending = [p for p in plans if not sweep_dir.run(p.run_id).is_complete()]  # under the lock
        skipped = len(plans) - len(pending)
        say(f"sweep {sweep.name}: {len(plans)} runs planned, {skipped} already complete, "
            f"{len(pending)} to run -> {sweep_dir.path}")
        groups: list[launcher.GroupStart] = []
        if pending:
            launcher.connect(cluster, max(p.num_workers for p in pending))
            env = fingerprint(cluster_file)
            config = sweep.model_dump(mode="json")
            cluster_dict = cluster.model_dump(mode="json")
            for plan in pending:
                sweep_dir.run(plan.run_id).prepare(config=config, cluster=cluster_dict,
                                                   run_plan=plan.to_dict(), env=env)
            tails = [(p.run_id, sweep_dir.run(p.run_id).events_path, p.epochs) for p in pending]

            def on_group(g: launcher.GroupStart) -> None:
                groups.append(g)
                say(describe_group(len(groups), g))

            with SweepProgress(tails, use_rich=progress):
                launcher.run_groups(sweep, cluster, sweep_dir, pending, on_group=on_group)
        statuses: dict[str, str] = {}
        for plan in plans:
            summary = sweep_dir.run(plan.run_id).read_summary()
            statuses[plan.run_id] = summary.status if summary else "incomplete"
    finally:
        sweep_dir.unlock()
    return SweepOutcome(sweep_dir.path, len(plans), skipped, statuses, groups, time.perf_counter() - t0)
