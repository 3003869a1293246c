"""The plan: pure functions from a validated sweep to the runs it asks for.

Owns: batch arithmetic (per-worker batch, micro-batch, gradient accumulation,
steps per epoch), the learning-rate scaling rules and the per-step schedule
(warmup, then constant / step / cosine), and the one resolver of
``max_micro_batch_size`` (``bench.memprobe.resolve_micro_batch``: ``auto`` reads the memory
probe through bench.memprobe; everything else here is pure). Everything derived is
computed here, never configured, and every impossible combination raises
``PlanError`` with the numbers in the message.

Must not import: torch, ray, pandas.

References: Goyal et al. 2017 (linear rule, eta = 0.1 * B / 256; gradual warmup from
eta to k*eta over 5 epochs); Hoffer et al. 2017 (sqrt rule).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Literal, Mapping

from bench.errors import PlanError
from bench.names import run_id

Scaling = Literal["linear", "sqrt", "none"]


# --- batch arithmetic ----------------------------------------------------------------------

def split_batch(global_batch_size: int, num_workers: int,
                max_micro_batch_size: int | None = None) -> tuple[int, int, int]:
    """(per_worker_batch_size, micro_batch_size, grad_accum_steps) for one global batch.

    global = num_workers x per_worker; per_worker = grad_accum_steps x micro. Accumulation is
    used only when the per-worker batch exceeds max_micro_batch_size, and then the per-worker
    batch must be a multiple of it (as Ray's benchmark harness requires).
    """
    if global_batch_size % num_workers:
        raise PlanError(f"global_batch_sizes: {global_batch_size} is not divisible by "
                        f"num_workers {num_workers} ({global_batch_size} / {num_workers} = "
                        f"{global_batch_size / num_workers:g})")
    per_worker = global_batch_size // num_workers
    if max_micro_batch_size is None or per_worker <= max_micro_batch_size:
        return per_worker, per_worker, 1
    if per_worker % max_micro_batch_size:
        raise PlanError(f"global_batch_sizes: {global_batch_size} is not divisible by num_workers x "
                        f"max_micro_batch_size = {num_workers} x {max_micro_batch_size} = "
                        f"{num_workers * max_micro_batch_size}")
    return per_worker, max_micro_batch_size, per_worker // max_micro_batch_size


def steps_per_epoch(num_train: int, global_batch_size: int, num_workers: int = 1,
                    grad_accum_steps: int = 1) -> int:
    """Full batches, plus the final partial batch when it still gives every worker at least
    one sample per micro-step (smaller remainders are dropped for that epoch)."""
    full, remainder = divmod(num_train, global_batch_size)
    return full + (1 if remainder >= num_workers * grad_accum_steps else 0)


# --- learning rate -------------------------------------------------------------------------

def scaled_lr(reference_lr: float, reference_batch_size: int, global_batch_size: int, scaling: Scaling) -> float:
    """Peak LR for a global batch B, from the LR tuned at the reference batch B0.
    linear: ref x B/B0 (Goyal); sqrt: ref x sqrt(B/B0); none: ref."""
    k = global_batch_size / reference_batch_size
    if scaling == "linear":
        return reference_lr * k
    if scaling == "sqrt":
        return reference_lr * math.sqrt(k)
    if scaling == "none":
        return reference_lr
    raise PlanError(f"lr.scaling: unknown rule {scaling!r} (allowed: linear, sqrt, none)")


def lr_at_step(step: int, *, start_lr: float, peak_lr: float, warmup_steps: int, total_steps: int,
               schedule: str = "constant", steps_per_epoch: int = 1,
               milestones_epochs: tuple[float, ...] = (), gamma: float = 0.1, min_lr_ratio: float = 0.0) -> float:
    """LR for the optimizer step with 0-based index `step`.

    Warmup (Goyal et al.): linear from start_lr at step 0 to peak_lr at step warmup_steps.
    After warmup: constant; step (x gamma at each milestone epoch passed); cosine or linear
    decay from peak at the end of warmup to min_lr_ratio x peak at total_steps (0 by default;
    nanoGPT / GPT-3 decay to 0.1 x peak).
    """
    if step < warmup_steps:
        return start_lr + (peak_lr - start_lr) * step / warmup_steps
    if schedule == "constant":
        return peak_lr
    if schedule == "step":
        epoch = step / steps_per_epoch
        return peak_lr * gamma ** sum(1 for m in milestones_epochs if epoch >= m)
    if schedule in ("cosine", "linear"):
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        left = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        floor = min_lr_ratio * peak_lr
        return floor + (peak_lr - floor) * left
    raise PlanError(f"lr.schedule: unknown schedule {schedule!r} (allowed: constant, step, cosine, linear)")


# --- evaluation schedule -------------------------------------------------------------------

EVALS_PER_DOUBLING = 4  # eval_every_steps: auto (resolution <= 1 - 2**-0.25 = 16 % after step 8)


@functools.lru_cache(maxsize=256)
def geometric_steps(total_steps: int, per_doubling: int = EVALS_PER_DOUBLING) -> frozenset[int]:
    """Steps round(2 ** (k / per_doubling)), k = 0, 1, ..., up to total_steps: evaluation points
    spaced evenly in log(step), so that a crossing at step S is resolved to within a fixed fraction
    of S whatever S turns out to be (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 16, 19, 23, 27, 32, ...)."""
    out, k = set(), 0
    while True:
        s = round(2 ** (k / per_doubling))
        if s > total_steps:
            return frozenset(out)
        out.add(s)
        k += 1


def eval_due(step: int, *, total_steps: int, steps_per_epoch: int, eval_every_epochs: int = 1,
             eval_every_steps: int | None = None, eval_auto: bool = False) -> bool:
    """Whether to evaluate after ``step`` optimizer steps (step >= 1). Always after the last step.
    eval_every_steps N: at multiples of N. auto: at ``geometric_steps`` and at every epoch end.
    Otherwise: at the end of every eval_every_epochs-th epoch."""
    if step >= total_steps:
        return True
    epoch_end = step % steps_per_epoch == 0
    if eval_auto:
        return epoch_end or step in geometric_steps(total_steps)
    if eval_every_steps is not None:
        return step % eval_every_steps == 0
    return epoch_end and (step // steps_per_epoch) % eval_every_epochs == 0


# --- the plan ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunPlan:
    """One run, fully derived. Written as run.json into the run folder."""

    sweep: str
    run_id: str
    seed: int
    workload: str
    model: str
    global_batch_size: int
    num_workers: int
    per_worker_batch_size: int
    micro_batch_size: int
    grad_accum_steps: int
    num_train: int
    num_test: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    scaling: str
    reference_lr: float  # the config's LR at reference_batch_size, before scaling
    reference_batch_size: int
    peak_lr: float
    warmup_steps: int
    warmup_epochs: float
    schedule: str
    milestones_epochs: tuple[float, ...]
    gamma: float
    # When to evaluate (bench.plan.eval_due); defaults = how runs planned before 2026-12 evaluated.
    eval_every_epochs: int = 1
    eval_every_steps: int | None = None
    eval_auto: bool = False
    # LR search (bench.lrsearch): peak_lr / the rule's peak LR at this batch (1.0: the rule's LR
    # itself), and the stage that planned the run (0: a plain sweep; 1: a search trial; 2: a seed
    # run after the choice). Defaults = every run planned before the LR search existed.
    lr_factor: float = 1.0
    stage: int = 0
    # What a batch counts: "samples", or "tokens" (workload lm: global_batch_size,
    # per_worker_batch_size and micro_batch_size are tokens, num_train / num_test are tokens, and
    # context_length is T). min_lr_ratio: cosine / linear decay ends at this x peak_lr;
    # warmup_from: "reference" (Goyal: from min(reference_lr, peak_lr)) or "zero". Defaults =
    # every run planned before language models.
    batch_unit: str = "samples"
    context_length: int | None = None
    min_lr_ratio: float = 0.0
    warmup_from: str = "reference"

    def eval_due(self, step: int) -> bool:
        """Whether this run evaluates after `step` optimizer steps."""
        return eval_due(step, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                        eval_every_epochs=self.eval_every_epochs, eval_every_steps=self.eval_every_steps,
                        eval_auto=self.eval_auto)

    def lr(self, step: int) -> float:
        """The LR this run applies at optimizer step `step` (0-based)."""
        start = 0.0 if self.warmup_from == "zero" else min(self.reference_lr, self.peak_lr)
        return lr_at_step(step, start_lr=start, peak_lr=self.peak_lr,
                          warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                          schedule=self.schedule, steps_per_epoch=self.steps_per_epoch,
                          milestones_epochs=self.milestones_epochs, gamma=self.gamma,
                          min_lr_ratio=self.min_lr_ratio)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["milestones_epochs"] = list(self.milestones_epochs)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunPlan":
        d = dict(d)
        d["milestones_epochs"] = tuple(d.get("milestones_epochs", ()))
        return cls(**d)


def run_schedule(num_train: int, global_batch_size: int, num_workers: int, grad_accum_steps: int, *,
                 epochs: int, max_steps: int | None, reference_lr: float, reference_batch_size: int, scaling: str,
                 warmup_epochs: float, warmup_steps: int | None,
                 spe: int | None = None) -> tuple[int, int, int, float]:
    """(steps_per_epoch, total_steps, warmup_steps, peak_lr) of one run from the sweep's plain
    values: the one derivation both ``plan_sweep`` and the submission checker use. ``spe``: steps
    per epoch counted elsewhere (a language model's, from its token batching)."""
    spe = steps_per_epoch(num_train, global_batch_size, num_workers, grad_accum_steps) if spe is None else spe
    total = spe * epochs if max_steps is None else min(spe * epochs, max_steps)
    warmup = warmup_steps if warmup_steps is not None else round(warmup_epochs * spe)
    return spe, total, warmup, scaled_lr(reference_lr, reference_batch_size, global_batch_size, scaling)


def plan_sweep(sweep, *, max_micro_batch_size: int | Mapping[int, int] | None = None) -> list[RunPlan]:
    """All runs of a validated SweepConfig, ordered by worker count, then batch, then seed.

    `max_micro_batch_size` overrides the sweep's: one cap for every run, or (the memory
    probe's answer for 'auto', from ``resolve_micro_batch``) a micro-batch per per-worker batch
    size; a per-worker batch missing from the mapping runs without accumulation. A sweep with
    ``max_micro_batch_size: auto`` must be given that answer: planning it without one raises
    PlanError rather than silently running without a cap.
    """
    num_train, num_test = sweep.dataset_sizes()
    tokens = sweep.batch_unit == "tokens"
    batch_key, cap_key = (("global_batch_tokens", "max_micro_batch_tokens") if tokens
                          else ("global_batch_sizes", "max_micro_batch_size"))
    micro_cap = max_micro_batch_size
    if micro_cap is None and sweep.micro_batch_cap == "auto":
        raise PlanError(f"{cap_key}: auto needs the memory probe's micro-batches "
                        "(bench.memprobe.resolve_micro_batch); planned without them the sweep would run "
                        "without a cap")
    if micro_cap is None and isinstance(sweep.micro_batch_cap, int):
        micro_cap = sweep.micro_batch_cap
    lr = sweep.lr
    context = sweep.options.context_length if tokens else None
    runs: list[RunPlan] = []
    for workers in sweep.num_workers:
        shapes = []  # one per batch size, checked before any run is planned
        for gbs in sweep.batch_sizes:
            if gbs > num_train:
                raise PlanError(f"{batch_key}: {gbs} is larger than the training set "
                                f"({num_train} {sweep.batch_unit} of workload {sweep.workload!r})")
            cap = micro_cap.get(gbs // workers) if isinstance(micro_cap, Mapping) else micro_cap
            max_steps, spe = sweep.max_steps, None
            if tokens:
                from bench.lm.workload import lm_run_shape

                per_worker, micro, accum, spe = lm_run_shape(sweep.options, gbs, workers, cap)
                if sweep.max_tokens is not None:  # the token budget in whole steps
                    max_steps = min(max_steps or math.inf, math.ceil(sweep.max_tokens / gbs))
            else:
                per_worker, micro, accum = split_batch(gbs, workers, cap)
            spe, total, warmup, peak = run_schedule(
                num_train, gbs, workers, accum, epochs=sweep.epochs, max_steps=max_steps,
                reference_lr=lr.reference_lr, reference_batch_size=lr.reference_batch_size, scaling=lr.scaling,
                warmup_epochs=lr.warmup_epochs, warmup_steps=lr.warmup_steps, spe=spe)
            if warmup > total:
                raise PlanError(f"lr.warmup: {warmup} warmup steps exceed the {total} steps of the run "
                                f"at global batch {gbs}")
            shapes.append((gbs, per_worker, micro, accum, spe, total, warmup, peak))
        # Seed-major: a sweep cut short (a device lease running out) still has every batch
        # size once before it has any twice.
        for seed in sweep.seeds:
            for gbs, per_worker, micro, accum, spe, total, warmup, peak in shapes:
                runs.append(RunPlan(
                    sweep=sweep.name, run_id=run_id(gbs, workers, seed), seed=seed,
                    workload=sweep.workload, model=sweep.model_name, global_batch_size=gbs,
                    num_workers=workers, per_worker_batch_size=per_worker, micro_batch_size=micro,
                    grad_accum_steps=accum, num_train=num_train, num_test=num_test,
                    steps_per_epoch=spe, epochs=math.ceil(total / spe), total_steps=total,
                    scaling=lr.scaling, reference_lr=lr.reference_lr, reference_batch_size=lr.reference_batch_size,
                    peak_lr=peak, warmup_steps=warmup,
                    warmup_epochs=warmup / spe, schedule=lr.schedule,
                    milestones_epochs=tuple(lr.step_milestones_epochs), gamma=lr.step_gamma,
                    eval_every_epochs=sweep.eval_every_epochs,
                    eval_every_steps=sweep.eval_every_steps if isinstance(sweep.eval_every_steps, int) else None,
                    eval_auto=sweep.eval_every_steps == "auto", batch_unit=sweep.batch_unit,
                    context_length=context, min_lr_ratio=lr.min_lr_ratio, warmup_from=lr.warmup_from))
    return runs
