"""Driver side of `batchscale run`: from validated configs to complete run folders.

Owns: the order of things on the driver — plan, claim and lock the sweep's
results folder, write each pending run's inputs, show progress, launch the
worker groups, and report what happened. Reaches Ray only through bench.launcher.
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


def run_sweep(sweep: SweepConfig, cluster: ClusterConfig, results_root: Path, *,
              cluster_file: str | None = None, plans: list[RunPlan] | None = None,
              say: Callable[[str], None] = print, progress: bool | None = None) -> SweepOutcome:
    t0 = time.perf_counter()
    plans = plans if plans is not None else plan_sweep(sweep)
    sweep_dir = SweepDir(Path(results_root) / sweep.name)
    pending = [p for p in plans if not sweep_dir.run(p.run_id).is_complete()]
    # Unwritable or foreign folder, or leftovers that cannot be cleared: refused, nothing written.
    sweep_dir.verify(sweep.config_hash(), [p.run_id for p in pending])
    if pending:  # an unreachable cluster fails here, before anything is written
        launcher.connect(cluster, max(p.num_workers for p in pending))
    sweep_dir.claim(sweep.name, sweep.config_hash())
    sweep_dir.lock()
    try:
        pending = [p for p in plans if not sweep_dir.run(p.run_id).is_complete()]  # under the lock
        skipped = len(plans) - len(pending)
        say(f"sweep {sweep.name}: {len(plans)} runs planned, {skipped} already complete, "
            f"{len(pending)} to run -> {sweep_dir.path}")
        statuses: dict[str, str] = {}
        groups: list[launcher.GroupStart] = []
        if pending:
            env = fingerprint(cluster_file)
            config = sweep.model_dump(mode="json")
            cluster_dict = cluster.model_dump(mode="json")
            for plan in pending:
                sweep_dir.run(plan.run_id).prepare(config=config, cluster=cluster_dict,
                                                   run_plan=plan.to_dict(), env=env)
            tails = [(p.run_id, sweep_dir.run(p.run_id).events_path, p.epochs) for p in pending]

            def on_group(g: launcher.GroupStart) -> None:
                groups.append(g)
                secs = f"{g.start_s:.1f} s" if g.start_s is not None else "unknown"
                say(f"worker group {len(groups)} ({g.num_workers} worker{'s' * (g.num_workers > 1)}, "
                    f"{g.num_runs} runs): start-up {secs}")

            with SweepProgress(tails, use_rich=progress):
                launcher.run_groups(sweep, cluster, sweep_dir, pending, on_group=on_group)
        for plan in plans:
            summary = sweep_dir.run(plan.run_id).read_summary()
            statuses[plan.run_id] = summary.status if summary else "incomplete"
    finally:
        sweep_dir.unlock()
    return SweepOutcome(sweep_dir.path, len(plans), skipped, statuses, groups, time.perf_counter() - t0)
