"""The worker loop: one data-parallel training run, read top to bottom.

Owns: the order of a run on one rank — set-up (timed as MLPerf's init interval), training in
segments between evaluations (``RunPlan.eval_due``: epoch ends, every N steps, or a geometric
schedule), evaluation of the train and test sets with metrics reduced across ranks, divergence
judged on the training loss the optimizer saw (``bench.divergence``), OOM handling, per-run
memory (``bench.memory``), the gradient-noise-scale probe's bookkeeping, checkpoints, and the
run's events and summary (rank 0 writes them). The step itself is ``bench.step.TrainStep``
(shared with the memory probe and the benchmarks); which samples a rank reads, and from
where, is ``bench.feed``'s business.

Must not import: ray (the launcher hands in a ``WorkerContext``; tests build one in-process),
pandas. Time-to-accuracy is not computed here: analysis reads it from the events afterwards.
"""

from __future__ import annotations

import math
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from bench import events as ev
from bench import noise, workloads
from bench.comm import ddp_bucket_sizes
from bench.divergence import DivergenceMonitor, Verdict, describe
from bench.feed import Batch, make_feed
from bench.hardware import merge_views, rank_view, worker_environment
from bench.memory import RunMemory
from bench.models import build_model
from bench.optim import build_optimizer
from bench.plan import RunPlan
from bench.step import TrainStep, evaluate  # evaluate: also bench.memprobe's (shared pass)
from bench.store import RunDir
from bench.summary import SCHEMA_VERSION, Failure, RunSummary, TelemetrySummary
from bench.workloads.data import Data


@dataclass
class WorkerContext:
    """Where this process sits in the worker group (from Ray Train, or built by a test)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    node: str = field(default_factory=socket.gethostname)
    node_id: str | None = None  # the Ray node this rank runs on (None without Ray)
    # Checkpoints: every rank calls save_checkpoint(run_id, state) (state on rank 0 only);
    # after a worker-group restart, ``restored`` state is handed to the run it belongs to.
    save_checkpoint: Callable[[str, dict | None], None] | None = None
    checkpoint_every_epochs: int = 0
    # Called at every epoch end (fault-injection tests): (run_id, epoch, restored, rank, world_size).
    after_epoch: Callable[[str, int, bool, int, int], None] | None = None
    # False once the driver that started this run is gone: the summary is then not written,
    # so the run stays incomplete and the next `batchscale run` redoes it.
    driver_alive: Callable[[], bool] | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


class Diverged(Exception):
    def __init__(self, verdict: Verdict, reason: str) -> None:
        super().__init__(reason)
        self.verdict = verdict


class DriverGone(Exception):
    """The driver died: stop without completing the run (it stays incomplete)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


NOISE_READ_EVERY_PROBES = 256  # bounds the pending samples in a long epoch (one sync per 256 probes)
LOSS_READ_EVERY_STEPS = 4096  # bounds the pending per-step losses between synchronisation points


class Trainer:
    """State of one run on one rank. ``run()`` is the whole algorithm."""

    def __init__(self, plan: RunPlan, sweep, run_dir: RunDir, ctx: WorkerContext,
                 data: Data | None = None, restored: dict | None = None, memory: RunMemory | None = None) -> None:
        self.plan, self.sweep, self.run_dir, self.ctx = plan, sweep, run_dir, ctx
        self.device, self.restored = ctx.device, restored
        self.log = None
        if ctx.rank == 0:
            offset = restored["events_offset"] if restored else None
            self.log = ev.EventLog(run_dir.events_path, mode="w", truncate_at=offset)
        if not restored:
            self.emit_interval(ev.INIT_START, ev.INTERVAL_START)
        torch.manual_seed(plan.seed)  # same initial weights on every rank and at every batch size
        loaded = data if data is not None else workloads.load(plan.workload, sweep.options, plan.seed)
        self.feed = make_feed(loaded, plan, ctx.rank, ctx.world_size, self.device, sweep.channels_last,
                              train_eval_samples=sweep.train_eval_samples, options=sweep.options)
        memory_format = torch.channels_last if self.feed.channels_last else torch.contiguous_format
        self.raw_model = build_model(plan.model, self.feed.input_shape, self.feed.num_classes).to(
            self.device, memory_format=memory_format)
        model = self.raw_model
        self.noise_hook = None
        if ctx.distributed:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device] if self.device.type == "cuda" else None)
            if sweep.noise_scale_every_steps:
                self.noise_hook = noise.DDPNoiseHook(ctx.world_size)
                model.register_comm_hook(self.noise_hook, noise.ddp_noise_hook)
        self.model = torch.compile(model) if sweep.compile else model
        self.optimizer = build_optimizer(sweep.optimizer, self.raw_model, plan.lr(0))
        self.gradient_sizes = [p.numel() * p.element_size() for p in self.raw_model.parameters() if p.requires_grad]
        use_bf16 = sweep.precision == "bf16"
        self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16)
        self.train_step = TrainStep(self.model, self.optimizer, num_workers=plan.num_workers,
                                    grad_accum_steps=plan.grad_accum_steps, distributed=ctx.distributed,
                                    label_smoothing=sweep.label_smoothing, autocast=self.autocast)
        self.step = 0
        self.samples_seen = 0
        self.train_time_s = 0.0
        self.eval_time_s = 0.0
        self.t_start = time.perf_counter()
        self.metrics: dict[str, float] = {}
        self.best_test_acc = -1.0
        self.epoch_times: list[tuple[float, int]] = []  # (seconds, samples) per epoch
        self.divergence = DivergenceMonitor(sweep.divergence_loss_factor)
        self.loss_pending: list[tuple[int, torch.Tensor, int]] = []  # (step, summed loss, targets)
        self.noise_ema = None  # bench.noise.NoiseScaleEMA once the first probe step runs
        self.noise_pending: list = []  # (step, bench.noise.NoiseSample) not yet read to the host
        self.memory = memory  # started by execute_run before the sampler (None on CPU)
        if not restored:
            self.emit_interval(ev.INIT_STOP, ev.INTERVAL_END)

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
        opt = self.sweep.optimizer
        for key, value in ev.hyperparameters(self.plan, opt.name, opt.weight_decay, self.feed.train_eval_samples):
            self.emit(key, value)
        if self.plan.batch_unit == "tokens":  # FLOPs per token, entropy floor (bench.lm.feed.run_facts)
            from bench.lm.feed import run_facts

            for key, value in run_facts(self.feed, self.raw_model):
                self.emit(key, value)

    # --- evaluation ------------------------------------------------------------------------
    def run_eval(self, epoch: int) -> None:
        _sync(self.device)
        t0 = time.perf_counter()
        if self.memory:
            self.memory.begin("eval")
        self.emit_interval(ev.EVAL_START, ev.INTERVAL_START, epoch_num=epoch)
        train_acc, train_loss = evaluate(self.model, self.feed.eval_batches("train"), self.ctx.distributed,
                                         self.autocast, self.device)
        test_acc, test_loss = evaluate(self.model, self.feed.eval_batches("test"), self.ctx.distributed,
                                       self.autocast, self.device)
        pos = self._position(epoch)
        for key, value in ((ev.TRAIN_ACCURACY, train_acc), (ev.TRAIN_LOSS, train_loss),
                           (ev.EVAL_ACCURACY, test_acc), (ev.EVAL_LOSS, test_loss)):
            self.emit(key, value, **pos)
        self.emit_interval(ev.EVAL_STOP, ev.INTERVAL_END, epoch_num=epoch)
        self.metrics = {"train_acc": train_acc, "train_loss": train_loss,
                        "test_acc": test_acc, "test_loss": test_loss}
        self.best_test_acc = max(self.best_test_acc, test_acc)
        self.eval_time_s += time.perf_counter() - t0

    # --- training ----------------------------------------------------------------------------
    def one_step(self, micro_batches: Iterable[Batch], num_global: int, step_in_epoch: int) -> None:
        """One optimizer step, with the LR of this step and, every k steps, a noise-scale probe."""
        p = self.plan
        lr = p.lr(self.step)
        probe = self._noise_probe(num_global)
        loss_sum = self.train_step(micro_batches, num_global, lr,
                                   observer=probe if isinstance(probe, noise.MicroBatchProbe) else None)
        self.loss_pending.append((self.step, loss_sum, num_global))
        if probe is not None:
            sample = probe.sample if isinstance(probe, noise.MicroBatchProbe) else probe.take()
            self.noise_pending.append((self.step, sample))
        if self.step < p.warmup_steps or self.step < p.steps_per_epoch or step_in_epoch == 0:
            self.emit(ev.OPT_LEARNING_RATE, lr, step=self.step)
        self.step += 1
        self.samples_seen += num_global
        if len(self.noise_pending) >= NOISE_READ_EVERY_PROBES or len(self.loss_pending) >= LOSS_READ_EVERY_STEPS:
            self.read_pending()  # a sync, bounded to once per thousands of steps

    def _noise_probe(self, num_global: int):
        """A probe on every ``noise_scale_every_steps``-th full step when there are two batch sizes
        to compare (several workers, or gradient accumulation); None otherwise."""
        p, every = self.plan, self.sweep.noise_scale_every_steps
        if not every or self.step % every or num_global != p.global_batch_size:
            return None  # the common case
        sizes = noise.probe_batch_sizes(p.micro_batch_size, p.grad_accum_steps, p.num_workers)
        if sizes is None:
            return None
        if self.noise_ema is None:
            self.noise_ema = noise.NoiseScaleEMA()
        if self.noise_hook is not None:
            self.noise_hook.arm(*sizes)
            return self.noise_hook
        return noise.MicroBatchProbe(self.raw_model.parameters(), p.micro_batch_size, p.grad_accum_steps)

    def read_pending(self) -> None:
        """Read the steps' losses and noise samples kept on the device, in one host sync each (the
        loop calls this where it synchronises anyway), judge divergence, log the noise scale."""
        if self.noise_pending:
            values = noise.read_samples([s for _, s in self.noise_pending],
                                        self.ctx.world_size if self.ctx.distributed else 1)
            for (step, sample), (small, big) in zip(self.noise_pending, values):
                b_simple = self.noise_ema.update(small, big, sample.b_small, sample.b_big)
                self.emit(ev.GRADIENT_NOISE_SCALE, b_simple, step=step, **self.noise_ema.metadata())
            self.noise_pending = []
        if not self.loss_pending:
            return
        first, pending, self.loss_pending = self.loss_pending[0][0], self.loss_pending, []
        sums = torch.stack([loss.double() for _, loss, _ in pending])
        if self.ctx.distributed:
            dist.all_reduce(sums)  # every rank judges the same global losses
        losses = [s / n for s, (_, _, n) in zip(sums.tolist(), pending)]
        verdict = self.divergence.feed(first, losses)
        if verdict is not None:
            p = self.plan
            lr, in_warmup = p.lr(verdict.step), verdict.step < p.warmup_steps
            raise Diverged(verdict, describe(verdict, lr=lr, peak_lr=p.peak_lr, in_warmup=in_warmup))

    def train_epoch(self, epoch: int) -> None:
        """One epoch's steps, split into training segments by the evaluations ``eval_due`` asks for
        (timed apart: train_time_s excludes evaluation; input reading counts as training)."""
        p = self.plan
        self.emit_interval(ev.EPOCH_START, ev.INTERVAL_START, epoch_num=epoch)
        steps = min(p.steps_per_epoch, p.total_steps - self.step)
        samples_before, epoch_s = self.samples_seen, 0.0
        self._begin_segment()
        t0 = time.perf_counter()
        for s, (micro_batches, num_global) in enumerate(self.feed.steps(epoch, steps)):
            self.one_step(micro_batches, num_global, s)
            if p.eval_due(self.step) and s < steps - 1:  # mid-epoch; the epoch end evaluates below
                _sync(self.device)
                epoch_s += time.perf_counter() - t0
                self._end_segment(time.perf_counter() - t0)
                self.read_pending()
                self.run_eval(epoch)
                self._begin_segment()
                t0 = time.perf_counter()
        _sync(self.device)
        seconds = time.perf_counter() - t0
        epoch_s += seconds
        self._end_segment(seconds)
        self.read_pending()
        self.epoch_times.append((epoch_s, self.samples_seen - samples_before))
        self.emit_interval(ev.EPOCH_STOP, ev.INTERVAL_END, epoch_num=epoch, step=self.step,
                           epoch_train_time_s=round(epoch_s, 6), epoch_samples=self.samples_seen - samples_before)
        if self.memory:
            allocated, reserved = self.memory.end_epoch()
            self.emit(ev.TORCH_MEMORY, None, epoch_num=epoch, max_allocated_gib=allocated, max_reserved_gib=reserved)

    def _begin_segment(self) -> None:
        if self.memory:
            self.memory.begin("train")

    def _end_segment(self, seconds: float) -> None:
        self.train_time_s += seconds

    def run(self) -> RunSummary:
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
                if p.eval_due(self.step):
                    self.run_eval(epoch)
                self.maybe_checkpoint(epoch)
        except Diverged as err:
            v = err.verdict
            status = "diverged"
            failure = Failure(reason=str(err), step=v.step, epoch_num=v.step // p.steps_per_epoch + 1,
                              criterion=v.criterion, lr=p.lr(v.step), peak_lr=p.peak_lr,
                              in_warmup=v.step < p.warmup_steps, loss=v.loss, limit=v.limit)
        except torch.cuda.OutOfMemoryError as err:
            status = "oom"
            failure = Failure(reason=str(err).splitlines()[0], step=self.step, epoch_num=epoch, lr=p.lr(self.step),
                              peak_lr=p.peak_lr, in_warmup=self.step < p.warmup_steps,
                              micro_batch_size=p.micro_batch_size,
                              memory_reserved_gib=torch.cuda.memory_reserved(self.device) / 2**30)
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        self.emit_interval(ev.RUN_STOP, ev.INTERVAL_END, status=status, step=self.step, epoch_num=epoch,
                           **({"reason": failure.reason} if failure else {}))
        return self.summary(status, failure, epoch)

    # --- checkpoints ----------------------------------------------------------------------------
    def state(self, epoch: int) -> dict:
        return {
            "run_id": self.plan.run_id, "epoch": epoch, "step": self.step,
            "samples_seen": self.samples_seen, "train_time_s": self.train_time_s,
            "eval_time_s": self.eval_time_s, "elapsed_s": time.perf_counter() - self.t_start,
            "metrics": self.metrics, "best_test_acc": self.best_test_acc, "epoch_times": self.epoch_times,
            "divergence": self.divergence.state(), "memory": self.memory.state() if self.memory else None,
            "events_offset": self.log.tell() if self.log else None,
            "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
        }

    def load_state(self, state: dict) -> int:
        """Continue where the checkpoint left off: same weights, optimizer state, step (hence
        LR schedule) and epoch (hence data order, which depends only on seed and epoch)."""
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for name in ("step", "samples_seen", "train_time_s", "eval_time_s", "metrics", "best_test_acc"):
            setattr(self, name, state[name])
        self.epoch_times = [tuple(t) for t in state["epoch_times"]]
        self.divergence.load_state(state["divergence"])
        if self.memory and state.get("memory"):
            self.memory.load_state(state["memory"])
        self.t_start = time.perf_counter() - state["elapsed_s"]
        return int(state["epoch"])

    def maybe_checkpoint(self, epoch: int) -> None:
        ctx = self.ctx
        every = ctx.checkpoint_every_epochs
        if ctx.save_checkpoint and every and epoch % every == 0 and self.step < self.plan.total_steps:
            ctx.save_checkpoint(self.plan.run_id, self.state(epoch) if ctx.rank == 0 else None)
        if ctx.after_epoch is not None:
            ctx.after_epoch(self.plan.run_id, epoch, bool(self.restored), ctx.rank, ctx.world_size)

    def summary(self, status: str, failure: Failure | None, epoch: int) -> RunSummary:
        p, m = self.plan, self.metrics
        timed = self.epoch_times[1:] or self.epoch_times  # first epoch is warm-up for throughput
        seconds = sum(t for t, _ in timed)
        memory = self.memory.summary() if self.memory else None
        return RunSummary(
            schema_version=SCHEMA_VERSION, run_id=p.run_id, sweep=p.sweep, status=status, failure=failure,
            global_batch_size=p.global_batch_size, num_workers=p.num_workers,
            per_worker_batch_size=p.per_worker_batch_size, micro_batch_size=p.micro_batch_size,
            grad_accum_steps=p.grad_accum_steps, seed=p.seed, peak_lr=p.peak_lr,
            epochs_completed=epoch if status == "success" else max(0, epoch - 1),
            steps_completed=self.step, samples_seen=self.samples_seen,
            final_train_acc=m.get("train_acc"), final_test_acc=m.get("test_acc"),
            final_train_loss=_finite(m.get("train_loss")), final_test_loss=_finite(m.get("test_loss")),
            best_test_acc=self.best_test_acc if self.best_test_acc >= 0 else None,
            train_time_s=self.train_time_s, eval_time_s=self.eval_time_s,
            wall_time_s=time.perf_counter() - self.t_start,
            samples_per_s=sum(n for _, n in timed) / seconds if seconds > 0 else None,
            target_accuracy=self.sweep.target_accuracy, target_loss=self.sweep.target_loss,
            batch_unit=p.batch_unit, context_length=p.context_length,
            torch_peak_reserved_gib=memory.train_peak_reserved_gib if memory else None,
            torch_peak_allocated_gib=memory.train_peak_allocated_gib if memory else None,
            memory=memory, gradient_bytes=sum(self.gradient_sizes),
            gradient_bucket_bytes=ddp_bucket_sizes(self.gradient_sizes))

    def close(self) -> None:
        self.feed.close()
        if self.log is not None:
            self.log.close()


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def _gather_objects(obj: Any, ctx: WorkerContext) -> list[Any]:
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def execute_run(plan: RunPlan, sweep, run_dir: RunDir, ctx: WorkerContext, *, data: Data | None = None,
                restored: dict | None = None) -> RunSummary:
    """Train one planned run on this rank, with telemetry; rank 0 writes the summary last."""
    from bench.telemetry import Sampler, merge_summaries

    gpu_ids: list[str] = []  # a CPU run samples no GPU, even on a GPU node
    if ctx.device.type == "cuda":
        gpu_ids = ["GPU-" + str(torch.cuda.get_device_properties(ctx.device).uuid)]
    memory = RunMemory.for_device(ctx.device)
    if memory:  # before the sampler: its first sample is the run's own baseline
        memory.start_run()
    sampler = Sampler(run_dir.telemetry_path(ctx.rank), run_id=plan.run_id, rank=ctx.rank,
                      hz=sweep.telemetry.hz, node=ctx.node, gpu_ids=gpu_ids) \
        if sweep.telemetry.enabled else None
    trainer = None
    try:
        if sampler:
            sampler.start()
        trainer = Trainer(plan, sweep, run_dir, ctx, data, restored, memory)
        summary = trainer.run()
    finally:
        telemetry = sampler.stop() if sampler else None
        if trainer is not None:
            trainer.close()
    gathered = _gather_objects((telemetry, rank_view(ctx.device, ctx.node, ctx.node_id)), ctx)
    if ctx.rank == 0:
        merged = merge_summaries([t for t, _ in gathered if t]) if sampler else None
        summary = summary.model_copy(update={
            "telemetry": TelemetrySummary.model_validate(merged) if merged else None,
            "hardware": merge_views([view for _, view in gathered])})
        if ctx.driver_alive is not None and not ctx.driver_alive():
            raise DriverGone(f"the driver of {plan.run_id} is gone; the run is left incomplete")
        run_dir.write_json("worker_env.json", worker_environment(ctx.device, ctx.node, ctx.world_size))
        run_dir.write_summary(summary)
    return summary
