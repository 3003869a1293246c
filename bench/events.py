"""The event vocabulary: one JSON object per line, MLPerf-shaped.

Owns: the names of every event key a run writes, the shape of one event line,
and reading/writing event lines. Every other module refers to keys through the
constants here, never through string literals.

Must not import: torch, ray, pandas.

Line shape (the same fields as an MLPerf ``:::MLLOG`` line, without the prefix)::

    {"time_ms": 1764040000000.0, "event_type": "POINT_IN_TIME",
     "key": "eval_accuracy", "value": 0.81,
     "metadata": {"epoch_num": 3, "step": 375, "samples_count": 1500,
                  "train_time_s": 1.92, "elapsed_s": 2.40}}

Where MLPerf has a name we use it; our own additions are marked below.
Every epoch-level metric event carries in ``metadata``: ``epoch_num`` (1-based,
epochs completed), ``step`` (optimizer steps completed), ``samples_count``
(training samples consumed), ``train_time_s`` (cumulative training time, eval
excluded, device synchronised) and ``elapsed_s`` (wall time since run_start).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import IO, Any, Iterator

from bench import safeio

# --- event types (MLPerf) ---
POINT_IN_TIME = "POINT_IN_TIME"
INTERVAL_START = "INTERVAL_START"
INTERVAL_END = "INTERVAL_END"

# --- run boundaries (MLPerf) ---
INIT_START = "init_start"  # INTERVAL_START; rank 0, before the worker's set-up (data, model, optimizer)
INIT_STOP = "init_stop"  # INTERVAL_END; set-up done, logged just before run_start
RUN_START = "run_start"  # INTERVAL_START
RUN_STOP = "run_stop"  # INTERVAL_END; metadata.status: success | diverged | oom
EPOCH_START = "epoch_start"
EPOCH_STOP = "epoch_stop"  # metadata also: epoch_train_time_s, epoch_samples
EVAL_START = "eval_start"
EVAL_STOP = "eval_stop"

# --- hyperparameters, logged once at run start (MLPerf) ---
SEED = "seed"
GLOBAL_BATCH_SIZE = "global_batch_size"
MICRO_BATCH_SIZE = "micro_batch_size"  # per worker, per accumulation step
GRADIENT_ACCUMULATION_STEPS = "gradient_accumulation_steps"
OPT_NAME = "opt_name"
OPT_BASE_LEARNING_RATE = "opt_base_learning_rate"  # the *peak* LR after scaling, as MLPerf uses it
OPT_LEARNING_RATE_WARMUP_EPOCHS = "opt_learning_rate_warmup_epochs"
OPT_LEARNING_RATE_WARMUP_STEPS = "opt_learning_rate_warmup_steps"
OPT_WEIGHT_DECAY = "opt_weight_decay"
TRAIN_SAMPLES = "train_samples"
EVAL_SAMPLES = "eval_samples"

# --- ours (no MLPerf name) ---
NUM_WORKERS = "num_workers"
PER_WORKER_BATCH_SIZE = "per_worker_batch_size"
LR_SCALING_RULE = "lr_scaling_rule"  # linear | sqrt | none
REFERENCE_LEARNING_RATE = "reference_learning_rate"  # the sweep's reference_lr, before scaling
REFERENCE_BATCH_SIZE = "reference_batch_size"
STEPS_PER_EPOCH = "steps_per_epoch"
TRAIN_EVAL_SAMPLES = "train_eval_samples"  # training samples the train_* metrics are measured on
# Language models (bench.lm), logged at run start after the lines above:
BATCH_UNIT = "batch_unit"  # ours: "tokens": every batch size and samples count of the run is tokens (targets)
CONTEXT_LENGTH = "context_length"  # ours: T, tokens per sequence
MODEL_FLOPS_PER_TOKEN = "model_flops_per_token"  # ours: 6 N (Kaplan et al. 2020), the basis of MFU
ENTROPY_FLOOR_NATS = "entropy_floor_nats"  # ours: the best achievable loss (generated corpora only)

# --- per-epoch metrics ---
EVAL_ACCURACY = "eval_accuracy"  # test-set accuracy (MLPerf name)
EVAL_LOSS = "eval_loss"  # ours
TRAIN_ACCURACY = "train_accuracy"  # ours: eval-mode accuracy on the training set: all of it, or a fixed
#   evenly spaced subset of train_eval_samples (sweep key train_eval_samples; streamed ImageNet's own option)
TRAIN_LOSS = "train_loss"  # ours: eval-mode loss on the same training samples
OPT_LEARNING_RATE = "opt_learning_rate"  # ours: LR applied; metadata.step = the step it applied to
GRADIENT_NOISE_SCALE = "gradient_noise_scale"  # ours: B_simple; metadata: grad_sq_small, grad_sq_big, trace_sigma
TORCH_MEMORY = "torch_memory"  # ours: metadata epoch_num, max_allocated_gib, max_reserved_gib: the peak of
#   that epoch's training (evaluation excluded), rank 0, CUDA only (bench.memory)



def hyperparameters(plan: Any, opt_name: str, weight_decay: float, train_eval_samples: int) -> list[tuple[str, Any]]:
    """The lines a run logs once at its start, from its ``bench.plan.RunPlan``, in this order."""
    p = plan
    return [(SEED, p.seed), (GLOBAL_BATCH_SIZE, p.global_batch_size), (NUM_WORKERS, p.num_workers),
            (PER_WORKER_BATCH_SIZE, p.per_worker_batch_size), (MICRO_BATCH_SIZE, p.micro_batch_size),
            (GRADIENT_ACCUMULATION_STEPS, p.grad_accum_steps), (OPT_NAME, opt_name),
            (LR_SCALING_RULE, p.scaling), (REFERENCE_LEARNING_RATE, p.reference_lr),
            (REFERENCE_BATCH_SIZE, p.reference_batch_size), (OPT_BASE_LEARNING_RATE, p.peak_lr),
            (OPT_LEARNING_RATE_WARMUP_EPOCHS, p.warmup_epochs), (OPT_LEARNING_RATE_WARMUP_STEPS, p.warmup_steps),
            (OPT_WEIGHT_DECAY, weight_decay), (TRAIN_SAMPLES, p.num_train), (EVAL_SAMPLES, p.num_test),
            (TRAIN_EVAL_SAMPLES, train_eval_samples), (STEPS_PER_EPOCH, p.steps_per_epoch),
            *([(BATCH_UNIT, p.batch_unit), (CONTEXT_LENGTH, p.context_length)]
              if getattr(p, "batch_unit", "samples") == "tokens" else [])]


def make_event(key: str, value: Any = None, *, event_type: str = POINT_IN_TIME,
               metadata: dict[str, Any] | None = None, time_ms: float | None = None) -> dict[str, Any]:
    """One event as a dict (the exact shape written to the log)."""
    return {
        "time_ms": round(time.time() * 1000.0, 3) if time_ms is None else time_ms,
        "event_type": event_type,
        "key": key,
        "value": _jsonable(value),
        "metadata": {k: _jsonable(v) for k, v in (metadata or {}).items()},
    }


def _jsonable(value: Any) -> Any:
    """NaN/inf are not JSON; a diverged loss is written as the string 'nan'/'inf'."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class EventLog:
    """Append-only event writer. Each line is flushed as written, so a crash loses at most one line."""

    def __init__(self, path: Path | str, *, mode: str = "a", truncate_at: int | None = None) -> None:
        """`truncate_at`: resume an existing log, dropping every byte after that offset (the
        events written after the checkpoint being resumed from)."""
        self.path = Path(path)
        if truncate_at is not None:
            with open(self.path, "r+b") as fh:
                fh.truncate(truncate_at)
            mode = "a"
        self._fh: IO[str] = open(self.path, mode, encoding="utf-8", buffering=1)

    def tell(self) -> int:
        """Bytes written so far (every line is flushed as written)."""
        self._fh.flush()
        return self.path.stat().st_size

    def log(self, key: str, value: Any = None, **kw: Any) -> dict[str, Any]:
        event = make_event(key, value, **kw)
        self._fh.write(json.dumps(event, separators=(",", ":")) + "\n")
        return event

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            self._fh.close()

    def __enter__(self) -> "EventLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CorruptEventLog(ValueError):
    """An event line that is not valid JSON (other than a torn last line)."""


def read_events(path: Path | str, *, root: Path | str | None = None) -> list[dict[str, Any]]:
    """All events of a log. A torn *last* line (crash mid-write) is ignored; a broken line
    in the middle raises CorruptEventLog naming the file and line number."""
    return list(iter_events(path, root=root))


def iter_events(path: Path | str, *, root: Path | str | None = None) -> Iterator[dict[str, Any]]:
    """Events of a log, streamed through bench.safeio (bounded size, no links below ``root``)."""
    path = Path(path)
    broken: str | None = None  # a bad line is an error only if another line follows it
    for number, line in safeio.iter_lines(path, "events", root=root):
        if broken is not None:
            raise CorruptEventLog(broken)
        if not line.strip():
            continue
        try:
            event = json.loads(line)
            if not isinstance(event, dict) or "key" not in event:
                raise ValueError("not an event object")
        except (ValueError, RecursionError) as err:
            broken = f"{path}:{number}: broken event line ({type(err).__name__})"
            continue
        yield event


def to_mllog_line(event: dict[str, Any], namespace: str = "") -> str:
    """Render one event as an MLPerf ``:::MLLOG`` line (for submissions)."""
    payload = {
        "namespace": namespace,
        "time_ms": event["time_ms"],
        "event_type": event["event_type"],
        "key": event["key"],
        "value": event["value"],
        "metadata": event.get("metadata", {}),
    }
    return ":::MLLOG " + json.dumps(payload, separators=(", ", ": "))
