"""The launcher: the only module that imports ray.

Owns: connecting to the cluster named by the cluster file (or starting a local
Ray), and running the planned runs through Ray Train's ``TorchTrainer`` with one
worker group per (sweep, worker count). The group's loop runs its runs one after
another and skips those the results store already holds complete, which is also
how an interrupted sweep resumes.

Metrics never travel through ``ray.train.report`` (1.3-1.9 s per call measured
with Ray 2.60); rank 0 writes each run's events and summary into the run folder.
Ray is imported inside functions so that ``import bench.launcher`` stays cheap.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench.config import ClusterConfig, SweepConfig
from bench.errors import LauncherError
from bench.plan import RunPlan
from bench.store import SweepDir


@dataclass
class GroupStart:
    num_workers: int
    num_runs: int
    start_s: float | None = None  # fit() called -> first run started training


@dataclass
class LaunchReport:
    groups: list[GroupStart] = field(default_factory=list)


# --- connecting ---------------------------------------------------------------------------

def _host_port(address: str) -> tuple[str, int]:
    addr = address.split("://", 1)[-1].rstrip("/")
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise LauncherError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.5:6379 or ray://head:10001)")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast: ray.init() on a dead address retries for a long time, a TCP connect does not."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        raise LauncherError(f"cannot reach the Ray cluster at {address} within {timeout_s:g} s "
                            f"({err.strerror or type(err).__name__}); is the head node up "
                            "(`ray status` there), and is the address in the cluster file right?") from None


_STARTED_HERE = False  # shut down only the Ray connection this process opened


def cluster_address(cluster: ClusterConfig) -> str | None:
    """Where to connect: the cluster file's ``address``; else ``RAY_ADDRESS`` when it is set (a
    ``ray job submit`` entrypoint runs with it, and there ray.init joins that cluster and refuses
    ``num_cpus``); else None: start a local Ray sized from the cluster file."""
    return cluster.address or os.environ.get("RAY_ADDRESS") or None


def connect(cluster: ClusterConfig, max_workers: int) -> None:
    global _STARTED_HERE
    import ray

    address = cluster_address(cluster)
    if address and address != "auto":
        check_reachable(address, cluster.connect_timeout_s)
    if ray.is_initialized():  # e.g. a test session's Ray, or a caller's own ray.init()
        return
    _STARTED_HERE = True
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    common = dict(log_to_driver=False, configure_logging=True, logging_level="WARNING")
    sigterm = signal.getsignal(signal.SIGTERM)  # ray.init replaces it; the CLI's clean stop needs it
    try:
        _init(ray, cluster, max_workers, common)
    finally:
        signal.signal(signal.SIGTERM, sigterm)


def _init(ray: Any, cluster: ClusterConfig, max_workers: int, common: dict) -> None:
    address = cluster_address(cluster)
    if address:
        ray.init(address=address, **common)
        return
    cpus_per_worker = float(cluster.resources_per_worker.get("CPU", 1))
    need = int(max_workers * cpus_per_worker + 0.999)
    num_cpus = cluster.local_num_cpus or max(os.cpu_count() or 1, need)
    if num_cpus < need:
        raise LauncherError(f"cluster {cluster.name!r}: local_num_cpus {num_cpus} < {need} CPUs needed by "
                            f"{max_workers} workers x {cpus_per_worker:g} CPU")
    # Dashboard off: nothing listens beyond the local Ray processes by default.
    ray.init(num_cpus=num_cpus, include_dashboard=False, **common)


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
    import ray.train
    import ray.train.torch

    from bench.worker import WorkerContext, execute_run

    rctx = ray.train.get_context()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    ctx = WorkerContext(rank=rctx.get_world_rank(), world_size=rctx.get_world_size(),
                        local_rank=rctx.get_local_rank(), device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    ctx.checkpoint_every_epochs = config["checkpoint_every_epochs"]
    ctx.save_checkpoint = _save_checkpoint
    ctx.fault = config.get("fault")
    restored = _load_checkpoint()
    sweep = SweepConfig.model_validate(config["sweep"])
    sweep_dir = SweepDir(config["sweep_dir"])
    plans = [RunPlan.from_dict(d) for d in config["plans"]]
    # Rank 0 decides which runs are still missing; every rank follows the same list.
    pending = [[p.run_id for p in plans if not sweep_dir.run(p.run_id).is_complete()]]
    if ctx.distributed:
        dist.broadcast_object_list(pending, src=0)
    todo = set(pending[0])
    entered = time.time()
    statuses = {}
    for plan in plans:
        if plan.run_id in todo:
            resume = restored if restored and restored["run_id"] == plan.run_id else None
            statuses[plan.run_id] = execute_run(plan, sweep, sweep_dir.run(plan.run_id), ctx,
                                                restored=resume).status
    return {"loop_entered_unix_s": entered, "statuses": statuses}


CHECKPOINT_FILE = "state.pt"


def _save_checkpoint(run_id: str, state: dict | None) -> None:
    """Every rank calls this (ray.train.report is a barrier); rank 0 passes the state.
    Checkpoints are the only thing that goes through report(): every few epochs at most."""
    import tempfile

    import torch
    import ray.train

    with tempfile.TemporaryDirectory(prefix="batchscale-ckpt-") as tmp:
        checkpoint = None
        if state is not None:
            torch.save(state, Path(tmp) / CHECKPOINT_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"run_id": run_id, "epoch": state["epoch"] if state else None}, checkpoint=checkpoint)


def _load_checkpoint() -> dict | None:
    """The state to resume from after a worker-group restart (None on a first start)."""
    import torch
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        # weights_only: a checkpoint on shared storage must not be able to run code in the workers.
        return torch.load(Path(directory) / CHECKPOINT_FILE, weights_only=True, map_location="cpu")


# --- driver side ----------------------------------------------------------------------------

def run_groups(sweep: SweepConfig, cluster: ClusterConfig, sweep_dir: SweepDir, plans: list[RunPlan],
               *, on_group: Callable[[GroupStart], None] | None = None) -> LaunchReport:
    """Run the given (pending) plans: one TorchTrainer per worker count, in order."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    class _Trainer(TorchTrainer):
        """Ray Train's fit() installs its own SIGINT handler that aborts and exits with code 1;
        batchscale handles Ctrl-C itself (one line, exit 130, the run left incomplete).
        `_register_sigint_handler` is private to Ray Train (2.60); without it, this is a no-op."""

        def _register_sigint_handler(self, controller: Any) -> None:
            return None

    report = LaunchReport()
    by_workers: dict[int, list[RunPlan]] = {}
    for plan in plans:
        by_workers.setdefault(plan.num_workers, []).append(plan)
    storage = cluster.storage_path or str((sweep_dir.path / ".ray").resolve())
    resources = dict(cluster.resources_per_worker)
    if cluster.use_gpu:
        resources.setdefault("GPU", 1)
    for num_workers, group in sorted(by_workers.items()):
        trainer = _Trainer(
            _group_loop,
            train_loop_config={
                "sweep": sweep.model_dump(mode="json"),
                "plans": [p.to_dict() for p in group],
                "sweep_dir": str(sweep_dir.path.resolve()),
                "use_gpu": cluster.use_gpu,
                "cpus_per_worker": resources.get("CPU", 1),
                "checkpoint_every_epochs": cluster.checkpoint_every_epochs,
                "fault": os.environ.get("BATCHSCALE_FAULT"),  # "RUN_ID:EPOCH", for fault-injection tests
            },
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=cluster.use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend=backend_for(cluster)),
            run_config=RunConfig(name=f"{sweep.name}-w{num_workers}-{int(time.time())}", storage_path=storage,
                                 failure_config=FailureConfig(max_failures=cluster.max_failures)),
        )
        start = GroupStart(num_workers=num_workers, num_runs=len(group))
        t0 = time.time()
        result = _fit(trainer)
        value = getattr(result, "return_value", None) or {}
        if "loop_entered_unix_s" in value:
            start.start_s = value["loop_entered_unix_s"] - t0
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
    try:
        return trainer.fit()
    except Exception as err:  # TrainingFailedError and friends: keep the first line, not Ray's wall of text
        name = type(err).__name__
        if name in ("TrainingFailedError", "WorkerGroupError", "ControllerError", "RayTaskError"):
            first = str(err).strip().splitlines()
            raise LauncherError(f"training failed in the worker group: {first[-1] if first else name}") from err
        raise
