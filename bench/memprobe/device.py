"""The probe on a device: ``probe()`` runs the worker's own training step at growing
micro-batches until one runs out of memory, and returns a ``ProbeResult``.

Owns: what a try runs (``Training``: the sweep's model and optimizer built as the worker builds
them, ``bench.step.TrainStep`` over ``ACCUM_MICRO_BATCHES`` random micro-batches of the data's
shape, one evaluation chunk through ``bench.step.evaluate``), out-of-memory caught and freed
between tries, the memory reserved for what a try does not build (the resident data sets, DDP's
gradient buckets), and the budget the prediction may use. How a try's peak is read is
bench.memprobe.meter's; the search, fit and file are bench.memprobe.fit's; what is measured and
how well: docs/memory-probe.md.

Must not import: ray, pandas. Imports torch (the probe command imports this module inside the
command, so other ``batchscale`` commands do not pay for torch).
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from bench.memprobe import meter as meters
from bench.memprobe.fit import (DEFAULT_RESOLUTION, DEFAULT_SAFETY_MARGIN, ProbeResult, Try, fit_linear,
                                format_mib, limit_check, memory_key, per_worker_batches, predict_largest, search)

ACCUM_MICRO_BATCHES = 2  # per probed step: the second runs beside the first one's gradients (worst case)


# --- what a try runs: the worker's step on random data of the workload's shape -----------------

@dataclass
class InputSpec:
    shape: tuple[int, ...]
    num_classes: int
    augment: str
    streaming: bool  # uint8 images normalised on the device (bench.workloads.vision.StreamingData)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    resident_bytes: int = 0  # train + test sets the worker keeps on its device
    tokens: bool = False  # a language model: inputs and targets are token ids (n, T), classes the vocabulary


def input_spec(sweep, seed: int = 0) -> InputSpec:
    """Input shape and classes from a tiny load of the workload (num_train/num_test cut to 2
    where the options have them), and the bytes the full sets take on the worker's device."""
    from bench import workloads
    from bench.workloads.data import Data

    if sweep.batch_unit == "tokens":  # a micro-batch of n sequences of T token ids; tokens stay on the host
        from bench.lm.options import lm_vocab_size

        return InputSpec((sweep.options.context_length,), lm_vocab_size(sweep.options), "none", False, tokens=True)
    options = sweep.options
    small = {k: min(getattr(options, k), 2) for k in ("num_train", "num_test") if k in type(options).model_fields}
    data = workloads.load(sweep.workload, options.model_copy(update=small) if small else options, seed)
    if isinstance(data, Data):
        num_train, num_test = sweep.dataset_sizes()
        x, y = data.x_train, data.y_train
        per_sample = math.prod(x.shape[1:]) * x.element_size() + y.element_size()
        return InputSpec(tuple(x.shape[1:]), data.num_classes, data.augment, False,
                         resident_bytes=(num_train + num_test) * per_sample)
    return InputSpec(tuple(data.input_shape), data.num_classes, data.augment, True,
                     mean=tuple(data.mean), std=tuple(data.std))


class Training:
    """The sweep's model and optimizer, and the worker's step and evaluation over them."""

    def __init__(self, sweep, spec: InputSpec, device: torch.device, seed: int = 0) -> None:
        from bench.models import build_model
        from bench.optim import build_optimizer
        from bench.step import TrainStep

        self.sweep, self.spec, self.device = sweep, spec, device
        torch.manual_seed(seed)
        self.memory_format = torch.channels_last if sweep.channels_last and len(spec.shape) == 3 \
            else torch.contiguous_format
        self.model = build_model(sweep.model_name, spec.shape, spec.num_classes).to(
            device, memory_format=self.memory_format)
        self.model.train()
        self.optimizer = build_optimizer(sweep.optimizer, self.model, sweep.lr.reference_lr)
        use_bf16 = sweep.precision == "bf16"
        self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
        self.train_step = TrainStep(self.model, self.optimizer, grad_accum_steps=ACCUM_MICRO_BATCHES,
                                    label_smoothing=sweep.label_smoothing, autocast=self.autocast)

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)

    def batch(self, n: int, augment: bool = True) -> torch.Tensor:
        """n random inputs as the feed hands them to the model."""
        s = self.spec
        if s.tokens:
            return torch.randint(0, s.num_classes, (n, *s.shape), device=self.device)
        if s.streaming:  # as StreamingData.to_device: uint8 -> float, normalised on the device
            x = torch.randint(0, 256, (n, *s.shape), dtype=torch.uint8).to(self.device).float().div_(255.0)
            x = x.sub_(torch.tensor(s.mean, device=self.device).view(1, -1, 1, 1))
            x = x.div_(torch.tensor(s.std, device=self.device).view(1, -1, 1, 1))
        else:
            x = torch.randn((n, *s.shape), device=self.device)
        if self.memory_format is torch.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if augment and s.augment == "crop_flip":
            from bench.augment import random_crop_flip

            x = random_crop_flip(x)
        return x

    def labels(self, n: int) -> torch.Tensor:
        shape = (n, *self.spec.shape) if self.spec.tokens else (n,)  # next-token targets for a language model
        return torch.randint(0, self.spec.num_classes, shape, device=self.device)

    def step(self, micro_batch: int) -> None:
        """One optimizer step of the worker (bench.step.TrainStep) over ACCUM_MICRO_BATCHES
        micro-batches made one at a time, with the noise probe when the sweep measures it."""
        from bench.noise import MicroBatchProbe

        observer = (MicroBatchProbe(self.model.parameters(), micro_batch, ACCUM_MICRO_BATCHES)
                    if self.sweep.noise_scale_every_steps else None)
        micro_batches = ((self.batch(micro_batch), self.labels(micro_batch)) for _ in range(ACCUM_MICRO_BATCHES))
        self.train_step(micro_batches, micro_batch * ACCUM_MICRO_BATCHES, self.sweep.lr.reference_lr,
                        observer=observer)

    def eval_chunk(self, n: int) -> None:
        """The worker's evaluation (bench.step.evaluate) over one chunk of n samples."""
        from bench.step import evaluate

        chunk = ((self.batch(n, augment=False), self.labels(n)) for _ in range(1))
        evaluate(self.model, chunk, False, self.autocast, self.device)

    def reset(self) -> None:
        """After a failed try: drop partial gradients."""
        self.optimizer.zero_grad(set_to_none=True)


class ProbeStep:
    """One try: ``repeats`` optimizer steps at a micro-batch -> peak bytes (the interface an
    injected test step also offers: optional ``reset``, ``free``, ``peak_after_failure``)."""

    def __init__(self, training: Training, meter, repeats: int) -> None:
        self.training, self.meter, self.repeats = training, meter, repeats

    @property
    def last_allocated(self) -> Optional[int]:
        return self.meter.last_allocated

    def __call__(self, micro_batch: int) -> int:
        def steps() -> None:
            for _ in range(self.repeats):
                self.training.step(micro_batch)

        return self.meter.measure(steps)

    def run_eval(self, n: int) -> int:
        return self.meter.measure(lambda: self.training.eval_chunk(n))

    def peak_after_failure(self) -> Optional[int]:
        return self.meter.peak_after_failure()

    def reset(self) -> None:
        self.training.reset()

    def free(self) -> None:
        self.meter.free()


# --- one try, out of memory caught ----------------------------------------------------------------

def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                              or "not enough memory" in msg)


def _run_try(step: Callable[[int], int], b: int, cap: Optional[int]) -> tuple[Try, dict]:
    """One try; an out-of-memory error is caught, recorded as a message (the exception and its
    frames, which hold the activations, are dropped) and the memory freed before returning."""
    t0 = time.perf_counter()
    peak: Optional[int] = None
    error: Optional[str] = None
    try:
        peak = step(b)
    except Exception as err:  # noqa: BLE001 - only out-of-memory is a result; the rest re-raises
        if not _is_oom(err):
            raise
        error = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        del err
    seconds = time.perf_counter() - t0
    if error is not None:
        peak_fn = getattr(step, "peak_after_failure", None)
        peak = peak_fn() if peak_fn else None
        reset = getattr(step, "reset", None)
        if reset:
            reset()
    ok = error is None and (cap is None or (peak is not None and peak <= cap))
    if error is None and not ok:
        error = f"peak {peak} bytes above the cap {cap}"
    free = getattr(step, "free", None)
    if free:
        free()
    else:
        gc.collect()
    return Try(b, ok, peak), {"peak_allocated_bytes": getattr(step, "last_allocated", None),
                              "seconds": round(seconds, 4), "error": error}


# --- the probe ----------------------------------------------------------------------------------

@dataclass
class _Setup:
    """What ``probe()`` prepared on the device before the first try."""

    step: Callable[[int], int]
    measurement: str
    reserved: dict[str, int]
    outside_bytes: int = 0  # CUDA: device memory used outside this process's allocator
    heap_free_bytes: Optional[int] = None  # CPU: free malloc chunks at the baseline
    reserve_fails: bool = False
    streaming: bool = False


def _setup_cuda(sweep, dev: torch.device, seed: int, repeats: int, cap: Optional[int], notes: list[str],
                held: list) -> _Setup:
    """The CUDA try: the reserve allocated as one placeholder (kept alive in ``held``), the
    allocator limited to the cap when there is one."""
    spec = input_spec(sweep, seed)
    reserved = {"resident_data": spec.resident_bytes} if spec.resident_bytes else {}
    torch.cuda.init()
    free_b, total_b = torch.cuda.mem_get_info(dev)
    outside = max(0, total_b - free_b - torch.cuda.memory_reserved(dev))
    if cap is not None:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total_b), dev)
    training = Training(sweep, spec, dev, seed)
    if max(sweep.num_workers) > 1:
        reserved["ddp_buckets"] = training.param_bytes()
    reserve_fails = False
    if sum(reserved.values()):
        try:
            held.append(torch.empty(sum(reserved.values()), dtype=torch.uint8, device=dev))
        except torch.cuda.OutOfMemoryError:
            reserve_fails = True
            notes.append(f"the reserved {format_mib(sum(reserved.values()))} ({', '.join(reserved)}) "
                         "alone do not fit: no micro-batch was tried")
    cuda = meters.CudaMeter(dev)
    return _Setup(ProbeStep(training, cuda, repeats), cuda.method, reserved, outside_bytes=outside,
                  reserve_fails=reserve_fails, streaming=spec.streaming)


def _setup_cpu(sweep, dev: torch.device, seed: int, repeats: int, notes: list[str]) -> _Setup:
    """The CPU try: a throwaway copy takes one step and one evaluation first, so that lazy
    imports and initialisation (torch._dynamo through torch.optim, oneDNN, the autograd engine)
    land before the baseline instead of in the first try."""
    spec = input_spec(sweep, seed)
    reserved = {"resident_data": spec.resident_bytes} if spec.resident_bytes else {}
    warm = Training(sweep, spec, dev, seed)
    warm.step(1)
    warm.eval_chunk(1)
    del warm
    rss = meters.RssMeter()
    rss.mark_baseline()
    heap_free = meters.heap_free_bytes()
    if heap_free is not None and heap_free > meters.HEAP_FREE_NOTE_BYTES:
        notes.append(f"this process's heap held {format_mib(heap_free)} of free chunks before the first try "
                     "(memory freed before the probe fixed the mmap threshold): tries that reuse them count "
                     "those pages again, so the CPU peaks may be high; probe in a fresh process "
                     "(batchscale probe-memory)")
    if meters.glibc() is not None and not meters.mmap_threshold_fixed():
        notes.append("glibc's mmap threshold was not fixed in this process (bench.memprobe.meter."
                     "fix_mmap_threshold): the CPU peaks follow heap fragmentation; batchscale probe-memory "
                     "fixes it first")
    training = Training(sweep, spec, dev, seed)
    if max(sweep.num_workers) > 1:
        reserved["ddp_buckets"] = training.param_bytes()
    cpu = meters.CpuMeter(rss, sum(reserved.values()))
    return _Setup(ProbeStep(training, cpu, repeats), cpu.method, reserved, heap_free_bytes=heap_free,
                  streaming=spec.streaming)


def probe(sweep, *, device: str | torch.device = "cuda", memory_cap_bytes: Optional[int] = None,
          start: int = 1, max_batch: int = 65536, resolution: float = DEFAULT_RESOLUTION,
          safety_margin: float = DEFAULT_SAFETY_MARGIN,
          repeats: int = 2, step: Optional[Callable[[int], int]] = None,
          on_try: Optional[Callable[[Try, dict], None]] = None, check_eval: bool = True) -> ProbeResult:
    """Find the largest micro-batch of `sweep`'s training step that fits on `device`.

    `memory_cap_bytes` is required on CPU (the memory a try may use; above it counts as out
    of memory) and optional on CUDA (limits the allocator to less than the whole GPU).
    `step`, for tests: a callable micro_batch -> peak bytes that replaces the training step
    and its measurement (it may raise an out-of-memory error; optional ``reset()`` /
    ``free()`` / ``peak_after_failure()`` methods are called as on the real one).
    `on_try(try, details)` is called after each try (progress output).
    """
    dev = torch.device(device)
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {dev}")
    if memory_cap_bytes is not None and memory_cap_bytes <= 0:
        raise ValueError(f"memory cap must be positive, got {memory_cap_bytes}")
    if not 0.0 <= safety_margin < 1.0:
        raise ValueError(f"safety margin must be in [0, 1), got {safety_margin}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not 1 <= start <= max_batch:
        raise ValueError(f"need 1 <= start <= max_batch, got start={start}, max_batch={max_batch}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available on this machine (use --device cpu with a memory cap)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(dev)
        device_name, device_total = props.name, int(props.total_memory)
    else:
        if memory_cap_bytes is None:
            raise ValueError("a CPU probe needs a memory cap (memory_cap_bytes / --cpu-memory-cap-gib)")
        device_name, device_total = "cpu (memory cap)", int(memory_cap_bytes)
    total = device_total if memory_cap_bytes is None else min(device_total, int(memory_cap_bytes))
    seed = sweep.seeds[0]
    notes: list[str] = []
    if step is None and sweep.compile:
        notes.append("compile: true in the sweep, but the probe runs the model eager")
    held: list = []  # the CUDA reserve's placeholder, alive for the whole search
    tries: list[Try] = []
    details: list[dict] = []
    eval_check: Optional[dict] = None
    frozen = False
    try:
        if step is not None:
            setup = _Setup(step, "injected step", {})
        elif dev.type == "cuda":
            setup = _setup_cuda(sweep, dev, seed, repeats, memory_cap_bytes, notes, held)
        else:
            setup = _setup_cpu(sweep, dev, seed, repeats, notes)
        # Everything alive now outlives the probe: freezing it keeps the per-try gc.collect()
        # to the objects the tries create (a full collection over torch's modules takes ~0.2 s).
        gc.collect()
        gc.freeze()
        frozen = True

        def fits(b: int) -> bool:
            t, info = _run_try(setup.step, b, memory_cap_bytes)
            tries.append(t)
            details.append(info)
            if on_try:
                on_try(t, info)
            return t.ok

        largest, first_fail = (0, None) if setup.reserve_fails else search(fits, start, max_batch, resolution)
        if check_eval and step is None and not setup.reserve_fails:
            eval_check = _check_eval(setup.step, sweep, setup.streaming, memory_cap_bytes)
    finally:
        if frozen:
            gc.unfreeze()
        held.clear()
        if dev.type == "cuda" and torch.cuda.is_available():
            if memory_cap_bytes is not None:
                torch.cuda.set_per_process_memory_fraction(1.0, dev)
            gc.collect()
            torch.cuda.empty_cache()

    points = [(t.micro_batch, float(t.peak_bytes)) for t in tries if t.ok and t.peak_bytes is not None]
    if len({b for b, _ in points}) < 2:  # CPU tries above the cap still measured their step
        points += [(t.micro_batch, float(t.peak_bytes)) for t, d in zip(tries, details)
                   if not t.ok and t.peak_bytes is not None and d["error"] and d["error"].startswith("peak ")]
    fitted = fit_linear(points)
    # With a cap on CUDA the allocator may take the cap (the context lies outside it), else
    # what the device has left beside the context and other processes.
    outside = setup.outside_bytes
    usable = total if memory_cap_bytes is not None and dev.type == "cuda" and total + outside <= device_total \
        else total - outside
    budget = int(usable * (1.0 - safety_margin))
    fixed = per_sample = predicted = None
    if fitted is not None:
        fixed, per_sample = fitted
        predicted = predict_largest(fixed, per_sample, budget)
    return ProbeResult(
        tries=tries, largest_fit=largest, first_fail=first_fail, fixed_bytes=fixed,
        per_sample_bytes=per_sample, predicted_largest=predicted, device=device_name, total_bytes=total,
        budget_bytes=budget, safety_margin=safety_margin, memory_cap_bytes=memory_cap_bytes,
        device_type=dev.type, measurement=setup.measurement, reserved_bytes=setup.reserved, try_details=details,
        eval_check=eval_check, per_worker_batches=per_worker_batches(sweep), sweep=sweep.name,
        config_hash=sweep.config_hash(), memory_key=memory_key(sweep),
        limit_check=limit_check(tries, largest, usable),
        setup={"workload": sweep.workload, "model": sweep.model_name, "precision": sweep.precision,
               "channels_last": sweep.channels_last, "optimizer": sweep.optimizer.name,
               "accum_micro_batches_per_step": ACCUM_MICRO_BATCHES, "repeats": repeats, "start": start,
               "max_batch": max_batch, "resolution": resolution, "outside_bytes": outside,
               "heap_free_at_baseline_bytes": setup.heap_free_bytes, "torch": torch.__version__},
        notes=notes)


def _check_eval(the_step, sweep, streaming: bool, cap: Optional[int]) -> Optional[dict]:
    """Does one evaluation chunk fit? The worker evaluates in chunks of bench.feed.EVAL_CHUNK
    samples (streamed data: STREAM_EVAL_BATCH) whatever the micro-batch."""
    run_eval = getattr(the_step, "run_eval", None)
    if run_eval is None or sweep.batch_unit == "tokens":  # bench.lm.feed evaluates in micro-batch-sized batches
        return None
    from bench.feed import EVAL_CHUNK, STREAM_EVAL_BATCH

    num_train, num_test = sweep.dataset_sizes()
    n = max(1, min(STREAM_EVAL_BATCH if streaming else EVAL_CHUNK, max(num_train, num_test)))
    t, info = _run_try(run_eval, n, cap)
    return {"chunk": n, "ok": t.ok, "peak_bytes": t.peak_bytes, "error": info["error"]}
