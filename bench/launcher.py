"""The launcher: connecting to Ray, and deciding how many lanes run the sweep at once.

Owns: connecting to the cluster named by the cluster file (or starting a local Ray), refusing a
worker group that can never start, and running the planned runs on *lanes* (bench.lanes): Ray
Train worker groups that each take runs of their worker count from the run book (bench.pool)
until none is left. ``max_concurrent_runs`` (sweep file) says how many lanes may run at once;
``auto`` as many as the cluster's workers hold (bench.placement.worker_slots). Where each lane's
workers go is Ray's decision (Ray Train's placement group). Complete runs are never planned
again (bench.runner), which is also how an interrupted sweep resumes.

Failing fast and quietly, in this order (bench.runner calls these around its folder checks):

- ``preflight()`` needs no Ray in this process. For a local Ray it checks the node that Ray would
  have (CPUs, GPUs torch can see, no custom resources); for an existing cluster it connects with a
  TCP check and then joins once in a child process (``probe``) that is killed after
  ``connect_timeout_s``. The child, not this process, is where Ray's C++ core can hang or print its
  connection warnings (an HTTP server on the port: 400 s of them), so neither reaches the user.
- ``connect()`` starts or joins Ray, then compares what the largest worker group needs with the
  live nodes (``bench.placement``), or with what the autoscaler can add, before any ``fit()``.
  A local Ray starts with ``RAY_AUTH_MODE`` set explicitly (to ``token``, Ray's own default), which
  is the supported way to keep Ray's token-authentication notice off the terminal.

Inside the workers (bench.lanes): rank 0 writes checkpoints straight into the run folder
(``checkpoint.pt``), and whichever lane takes the run next after a failure resumes from there; metrics and checkpoints never go through ``ray.train.report``
(a barrier, 1.3-1.9 s per call with Ray 2.60). Every rank can ask whether its driver still holds
the sweep's lock (``DriverLock``): a run whose driver is gone is not completed. Only this module
and bench.lanes import ray, inside functions, so that ``import bench.launcher`` stays cheap.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench import faults, lanes
from bench.clusterprobe import check_reachable, probe
from bench.config import ClusterConfig, SweepConfig
from bench.errors import LauncherError
from bench.groupstate import Restart, attempts, driver_lock, read_json_records, read_records
from bench.placement import fmt_resources, placement_problem, worker_resources, worker_slots, workers
from bench.pool import lanes_to_start
from bench.plan import RunPlan
from bench.store import SweepDir


@dataclass
class GroupStart:
    """What one lane (worker group) did."""

    num_workers: int
    num_runs: int  # distinct runs it took
    start_s: float | None = None  # fit() called -> the first attempt's loop entered
    restarts: list[Restart] = field(default_factory=list)
    checkpoint_s: float = 0.0  # rank 0's time writing checkpoints (last attempt)
    num_checkpoints: int = 0
    lane: int = 1  # numbered in the order the lanes started
    nodes: list[str] = field(default_factory=list)  # its rank 0's Ray nodes (short ids), on >1 node
    error: str | None = None  # why it failed for good, in one line


@dataclass
class LaunchReport:
    groups: list[GroupStart] = field(default_factory=list)


# --- before Ray: what a local Ray would have; an existing cluster joined in a child process ----

_STARTED_HERE = False  # shut down only the Ray connection this process opened


def cluster_address(cluster: ClusterConfig) -> str | None:
    """Where to connect: the cluster file's ``address``; else ``RAY_ADDRESS`` when it is set (a
    ``ray job submit`` entrypoint runs with it, and there ray.init joins that cluster and refuses
    ``num_cpus``); else None: start a local Ray sized from the cluster file."""
    return cluster.address or os.environ.get("RAY_ADDRESS") or None


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def preflight(cluster: ClusterConfig, max_workers: int) -> None:
    """Every check that needs no Ray in this process; raises LauncherError (one line). Where this
    process is already connected (a test session's Ray, a caller's own ray.init()), connect() keeps
    that connection and checks its live nodes; only the address's TCP check runs here then."""
    address = cluster_address(cluster)
    if address not in (None, "auto"):
        check_reachable(address, cluster.connect_timeout_s)
    if _ray_connected():
        return
    if address is None:
        _check_local(cluster, max_workers)
    else:
        probe(address, cluster.connect_timeout_s)


SIZED_AT_START = ("memory", "object_store_memory")  # a local Ray sizes these itself: checked live
LOCAL_RESOURCES = ("CPU", "GPU", *SIZED_AT_START)  # all a local Ray defines


def local_num_cpus(cluster: ClusterConfig, max_workers: int) -> int:
    need = int(max_workers * float(cluster.resources_per_worker.get("CPU", 1)) + 0.999)
    return cluster.local_num_cpus or max(os.cpu_count() or 1, need)


def local_num_gpus() -> int:
    """GPUs a local Ray gets (passed to ray.init, so Ray and this check agree): those torch sees,
    which respects CUDA_VISIBLE_DEVICES. Imports torch, so only asked when use_gpu is set."""
    import torch

    return torch.cuda.device_count()


def _check_local(cluster: ClusterConfig, max_workers: int) -> None:
    need = worker_resources(cluster.resources_per_worker, cluster.use_gpu)
    node = {"CPU": float(local_num_cpus(cluster, max_workers))}
    if "GPU" in need:
        node["GPU"] = float(local_num_gpus())
    sized = {name: amount for name, amount in need.items() if name not in SIZED_AT_START}
    problem = placement_problem(sized, max_workers, [node], where="a local Ray on this machine")
    if problem:
        hint = ""
        if node.get("GPU") == 0:
            hint = "; torch sees no CUDA device here: set use_gpu: false (backend gloo) or run where a GPU is visible"
        elif any(name not in LOCAL_RESOURCES for name in need):
            hint = "; a custom resource needs a cluster whose nodes declare it (`ray start --resources`)"
        raise LauncherError(f"cluster {cluster.name!r}: cannot start {workers(max_workers)}: {problem}{hint}")


def _probe_child() -> None:
    """The probe process (bench.clusterprobe): import ray, say so, join the cluster at argv[1],
    say so (or say why not), leave."""
    import ray

    print("imported", flush=True)
    try:
        ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
    except Exception as err:  # ConnectionError (nothing at "auto"), AuthenticationError, version mismatch
        first = (str(err).strip().splitlines() or [""])[0]
        print(f"error: {type(err).__name__}: {first[:300]}", flush=True)
        raise SystemExit(1) from None
    print("joined", flush=True)
    ray.shutdown()


# --- connecting, and refusing a group that cannot start ------------------------------------

def connect(cluster: ClusterConfig, max_workers: int) -> None:
    global _STARTED_HERE
    address = cluster_address(cluster)
    if address is None and "ray" not in sys.modules:
        # Ray reads RAY_AUTH_MODE once, at import: set explicitly, Ray starts with token
        # authentication (its default for a new local cluster) and prints no notice about it.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if not ray.is_initialized():  # else e.g. a test session's Ray, or a caller's own ray.init()
        _STARTED_HERE = True
        os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
        common = dict(log_to_driver=False, configure_logging=True, logging_level="WARNING")
        sigterm = signal.getsignal(signal.SIGTERM)  # ray.init replaces it; the CLI's clean stop needs it
        try:
            if address:
                ray.init(address=address, **common)
            else:  # Dashboard off: nothing listens beyond the local Ray processes by default.
                gpus = {"num_gpus": local_num_gpus()} if cluster.use_gpu else {}
                ray.init(num_cpus=local_num_cpus(cluster, max_workers), include_dashboard=False, **gpus, **common)
        except (ConnectionError, RuntimeError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise LauncherError(f"cannot {'join' if address else 'start'} Ray: {first[:300]}") from None
        finally:
            signal.signal(signal.SIGTERM, sigterm)
    check_resources(cluster, max_workers)


def check_resources(cluster: ClusterConfig, max_workers: int) -> None:
    """Before any fit(): the largest worker group fits the live nodes (or the autoscaler's
    ceiling); Ray would otherwise wait for it forever, silently."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    need = worker_resources(cluster.resources_per_worker, cluster.use_gpu)
    ceiling = autoscaler_max_resources()
    problem = placement_problem(need, max_workers, nodes, max_totals=ceiling,
                                where="the Ray cluster" + (" and its autoscaler" if ceiling else ""))
    if problem:
        raise LauncherError(f"cluster {cluster.name!r}: cannot start {workers(max_workers)}: {problem}")


def autoscaler_max_resources() -> dict[str, float] | None:
    """The most of each resource the cluster's autoscaler can provide, from the node types it
    publishes in the GCS; None where none are published (a local Ray, a fixed cluster, autoscaler
    v1). Private Ray API (the source Ray Train V2's own pre-start check reads, Ray 2.60);
    tests/test_launcher.py pins it. Without it the live nodes are taken as all there will be."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config() or None
    except Exception:  # moved or failed: fall back to the live nodes
        return None


def shutdown() -> None:
    global _STARTED_HERE
    if not _STARTED_HERE:
        return
    import ray

    ray.shutdown()
    _STARTED_HERE = False


# --- running the sweep: lanes, as many at once as allowed and as fit ---------------------------

POLL_S = 0.5  # the driver's look at the run book and its lanes


@dataclass(frozen=True)
class Concurrency:
    max_lanes: int  # max_concurrent_runs (auto: one lane per run at most)
    worker_slots: int  # workers the cluster holds at once (bench.placement.worker_slots)
    at_once: int  # runs of the smallest worker count that go at once
    text: str  # what to tell the user; empty when runs go one at a time as asked


def num_alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def concurrency(setting: int | str, cluster: ClusterConfig, plans: list[RunPlan]) -> Concurrency:
    """How many lanes may run at once: ``max_concurrent_runs`` (N; auto sets no limit of its own),
    within the workers the live cluster (or its autoscaler's ceiling) holds at once. Ray places
    each lane's workers; this only decides how many lanes ask."""
    import ray

    need = worker_resources(cluster.resources_per_worker, cluster.use_gpu)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    slots = worker_slots(need, nodes, max_totals=autoscaler_max_resources())
    max_lanes = max(1, len(plans)) if setting == "auto" else int(setting)
    smallest = min((p.num_workers for p in plans), default=1)
    at_once = min(max_lanes, max(1, slots // smallest), sum(p.num_workers == smallest for p in plans) or 1)
    text = ""
    if setting != 1:
        text = (f"max_concurrent_runs {setting}: up to {at_once} run{'s' * (at_once != 1)} of {workers(smallest)} "
                f"at once (the cluster holds {slots} workers of {fmt_resources(need)})")
    return Concurrency(max_lanes, slots, at_once, text)


@dataclass
class _Lane:
    index: int
    num_workers: int
    files: lanes.LaneFiles
    thread: lanes.FitThread
    fit_unix_s: float


def run_groups(sweep: SweepConfig, cluster: ClusterConfig, sweep_dir: SweepDir, plans: list[RunPlan], *,
               on_group: Callable[[GroupStart], None] | None = None,
               on_holders: Callable[[dict[str, tuple[int, str | None]]], None] | None = None,
               limits: Concurrency | None = None, runs_per_lane: int | None = None) -> LaunchReport:
    """Run the given (pending) plans on lanes: worker groups that each take runs of their worker
    count from the run book until none is left. As many lanes run at once as ``limits`` allow
    (smallest worker count first); a lane that ends while runs of its count wait or were handed
    back is replaced; a lane that failed for good (Ray Train's restarts used up) lets the others
    finish and then fails the sweep. ``runs_per_lane``: end each lane after that many runs (one
    start per run; bench.perf.concurrency compares it with the pool). The caller holds the
    sweep's lock (the workers check that it still does)."""
    import ray

    limits = limits or concurrency(sweep.max_concurrent_runs, cluster, plans)
    records = (sweep_dir.path / ".ray").resolve()
    records.mkdir(parents=True, exist_ok=True)
    resources = worker_resources(cluster.resources_per_worker, cluster.use_gpu)
    by_workers: dict[int, list[RunPlan]] = {}
    for plan in plans:
        by_workers.setdefault(plan.num_workers, []).append(plan)
    fault, alive = faults.from_environment(), driver_lock(sweep_dir)
    book = lanes.start_book(plans, cluster.max_failures)
    multi_node = num_alive_nodes() > 1
    report, running, errors = LaunchReport(), [], []
    numbers = itertools.count(1)

    def start(num_workers: int) -> _Lane:
        index = next(numbers)
        files = lanes.LaneFiles(records, f"{sweep.name}-w{num_workers}-l{index}-{time.time_ns()}")
        trainer = lanes.build_trainer(sweep, cluster, sweep_dir, by_workers[num_workers], lane=index,
                                      num_workers=num_workers, book=book, files=files, resources=resources,
                                      backend=backend_for(cluster), fault=fault, driver_alive=alive,
                                      runs_per_lane=runs_per_lane)
        fit_unix_s = time.time()
        return _Lane(index, num_workers, files, lanes.FitThread(trainer, name=f"batchscale-lane-{index}"), fit_unix_s)

    while True:
        for lane in [lane for lane in running if not lane.thread.running]:
            running.remove(lane)
            ray.get(book.release.remote(lane.index))  # what it still held goes back (or is given up)
            group = _ended(lane, records, multi_node)
            report.groups.append(group)
            errors += [group.error] if group.error else []
            if on_group:
                on_group(group)
        snapshot = ray.get(book.snapshot.remote())
        if on_holders:
            on_holders(snapshot.holders)
        if not errors:  # after a lane failed for good, the live lanes finish and no new one starts
            live = Counter(lane.num_workers for lane in running)
            running += [start(w) for w in lanes_to_start(snapshot, live, max_lanes=limits.max_lanes,
                                                         worker_slots=limits.worker_slots)]
        if not running:
            break
        time.sleep(POLL_S)
    if errors:
        raise LauncherError(errors[0])
    if snapshot.outstanding:  # cannot happen while the largest group fits (check_resources)
        raise LauncherError(f"{snapshot.outstanding} runs were left unstarted: no lane could take them")
    return report


def _ended(lane: _Lane, records: Path, multi_node: bool) -> GroupStart:
    """What a lane did, from its fit() result and its records: runs taken, start-up, restarts."""
    value: dict = {}
    error = None
    try:
        value = getattr(lane.thread.result(), "return_value", None) or {}
    except LauncherError as err:
        error = str(err)
    taken = read_json_records(lane.files.runs, records)
    group = GroupStart(num_workers=lane.num_workers, num_runs=len({r.get("run_id") for r in taken}),
                       checkpoint_s=value.get("checkpoint_s", 0.0), num_checkpoints=value.get("num_checkpoints", 0),
                       lane=lane.index, error=error)
    group.start_s, group.restarts = attempts(read_records(lane.files.entered, records),
                                             read_records(lane.files.failed, records), lane.fit_unix_s)
    if multi_node:
        group.nodes = sorted({str(r.get("node_id"))[:8] for r in taken if r.get("node_id")})
    return group


def backend_for(cluster: ClusterConfig) -> str:
    """The torch.distributed backend: the cluster's choice, else NCCL on GPUs and gloo on CPUs."""
    if cluster.backend != "auto":
        return cluster.backend
    return "nccl" if cluster.use_gpu else "gloo"
