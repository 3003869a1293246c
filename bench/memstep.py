"""Memory probe, one try: the training step a probe try runs, and how its peak memory is measured.

Owns: the probe's copy of the worker's training step (``_Training``), its input
(``InputSpec`` / ``input_spec``), one try's measurement on CUDA (``_CudaStep``) and on CPU
(``_CpuStep`` with ``RssMeter``: the process's resident set, read from /proc where it can).
The search, out-of-memory handling and budget are bench.memmeasure's (``probe()``).

Must not import: ray, pandas. torch is imported here (only bench.memmeasure imports this
module, and only the probe command and tests import that).

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
device (in-memory workloads) are RESERVED: allocated as one placeholder on CUDA (by
``probe()``), added to the measured bytes on CPU (``reserved_bytes`` in the result).

Measurement:
- CUDA: ``torch.cuda.reset_peak_memory_stats`` before the try, ``max_memory_reserved``
  after it is the try's ``peak_bytes`` (what the caching allocator took from the device,
  which is what runs out), ``max_memory_allocated`` is recorded beside it. Between tries:
  ``zero_grad(set_to_none=True)``, ``del``, ``gc.collect()``, ``torch.cuda.empty_cache()``.
- CPU: there is no allocator counter, so a try's ``peak_bytes`` is the process's peak
  resident set during the try minus its resident set just before the model was built
  (plus the reserved bytes). On Linux the peak is the kernel's own high-water mark:
  ``/proc/self/clear_refs`` is written "5" (reset VmHWM) before the try and ``VmHWM`` read
  from ``/proc/self/status`` after it, so short spikes are not missed. Elsewhere a thread
  samples ``psutil`` RSS every millisecond (spikes shorter than that are missed).
  Library code paged in during a try (``RssFile``) is subtracted, and a throwaway model
  takes one warm-up step before the baseline (in ``probe()``) so lazy imports and
  initialisation are not counted. With glibc the probe fixes the mmap threshold at 128 KiB
  (``mallopt``, at the start of a CPU probe, before the data are loaded) and calls
  ``malloc_trim(0)`` between tries, so freed tensors leave the resident set: the numbers
  then follow live memory, repeatable to ~0.1 MiB (measured: blobs MLP, 622 bytes/sample,
  same boundary in three probes). Under glibc's default dynamic
  threshold the same step measured 1.1-1.5 KB/sample with a boundary varying by 30 % from
  probe to probe: heap fragmentation a long CPU run may also see, which the safety margin does
  not cover. The fix cannot undo what happened before it: memory freed earlier under the
  dynamic threshold stays in the heap as free chunks, and a try that reuses them counts their
  pages again (measured: after two ResNet-18 steps in the same process, 73 MiB of free chunks
  and 1.1-1.5 KB/sample again). The probe records those bytes (``heap_free_bytes``) and says
  so in its notes when they exceed ``HEAP_FREE_NOTE_BYTES``; ``batchscale probe-memory`` runs
  in a fresh process, where they are below 1 MiB. What stays resident across tries (thread
  stacks, allocator leftovers) counts against every later try, so the numbers err high by up to a few MiB; pages are 4 KiB.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import math
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

ACCUM_MICRO_BATCHES = 2  # micro-batches accumulated per probed optimizer step
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024
HEAP_FREE_NOTE_BYTES = 8 << 20  # free heap chunks at the baseline above this get a note


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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_GLIBC: list = []  # [libc or None], looked up once


def glibc() -> Optional[ctypes.CDLL]:
    """The C library when it is glibc with mallopt and malloc_trim, else None."""
    if not _GLIBC:
        libc = None
        with contextlib.suppress(OSError, TypeError):
            name = ctypes.util.find_library("c")
            candidate = ctypes.CDLL(name) if name else None
            if candidate is not None and hasattr(candidate, "malloc_trim") and hasattr(candidate, "mallopt"):
                libc = candidate
        _GLIBC.append(libc)
    return _GLIBC[0]


def fix_mmap_threshold() -> bool:
    """Put every allocation above 128 KiB in its own mapping, returned to the kernel on free,
    for the rest of this process (glibc's default threshold rises after each large free, up
    to 32 MiB). The earlier the better: memory freed before this call stays in the heap as
    free chunks (see ``heap_free_bytes``). False where the C library is not glibc."""
    libc = glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def heap_free_bytes() -> Optional[int]:
    """Bytes in free chunks of the malloc heaps (glibc's ``mallinfo2().fordblks``, all arenas),
    after ``malloc_trim``; None where unknown (not glibc, or glibc older than 2.33). A try whose
    small allocations land in such chunks touches their pages again, so the CPU peak counts
    pages the step's live memory does not need: measured, 73 MiB left free by two ResNet-18
    steps run before the threshold was fixed doubled the blobs MLP's bytes per sample."""
    libc = glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().fordblks)


class RssMeter:
    """Peak resident set of this process over an interval (see the module docstring)."""

    def __init__(self) -> None:
        self.kernel_hwm = self._can_reset_hwm()
        self._samples: list[int] = []
        self._base_rss = self._base_file = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._libc = glibc() if fix_mmap_threshold() else None

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
        self.optimizer = build_optimizer(sweep.optimizer, self.model, sweep.lr.reference_lr)
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
        """The worker's own training step (bench.step.TrainStep) over ACCUM_MICRO_BATCHES
        micro-batches made one at a time, with the noise probe when the sweep measures it."""
        from bench.noise import MicroBatchProbe
        from bench.step import TrainStep

        probe = (MicroBatchProbe(self.model.parameters(), micro_batch, ACCUM_MICRO_BATCHES)
                 if self.sweep.noise_scale_every_steps else None)
        micro_batches = ((self.batch(micro_batch),
                          torch.randint(0, self.spec.num_classes, (micro_batch,), device=self.device))
                         for _ in range(ACCUM_MICRO_BATCHES))
        step = TrainStep(self.model, self.optimizer, grad_accum_steps=ACCUM_MICRO_BATCHES,
                         label_smoothing=self.sweep.label_smoothing, autocast=self.autocast)
        step(micro_batches, micro_batch * ACCUM_MICRO_BATCHES, self.sweep.lr.reference_lr, observer=probe)

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
