"""The run summary: the typed contract between the worker that writes ``summary.json`` and
everything that reads it (store, analysis, report, planner, submission).

Owns: ``RunSummary`` and its parts, with units in the field names (``_s`` seconds, ``_gib``
GiB = 2**30 bytes, ``_pct`` percent, ``_w`` watts, ``_j`` joules). The worker builds one and the
store writes it with ``model_dump``; readers get it back through ``RunSummary.model_validate``,
so a file of the wrong shape is refused with the field that is wrong.

Compatibility: summaries written before a field existed still validate (new fields are optional
and default to None); ``schema_version`` says which version wrote the file. Unknown keys are
ignored, so an older batchscale can read a newer summary.

Must not import: torch, ray, pandas; nothing from bench.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 2  # 1: before failure.lr / memory / hardware; 2: this module

RunStatus = Literal["success", "diverged", "oom"]


class _Stored(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Failure(_Stored):
    """Why a run stopped early. ``step`` counts optimizer steps completed before the one that
    failed, so the LR of the failing step is the plan's ``lr(step)``."""

    reason: str
    step: int = Field(ge=0)
    epoch_num: int = Field(ge=0)
    criterion: Optional[str] = None  # diverged: "non_finite_loss" | "smoothed_loss" | (v1) "eval_train_loss"
    lr: Optional[float] = None  # LR applied at the failing step (None in v1 summaries)
    peak_lr: Optional[float] = None  # the planned peak LR of the run
    in_warmup: Optional[bool] = None  # failed before the warm-up reached the peak
    loss: Optional[float] = None  # the loss that tripped the criterion (None if not finite)
    limit: Optional[float] = None  # the threshold it crossed
    micro_batch_size: Optional[int] = None  # oom
    memory_reserved_gib: Optional[float] = None  # oom


class MemorySummary(_Stored):
    """PyTorch's caching-allocator figures for this run alone (CUDA; None on CPU): at the run's
    start the cache is emptied and the peak counters reset, so nothing is inherited from an
    earlier run of the same worker group."""

    baseline_allocated_gib: float  # allocated when the run started (after emptying the cache)
    baseline_reserved_gib: float
    train_peak_allocated_gib: float  # max over the run's training epochs (evaluation excluded)
    train_peak_reserved_gib: float
    eval_peak_allocated_gib: Optional[float] = None  # max over its evaluations
    eval_peak_reserved_gib: Optional[float] = None


class TelemetrySummary(_Stored):
    """The sampler's summary, merged over ranks (bench.telemetry.merge_summaries)."""

    kind: Literal["gpu", "cpu"]
    num_samples: int = 0
    peak_memory_gib: Optional[float] = None  # device memory used (NVML), absolute
    baseline_memory_gib: Optional[float] = None  # device memory used at the run's first sample
    peak_memory_above_baseline_gib: Optional[float] = None
    mean_util_pct: Optional[float] = None
    p95_util_pct: Optional[float] = None
    mean_power_w: Optional[float] = None
    energy_j: Optional[float] = None
    error: Optional[str] = None


class GpuSeen(_Stored):
    """One GPU as a worker saw it (torch + NVML)."""

    model: str
    memory_gib: float
    uuid: Optional[str] = None


class HardwareSeen(_Stored):
    """What the workers actually ran on, as opposed to what the cluster file claims."""

    num_workers: int
    nodes: list[str]  # distinct Ray node ids (or host names without Ray) the ranks ran on
    hostnames: list[str] = []
    device_type: Literal["cpu", "cuda"]
    gpus: list[GpuSeen] = []  # distinct GPUs the ranks used
    driver: Optional[str] = None
    cpu_model: Optional[str] = None


class RunSummary(_Stored):
    """``summary.json``: written last by rank 0; its presence marks the run complete."""

    schema_version: int = 1
    run_id: str
    sweep: str
    status: RunStatus
    failure: Optional[Failure] = None
    global_batch_size: int = Field(gt=0)
    num_workers: int = Field(gt=0)
    per_worker_batch_size: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    grad_accum_steps: int = Field(gt=0)
    seed: int = Field(ge=0)
    peak_lr: float
    epochs_completed: int = Field(ge=0)
    steps_completed: int = Field(ge=0)
    samples_seen: int = Field(ge=0)
    final_train_acc: Optional[float] = None
    final_test_acc: Optional[float] = None
    final_train_loss: Optional[float] = None
    final_test_loss: Optional[float] = None
    best_test_acc: Optional[float] = None
    train_time_s: float = Field(ge=0)  # device-synchronised training time, evaluation excluded
    eval_time_s: float = Field(ge=0)
    wall_time_s: float = Field(ge=0)
    samples_per_s: Optional[float] = None  # training throughput over the epochs after the first
    target_accuracy: Optional[float] = None
    target_loss: Optional[float] = None  # a validation loss target (nats per token; language models)
    # "tokens" for a language model: every batch size, samples_seen and samples_per_s count tokens
    # (loss targets); context_length is T. None in summaries written before language models.
    batch_unit: Optional[Literal["samples", "tokens"]] = None
    context_length: Optional[int] = None
    # v1 named these the run's peaks; they were read after the last evaluation's reset (v1 bug).
    # v2: the same as memory.train_peak_*.
    torch_peak_reserved_gib: Optional[float] = None
    torch_peak_allocated_gib: Optional[float] = None
    memory: Optional[MemorySummary] = None
    # What one data-parallel step all-reduces (bench.comm's step model needs it to plan past the
    # GPUs measured): gradient bytes, and the bytes of each of DDP's default buckets.
    gradient_bytes: Optional[int] = None
    gradient_bucket_bytes: Optional[list[float]] = None
    telemetry: Optional[TelemetrySummary] = None
    hardware: Optional[HardwareSeen] = None
