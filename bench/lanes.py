"""Lanes: long-lived Ray Train worker groups that take the sweep's runs one after another.

Owns: what one lane is on Ray — its ``TorchTrainer`` (placed by Ray Train's placement group,
restarted by Ray Train on a worker failure up to ``max_failures``), the loop its workers run
(``lane_loop``: take a run from the run book, train it, say it is done, until none is left),
the callback on Ray Train's controller that hands a failed attempt's run back at once, the run
book as a Ray actor pinned to the driver's node, and ``FitThread`` (``fit()`` off the main thread,
so that Ctrl-C stays batchscale's). bench.launcher decides how many lanes run and starts them.

What a lane leaves in ``results/<sweep>/.ray/`` (bench.groupstate's JSON-line records): per lane,
when each attempt's loop was entered (start-up, restarts), when a worker failed, and one line per
run it took (run id, node, the epoch it resumed from): where each run ran, attempt by attempt.

Must not import: pandas. Ray only inside functions (as in bench.launcher), so importing this stays cheap.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config import ClusterConfig, SweepConfig
from bench.errors import LauncherError
from bench.groupstate import CheckpointWriter, append_record, load_checkpoint
from bench.plan import RunPlan
from bench.pool import RunBook
from bench.store import SweepDir

BOOK_CALL_TIMEOUT_S = 120.0  # a run-book call from a worker; the book lives on the driver's node


@dataclass(frozen=True)
class LaneFiles:
    """The lane's records under ``results/<sweep>/.ray/`` (``name``: the Ray Train run name)."""

    folder: Path
    name: str

    @property
    def entered(self) -> Path:
        return self.folder / f"{self.name}.entered.jsonl"

    @property
    def failed(self) -> Path:
        return self.folder / f"{self.name}.failed.jsonl"

    @property
    def runs(self) -> Path:
        return self.folder / f"{self.name}.runs.jsonl"


def start_book(plans: list[RunPlan], max_failures: int) -> Any:
    """The run book as a Ray actor on this (the driver's) node: 0 CPUs, never restarted; it dies
    with the driver, and the workers then read every run as no longer theirs."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0, max_restarts=0)(RunBook)
    return actor.options(scheduling_strategy=here).remote(
        [(p.run_id, p.num_workers) for p in plans], max_failures)


@dataclass(frozen=True)
class HoldsRun:
    """``WorkerContext.driver_alive`` for one run on rank 0: the driver still holds the sweep's
    lock, and this lane attempt still holds the run in the book (a run handed back after a
    failure that this attempt only seemed to survive must not be completed twice). Any error
    reads as no."""

    lock_alive: Any  # bench.groupstate.DriverLock, or None
    book: Any
    token: str
    run_id: str

    def __call__(self) -> bool:
        import ray

        if self.lock_alive is not None and not self.lock_alive():
            return False
        try:
            return bool(ray.get(self.book.owns.remote(self.token, self.run_id), timeout=BOOK_CALL_TIMEOUT_S))
        except Exception:  # the book is gone with its driver, or unreachable
            return False


def lane_loop(config: dict) -> dict:
    """Runs in every worker of a lane: take a run (rank 0 asks the book, every rank follows),
    train it, repeat until the book has none for this worker count (or ``runs_per_lane`` is
    reached, or the driver is gone)."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from bench.worker import WorkerContext, execute_run

    rctx = ray.train.get_context()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    node_id = ray.get_runtime_context().get_node_id()
    ctx = WorkerContext(rank=rctx.get_world_rank(), world_size=rctx.get_world_size(),
                        local_rank=rctx.get_local_rank(), device=device, node_id=node_id)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))  # the threads its resources give it
    writer = CheckpointWriter(config["sweep_dir"])
    ctx.checkpoint_every_epochs = config["checkpoint_every_epochs"]
    ctx.save_checkpoint = writer
    ctx.after_epoch = config["after_epoch"]
    lock_alive, book, lane = config["driver_alive"], config["book"], config["lane"]
    files = LaneFiles(Path(config["records"]), config["name"])
    token = uuid.uuid4().hex
    if ctx.rank == 0:
        append_record(str(files.entered), {"unix_s": time.time()})
        ray.get(book.enter.remote(lane, token, ctx.world_size, node_id), timeout=BOOK_CALL_TIMEOUT_S)
    sweep = SweepConfig.model_validate(config["sweep"])
    sweep_dir = SweepDir(config["sweep_dir"])
    plans = {d["run_id"]: RunPlan.from_dict(d) for d in config["plans"]}
    statuses: dict[str, str] = {}
    limit = config["runs_per_lane"]
    while True:
        take: list[str | None] = [None]
        if ctx.rank == 0 and (limit is None or len(statuses) < limit) and (lock_alive is None or lock_alive()):
            take = [ray.get(book.take.remote(token), timeout=BOOK_CALL_TIMEOUT_S)]
        if ctx.distributed:
            dist.broadcast_object_list(take, src=0)
        run_id = take[0]
        if run_id is None:  # none left for this worker count, or the driver is gone
            break
        run_dir = sweep_dir.run(run_id)
        restored = load_checkpoint(run_dir)  # left by an attempt that died holding this run
        ctx.driver_alive = lock_alive
        if ctx.rank == 0:
            append_record(str(files.runs), {"unix_s": time.time(), "run_id": run_id, "lane": lane, "node_id": node_id,
                                            "resumed_from_epoch": restored["epoch"] if restored else None})
            ctx.driver_alive = HoldsRun(lock_alive, book, token, run_id)
        statuses[run_id] = execute_run(plans[run_id], sweep, run_dir, ctx, restored=restored).status
        if ctx.rank == 0:
            if run_dir.is_complete():
                run_dir.checkpoint_path.unlink(missing_ok=True)
            ray.get(book.done.remote(token, run_id), timeout=BOOK_CALL_TIMEOUT_S)
    return {"statuses": statuses, "checkpoint_s": writer.seconds, "num_checkpoints": writer.count}


def build_trainer(sweep: SweepConfig, cluster: ClusterConfig, sweep_dir: SweepDir, plans: list[RunPlan], *,
                  lane: int, num_workers: int, book: Any, files: LaneFiles, resources: dict[str, float],
                  backend: str, fault: Any, driver_alive: Any, runs_per_lane: int | None) -> Any:
    """One lane's TorchTrainer: ``num_workers`` workers of ``resources`` each, placed by Ray
    Train's placement group; ``plans``: the runs of that worker count it may be handed."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, UserCallback
    from ray.train.torch import TorchConfig, TorchTrainer

    class FailureRecorder(UserCallback):
        """On Ray Train's controller (the driver's node): when a worker fails, note the time (for
        'N s to resume') and hand the failed attempt's run back to the book at once, so that a
        live lane resumes it from its checkpoint without waiting for this lane's restart."""

        def __init__(self, path: str, book: Any, lane: int) -> None:
            self.path, self.book, self.lane = path, book, lane

        def after_exception(self, run_context: Any, worker_exceptions: dict) -> None:
            now = time.time()
            causes = sorted({type(e).__name__ for e in worker_exceptions.values()})
            append_record(self.path, {"unix_s": now, "cause": ", ".join(causes)})
            self.book.release.remote(self.lane, now)  # not awaited: the controller's loop goes on

    return TorchTrainer(
        lane_loop,
        train_loop_config={
            "sweep": sweep.model_dump(mode="json"), "plans": [p.to_dict() for p in plans],
            "sweep_dir": str(sweep_dir.path.resolve()), "use_gpu": cluster.use_gpu,
            "cpus_per_worker": resources.get("CPU", 1), "checkpoint_every_epochs": cluster.checkpoint_every_epochs,
            "after_epoch": fault, "driver_alive": driver_alive, "book": book, "lane": lane,
            "records": str(files.folder), "name": files.name, "runs_per_lane": runs_per_lane,
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=cluster.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=backend),
        run_config=RunConfig(name=files.name, storage_path=cluster.storage_path or str(files.folder),
                             callbacks=[FailureRecorder(str(files.failed), book, lane)],
                             failure_config=FailureConfig(max_failures=cluster.max_failures)),
    )


class FitThread:
    """``trainer.fit()`` in a helper thread. Ray Train installs its own SIGINT handler (abort,
    exit 1) when fit() runs in the main thread; Python lets only the main thread install
    handlers, so from here it cannot, and Ctrl-C / SIGTERM stay with batchscale (one line, exit
    130, the runs in progress left incomplete). tests/test_launcher.py pins this."""

    def __init__(self, trainer: Any, name: str = "batchscale-fit") -> None:
        self._trainer = trainer
        self._outcome: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._target, name=name, daemon=True)
        self._thread.start()

    def _target(self) -> None:
        try:
            self._outcome["result"] = self._trainer.fit()
        except BaseException as err:  # handed to the main thread by result()
            self._outcome["error"] = err

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self) -> Any:
        """Wait (interruptibly) for fit(); its Result, or a LauncherError in one line."""
        while self._thread.is_alive():
            self._thread.join(0.2)
        err = self._outcome.get("error")
        if err is None:
            return self._outcome["result"]
        name = type(err).__name__
        if name in ("TrainingFailedError", "WorkerGroupError", "ControllerError", "RayTaskError"):
            lines = str(err).strip().splitlines()  # keep the last line of Ray's wall of text
            raise LauncherError(f"training failed in the worker group: {lines[-1] if lines else name}") from err
        raise err
