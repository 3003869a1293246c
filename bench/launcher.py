"""The launcher: the only module that imports ray.

Owns: connecting to the cluster named by the cluster file (or starting a local Ray), refusing a
worker group that can never start, and running the planned runs through Ray Train's
``TorchTrainer`` with one worker group per (sweep, worker count). The group's loop runs its runs
one after another and skips those the results store already holds complete, which is also how an
interrupted sweep resumes.

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

Inside the workers: rank 0 writes checkpoints straight into the run folder (``checkpoint.pt``) and a
restarted group resumes from there; metrics and checkpoints never go through ``ray.train.report``
(a barrier, 1.3-1.9 s per call with Ray 2.60). Every rank can ask whether its driver still holds
the sweep's lock (``DriverLock``): a run whose driver is gone is not completed. Ray is imported
inside functions so that ``import bench.launcher`` stays cheap.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from bench import faults
from bench.clusterprobe import check_reachable, probe
from bench.config import ClusterConfig, SweepConfig
from bench.errors import LauncherError
from bench.groupstate import (CheckpointWriter, Restart, append_record, attempts, driver_lock,
                               load_checkpoint, read_records)
from bench.placement import placement_problem, worker_resources, workers
from bench.plan import RunPlan
from bench.store import SweepDir


@dataclass
class GroupStart:
    num_workers: int
    num_runs: int
    start_s: float | None = None  # fit() called -> the first attempt's loop entered
    restarts: list[Restart] = field(default_factory=list)
    checkpoint_s: float = 0.0  # rank 0's time writing checkpoints (last attempt)
    num_checkpoints: int = 0


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


# --- the worker group's loop (runs inside each Ray Train worker) ----------------------------

def _group_loop(config: dict) -> dict:
    import torch
    import torch.distributed as dist
    import ray
    import ray.train
    import ray.train.torch

    from bench.worker import WorkerContext, execute_run

    rctx = ray.train.get_context()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    ctx = WorkerContext(rank=rctx.get_world_rank(), world_size=rctx.get_world_size(),
                        local_rank=rctx.get_local_rank(), device=device,
                        node_id=ray.get_runtime_context().get_node_id())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    writer = CheckpointWriter(config["sweep_dir"])
    ctx.checkpoint_every_epochs = config["checkpoint_every_epochs"]
    ctx.save_checkpoint = writer
    ctx.after_epoch = config["after_epoch"]
    ctx.driver_alive = config["driver_alive"]
    if ctx.rank == 0:
        append_record(config["entered_log"], {"unix_s": time.time()})
    sweep = SweepConfig.model_validate(config["sweep"])
    sweep_dir = SweepDir(config["sweep_dir"])
    plans = [RunPlan.from_dict(d) for d in config["plans"]]
    # Rank 0 decides which runs are still missing; every rank follows the same list.
    pending = [[p.run_id for p in plans if not sweep_dir.run(p.run_id).is_complete()]]
    if ctx.distributed:
        dist.broadcast_object_list(pending, src=0)
    statuses = {}
    for plan in plans:
        if plan.run_id not in pending[0]:
            continue
        go = [ctx.driver_alive is None or ctx.driver_alive()] if ctx.rank == 0 else [None]
        if ctx.distributed:
            dist.broadcast_object_list(go, src=0)
        if not go[0]:  # the driver is gone: start nothing more (Ray ends this group soon)
            break
        run_dir = sweep_dir.run(plan.run_id)
        statuses[plan.run_id] = execute_run(plan, sweep, run_dir, ctx, restored=load_checkpoint(run_dir)).status
        if ctx.rank == 0 and run_dir.is_complete():
            run_dir.checkpoint_path.unlink(missing_ok=True)
    return {"statuses": statuses, "checkpoint_s": writer.seconds, "num_checkpoints": writer.count}


# --- driver side ----------------------------------------------------------------------------

def run_groups(sweep: SweepConfig, cluster: ClusterConfig, sweep_dir: SweepDir, plans: list[RunPlan],
               *, on_group: Callable[[GroupStart], None] | None = None) -> LaunchReport:
    """Run the given (pending) plans: one TorchTrainer per worker count, in order. The caller
    holds the sweep's lock (the workers check that it still does)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, UserCallback
    from ray.train.torch import TorchConfig, TorchTrainer

    class FailureRecorder(UserCallback):
        """On Ray Train's controller: when a worker fails, note the time (for 'N s to resume')."""

        def __init__(self, path: str) -> None:
            self.path = path

        def after_exception(self, run_context: Any, worker_exceptions: dict) -> None:
            causes = sorted({type(e).__name__ for e in worker_exceptions.values()})
            append_record(self.path, {"unix_s": time.time(), "cause": ", ".join(causes)})

    report = LaunchReport()
    by_workers: dict[int, list[RunPlan]] = {}
    for plan in plans:
        by_workers.setdefault(plan.num_workers, []).append(plan)
    records = (sweep_dir.path / ".ray").resolve()
    records.mkdir(parents=True, exist_ok=True)
    storage = cluster.storage_path or str(records)
    resources = worker_resources(cluster.resources_per_worker, cluster.use_gpu)
    fault, alive = faults.from_environment(), driver_lock(sweep_dir)
    for num_workers, group in sorted(by_workers.items()):
        name = f"{sweep.name}-w{num_workers}-{time.time_ns()}"
        entered, failed = records / f"{name}.entered.jsonl", records / f"{name}.failed.jsonl"
        trainer = TorchTrainer(
            _group_loop,
            train_loop_config={
                "sweep": sweep.model_dump(mode="json"), "plans": [p.to_dict() for p in group],
                "sweep_dir": str(sweep_dir.path.resolve()), "use_gpu": cluster.use_gpu,
                "cpus_per_worker": resources.get("CPU", 1), "checkpoint_every_epochs": cluster.checkpoint_every_epochs,
                "after_epoch": fault, "driver_alive": alive, "entered_log": str(entered),
            },
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=cluster.use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend=backend_for(cluster)),
            run_config=RunConfig(name=name, storage_path=storage, callbacks=[FailureRecorder(str(failed))],
                                 failure_config=FailureConfig(max_failures=cluster.max_failures)),
        )
        t0 = time.time()
        value = getattr(_fit(trainer), "return_value", None) or {}
        start = GroupStart(num_workers=num_workers, num_runs=len(group),
                           checkpoint_s=value.get("checkpoint_s", 0.0), num_checkpoints=value.get("num_checkpoints", 0))
        start.start_s, start.restarts = attempts(read_records(entered, records), read_records(failed, records), t0)
        report.groups.append(start)
        if on_group:
            on_group(start)
    return report


def backend_for(cluster: ClusterConfig) -> str:
    """The torch.distributed backend: the cluster's choice, else NCCL on GPUs and gloo on CPUs."""
    if cluster.backend != "auto":
        return cluster.backend
    return "nccl" if cluster.use_gpu else "gloo"


def _fit(trainer: Any) -> Any:
    """``trainer.fit()`` in a helper thread while this (main) thread waits, interruptibly. Ray Train
    installs its own SIGINT handler (abort, exit 1) when fit() runs in the main thread; Python lets
    only the main thread install handlers, so from here it cannot, and Ctrl-C / SIGTERM stay with
    batchscale (one line, exit 130, the run left incomplete). tests/test_launcher.py pins this."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # handed to the main thread below
            outcome["error"] = err

    thread = threading.Thread(target=target, name="batchscale-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    err = outcome.get("error")
    if err is None:
        return outcome["result"]
    name = type(err).__name__
    if name in ("TrainingFailedError", "WorkerGroupError", "ControllerError", "RayTaskError"):
        # keep the last line of Ray's wall of text
        lines = str(err).strip().splitlines()
        raise LauncherError(f"training failed in the worker group: {lines[-1] if lines else name}") from err
    raise err
