"""The worker loop: one data-parallel training run, read top to bottom.

Owns: the training step (this rank's micro-batches, from ``bench.feed``, with gradient
accumulation under DDP ``no_sync`` and the LR applied per step), evaluation of the
train and test sets with metrics reduced across ranks, divergence and OOM detection,
and the run's events and summary (rank 0 writes them). Which samples a rank reads,
and from where (resident tensors or streamed files), is the feed's business.

Must not import: ray (the launcher hands in a ``WorkerContext``; tests build one
in-process), pandas. Time-to-accuracy is not computed here: analysis reads it
from the events afterwards.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench import events as ev
from bench import noise, workloads
from bench.feed import Batch, make_feed
from bench.models import build_model
from bench.plan import RunPlan
from bench.store import RunDir
from bench.summary import RunSummary
from bench.workloads.data import Data


@dataclass
class WorkerContext:
    """Where this process sits in the worker group (from Ray Train, or built by a test)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    node: str = field(default_factory=socket.gethostname)
    # Checkpoints: the launcher provides save (all ranks call it; it is a barrier under Ray)
    # and, after a worker-group restart, the state to resume this run from.
    save_checkpoint: Callable[[str, dict | None], None] | None = None
    checkpoint_every_epochs: int = 0
    fault: str | None = None  # "RUN_ID:EPOCH": kill one worker after that epoch; "RUN_ID:EPOCH:stall":
    # stall there (fault-injection and interruption tests)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


class Diverged(Exception):
    pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _all_reduce_sum(t: torch.Tensor, ctx: WorkerContext) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


STALL_S = 600.0  # BATCHSCALE_FAULT=RUN_ID:EPOCH:stall
NOISE_READ_EVERY_PROBES = 256  # bounds the pending samples in a long epoch (one sync per 256 probes)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Batch], ctx: WorkerContext,
             autocast: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over a split; each rank scores its share (the feed's
    batches) and one all-reduce combines them: a single host read per evaluation."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    for x, y in batches:
        with autocast():
            logits = model(x)
        totals[0] += (logits.argmax(1) == y).sum()
        totals[1] += F.cross_entropy(logits.float(), y, reduction="sum")
        totals[2] += y.numel()
    correct, loss_sum, count = _all_reduce_sum(totals, ctx).tolist()
    model.train()
    return correct / count, loss_sum / count


class Trainer:
    """State of one run on one rank. `run()` is the whole algorithm."""

    def __init__(self, plan: RunPlan, sweep, run_dir: RunDir, ctx: WorkerContext,
                 data: Data | None = None, restored: dict | None = None) -> None:
        self.plan, self.sweep, self.run_dir, self.ctx = plan, sweep, run_dir, ctx
        self.device = ctx.device
        torch.manual_seed(plan.seed)  # same initial weights on every rank and at every batch size
        loaded = data if data is not None else workloads.load(plan.workload, sweep.options, plan.seed)
        self.feed = make_feed(loaded, plan, ctx.rank, ctx.world_size, self.device, sweep.channels_last)
        memory_format = torch.channels_last if self.feed.channels_last else torch.contiguous_format
        model = build_model(plan.model, self.feed.input_shape, self.feed.num_classes)
        model = model.to(self.device, memory_format=memory_format)
        self.raw_model = model
        if ctx.distributed:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.model = torch.compile(model) if sweep.compile else model
        from bench.optim import build_optimizer

        self.optimizer = build_optimizer(sweep.optimizer, self.raw_model, plan.lr(0))
        self.label_smoothing = sweep.label_smoothing
        use_bf16 = sweep.precision == "bf16"
        self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16)
        self.restored = restored
        self.log = None
        if ctx.rank == 0:
            offset = restored["events_offset"] if restored else None
            self.log = ev.EventLog(run_dir.events_path, mode="w", truncate_at=offset)
        self.step = 0
        self.samples_seen = 0
        self.train_time_s = 0.0
        self.eval_time_s = 0.0
        self.t_start = time.perf_counter()
        self.initial_loss: float | None = None
        self.metrics: dict[str, float] = {}
        self.best_test_acc = -1.0
        self.epoch_times: list[tuple[float, int]] = []  # (seconds, samples) per epoch
        self.noise_ema = None  # bench.noise.NoiseScaleEMA once the first probe step runs
        self.noise_pending: list = []  # (step, bench.noise.NoiseSample) not yet read to the host

    # --- events (rank 0 only) ------------------------------------------------------------
    def emit(self, key: str, value: Any = None, **metadata: Any) -> None:
        if self.log is not None:
            self.log.log(key, value, metadata=metadata)

    def emit_interval(self, key: str, event_type: str, **metadata: Any) -> None:
        if self.log is not None:
            self.log.log(key, None, event_type=event_type, metadata=metadata)

    def _position(self, epoch: int) -> dict[str, Any]:
        return {"epoch_num": epoch, "step": self.step, "samples_count": self.samples_seen,
                "train_time_s": round(self.train_time_s, 6),
                "elapsed_s": round(time.perf_counter() - self.t_start, 6)}

    def log_hyperparameters(self) -> None:
        p, opt = self.plan, self.sweep.optimizer
        for key, value in [
            (ev.SEED, p.seed), (ev.GLOBAL_BATCH_SIZE, p.global_batch_size), (ev.NUM_WORKERS, p.num_workers),
            (ev.PER_WORKER_BATCH_SIZE, p.per_worker_batch_size), (ev.MICRO_BATCH_SIZE, p.micro_batch_size),
            (ev.GRADIENT_ACCUMULATION_STEPS, p.grad_accum_steps), (ev.OPT_NAME, opt.name),
            (ev.LR_SCALING_RULE, p.scaling), (ev.REFERENCE_LEARNING_RATE, p.reference_lr),
            (ev.REFERENCE_BATCH_SIZE, p.reference_batch_size), (ev.OPT_BASE_LEARNING_RATE, p.peak_lr),
            (ev.OPT_LEARNING_RATE_WARMUP_EPOCHS, p.warmup_epochs),
            (ev.OPT_LEARNING_RATE_WARMUP_STEPS, p.warmup_steps), (ev.OPT_WEIGHT_DECAY, opt.weight_decay),
            (ev.TRAIN_SAMPLES, p.num_train), (ev.EVAL_SAMPLES, p.num_test),
            (ev.TRAIN_EVAL_SAMPLES, self.feed.train_eval_samples),
            (ev.STEPS_PER_EPOCH, p.steps_per_epoch),
        ]:
            self.emit(key, value)

    # --- evaluation ------------------------------------------------------------------------
    def run_eval(self, epoch: int) -> None:
        _sync(self.device)
        t0 = time.perf_counter()
        self.emit_interval(ev.EVAL_START, ev.INTERVAL_START, epoch_num=epoch)
        train_acc, train_loss = evaluate(self.model, self.feed.eval_batches("train"), self.ctx,
                                         self.autocast, self.device)
        test_acc, test_loss = evaluate(self.model, self.feed.eval_batches("test"), self.ctx,
                                       self.autocast, self.device)
        pos = self._position(epoch)
        for key, value in ((ev.TRAIN_ACCURACY, train_acc), (ev.TRAIN_LOSS, train_loss),
                           (ev.EVAL_ACCURACY, test_acc), (ev.EVAL_LOSS, test_loss)):
            self.emit(key, value, **pos)
        self.emit_interval(ev.EVAL_STOP, ev.INTERVAL_END, epoch_num=epoch)
        self.metrics = {"train_acc": train_acc, "train_loss": train_loss,
                        "test_acc": test_acc, "test_loss": test_loss}
        self.best_test_acc = max(self.best_test_acc, test_acc)
        if self.initial_loss is None:
            self.initial_loss = train_loss
        limit = self.sweep.divergence_loss_factor * self.initial_loss
        if not math.isfinite(train_loss) or train_loss > limit:
            raise Diverged(f"training loss {train_loss:.4g} after step {self.step} "
                           f"(initial {self.initial_loss:.4g}, limit {limit:.4g})")
        self.eval_time_s += time.perf_counter() - t0

    # --- training ----------------------------------------------------------------------------
    def train_step(self, micro_batches: Iterable[Batch], num_global: int, step_in_epoch: int) -> torch.Tensor:
        """One optimizer step over one global batch (this rank's micro-batches of it, from the
        feed). Returns the summed loss on the device (no host synchronisation here)."""
        p = self.plan
        lr = p.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        probe = self.noise_probe(num_global)
        # Sum-reduced loss scaled by world/num_global: after DDP's mean over ranks the gradient
        # is exactly the mean over the global batch, even for a partial last batch.
        scale = p.num_workers / num_global
        loss_sum = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            last = i == p.grad_accum_steps - 1
            # Non-final micro-steps skip DDP's all-reduce; a noise-scale probe step skips it on
            # every micro-step and all-reduces once itself, after reading the local gradients.
            no_sync = self.ctx.distributed and (not last or probe is not None)
            sync = self.model.no_sync() if no_sync else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    logits = self.model(x)
                loss = F.cross_entropy(logits.float(), y, reduction="sum",
                                       label_smoothing=self.label_smoothing)
                (loss * scale).backward()
            loss_sum += loss.detach()
            if probe is not None:
                probe.after_micro_backward()
        sample = probe.finish() if probe is not None else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if sample is not None:
            self.noise_pending.append((self.step, sample))
            if len(self.noise_pending) >= NOISE_READ_EVERY_PROBES:
                self.log_noise_scale()
        if self.step < p.warmup_steps or self.step < p.steps_per_epoch or step_in_epoch == 0:
            self.emit(ev.OPT_LEARNING_RATE, lr, step=self.step)
        self.step += 1
        self.samples_seen += num_global
        return loss_sum

    # --- gradient noise scale (McCandlish et al. 2018, appendix A) ------------------------------
    def noise_probe(self, num_global: int):
        """A probe on every `noise_scale_every_steps`-th full step, when there are two batch sizes
        to compare (several workers, or gradient accumulation); None otherwise."""
        p, every = self.plan, self.sweep.noise_scale_every_steps
        if not every or self.step % every or num_global != p.global_batch_size:
            return None  # the common case: no import, no allocation on the hot path
        if noise.probe_batch_sizes(p.micro_batch_size, p.grad_accum_steps, p.num_workers) is None:
            return None
        if self.noise_ema is None:
            self.noise_ema = noise.NoiseScaleEMA()
        return noise.GradNoiseProbe(self.raw_model.parameters(), p.micro_batch_size,
                                    p.grad_accum_steps, p.num_workers)

    def log_noise_scale(self) -> None:
        """Read the pending probe samples in one host sync (at the end of an epoch, where the
        loop synchronises anyway), fold them into the EMA in step order and log each. Reading
        each probe step as it happened cost 3.5 % of step time at every 10 steps on an H200
        (results/h200/noise-overhead.json): the sync drains the queue the CPU had built ahead."""
        if not self.noise_pending:
            return
        values = noise.read_samples([sample for _, sample in self.noise_pending])
        for (step, sample), (small, big) in zip(self.noise_pending, values):
            b_simple = self.noise_ema.update(small, big, sample.b_small, sample.b_big)
            self.emit(ev.GRADIENT_NOISE_SCALE, b_simple, step=step, **self.noise_ema.metadata())
        self.noise_pending = []

    def train_epoch(self, epoch: int) -> None:
        p = self.plan
        self.emit_interval(ev.EPOCH_START, ev.INTERVAL_START, epoch_num=epoch)
        steps = min(p.steps_per_epoch, p.total_steps - self.step)
        samples_before = self.samples_seen
        _sync(self.device)
        t0 = time.perf_counter()  # input reading counts as training time (streamed data too)
        for s, (micro_batches, num_global) in enumerate(self.feed.steps(epoch, steps)):
            self.train_step(micro_batches, num_global, s)
        _sync(self.device)
        seconds = time.perf_counter() - t0
        self.log_noise_scale()
        self.train_time_s += seconds
        self.epoch_times.append((seconds, self.samples_seen - samples_before))
        self.emit_interval(ev.EPOCH_STOP, ev.INTERVAL_END, epoch_num=epoch, step=self.step,
                           epoch_train_time_s=round(seconds, 6),
                           epoch_samples=self.samples_seen - samples_before)
        if self.device.type == "cuda":
            self.emit(ev.TORCH_MEMORY, None, epoch_num=epoch,
                      max_allocated_gib=torch.cuda.max_memory_allocated(self.device) / 2**30,
                      max_reserved_gib=torch.cuda.max_memory_reserved(self.device) / 2**30)
            torch.cuda.reset_peak_memory_stats(self.device)

    def run(self) -> dict:
        p = self.plan
        status, failure = "success", None
        if self.restored:
            epoch = self.load_state(self.restored)
        else:
            self.emit_interval(ev.RUN_START, ev.INTERVAL_START)
            self.log_hyperparameters()
            epoch = 0
        try:
            if not self.restored:
                self.run_eval(0)
            while self.step < p.total_steps:
                epoch += 1
                self.train_epoch(epoch)
                if epoch % self.sweep.eval_every_epochs == 0 or self.step >= p.total_steps:
                    self.run_eval(epoch)
                self.maybe_checkpoint(epoch)
        except Diverged as err:
            status, failure = "diverged", {"reason": str(err), "step": self.step, "epoch_num": epoch}
        except torch.cuda.OutOfMemoryError as err:
            status = "oom"
            failure = {"reason": str(err).splitlines()[0], "step": self.step, "epoch_num": epoch,
                       "micro_batch_size": p.micro_batch_size,
                       "memory_reserved_gib": torch.cuda.memory_reserved(self.device) / 2**30}
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        self.emit_interval(ev.RUN_STOP, ev.INTERVAL_END, status=status, step=self.step, epoch_num=epoch,
                           **({"reason": failure["reason"]} if failure else {}))
        return self.summary(status, failure, epoch)

    # --- checkpoints ----------------------------------------------------------------------------
    def state(self, epoch: int) -> dict:
        return {
            "run_id": self.plan.run_id, "epoch": epoch, "step": self.step,
            "samples_seen": self.samples_seen, "train_time_s": self.train_time_s,
            "eval_time_s": self.eval_time_s, "elapsed_s": time.perf_counter() - self.t_start,
            "initial_loss": self.initial_loss, "metrics": self.metrics, "best_test_acc": self.best_test_acc,
            "epoch_times": self.epoch_times, "events_offset": self.log.tell() if self.log else None,
            "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
        }

    def load_state(self, state: dict) -> int:
        """Continue where the checkpoint left off: same weights, optimizer state, step (hence
        LR schedule) and epoch (hence data order, which depends only on seed and epoch)."""
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for name in ("step", "samples_seen", "train_time_s", "eval_time_s", "initial_loss",
                     "metrics", "best_test_acc"):
            setattr(self, name, state[name])
        self.epoch_times = [tuple(t) for t in state["epoch_times"]]
        self.t_start = time.perf_counter() - state["elapsed_s"]
        return int(state["epoch"])

    def maybe_checkpoint(self, epoch: int) -> None:
        every = self.ctx.checkpoint_every_epochs
        if self.ctx.save_checkpoint and every and epoch % every == 0 and self.step < self.plan.total_steps:
            self.ctx.save_checkpoint(self.plan.run_id, self.state(epoch) if self.ctx.rank == 0 else None)
        if self.ctx.fault == f"{self.plan.run_id}:{epoch}:stall":
            # A run too slow to finish before a signal lands, however fast the machine (the
            # interruption tests): it sits here until the driver stops it.
            time.sleep(STALL_S)
        if (self.ctx.fault == f"{self.plan.run_id}:{epoch}" and not self.restored
                and self.ctx.rank == self.ctx.world_size - 1):
            # Ray Train V2 registers a reported checkpoint when its controller next polls the
            # workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default); wait past that so
            # the test exercises "resume from the last checkpoint", then die without cleanup.
            # (at least 10 s: the polls lag on a loaded 2-core machine)
            time.sleep(max(10.0, 2.5 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0))))
            os._exit(17)

    def summary(self, status: str, failure: dict | None, epoch: int) -> dict:
        p, m = self.plan, self.metrics
        timed = self.epoch_times[1:] or self.epoch_times  # first epoch is warm-up for throughput
        seconds = sum(t for t, _ in timed)
        on_cuda = self.device.type == "cuda"
        return {
            "run_id": p.run_id, "sweep": p.sweep, "status": status, "failure": failure,
            "global_batch_size": p.global_batch_size, "num_workers": p.num_workers,
            "per_worker_batch_size": p.per_worker_batch_size, "micro_batch_size": p.micro_batch_size,
            "grad_accum_steps": p.grad_accum_steps, "seed": p.seed, "peak_lr": p.peak_lr,
            "epochs_completed": epoch if status == "success" else max(0, epoch - 1),
            "steps_completed": self.step, "samples_seen": self.samples_seen,
            "final_train_acc": m.get("train_acc"), "final_test_acc": m.get("test_acc"),
            "final_train_loss": _finite(m.get("train_loss")), "final_test_loss": _finite(m.get("test_loss")),
            "best_test_acc": self.best_test_acc if self.best_test_acc >= 0 else None,
            "train_time_s": self.train_time_s, "eval_time_s": self.eval_time_s,
            "wall_time_s": time.perf_counter() - self.t_start,
            "samples_per_s": sum(n for _, n in timed) / seconds if seconds > 0 else None,
            "target_accuracy": self.sweep.target_accuracy,
            "torch_peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / 2**30 if on_cuda else None,
            "torch_peak_allocated_gib": torch.cuda.max_memory_allocated(self.device) / 2**30 if on_cuda else None,
            "telemetry": None,
        }

    def close(self) -> None:
        self.feed.close()
        if self.log is not None:
            self.log.close()


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def worker_environment(ctx: WorkerContext) -> dict:
    """What rank 0 ran on: written as worker_env.json."""
    env: dict[str, Any] = {
        "hostname": ctx.node, "torch": torch.__version__, "device": str(ctx.device),
        "world_size": ctx.world_size,
        "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        "torch_num_threads": torch.get_num_threads(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(gpu_model=props.name, gpu_memory_gib=props.total_memory / 2**30,
                   gpu_uuid="GPU-" + str(props.uuid), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
        with contextlib.suppress(Exception):
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
    return env


def _gather_objects(obj: Any, ctx: WorkerContext) -> list[Any]:
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def execute_run(plan: RunPlan, sweep, run_dir: RunDir, ctx: WorkerContext, *, data: Data | None = None,
                restored: dict | None = None) -> dict:
    """Train one planned run on this rank, with telemetry; rank 0 writes the summary last."""
    from bench.telemetry import Sampler, merge_summaries

    gpu_ids: list[str] = []  # a CPU run samples no GPU, even on a GPU node
    if ctx.device.type == "cuda":
        gpu_ids = ["GPU-" + str(torch.cuda.get_device_properties(ctx.device).uuid)]
    sampler = Sampler(run_dir.telemetry_path(ctx.rank), run_id=plan.run_id, rank=ctx.rank,
                      hz=sweep.telemetry.hz, node=ctx.node, gpu_ids=gpu_ids) \
        if sweep.telemetry.enabled else None
    trainer = None
    try:
        if sampler:
            sampler.start()
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        trainer = Trainer(plan, sweep, run_dir, ctx, data, restored)
        summary = trainer.run()
    finally:
        telemetry = sampler.stop() if sampler else None
        if trainer is not None:
            trainer.close()
    telemetry_all = _gather_objects(telemetry, ctx)
    if ctx.rank == 0:
        summary["telemetry"] = merge_summaries([t for t in telemetry_all if t]) if sampler else None
        run_dir.write_json("worker_env.json", worker_environment(ctx))
        run_dir.write_summary(RunSummary.model_validate(summary))
    return summary
