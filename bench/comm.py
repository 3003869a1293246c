"""Communication cost model: what an all-reduce costs, on a measured or a nominal link.

Owns: the nccl-tests conventions (algbw = S / t; busbw = algbw x 2(n - 1)/n, the per-rank
traffic of a ring, comparable across n), the alpha-beta ring all-reduce cost

    t(S, n) = base + 2(n - 1) alpha + 2(n - 1)/n x S / beta,   summed over the calls (DDP buckets)

(alpha: latency per ring step; beta: the bus bandwidth a large all-reduce reaches; REFERENCE.md
"Scaling out on Ray"), its hierarchical form across nodes, DDP's bucket sizes, the fit of alpha
and beta to measured points (a measured link also keeps the bandwidth measured at each message
size, which carries cache and protocol effects one straight line cannot), and ``AllreduceResult``: the typed file ``python -m bench.perf allreduce`` writes and
every reader validates. The step-time model built on it is ``bench.stepmodel``; the table of
nominal links and the reading of a cluster file's ``hardware.interconnect`` is
``bench.interconnect``.

Must not import: torch, ray, pandas, numpy (pure Python: the planner calls it per row), and
nothing from bench.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field

GB = 1e9  # nccl-tests' GB/s: 10^9 bytes per second
MIB = 2**20
DDP_BUCKET_CAP_BYTES = 25 * MIB  # torch DistributedDataParallel(bucket_cap_mb=25), its default
DDP_FIRST_BUCKET_BYTES = 1 * MIB  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES: the first bucket is small


def bus_factor(num_workers: int) -> float:
    """2(n - 1)/n: bytes each rank sends per byte all-reduced by a ring (nccl-tests' busbw factor)."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    return 2.0 * (num_workers - 1) / num_workers


def algbw_bytes_per_s(size_bytes: float, time_s: float) -> float:
    """Algorithm bandwidth: the bytes of the buffer over the time of one all-reduce."""
    if time_s <= 0:
        raise ValueError(f"time must be positive, got {time_s} s")
    return size_bytes / time_s


def busbw_bytes_per_s(algbw: float, num_workers: int) -> float:
    """Bus bandwidth of an all-reduce: algbw x 2(n - 1)/n (0 for one rank, which sends nothing)."""
    return algbw * bus_factor(num_workers)


def ddp_bucket_sizes(gradient_bytes: float | Sequence[float], bucket_cap_bytes: float = DDP_BUCKET_CAP_BYTES,
                     first_bucket_bytes: float = DDP_FIRST_BUCKET_BYTES) -> list[float]:
    """The bytes of each all-reduce DDP makes per step with its default buckets. Given the
    parameters' gradient bytes in ``model.parameters()`` order, DDP's rule is followed: in
    reverse order (about the order backward produces them), a bucket closes once it holds at
    least its cap, the first bucket's cap being small. Given only a total, the split is
    approximated as if parameters were small: first bucket, full buckets, the rest."""
    if isinstance(gradient_bytes, (int, float)):
        if gradient_bytes <= 0:
            return []
        first = min(float(gradient_bytes), first_bucket_bytes)
        rest = float(gradient_bytes) - first
        full, last = divmod(rest, bucket_cap_bytes)
        return [first] + [float(bucket_cap_bytes)] * int(full) + ([last] if last > 0 else [])
    buckets, current, cap = [], 0.0, first_bucket_bytes
    for nbytes in reversed(list(gradient_bytes)):
        current += nbytes
        if current >= cap:
            buckets.append(current)
            current, cap = 0.0, bucket_cap_bytes
    return buckets + ([current] if current > 0 else [])


@dataclass(frozen=True)
class Link:
    """One kind of link as the ring model sees it."""

    name: str  # e.g. "measured gloo, 2 ranks on cpu" or "NVLink 4 (450 GB/s per GPU)"
    alpha_s: float  # latency per ring step
    beta_bytes_per_s: float  # bus bandwidth per rank, one direction (busbw of a large all-reduce)
    source: str  # the measurement file and fit, or the datasheet the nominal figure comes from
    base_s: float = 0.0  # fixed cost per all-reduce call (NCCL's base latency), on top of the steps
    # Measured links: (message bytes, bus bandwidth) where measured, latency taken out, ascending;
    # between them interpolated in log2(size), beyond them held. Empty: beta at every size.
    bandwidth_curve: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if not (self.beta_bytes_per_s > 0 and math.isfinite(self.beta_bytes_per_s)):
            raise ValueError(f"link {self.name!r}: bandwidth must be positive, got {self.beta_bytes_per_s}")
        if self.alpha_s < 0 or self.base_s < 0:
            raise ValueError(f"link {self.name!r}: latencies must be >= 0")

    def beta_at(self, size_bytes: float) -> float:
        """Bus bandwidth for one all-reduce of ``size_bytes``."""
        curve = self.bandwidth_curve
        if not curve:
            return self.beta_bytes_per_s
        if size_bytes <= curve[0][0]:
            return curve[0][1]
        for (s0, b0), (s1, b1) in zip(curve, curve[1:]):
            if size_bytes <= s1:
                return b0 + (b1 - b0) * math.log2(size_bytes / s0) / math.log2(s1 / s0)
        return curve[-1][1]


def _buckets(size_bytes: float, bucket_bytes: Sequence[float] | None) -> list[float]:
    if bucket_bytes is None:
        return [float(size_bytes)] if size_bytes > 0 else []
    return [float(b) for b in bucket_bytes if b > 0]


def ring_allreduce_s(size_bytes: float, num_workers: int, link: Link, *,
                     bucket_bytes: Sequence[float] | None = None) -> float:
    """Seconds to all-reduce ``size_bytes`` over ``num_workers`` ranks in one call, or in one call
    per bucket of ``bucket_bytes`` (which then replace ``size_bytes``): each call pays the latency,
    the bytes move at the bandwidth of their call's size."""
    if num_workers == 1:
        return 0.0
    steps, factor = 2 * (num_workers - 1), bus_factor(num_workers)
    return sum(link.base_s + steps * link.alpha_s + factor * b / link.beta_at(b)
               for b in _buckets(size_bytes, bucket_bytes))


def hierarchical_allreduce_s(size_bytes: float, num_workers: int, num_nodes: int, intra: Link | None,
                             inter: Link, *, bucket_bytes: Sequence[float] | None = None) -> float:
    """A ring over ``num_nodes`` nodes as NCCL models it (src/graph/tuning.cc): of the 2(n - 1)
    steps, 2(N - 1) cross a node boundary and pay the inter-node latency, the rest the intra-node
    one; the bytes move at the slower of the two bus bandwidths (``inter`` is the node's aggregate
    network bandwidth: rings spread over its ports). ``intra`` may be None with one worker per node."""
    if num_workers == 1:
        return 0.0
    if not 1 <= num_nodes <= num_workers:
        raise ValueError(f"num_nodes must be in 1..{num_workers}, got {num_nodes}")
    inter_steps = 2 * (num_nodes - 1)
    intra_steps = 2 * (num_workers - 1) - inter_steps
    if intra_steps and intra is None:
        raise ValueError(f"{num_workers} workers on {num_nodes} nodes need an intra-node link")
    latency_s = max(inter.base_s, intra.base_s if intra else 0.0) + inter_steps * inter.alpha_s \
        + (intra_steps * intra.alpha_s if intra_steps else 0.0)

    def beta(b: float) -> float:
        return inter.beta_at(b) if intra is None else min(intra.beta_at(b), inter.beta_at(b))

    factor = bus_factor(num_workers)
    return sum(latency_s + factor * b / beta(b) for b in _buckets(size_bytes, bucket_bytes))


# --- fitting alpha and beta to measured points ---------------------------------------------

@dataclass(frozen=True)
class RingFit:
    alpha_s: float
    beta_bytes_per_s: float
    num_workers: int
    num_points: int
    max_rel_residual: float  # largest |model - measured| / measured over the points fitted

    def link(self, name: str, source: str) -> Link:
        return Link(name, self.alpha_s, self.beta_bytes_per_s,
                    f"{source}: ring fit over {self.num_points} sizes, alpha {self.alpha_s * 1e6:.3g} us, "
                    f"beta {self.beta_bytes_per_s / GB:.3g} GB/s, max residual "
                    f"{100 * self.max_rel_residual:.0f} %")


def _solve_2x2(a11: float, a12: float, a22: float, b1: float, b2: float) -> tuple[float, float] | None:
    det = a11 * a22 - a12 * a12
    if det <= 1e-12 * a11 * a22:
        return None
    return (b1 * a22 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det


def fit_ring(sizes_bytes: Sequence[float], times_s: Sequence[float], num_workers: int) -> RingFit:
    """alpha and beta of the ring model from measured (size, time) points at ``num_workers``.

    t = a + c S is fitted by least squares on the *relative* error (weights 1/t^2), so the
    microsecond points, which carry alpha, count as much as the second-long ones, which carry
    beta; then alpha = a / 2(n - 1) and beta = 2(n - 1)/n / c. A negative intercept (latency
    lost in the noise) refits with alpha = 0."""
    if num_workers < 2:
        raise ValueError(f"fitting a ring needs >= 2 ranks, got {num_workers}")
    points = [(float(s), float(t)) for s, t in zip(sizes_bytes, times_s, strict=True)]
    if any(not (s > 0 and t > 0 and math.isfinite(s) and math.isfinite(t)) for s, t in points):
        raise ValueError("sizes and times must be positive and finite")
    if len({s for s, _ in points}) < 2:
        raise ValueError(f"fitting a ring needs >= 2 distinct sizes, got {len(points)} point(s)")
    scale = max(s for s, _ in points)  # sizes in units of the largest: sums stay O(1)
    xs = [(s / scale, t, 1.0 / t**2) for s, t in points]
    sw, sx, sxx = sum(w for _, _, w in xs), sum(w * x for x, _, w in xs), sum(w * x * x for x, _, w in xs)
    sy, sxy = sum(w * t for _, t, w in xs), sum(w * x * t for x, t, w in xs)
    solved = _solve_2x2(sw, sx, sxx, sy, sxy)
    a, c = solved if solved is not None else (-1.0, 0.0)
    if a < 0:
        a, c = 0.0, sxy / sxx
    if c <= 0:
        raise ValueError("time does not grow with size in the measured points: no bandwidth to fit")
    c /= scale
    residual = max(abs(a + c * s - t) / t for s, t in points)
    steps = 2 * (num_workers - 1)
    return RingFit(alpha_s=a / steps, beta_bytes_per_s=bus_factor(num_workers) / c, num_workers=num_workers,
                   num_points=len(points), max_rel_residual=residual)


# --- the all-reduce benchmark's file --------------------------------------------------------

class AllreduceRow(BaseModel):
    """One message size, as nccl-tests prints it (in-place all-reduce, sum)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    size_bytes: int = Field(gt=0)
    count: int = Field(gt=0, description="elements per rank")
    time_us: float = Field(gt=0, description="mean time of one all-reduce, averaged over the ranks")
    algbw_gb_s: float = Field(ge=0)
    busbw_gb_s: float = Field(ge=0)
    num_wrong: int = Field(ge=0, description="elements that differed from the expected sum in the check")


class AllreduceResult(BaseModel):
    """``results/<system>/allreduce-<backend>-w<N>.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: Literal[1] = 1
    system: str
    backend: Literal["gloo", "nccl"]
    num_workers: int = Field(ge=2)
    num_nodes: int = Field(1, ge=1)
    device: str = Field(description="'cpu' or the GPU model")
    dtype: str
    warmup_iters: int = Field(ge=0)
    iters: int = Field(ge=1)
    threads_per_worker: Optional[int] = None  # torch intra-op threads per process (CPU)
    machine: dict[str, Any] = Field(default_factory=dict, description="bench.fingerprint of the driver")
    rows: list[AllreduceRow] = Field(min_length=1)

    def ring_fit(self) -> RingFit:
        """The ring model fitted to the rows that passed the check."""
        ok = [r for r in self.rows if r.num_wrong == 0]
        return fit_ring([r.size_bytes for r in ok], [r.time_us * 1e-6 for r in ok], self.num_workers)

    def link(self, source: str) -> Link:
        """The measured link: alpha from the ring fit; the bandwidth per message size measured
        (bus factor x size / (time - latency)) where bandwidth is at least half the time, in the
        fit and in the measurement (one noisy small size does not count), so that the model
        gives back the measured time at every such size and scales it in n as a ring."""
        fit = self.ring_fit()
        factor = bus_factor(self.num_workers)
        latency_s = 2 * (self.num_workers - 1) * fit.alpha_s
        curve: list[tuple[float, float]] = []
        for r in sorted(self.rows, key=lambda r: r.size_bytes):
            t = r.time_us * 1e-6
            bandwidth_bound = factor * r.size_bytes / fit.beta_bytes_per_s >= latency_s and t - latency_s >= 0.5 * t
            if r.num_wrong == 0 and bandwidth_bound:
                curve.append((float(r.size_bytes), factor * r.size_bytes / (t - latency_s)))
        where = f"{self.num_nodes} nodes" if self.num_nodes > 1 else "one node"
        measured = (f"; bandwidth as measured at {len(curve)} sizes {curve[0][0]:.0f}-{curve[-1][0]:.0f} B "
                    f"({min(b for _, b in curve) / GB:.3g}-{max(b for _, b in curve) / GB:.3g} GB/s)") if curve else ""
        base = fit.link(f"measured {self.backend}, {self.num_workers} ranks on {self.device}, {where}", source)
        return Link(base.name, base.alpha_s, base.beta_bytes_per_s, base.source + measured,
                    bandwidth_curve=tuple(curve))
