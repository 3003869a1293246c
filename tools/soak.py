"""Soak test (a script, not a CI test): many short sweeps in one driver process, watching for leaks.

    python tools/soak.py --minutes 30      # the real soak
    python tools/soak.py --minutes 1       # a quick check that it works

One ``ray.init`` (through ``bench.launcher.connect``), then round after round of a tiny blobs
sweep, each into a new results folder, until the time is up. The driver's resident memory,
open file descriptors, thread count, live Ray actors and Ray worker processes are printed at
the start, after the first round (the baseline: imports and Ray's own start-up are done by
then), every ``--report-every`` rounds, and at the end.

Exit codes: 0 healthy; 1 a run failed, RSS grew by more than ``--max-rss-growth-pct`` over the
baseline, or file descriptors / live actors kept growing (``leaks()`` says what counts as
growing); 2 bad arguments; 130 interrupted.

Live actors come from Ray's public state API (``ray.util.state.list_actors``) where it answers;
it needs Ray's dashboard (``ray[default]``), which a local Ray started by ``bench.launcher``
does not run, so there they are this driver's own Ray worker processes that hold an actor
(``actor_processes``: titled ``ray::<Class>``, where an idle worker is ``ray::IDLE``). The
first reading says which.

Owns: nothing the benchmark uses; a lab tool beside the package (``bench`` does not import it).
Everything that starts or stops Ray goes through ``bench.launcher``.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a script (python tools/soak.py): bench from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench import launcher
from bench.config import ClusterConfig, SweepConfig, default_cluster

# Two runs of a few epochs each: the shortest sweep that still goes through every driver step
# (claim, lock, prepare, one worker group, telemetry, summaries).
SOAK_SWEEP = dict(
    name="soak", description="tools/soak.py round", workload="blobs",
    lr=dict(reference_lr=0.05, reference_batch_size=100, scaling="linear"),
    epochs=3, global_batch_sizes=[100, 250], num_workers=[1], seeds=[0], target_accuracy=0.5,
)
FD_SLACK = 16  # descriptors the driver may gain for good (Ray clients, log files) before it counts
ACTOR_SLACK = 2  # live actors above the baseline: a trainer controller still shutting down


@dataclass
class Sample:
    """One reading of the driver's resources."""

    round: int
    elapsed_s: float
    rss_mib: float
    num_fds: int
    num_threads: int
    live_actors: int | None  # None: not counted (before Ray starts)
    ray_processes: int  # this driver's ray::* processes (idle workers, agents, trainer workers, controllers)

    HEADER = "round  elapsed_s  rss_mib  fds  threads  live_actors  ray_procs"

    def line(self, label: str = "") -> str:
        actors = "?" if self.live_actors is None else str(self.live_actors)
        return (f"{self.round:5d}  {self.elapsed_s:9.1f}  {self.rss_mib:7.1f}  {self.num_fds:3d}  "
                f"{self.num_threads:7d}  {actors:>11}  {self.ray_processes:9d}  {label}").rstrip()


# Ray's own per-node processes that are neither tasks nor actors (titles as of Ray 2.60)
RAY_SYSTEM_TITLES = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _own_ray_titles() -> list[str]:
    """Titles of the ``ray::*`` processes under this driver (the local Ray it started: its
    raylet's workers and agents), not those of other Ray instances on the machine."""
    titles = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd, name = proc.cmdline(), proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        title = cmd[0] if cmd and cmd[0].startswith("ray::") else name
        if title.startswith("ray::"):
            titles.append(title.split()[0])
    return titles


def actor_processes() -> int:
    """This driver's Ray worker processes that hold an actor (between rounds no task runs, so
    every busy worker is an actor's)."""
    return sum(1 for t in _own_ray_titles() if t not in RAY_SYSTEM_TITLES)


def state_api_actors() -> Optional[int]:
    """Live actors of the connected cluster from Ray's public state API; None where it does not
    answer (no dashboard: ray[default] missing, or a local Ray started without it)."""
    try:
        import ray
        from ray.util.state import list_actors

        address = ray.get_runtime_context().gcs_address
        return len(list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=10_000,
                               raise_on_missing_output=False))
    except Exception:  # noqa: BLE001 - any failure means this source is unavailable, not a crash
        return None


def actor_counter() -> tuple[Callable[[], Optional[int]], str]:
    """The live-actor count this soak uses throughout, and what it is."""
    if state_api_actors() is not None:
        return state_api_actors, "live actors from the Ray state API (ray.util.state.list_actors)"
    return actor_processes, ("live actors = this driver's Ray actor processes (the Ray state API needs the "
                             "dashboard, which this Ray does not run)")


def sample(round_: int, t0: float, live_actors: Callable[[], Optional[int]] = lambda: None) -> Sample:
    gc.collect()  # count what is really held, not garbage waiting for a collection
    me = psutil.Process()
    return Sample(round=round_, elapsed_s=time.monotonic() - t0, rss_mib=me.memory_info().rss / 2**20,
                  num_fds=me.num_fds(), num_threads=me.num_threads(), live_actors=live_actors(),
                  ray_processes=len(_own_ray_titles()))


def leaks(baseline: Sample, end: Sample, max_rss_growth_pct: float) -> list[str]:
    """What grew too much between the baseline (after round 1) and the end. A bounded cost
    (a cache filled once, a connection opened once) stays within the slack; a per-round leak
    over tens of rounds does not."""
    problems = []
    growth_pct = 100.0 * (end.rss_mib - baseline.rss_mib) / baseline.rss_mib
    if growth_pct > max_rss_growth_pct:
        problems.append(f"RSS grew {growth_pct:.0f}% ({baseline.rss_mib:.0f} -> {end.rss_mib:.0f} MiB; "
                        f"limit {max_rss_growth_pct:g}%)")
    if end.num_fds > baseline.num_fds + FD_SLACK:
        problems.append(f"open file descriptors grew {baseline.num_fds} -> {end.num_fds} (slack {FD_SLACK})")
    if None not in (baseline.live_actors, end.live_actors) and end.live_actors > baseline.live_actors + ACTOR_SLACK:
        problems.append(f"live Ray actors grew {baseline.live_actors} -> {end.live_actors} (slack {ACTOR_SLACK})")
    return problems


def one_round(sweep: SweepConfig, cluster: ClusterConfig, root: Path, round_: int, keep: bool) -> list[str]:
    """Run the sweep into a fresh results folder; returns the run ids that did not succeed."""
    from bench.runner import run_sweep

    folder = root / f"round-{round_:04d}"
    outcome = run_sweep(sweep, cluster, folder, say=lambda _msg: None, progress=False)
    failed = [rid for rid, status in outcome.statuses.items() if status != "success"]
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return failed


def soak(minutes: float, report_every: int, max_rss_growth_pct: float, root: Path, keep: bool) -> int:
    sweep = SweepConfig.model_validate(SOAK_SWEEP)
    cluster, _ = default_cluster()
    t0 = time.monotonic()
    deadline = t0 + 60.0 * minutes
    print(f"soak: {minutes:g} min of '{sweep.name}' sweeps ({len(sweep.global_batch_sizes)} runs each) "
          f"into {root}", flush=True)
    print(Sample.HEADER)
    print(sample(0, t0).line("start (before Ray)"), flush=True)
    launcher.connect(cluster, max(sweep.num_workers))
    live_actors, what = actor_counter()
    print(f"soak: {what}", flush=True)
    round_, baseline, failures = 0, None, []
    while round_ == 0 or time.monotonic() < deadline:
        round_ += 1
        failures += [f"round {round_}: {rid}" for rid in one_round(sweep, cluster, root, round_, keep)]
        if round_ == 1:
            baseline = sample(round_, t0, live_actors)
            print(baseline.line("baseline (after round 1)"), flush=True)
        elif round_ % report_every == 0 and time.monotonic() < deadline:  # the end line follows anyway
            print(sample(round_, t0, live_actors).line(), flush=True)
    end = sample(round_, t0, live_actors)
    print(end.line("end"), flush=True)
    problems = leaks(baseline, end, max_rss_growth_pct) if round_ > 1 else []
    problems += [f"run not successful: {f}" for f in failures]
    for p in problems:
        print(f"soak: FAIL: {p}", flush=True)
    print(f"soak: {round_} rounds, {round_ * len(sweep.global_batch_sizes)} runs in "
          f"{(time.monotonic() - t0) / 60:.1f} min: {'FAIL' if problems else 'ok'}", flush=True)
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/soak.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to keep starting rounds (default 30)")
    parser.add_argument("--report-every", type=int, default=10, help="print a reading every N rounds (default 10)")
    parser.add_argument("--max-rss-growth-pct", type=float, default=50.0,
                        help="fail if RSS grows more than this over the baseline (default 50)")
    parser.add_argument("--results-dir", help="where the rounds go (default: a temp folder, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep every round's results folder")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.report_every < 1:
        parser.error("--minutes must be > 0 and --report-every >= 1")
    own_root = args.results_dir is None
    root = Path(tempfile.mkdtemp(prefix="batchscale-soak-")) if own_root else Path(args.results_dir)
    try:
        return soak(args.minutes, args.report_every, args.max_rss_growth_pct, root, args.keep)
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130
    finally:
        launcher.shutdown()
        if own_root and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
