"""Gradient noise scale, measured in-run from gradients the step computes anyway.

Owns: McCandlish et al. 2018 (appendix A) two-batch estimators of |G|^2 and tr(Sigma)
(``gns_estimates``), their bias-corrected EMA and B_simple = tr(Sigma)/|G|^2
(``NoiseScaleEMA``), and the torch side of one measurement step (``GradNoiseProbe``,
``grad_sq_norm``, ``allreduce_grads_mean``), plus a way to time that cost.

Must not import: ray, pandas, bench.optim (torch.distributed: only when world_size > 1).

Why it works: a mean gradient over b i.i.d. samples has E|G_b|^2 = |G|^2 + tr(Sigma)/b.
With two batch sizes b < B, the two linear equations give unbiased estimates
    |G|^2   ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sig) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B).
Each single estimate is very noisy (it can be negative); McCandlish et al. average both
with an EMA (beta ~ 0.99) *before* dividing.

Protocol for the worker loop (one optimizer step = grad_accum_steps micro-batches per
worker; each micro-batch loss is the mean over its samples divided by grad_accum_steps,
as for ordinary accumulation; micro-batches all hold micro_batch_size samples). Only on a
measurement step (step % noise_scale_every_steps == 0, and ``probe_batch_sizes(...)`` is
not None), after the usual optimizer.zero_grad():

    probe = GradNoiseProbe(model.parameters(), micro_batch_size, grad_accum_steps, world_size)
    for micro_x, micro_y in micro_batches:
        with ddp_model.no_sync():     # ALL micro-steps, forward and backward: .grad stays local
            (loss_fn(ddp_model(micro_x), micro_y) / grad_accum_steps).backward()
        probe.after_micro_backward()
    sample = probe.finish()          # all-reduces .grad (mean over workers), like DDP would
    optimizer.step()                 # .grad is exactly what a normal DDP step would hold
    pending.append((step, sample))   # still on the device: no host sync on the step
    ...
    # at the end of the epoch (the loop synchronises there anyway): one read for all of them
    for (step, sample), (g_small_sq, g_big_sq) in zip(pending, read_samples([s for _, s in pending])):
        b_simple = ema.update(g_small_sq, g_big_sq, sample.b_small, sample.b_big)
    -> event gradient_noise_scale: value b_simple (None until defined),
       metadata {"step": step, **ema.metadata()}  (this step's raw grad_sq_small/big and
       b_small/b_big; the EMA trace_sigma and g_sq)

The small batch is the micro-batch (b = micro_batch_size), the big batch is the global
batch (B = micro * grad_accum_steps * world_size): with 1 worker and accumulation this is
micro-batch vs per-worker batch; with N workers and no accumulation it is per-worker vs
global batch. |G_b|^2 is averaged over the micro-batches and over the workers (the local
mean rides along in the gradient all-reduce, so no extra collective). With one worker and
no accumulation b == B and nothing can be measured (``probe_batch_sizes`` returns None).
Without DDP (one worker) use a null context instead of no_sync(). Every rank must have
gradients for the same parameters (as DDP itself requires).

Cost of a measurement step (every k steps): one gradient norm per micro-batch and one
after the all-reduce (fused foreach kernels), a copy/add/zero of the gradients per
micro-batch when grad_accum_steps > 1, and the gradient all-reduce run after backward
instead of overlapped with it. ``time_probe_s`` times the extra kernels on copies of the
current gradients; ``overhead_fraction`` turns that into a fraction of training time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

# --- pure estimators -----------------------------------------------------------------------


def gns_estimates(g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """Unbiased (|G|^2, tr Sigma) from squared gradient norms at batch sizes b_small < b_big."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    g_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace_sigma = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g_sq, trace_sigma


class NoiseScaleEMA:
    """Bias-corrected EMAs of |G|^2 and tr(Sigma); B_simple = tr(Sigma) / |G|^2.

    Non-finite samples (a diverging run) are ignored rather than poisoning the averages.
    """

    def __init__(self, beta: float = 0.99) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.num_updates = 0
        self._g_sq = 0.0          # raw (biased towards 0) EMAs
        self._trace = 0.0
        self._last: dict[str, float] = {}

    def update(self, g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> Optional[float]:
        """Fold in one measurement; return the current B_simple (None while undefined)."""
        g_sq, trace = gns_estimates(g_small_sq, g_big_sq, b_small, b_big)
        if math.isfinite(g_sq) and math.isfinite(trace):
            self.num_updates += 1
            self._g_sq = self.beta * self._g_sq + (1.0 - self.beta) * g_sq
            self._trace = self.beta * self._trace + (1.0 - self.beta) * trace
            self._last = {"grad_sq_small": float(g_small_sq), "grad_sq_big": float(g_big_sq),
                          "b_small": b_small, "b_big": b_big}
        return self.b_simple

    def _corrected(self, raw: float) -> Optional[float]:
        if self.num_updates == 0:
            return None
        return raw / (1.0 - self.beta ** self.num_updates)

    @property
    def g_sq(self) -> Optional[float]:
        """EMA estimate of |G|^2 (None before the first finite measurement)."""
        return self._corrected(self._g_sq)

    @property
    def trace_sigma(self) -> Optional[float]:
        """EMA estimate of tr(Sigma), the per-sample gradient variance summed over parameters."""
        return self._corrected(self._trace)

    @property
    def b_simple(self) -> Optional[float]:
        """tr(Sigma)/|G|^2 in samples; None until both EMAs are positive."""
        g_sq, trace = self.g_sq, self.trace_sigma
        if g_sq is None or trace is None or g_sq <= 0.0 or trace <= 0.0:
            return None
        return trace / g_sq

    def metadata(self) -> dict[str, Optional[float]]:
        """The gradient_noise_scale event metadata (docs/contracts.md), minus the step:
        the last raw squared norms and batch sizes, and the EMA estimates."""
        return {"grad_sq_small": None, "grad_sq_big": None, "b_small": None, "b_big": None,
                **self._last, "trace_sigma": self.trace_sigma, "g_sq": self.g_sq}


def probe_batch_sizes(micro_batch_size: int, grad_accum_steps: int,
                      world_size: int) -> Optional[tuple[int, int]]:
    """(b_small, b_big) a measurement step compares, or None when there is only one size."""
    b_big = micro_batch_size * grad_accum_steps * world_size
    return None if b_big <= micro_batch_size else (micro_batch_size, b_big)


def overhead_fraction(probe_s: float, step_s: float, every_steps: int) -> float:
    """Share of training time spent measuring: probe_s extra every `every_steps` steps of step_s."""
    if step_s <= 0 or every_steps <= 0:
        raise ValueError(f"need step_s > 0 and every_steps > 0, got {step_s}, {every_steps}")
    return probe_s / (every_steps * step_s + probe_s)


# --- torch helpers -------------------------------------------------------------------------


def _grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def grad_sq_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum over parameters of |grad|^2 as a 0-d tensor (fused; no host sync).

    float32, or float64 when any gradient is float64.
    """
    grads = _grads(params)
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    # float32 accumulation (bf16/fp16 grads upcast); a float64 model keeps float64.
    wide = [g for g in grads if g.dtype == torch.float64]
    rest = [g for g in grads if g.dtype != torch.float64]
    norms = list(torch._foreach_norm(rest, 2, dtype=torch.float32)) if rest else []
    norms += list(torch._foreach_norm(wide, 2)) if wide else []
    device, dtype = grads[0].device, torch.float64 if wide else torch.float32
    return torch.stack([n.to(device, dtype) for n in norms]).square().sum()


def allreduce_mean_(tensors: list[torch.Tensor], world_size: int, bucket_cap_mb: float = 25.0) -> None:
    """In place: every tensor becomes its mean over the process group.

    Tensors are flattened into buckets (same device and dtype, at most bucket_cap_mb each)
    so that one all_reduce moves many small tensors. No-op when world_size == 1.
    """
    if world_size == 1 or not tensors:
        return
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised")
    for bucket in _buckets(tensors, bucket_cap_mb * 2**20):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)            # SUM: gloo has no AVG
        flat.div_(world_size)
        for t, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(synced)


def _buckets(tensors: list[torch.Tensor], cap_bytes: float) -> list[list[torch.Tensor]]:
    """Group by (device, dtype) in the given order, then split at cap_bytes."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[list[torch.Tensor]]] = {}
    sizes: dict[tuple[torch.device, torch.dtype], float] = {}
    for t in tensors:
        kind = (t.device, t.dtype)
        nbytes = t.numel() * t.element_size()
        if kind not in by_kind or sizes[kind] + nbytes > cap_bytes:
            by_kind.setdefault(kind, []).append([])
            sizes[kind] = 0.0
        by_kind[kind][-1].append(t)
        sizes[kind] += nbytes
    return [b for kind_buckets in by_kind.values() for b in kind_buckets if b]


def allreduce_grads_mean(params: Iterable[torch.Tensor], world_size: int,
                         extra: Optional[list[torch.Tensor]] = None) -> None:
    """Average every .grad over the workers (what DDP does), plus `extra` tensors in place."""
    allreduce_mean_(_grads(params) + list(extra or []), world_size)


# --- one measurement step ------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseSample:
    """Squared gradient norms of one measurement step, still on the device."""
    grad_sq_small: torch.Tensor   # mean over micro-batches and workers of |G_b|^2
    grad_sq_big: torch.Tensor     # |G_B|^2 of the all-reduced (global) gradient
    b_small: int                  # samples per small batch (micro_batch_size)
    b_big: int                    # samples per big batch (global_batch_size)

    def read(self) -> tuple[float, float]:
        """(|G_b|^2, |G_B|^2) as floats: the one host sync of a measurement."""
        device = self.grad_sq_small.device
        both = torch.stack([self.grad_sq_small.float(), self.grad_sq_big.float().to(device)])
        small, big = both.tolist()
        return small, big


def read_samples(samples: Sequence[NoiseSample]) -> list[tuple[float, float]]:
    """(|G_b|^2, |G_B|^2) of each sample, read to the host in one synchronisation."""
    if not samples:
        return []
    device = samples[0].grad_sq_small.device
    flat = torch.stack([t for s in samples for t in (s.grad_sq_small.float().reshape(()),
                                                     s.grad_sq_big.float().to(device).reshape(()))]).tolist()
    return list(zip(flat[0::2], flat[1::2]))


class GradNoiseProbe:
    """Collects micro-batch gradient norms over one optimizer step; see the module docstring.

    Call ``after_micro_backward()`` after each of the grad_accum_steps backward passes (all
    run under DDP ``no_sync()``), then ``finish()`` once; afterwards .grad holds the global
    mean gradient, exactly as after a normal synchronised step.
    """

    def __init__(self, params: Iterable[torch.Tensor], micro_batch_size: int,
                 grad_accum_steps: int, world_size: int) -> None:
        sizes = probe_batch_sizes(micro_batch_size, grad_accum_steps, world_size)
        if sizes is None:
            raise ValueError("noise scale needs two batch sizes: grad_accum_steps > 1 or world_size > 1 "
                             f"(got micro_batch_size={micro_batch_size}, "
                             f"grad_accum_steps={grad_accum_steps}, "
                             f"world_size={world_size})")
        self.params = [p for p in params if p.requires_grad]
        self.b_small, self.b_big = sizes
        self.grad_accum_steps = grad_accum_steps
        self.world_size = world_size
        self._num_micro = 0
        self._small_sq_sum: Optional[torch.Tensor] = None
        self._accumulated: Optional[list[torch.Tensor]] = None   # sum of earlier micro grads

    def after_micro_backward(self) -> None:
        """Record |grad of this micro-batch|^2 and set .grad aside until the last micro-batch."""
        if self._num_micro >= self.grad_accum_steps:
            raise RuntimeError("after_micro_backward called more than "
                               f"grad_accum_steps={self.grad_accum_steps} times")
        # .grad holds this micro-batch's gradient / grad_accum_steps (earlier ones were zeroed).
        sq = grad_sq_norm(self.params) * float(self.grad_accum_steps ** 2)
        self._small_sq_sum = sq if self._small_sq_sum is None else self._small_sq_sum + sq
        self._num_micro += 1
        grads = _grads(self.params)
        if self._num_micro == self.grad_accum_steps:     # last: put the earlier ones back
            if self._accumulated is not None:
                torch._foreach_add_(grads, self._accumulated)
                self._accumulated = None
            return
        if self._accumulated is None:
            self._accumulated = [g.detach().clone() for g in grads]
        else:
            torch._foreach_add_(self._accumulated, grads)
        torch._foreach_zero_(grads)                      # in place: DDP bucket views survive

    def finish(self) -> NoiseSample:
        """All-reduce the gradients (mean) and return the sample; .grad is then global."""
        if self._num_micro != self.grad_accum_steps or self._small_sq_sum is None:
            raise RuntimeError(f"finish() after {self._num_micro} of {self.grad_accum_steps} micro-batches")
        small = (self._small_sq_sum / self.grad_accum_steps).reshape(())
        allreduce_grads_mean(self.params, self.world_size, extra=[small])
        return NoiseSample(small, grad_sq_norm(self.params), self.b_small, self.b_big)


# --- cost ----------------------------------------------------------------------------------


class _GradHolder:
    """Stands in for a parameter: the probe only reads .grad and .requires_grad."""
    requires_grad = True

    def __init__(self, grad: torch.Tensor) -> None:
        self.grad = grad


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_probe_s(params: Iterable[torch.Tensor], world_size: int, grad_accum_steps: int = 1,
                 repeats: int = 20) -> float:
    """Median seconds of a measurement's work, on copies of the current .grad.

    Times: one norm per micro-batch, copy/add/zero per extra micro-batch, one coalesced
    all-reduce, one final norm, the host read. With world_size > 1 this is an upper bound
    on the extra cost: the all-reduce replaces DDP's own, which would partly overlap
    backward; world_size=1 gives the norms-only lower bound. For the exact figure compare
    whole-step times with and without measuring. Collective: with world_size > 1 every
    rank must call it.
    """
    grads = [g.detach().clone() for g in _grads(params)]
    if not grads:
        raise ValueError("no gradients: run a backward pass first")
    device, times = grads[0].device, []
    holders = [_GradHolder(g) for g in grads]
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        # b sizes are irrelevant here; world 2 only passes the check, world 1 skips all-reduce
        probe = GradNoiseProbe(holders, 1, max(grad_accum_steps, 1),  # type: ignore[arg-type]
                               max(world_size, 2))
        probe.world_size = world_size
        for _ in range(probe.grad_accum_steps):
            probe.after_micro_backward()
        probe.finish().read()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
