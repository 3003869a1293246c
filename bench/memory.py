"""Per-run device memory: what one run needed, not what the worker group had seen before it.

Owns: the bookkeeping behind ``RunSummary.memory`` and the per-epoch ``torch_memory`` events.
Runs of one worker group share a process and so PyTorch's caching allocator: without care, a
batch-128 run after a batch-8192 run reports the cache the big run left (4.9 GiB reserved
instead of its own), and peak counters read after the last reset cover only the last
evaluation. So, at the start of each run: empty the cache, reset the peak counters, record the
run's own baseline; then keep training and evaluation peaks apart (reset before each training
segment, read before each evaluation, and the other way round).

The allocator is reached through a small backend (``CudaMemory`` by default) so the
bookkeeping is tested with a fake device on the CPU. On the CPU there is no allocator to ask:
``RunMemory.for_device`` returns None and the summary's ``memory`` is None.

Must not import: ray, pandas; torch only inside ``CudaMemory``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from bench.summary import MemorySummary

GIB = 2**30


class MemoryBackend(Protocol):
    def empty_cache(self) -> None: ...
    def reset_peak(self) -> None: ...
    def allocated(self) -> int: ...  # bytes now
    def reserved(self) -> int: ...
    def peak_allocated(self) -> int: ...  # bytes, since the last reset_peak
    def peak_reserved(self) -> int: ...


class CudaMemory:
    """PyTorch's CUDA caching allocator for one device."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch, self.device = torch, device

    def empty_cache(self) -> None:
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        self.torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int:
        return self.torch.cuda.memory_allocated(self.device)

    def reserved(self) -> int:
        return self.torch.cuda.memory_reserved(self.device)

    def peak_allocated(self) -> int:
        return self.torch.cuda.max_memory_allocated(self.device)

    def peak_reserved(self) -> int:
        return self.torch.cuda.max_memory_reserved(self.device)


@dataclass
class RunMemory:
    """Start it when the run starts; bracket training and evaluation with the phase methods."""

    backend: MemoryBackend
    baseline_allocated: int = 0
    baseline_reserved: int = 0
    train_peak: tuple[int, int] = (0, 0)  # (allocated, reserved) bytes, max over training segments
    eval_peak: Optional[tuple[int, int]] = None
    epoch_train_peak: tuple[int, int] = (0, 0)  # since the current epoch's first training segment
    _phase: Optional[str] = field(default=None, repr=False)

    @classmethod
    def for_device(cls, device: Any) -> Optional["RunMemory"]:
        return cls(CudaMemory(device)) if getattr(device, "type", None) == "cuda" else None

    def start_run(self) -> None:
        """Free what earlier runs left in the cache and reset the counters: this run's baseline."""
        self.backend.empty_cache()
        self.backend.reset_peak()
        self.baseline_allocated, self.baseline_reserved = self.backend.allocated(), self.backend.reserved()
        self.train_peak, self.eval_peak, self.epoch_train_peak, self._phase = (0, 0), None, (0, 0), None

    def _close_phase(self) -> None:
        if self._phase is None:
            return
        peak = (self.backend.peak_allocated(), self.backend.peak_reserved())
        if self._phase == "train":
            self.train_peak = _max(self.train_peak, peak)
            self.epoch_train_peak = _max(self.epoch_train_peak, peak)
        else:
            self.eval_peak = peak if self.eval_peak is None else _max(self.eval_peak, peak)
        self._phase = None

    def begin(self, phase: str) -> None:
        """Enter "train" or "eval": the previous phase's peak is booked, the counters reset."""
        if phase not in ("train", "eval"):
            raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
        self._close_phase()
        self.backend.reset_peak()
        self._phase = phase

    def end_epoch(self) -> tuple[float, float]:
        """(allocated, reserved) GiB peaks of this epoch's training; starts the next epoch's."""
        if self._phase == "train":
            self._close_phase()
            self.backend.reset_peak()
            self._phase = "train"
        out = (self.epoch_train_peak[0] / GIB, self.epoch_train_peak[1] / GIB)
        self.epoch_train_peak = (0, 0)
        return out

    def summary(self) -> MemorySummary:
        self._close_phase()
        ev = self.eval_peak
        return MemorySummary(
            baseline_allocated_gib=self.baseline_allocated / GIB, baseline_reserved_gib=self.baseline_reserved / GIB,
            train_peak_allocated_gib=self.train_peak[0] / GIB, train_peak_reserved_gib=self.train_peak[1] / GIB,
            eval_peak_allocated_gib=None if ev is None else ev[0] / GIB,
            eval_peak_reserved_gib=None if ev is None else ev[1] / GIB)

    def state(self) -> dict:
        return {"train_peak": list(self.train_peak), "eval_peak": None if self.eval_peak is None else list(self.eval_peak)}

    def load_state(self, state: dict) -> None:
        self.train_peak = tuple(state["train_peak"])
        self.eval_peak = None if state["eval_peak"] is None else tuple(state["eval_peak"])


def _max(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return max(a[0], b[0]), max(a[1], b[1])
