"""Memory probe: the largest per-GPU micro-batch a sweep's training step fits in.

Owns: ``batchscale probe-memory`` (``register``), the search (doubling from ``start``
until a step runs out of memory, then bisection between the last fit and the first
failure), the per-try peak-memory measurement, the linear fit
``memory ~ fixed + per_sample x micro_batch`` over the successful tries with the
largest batch it predicts for the device's memory less a safety margin, the choice of
micro-batch of each per-worker batch for ``auto`` (``micro_batch_per_worker_batch``), and the probe file
(``results/<sweep>/memory-probe.json``, written atomically; ``load_probe`` reads it back
and refuses one made for a different model / precision / optimizer).

Must not import: ray, pandas. torch is imported here (the CLI imports this module lazily).

What one try runs (``_Training.step``), built as the worker builds it: the sweep's model
from ``bench.models.build_model`` with the workload's input shape and class count (taken
from a tiny load of the workload, or the streaming loader's ``input_shape``), moved to the
device in channels_last when configured, the sweep's optimizer (``bench.optim``), then one
optimizer step made of TWO accumulated micro-batches of the probed size: random inputs of
the data's shape (a fresh tensor per micro-batch, as the worker's ``x_train[idx]`` gather
is), the workload's crop+flip when it has one, bf16 autocast when ``precision: bf16``,
``cross_entropy(logits.float(), y, reduction="sum", label_smoothing)``, backward, then
``optimizer.step()`` and ``zero_grad(set_to_none=True)``. Two micro-batches because the
second forward/backward runs with the first one's gradients resident, which is the worst
case of an accumulating step and so covers what ``auto`` will run (for a run without
accumulation it errs high by about one copy of the gradients); each try repeats the
step (``repeats``, default 2) so optimizer state exists throughout, as in steady-state
training. With ``noise_scale_every_steps`` the worker's ``GradNoiseProbe`` runs too (it
keeps a copy of the gradients). Not reproduced: ``torch.compile`` (the probe runs eager)
and DDP; instead the memory DDP adds when a sweep has more than one worker (its gradient
buckets, one copy of the gradients) and the training + test sets the worker keeps on its
device (in-memory workloads) are RESERVED: allocated as one placeholder on CUDA, added to
the measured bytes on CPU (``reserved_bytes`` in the result).

Measurement:
- CUDA: ``torch.cuda.reset_peak_memory_stats`` before the try, ``max_memory_reserved``
  after it is the try's ``peak_bytes`` (what the caching allocator took from the device,
  which is what runs out), ``max_memory_allocated`` is recorded beside it. A try fails on
  ``torch.cuda.OutOfMemoryError``; with a memory cap the allocator is also limited to the
  cap (``set_per_process_memory_fraction``) and a peak above the cap fails. Between tries:
  ``zero_grad(set_to_none=True)``, ``del``, ``gc.collect()``, ``torch.cuda.empty_cache()``.
  The prediction's budget is (total - memory used outside this process's allocator when
  the probe starts: the CUDA context, other processes) x (1 - safety margin); with a cap,
  cap x (1 - margin) when the cap leaves room for that outside use.
- CPU: there is no allocator counter, so a try's ``peak_bytes`` is the process's peak
  resident set during the try minus its resident set just before the model was built
  (plus the reserved bytes). On Linux the peak is the kernel's own high-water mark:
  ``/proc/self/clear_refs`` is written "5" (reset VmHWM) before the try and ``VmHWM`` read
  from ``/proc/self/status`` after it, so short spikes are not missed. Elsewhere a thread
  samples ``psutil`` RSS every millisecond (spikes shorter than that are missed).
  Library code paged in during a try (``RssFile``) is subtracted, and a throwaway model
  takes one warm-up step before the baseline so lazy imports and initialisation are not
  counted. With glibc the probe fixes the mmap threshold at 128 KiB (``mallopt``) and calls
  ``malloc_trim(0)`` between tries, so freed tensors leave the resident set: the numbers
  then follow live memory, repeatable to ~0.1 MiB (measured: blobs MLP, 622 bytes/sample,
  same boundary in three probes). Under glibc's default dynamic threshold the same step
  measured 1.1-1.5 KB/sample with a boundary varying by 30 % from probe to probe: heap
  fragmentation a long CPU run may also see, which the safety margin does not cover.
  What stays resident across tries (thread stacks, allocator leftovers) counts against
  every later try, so the numbers err high by up to a few MiB; pages are 4 KiB. A try
  "runs out of memory" when its peak is above ``memory_cap_bytes`` (the step completes;
  it is never killed midway) or torch fails to allocate.

Choice for ``max_micro_batch_size: auto`` (``micro_batch_per_worker_batch``): each per-worker
batch P runs whole when P <= the measured largest fit, else as P / M micro-batches of M, the
largest divisor of P that fits (``plan_sweep`` takes this mapping). Per batch rather than one
sweep-wide cap: a single cap must divide every P above it, so with P = 64, 256, 480 and a fit
of 90 it would be 32 and split the 64 that fits whole; per batch, 64 runs whole and 256, 480
as 4 x 64 and 6 x 80. A P with no large divisor (a prime, say) gets small micro-batches:
the probe command prints each choice so that shows before a sweep runs.

After the search, one evaluation chunk (``bench.feed.EVAL_CHUNK`` samples, forward only,
no grad) is run once and reported as ``eval_check``: the worker evaluates in chunks of that
size whatever the micro-batch, so a large model can fit its micro-batch and still fail there.

Measured on a 2-core CPU: probing the blobs MLP under an 8 MiB cap takes 28 tries (0.8 s of
steps, ~3 s with the workload load, warm-up and eval check).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import hashlib
import json
import math
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

SCHEMA = "batchscale.memory-probe/1"
PROBE_FILE = "memory-probe.json"
ACCUM_MICRO_BATCHES = 2  # micro-batches accumulated per probed optimizer step
DEFAULT_SAFETY_MARGIN = 0.10
GIB = 2**30
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


class Try(NamedTuple):
    micro_batch: int
    ok: bool
    peak_bytes: Optional[int]  # None when nothing was measured (failure before any step ended)


@dataclass
class ProbeResult:
    tries: list[Try]
    largest_fit: int  # 0: not even the smallest micro-batch tried fits
    first_fail: Optional[int]  # None: max_batch fits
    fixed_bytes: Optional[float]  # None: fewer than two measured batch sizes
    per_sample_bytes: Optional[float]
    predicted_largest: Optional[int]  # None: no fit, or memory does not grow with the batch
    device: str  # e.g. "NVIDIA H100 80GB HBM3" or "cpu (memory cap)"
    total_bytes: int  # device memory, or the CPU cap
    budget_bytes: int = 0  # what the prediction may use: total less outside use and the margin
    safety_margin: float = DEFAULT_SAFETY_MARGIN
    memory_cap_bytes: Optional[int] = None
    device_type: str = "cpu"
    measurement: str = ""
    reserved_bytes: dict[str, int] = field(default_factory=dict)
    try_details: list[dict] = field(default_factory=list)  # per try: allocated, seconds, error
    eval_check: Optional[dict] = None  # one evaluation chunk's forward (bench.feed.EVAL_CHUNK)
    per_worker_batches: list[int] = field(default_factory=list)
    sweep: str = ""
    config_hash: str = ""
    memory_key: str = ""
    setup: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tries"] = [dict(t._asdict(), **extra) for t, extra in
                      zip(self.tries, self.try_details + [{}] * (len(self.tries) - len(self.try_details)))]
        del d["try_details"]
        choice: dict[str, Any] = {}
        if self.largest_fit > 0 and self.per_worker_batches:
            choice = {"by_per_worker_batch": {str(p): m for p, m in micro_batch_per_worker_batch(self).items()}}
        d["choice"] = choice
        return {"schema": SCHEMA, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "ProbeResult":
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a memory probe file (schema {d.get('schema')!r}, expected {SCHEMA!r})")
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        rows = d.pop("tries")
        d["tries"] = [Try(int(r["micro_batch"]), bool(r["ok"]), r["peak_bytes"]) for r in rows]
        d["try_details"] = [{k: v for k, v in r.items() if k not in Try._fields} for r in rows]
        return cls(**d)


class ProbeMismatch(ValueError):
    """No usable probe for this sweep: missing, unreadable, or measured for a different model,
    input, precision or optimizer (the message says which, and what to run)."""


# --- search and fit (pure) --------------------------------------------------------------------

def search(fits: Callable[[int], bool], start: int = 1, max_batch: int = 65536) -> tuple[int, Optional[int]]:
    """(largest fitting batch, smallest failing batch) of a monotone `fits`: doubling from
    `start` (the last try is max_batch itself), then bisection between the last fit and the
    first failure. A failing `start` bisects down from it; largest 0 means 1 fails too."""
    if not 1 <= start <= max_batch:
        raise ValueError(f"need 1 <= start <= max_batch, got start={start}, max_batch={max_batch}")
    lo, hi, b = 0, None, start
    while True:
        if fits(b):
            lo = b
            if b >= max_batch:
                return lo, None
            b = min(2 * b, max_batch)
        else:
            hi = b
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def fit_linear(points: Sequence[tuple[int, float]]) -> Optional[tuple[float, float]]:
    """Least squares (fixed, per_sample) of bytes = fixed + per_sample x batch; None when
    fewer than two distinct batch sizes."""
    if len({b for b, _ in points}) < 2:
        return None
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    sbb = sum((b - mean_b) ** 2 for b, _ in points)
    sbm = sum((b - mean_b) * (m - mean_m) for b, m in points)
    slope = sbm / sbb
    return mean_m - slope * mean_b, slope


def predict_largest(fixed: float, per_sample: float, budget_bytes: float) -> Optional[int]:
    """Largest batch with fixed + per_sample x batch <= budget; None if memory does not grow."""
    if per_sample <= 0 or not math.isfinite(per_sample):
        return None
    return max(0, int(math.floor((budget_bytes - fixed) / per_sample)))


# --- micro-batch choice --------------------------------------------------------------------------

def per_worker_batches(sweep) -> list[int]:
    """Every per-worker batch the sweep plans (global batches divisible by the worker count)."""
    return sorted({g // w for w in sweep.num_workers for g in sweep.global_batch_sizes if g % w == 0})


def _largest_divisor_at_most(n: int, limit: int) -> int:
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            for c in (d, n // d):
                if best < c <= limit:
                    best = c
    return best


def micro_batch_per_worker_batch(result: ProbeResult, batches: Optional[Sequence[int]] = None, *,
                                 limit: Optional[int] = None) -> dict[int, int]:
    """``max_micro_batch_size: auto``: for each per-worker batch P on its own, the largest
    divisor of P that fits (P itself when it fits: no accumulation)."""
    limit = result.largest_fit if limit is None else limit
    ps = sorted(set(batches if batches is not None else result.per_worker_batches))
    if limit < 1:
        return {}
    return {p: p if p <= limit else _largest_divisor_at_most(p, limit) for p in ps}


# --- memory key: what the measurement depends on -------------------------------------------------

def memory_key(sweep) -> str:
    """Hash of the sweep settings that change a step's memory (not lr, epochs, batches, ...)."""
    relevant = {
        "workload": sweep.workload, "workload_options": sweep.workload_options, "model": sweep.model_name,
        "precision": sweep.precision, "channels_last": sweep.channels_last,
        "optimizer": sweep.optimizer.name, "noise_scale": sweep.noise_scale_every_steps > 0,
        "ddp": max(sweep.num_workers) > 1,
    }
    blob = json.dumps(relevant, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --- CPU resident-set measurement ----------------------------------------------------------------

def _proc_status_bytes(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


class RssMeter:
    """Peak resident set of this process over an interval (see the module docstring)."""

    def __init__(self) -> None:
        self.kernel_hwm = self._can_reset_hwm()
        self._samples: list[int] = []
        self._base_rss = self._base_file = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        libc_name = ctypes.util.find_library("c")
        self._libc = None
        with contextlib.suppress(OSError, TypeError):
            libc = ctypes.CDLL(libc_name) if libc_name else None
            if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt"):
                self._libc = libc
                # A fixed mmap threshold (glibc's default one rises after each large free) puts
                # every tensor above 128 KiB in its own mapping, returned on free: the resident
                # set then follows live memory. Process-wide and permanent, like the probe.
                libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)

    @property
    def method(self) -> str:
        how = ("peak RSS from the kernel high-water mark (/proc/self/clear_refs 5, VmHWM)" if self.kernel_hwm
               else "peak RSS sampled by a thread every 1 ms (psutil); shorter spikes are missed")
        return how + (", glibc mmap threshold fixed at 128 KiB and malloc_trim between tries" if self._libc else "")

    @staticmethod
    def _can_reset_hwm() -> bool:
        if _proc_status_bytes("VmHWM") is None:
            return False
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def current() -> int:
        rss = _proc_status_bytes("VmRSS")
        if rss is not None:
            return rss
        import psutil

        return int(psutil.Process().memory_info().rss)

    @staticmethod
    def file_pages() -> int:
        """Resident file-backed and shared pages (shared-library code paged in); 0 when unknown."""
        return (_proc_status_bytes("RssFile") or 0) + (_proc_status_bytes("RssShmem") or 0)

    def trim(self) -> None:
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)

    def mark_baseline(self) -> None:
        """Everything resident now (interpreter, libraries, data) is not the step's."""
        self.trim()
        self._base_rss, self._base_file = self.current(), self.file_pages()

    def start(self) -> None:
        if self.kernel_hwm:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            return
        import psutil

        proc = psutil.Process()
        self._samples = [int(proc.memory_info().rss)]
        self._stop.clear()

        def sample() -> None:
            while not self._stop.wait(0.001):
                self._samples.append(int(proc.memory_info().rss))

        self._thread = threading.Thread(target=sample, name="memprobe-rss", daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Peak resident growth since mark_baseline(), over the interval since start(), less the
        library pages paged in meanwhile (they are not the step's memory)."""
        if self.kernel_hwm:
            peak = max(_proc_status_bytes("VmHWM") or 0, self.current())
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            peak = max(self._samples + [self.current()])
        file_growth = max(0, self.file_pages() - self._base_file)
        return max(0, peak - self._base_rss - file_growth)


# --- the training step, as the worker runs it ----------------------------------------------------

def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                              or "not enough memory" in msg)


@dataclass
class InputSpec:
    shape: tuple[int, ...]
    num_classes: int
    augment: str
    streaming: bool  # uint8 images normalised on the device (bench.workloads.vision.StreamingData)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    resident_bytes: int = 0  # train + test sets the worker keeps on its device


def input_spec(sweep, seed: int = 0) -> InputSpec:
    """Input shape and classes from a tiny load of the workload (num_train/num_test cut to 2
    where the options have them), and the bytes the full sets take on the worker's device."""
    from bench import workloads
    from bench.workloads.data import Data

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


class _Training:
    """Model + optimizer + one optimizer step over ACCUM_MICRO_BATCHES random micro-batches."""

    def __init__(self, sweep, spec: InputSpec, device: torch.device, seed: int = 0) -> None:
        from bench.models import build_model
        from bench.optim import build_optimizer

        self.sweep, self.spec, self.device = sweep, spec, device
        torch.manual_seed(seed)
        self.memory_format = torch.channels_last if sweep.channels_last and len(spec.shape) == 3 \
            else torch.contiguous_format
        model = build_model(sweep.model_name, spec.shape, spec.num_classes)
        self.model = model.to(device, memory_format=self.memory_format)
        self.model.train()
        self.optimizer = build_optimizer(sweep.optimizer, self.model, sweep.lr.base_lr)
        use_bf16 = sweep.precision == "bf16"
        self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)

    def batch(self, n: int, augment: bool = True) -> torch.Tensor:
        s = self.spec
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

    def step(self, micro_batch: int) -> None:
        probe = None
        if self.sweep.noise_scale_every_steps:
            from bench.noise import GradNoiseProbe

            probe = GradNoiseProbe(self.model.parameters(), micro_batch, ACCUM_MICRO_BATCHES, 1)
        scale = 1.0 / (micro_batch * ACCUM_MICRO_BATCHES)
        for _ in range(ACCUM_MICRO_BATCHES):
            x = self.batch(micro_batch)
            y = torch.randint(0, self.spec.num_classes, (micro_batch,), device=self.device)
            with self.autocast():
                logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y, reduction="sum", label_smoothing=self.sweep.label_smoothing)
            (loss * scale).backward()
            del x, y, logits, loss
            if probe is not None:
                probe.after_micro_backward()
        if probe is not None:
            probe.finish()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_chunk(self, n: int) -> None:
        self.model.eval()
        try:
            x = self.batch(n, augment=False)  # evaluation does not augment
            with self.autocast():
                logits = self.model(x)
            y = torch.randint(0, self.spec.num_classes, (n,), device=self.device)
            (logits.argmax(1) == y).sum()
            F.cross_entropy(logits.float(), y, reduction="sum")
        finally:
            self.model.train()

    def reset(self) -> None:
        """After a failed try: drop partial gradients."""
        self.optimizer.zero_grad(set_to_none=True)


class _CudaStep:
    """One try on CUDA: `repeats` steps, peak = max_memory_reserved after a reset."""

    def __init__(self, training: _Training, repeats: int) -> None:
        self.training, self.repeats, self.device = training, repeats, training.device
        self.last_allocated: Optional[int] = None

    def _start(self) -> None:
        self.last_allocated = None
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def _peak(self) -> int:
        torch.cuda.synchronize(self.device)
        self.last_allocated = int(torch.cuda.max_memory_allocated(self.device))
        return int(torch.cuda.max_memory_reserved(self.device))

    def __call__(self, micro_batch: int) -> int:
        self._start()
        for _ in range(self.repeats):
            self.training.step(micro_batch)
        return self._peak()

    def peak_after_failure(self) -> Optional[int]:
        with contextlib.suppress(Exception):
            return int(torch.cuda.max_memory_reserved(self.device))
        return None

    def run_eval(self, n: int) -> int:
        self._start()
        self.training.eval_chunk(n)
        return self._peak()

    def reset(self) -> None:
        self.training.reset()

    def free(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()


class _CpuStep:
    """One try on CPU: `repeats` steps, peak = resident-set growth over the probe's baseline."""

    def __init__(self, training: _Training, repeats: int, meter: RssMeter, reserved: int) -> None:
        self.training, self.repeats, self.meter, self.reserved = training, repeats, meter, reserved
        self.last_allocated: Optional[int] = None

    def __call__(self, micro_batch: int) -> int:
        self.meter.start()
        try:
            for _ in range(self.repeats):
                self.training.step(micro_batch)
        finally:
            peak = self.meter.stop()
        return peak + self.reserved

    def run_eval(self, n: int) -> int:
        self.meter.start()
        try:
            self.training.eval_chunk(n)
        finally:
            peak = self.meter.stop()
        return peak + self.reserved

    def reset(self) -> None:
        self.training.reset()

    def free(self) -> None:
        self.meter.trim()


# --- the probe -------------------------------------------------------------------------------

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


def probe(sweep, *, device: str | torch.device = "cuda", memory_cap_bytes: Optional[int] = None,
          start: int = 1, max_batch: int = 65536, safety_margin: float = DEFAULT_SAFETY_MARGIN,
          repeats: int = 2, step: Optional[Callable[[int], int]] = None,
          on_try: Optional[Callable[[Try, dict], None]] = None, check_eval: bool = True) -> ProbeResult:
    """Find the largest micro-batch of `sweep`'s training step that fits on `device`.

    `memory_cap_bytes` is required on CPU (the memory a try may use; above it counts as out
    of memory) and optional on CUDA (limits the allocator to less than the whole GPU).
    `step`, for tests: a callable micro_batch -> peak bytes that replaces the training step
    and its measurement (it may raise an out-of-memory error; optional ``reset()`` /
    ``free()`` / ``peak_after_failure()`` methods are called as on the real ones).
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
    seed = sweep.seeds[0]
    notes: list[str] = []
    reserved: dict[str, int] = {}
    outside = 0
    placeholder = None
    restore_fraction = frozen = reserve_fails = False
    eval_check: Optional[dict] = None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available on this machine (use --device cpu with a memory cap)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(dev)
        device_name, total = props.name, int(props.total_memory)
        device_total = total
    else:
        if memory_cap_bytes is None:
            raise ValueError("a CPU probe needs a memory cap (memory_cap_bytes / --cpu-memory-cap-gib)")
        device_name, total = "cpu (memory cap)", int(memory_cap_bytes)
        device_total = total
    if memory_cap_bytes is not None:
        total = min(total, int(memory_cap_bytes))
    try:
        if step is not None:
            measurement = "injected step"
            the_step: Callable[[int], int] = step
        else:
            spec = input_spec(sweep, seed)
            if spec.resident_bytes:
                reserved["resident_data"] = spec.resident_bytes
            if sweep.compile:
                notes.append("compile: true in the sweep, but the probe runs the model eager")
            if dev.type == "cuda":
                torch.cuda.init()
                free_b, total_b = torch.cuda.mem_get_info(dev)
                outside = max(0, total_b - free_b - torch.cuda.memory_reserved(dev))
                if memory_cap_bytes is not None:
                    torch.cuda.set_per_process_memory_fraction(min(1.0, memory_cap_bytes / total_b), dev)
                    restore_fraction = True
                training = _Training(sweep, spec, dev, seed)
                if max(sweep.num_workers) > 1:
                    reserved["ddp_buckets"] = training.param_bytes()
                if sum(reserved.values()):
                    try:
                        placeholder = torch.empty(sum(reserved.values()), dtype=torch.uint8, device=dev)
                    except torch.cuda.OutOfMemoryError:
                        reserve_fails = True
                        notes.append(f"the reserved {_mib(sum(reserved.values()))} ({', '.join(reserved)}) "
                                     "alone do not fit: no micro-batch was tried")
                the_step = _CudaStep(training, repeats)
                measurement = "torch.cuda.max_memory_reserved per try (max_memory_allocated alongside)"
            else:
                # Warm up once with a throwaway copy so that lazy imports and initialisation
                # (torch._dynamo through torch.optim, oneDNN, the autograd engine) land before
                # the baseline instead of in the first try.
                warm = _Training(sweep, spec, dev, seed)
                warm.step(1)
                warm.eval_chunk(1)
                del warm
                meter = RssMeter()
                meter.mark_baseline()
                training = _Training(sweep, spec, dev, seed)
                if max(sweep.num_workers) > 1:
                    reserved["ddp_buckets"] = training.param_bytes()
                the_step = _CpuStep(training, repeats, meter, sum(reserved.values()))
                measurement = meter.method + ", minus the resident set before the model was built and library pages"
        tries: list[Try] = []
        details: list[dict] = []
        # Everything alive now outlives the probe: freezing it keeps the per-try gc.collect()
        # to the objects the tries create (a full collection over torch's modules takes ~0.2 s).
        gc.collect()
        gc.freeze()
        frozen = True

        def fits(b: int) -> bool:
            t, info = _run_try(the_step, b, memory_cap_bytes)
            tries.append(t)
            details.append(info)
            if on_try:
                on_try(t, info)
            return t.ok

        largest, first_fail = (0, None) if reserve_fails else search(fits, start, max_batch)
        if check_eval and step is None and not reserve_fails:
            eval_check = _check_eval(the_step, sweep, spec.streaming, memory_cap_bytes)
    finally:
        if frozen:
            gc.unfreeze()
        del placeholder
        if restore_fraction:
            torch.cuda.set_per_process_memory_fraction(1.0, dev)
        if dev.type == "cuda" and torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()

    points = [(t.micro_batch, float(t.peak_bytes)) for t in tries if t.ok and t.peak_bytes is not None]
    if len({b for b, _ in points}) < 2:  # CPU tries above the cap still measured their step
        points += [(t.micro_batch, float(t.peak_bytes)) for t, d in zip(tries, details)
                   if not t.ok and t.peak_bytes is not None and d["error"] and d["error"].startswith("peak ")]
    fitted = fit_linear(points)
    # With a cap on CUDA the allocator may take the cap (the context lies outside it), else
    # what the device has left beside the context and other processes.
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
        device_type=dev.type, measurement=measurement, reserved_bytes=reserved, try_details=details,
        eval_check=eval_check, per_worker_batches=per_worker_batches(sweep), sweep=sweep.name,
        config_hash=sweep.config_hash(), memory_key=memory_key(sweep),
        setup={"workload": sweep.workload, "model": sweep.model_name, "precision": sweep.precision,
               "channels_last": sweep.channels_last, "optimizer": sweep.optimizer.name,
               "accum_micro_batches_per_step": ACCUM_MICRO_BATCHES, "repeats": repeats, "start": start,
               "max_batch": max_batch, "outside_bytes": outside, "torch": torch.__version__},
        notes=notes)


def _check_eval(the_step, sweep, streaming: bool, cap: Optional[int]) -> Optional[dict]:
    """Does one evaluation chunk's forward (no grad) fit? The worker evaluates in chunks of
    bench.feed.EVAL_CHUNK samples (streamed data: STREAM_EVAL_BATCH) whatever the micro-batch."""
    run_eval = getattr(the_step, "run_eval", None)
    if run_eval is None:
        return None
    from bench.feed import EVAL_CHUNK, STREAM_EVAL_BATCH

    num_train, num_test = sweep.dataset_sizes()
    n = max(1, min(STREAM_EVAL_BATCH if streaming else EVAL_CHUNK, max(num_train, num_test)))
    t, info = _run_try(run_eval, n, cap)
    return {"chunk": n, "ok": t.ok, "peak_bytes": t.peak_bytes, "error": info["error"]}


# --- the probe file ------------------------------------------------------------------------------

def default_output(sweep, results_dir: str | Path = "results") -> Path:
    return Path(results_dir) / sweep.name / PROBE_FILE


def write_probe(result: ProbeResult, path: str | Path) -> Path:
    from bench.store import atomic_write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    data["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(path, data)
    return path


def load_probe(path: str | Path, sweep=None) -> ProbeResult:
    """Read a probe file; with `sweep`, refuse (ProbeMismatch) one that measured a different
    model, input, precision, optimizer or parallelism."""
    result = ProbeResult.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    if sweep is not None and result.memory_key != memory_key(sweep):
        raise ProbeMismatch(f"{path} was measured for a different model / input / precision / optimizer "
                            f"than sweep {sweep.name!r} now asks for; run batchscale probe-memory again")
    return result


def micro_batch_for_auto(sweep, results_dir: str | Path = "results") -> tuple[dict[int, int], Path]:
    """``max_micro_batch_size: auto``: the micro-batch of each per-worker batch, chosen from
    RESULTS_DIR/<sweep>/memory-probe.json, and that path. Raises ProbeMismatch (a ValueError) when the file is missing, unreadable,
    made for another model / precision / optimizer, or found that nothing fits."""
    path = default_output(sweep, results_dir)
    if not path.is_file():
        raise ProbeMismatch(f"max_micro_batch_size: auto needs a memory probe; run "
                            f"`batchscale probe-memory SWEEP --results-dir {results_dir}` on a GPU node "
                            f"first (no {path})")
    try:
        result = load_probe(path, sweep)
    except ProbeMismatch:
        raise
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise ProbeMismatch(f"{path}: not a readable memory probe ({type(err).__name__}: {err})") from None
    if result.largest_fit < 1:
        raise ProbeMismatch(f"{path}: no micro-batch fits: even {result.first_fail or 1} sample(s) ran out "
                            f"of memory on {result.device}")
    return micro_batch_per_worker_batch(result, per_worker_batches(sweep)), path


# --- command line ----------------------------------------------------------------------------

def _mib(b: Optional[float]) -> str:
    return "?" if b is None else f"{b / 2**20:,.1f} MiB"


def cmd_probe_memory(args: argparse.Namespace) -> int:
    from bench.cli import EXIT_FAILED, UserError
    from bench.config import ConfigError, load_sweep

    try:
        sweep, sweep_path = load_sweep(args.sweep)
    except ConfigError as err:
        raise UserError(str(err)) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cap_gib = args.cpu_memory_cap_gib if device == "cpu" else args.gpu_memory_cap_gib
    if device == "cpu" and cap_gib is None:
        raise UserError("--device cpu needs --cpu-memory-cap-gib (the memory a try may use)")
    if device == "cpu" and args.gpu_memory_cap_gib is not None:
        raise UserError("--gpu-memory-cap-gib applies to --device cuda; use --cpu-memory-cap-gib")
    if device == "cuda" and args.cpu_memory_cap_gib is not None:
        raise UserError("--cpu-memory-cap-gib applies to --device cpu; use --gpu-memory-cap-gib")
    if cap_gib is not None and not 0 < cap_gib < 1e6:
        raise UserError(f"memory cap must be a positive number of GiB, got {cap_gib}")
    if not 1 <= args.start <= args.max_batch:
        raise UserError(f"need 1 <= --start <= --max-batch, got {args.start} and {args.max_batch}")
    if not 0 <= args.safety_margin < 1:
        raise UserError(f"--safety-margin must be in [0, 1), got {args.safety_margin}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available here (torch "
                        f"{torch.__version__}); use --device cpu --cpu-memory-cap-gib X", EXIT_FAILED)
    out = Path(args.output) if args.output else default_output(sweep, args.results_dir)
    cap = int(cap_gib * GIB) if cap_gib is not None else None

    def show(t: Try, info: dict) -> None:
        what = "fits" if t.ok else "out of memory"
        print(f"  micro-batch {t.micro_batch:>7}: {what:<13} peak {_mib(t.peak_bytes):>14}  "
              f"({info['seconds']:.2f} s)", flush=True)

    print(f"probing {sweep.name} ({sweep.model_name} on {sweep.workload}, {sweep.precision}"
          f"{', channels_last' if sweep.channels_last else ''}) on {device}"
          + (f", cap {cap_gib:g} GiB" if cap else ""), flush=True)
    try:
        result = probe(sweep, device=device, memory_cap_bytes=cap, start=args.start, max_batch=args.max_batch,
                       safety_margin=args.safety_margin, repeats=args.repeats, on_try=show)
    except OSError as err:
        raise UserError(f"{sweep_path}: cannot load workload {sweep.workload!r}: {err}", EXIT_FAILED) from None
    try:
        write_probe(result, out)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}", EXIT_FAILED) from None
    print(f"device {result.device}: {_mib(result.total_bytes)}; largest micro-batch that fits: "
          f"{result.largest_fit}" + (f" (first failure {result.first_fail})" if result.first_fail else
                                     f" (max tried: {args.max_batch})"))
    if result.per_sample_bytes is not None:
        print(f"fit: {_mib(result.fixed_bytes)} + {result.per_sample_bytes / 2**10:,.1f} KiB x micro-batch; "
              f"predicted largest within {_mib(result.budget_bytes)} ({result.safety_margin:.0%} margin): "
              f"{result.predicted_largest if result.predicted_largest is not None else 'unbounded'}")
    if result.eval_check and not result.eval_check["ok"]:
        print(f"batchscale: warning: an evaluation chunk of {result.eval_check['chunk']} samples does not fit "
              f"({result.eval_check['error']})", file=sys.stderr)
    print(f"probe: {out}")
    if result.largest_fit < 1:
        raise UserError(f"no micro-batch fits on {result.device}: even {result.first_fail} ran out of memory "
                        f"(see {out})", EXIT_FAILED)
    chosen = micro_batch_per_worker_batch(result)
    print("max_micro_batch_size: auto runs per-worker batch " + ", ".join(
        f"{p} as {p // m} x {m}" if m < p else f"{p} whole" for p, m in chosen.items()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `probe-memory` to the batchscale parser."""
    p = sub.add_parser("probe-memory", help="largest per-GPU micro-batch the sweep's training step fits")
    p.add_argument("sweep", help="sweep YAML, or a packaged name")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    p.add_argument("--cpu-memory-cap-gib", type=float, help="with --device cpu (required): memory a try may use")
    p.add_argument("--gpu-memory-cap-gib", type=float, help="with --device cuda: probe as if the GPU had this much")
    p.add_argument("--start", type=int, default=1, help="first micro-batch tried (default 1; doubles from there)")
    p.add_argument("--max-batch", type=int, default=65536, help="largest micro-batch tried (default 65536)")
    p.add_argument("--safety-margin", type=float, default=DEFAULT_SAFETY_MARGIN,
                   help="share of memory kept free in the prediction (default 0.1)")
    p.add_argument("--repeats", type=int, default=2, choices=range(1, 11), metavar="N",
                   help="optimizer steps per try (default 2)")
    p.add_argument("--results-dir", default="results", help="results root (default: ./results)")
    p.add_argument("-o", "--output", help="probe JSON (default: RESULTS_DIR/<sweep>/memory-probe.json)")
    p.set_defaults(func=cmd_probe_memory)
