"""Data-parallel step time past the worker counts measured:

    step(b, W) = compute(b) + allreduce(gradient bytes, W, link) - overlap

with b the per-worker batch. compute(b) comes from measured runs at the smallest worker count
W0 (1 where measured: no all-reduce at all); the all-reduce from ``bench.interconnect.Links``
(a measured ring fit, or nominal links); overlap = phi x min(allreduce, compute), the part of
the all-reduce DDP hides behind the backward pass, with phi fitted to measured multi-worker runs.

Owns: ``StepPoint`` (one measured (b, W, seconds per step)), ``step_time_from_events`` (a run's
seconds per optimizer step from its log), ``points_from_records``, ``ComputeCurve``,
``fit_overlap``, ``fit_step_model`` -> ``StepModel`` and its ``predict`` -> ``StepPrediction``
(with the assumptions it used, one line each, for a planner row's note), and
``model_from_records``: the one call the planner and the report make.

Must not import: torch, ray, pandas; from bench only comm, interconnect, events.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from bench import events as ev
from bench.comm import Link, ddp_bucket_sizes
from bench.interconnect import Links, links_for


@dataclass(frozen=True)
class StepPoint:
    """One measured configuration: mean seconds per optimizer step at per-worker batch b on W workers."""

    per_worker_batch_size: float
    num_workers: int
    step_s: float


def step_time_from_events(events: Iterable[dict[str, Any]]) -> tuple[float, int] | None:
    """(seconds per optimizer step, steps counted) from a run's ``epoch_stop`` lines: training
    time only (evaluation excluded, input reading included, as the worker times it), the first
    epoch left out as warm-up when there are more (as the summary's samples_per_s). None
    without a timed step."""
    epochs: list[tuple[int, float]] = []
    previous_step = 0
    for event in events:
        if event.get("key") != ev.EPOCH_STOP:
            continue
        md = event.get("metadata") or {}
        step, seconds = md.get("step"), md.get("epoch_train_time_s")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (step, seconds)):
            continue
        epochs.append((int(step) - previous_step, float(seconds)))
        previous_step = int(step)
    timed = epochs[1:] or epochs
    steps, seconds = sum(n for n, _ in timed), sum(s for _, s in timed)
    return (seconds / steps, steps) if steps > 0 and seconds > 0 else None


def points_from_records(records: Iterable[Any]) -> list[StepPoint]:
    """One point per (per-worker batch, workers): the mean over its successful runs (seeds) of
    their seconds per step. ``records`` are ``bench.records.RunRecord`` values."""
    times: dict[tuple[float, int], list[float]] = {}
    for r in records:
        measured = step_time_from_events(r.events) if r.status == "success" else None
        if measured is not None:
            key = (float(r.plan["per_worker_batch_size"]), int(r.plan["num_workers"]))
            times.setdefault(key, []).append(measured[0])
    return [StepPoint(b, w, sum(ts) / len(ts)) for (b, w), ts in sorted(times.items())]


class ComputeCurve:
    """Seconds per step against the per-worker batch b at one worker count: samples/s
    interpolated linearly in log2(b) between measured batches (as the planner's r(b)); below
    the smallest the step time is held (latency bound), above the largest samples/s is held."""

    def __init__(self, points: Sequence[tuple[float, float]], num_workers: int) -> None:
        by_batch: dict[float, list[float]] = {}
        for b, t in points:
            if not (b > 0 and t > 0 and math.isfinite(t)):
                raise ValueError(f"a compute point needs a positive batch and step time, got ({b}, {t})")
            by_batch.setdefault(float(b), []).append(float(t))
        if not by_batch:
            raise ValueError("no measured step time to build the compute curve from")
        self.batches = sorted(by_batch)
        self.step_s = [sum(by_batch[b]) / len(by_batch[b]) for b in self.batches]
        self.num_workers = num_workers

    def compute_s(self, b: float) -> float:
        bs, ts = self.batches, self.step_s
        if b <= bs[0]:
            return ts[0]
        if b >= bs[-1]:
            return ts[-1] * b / bs[-1]
        i = next(k for k in range(1, len(bs)) if bs[k] >= b)
        f = math.log2(b / bs[i - 1]) / math.log2(bs[i] / bs[i - 1])
        rate = bs[i - 1] / ts[i - 1] + f * (bs[i] / ts[i] - bs[i - 1] / ts[i - 1])
        return b / rate

    def note(self, b: float) -> str:
        span = f"{self.batches[0]:g}" if len(self.batches) == 1 else f"{self.batches[0]:g}-{self.batches[-1]:g}"
        where = f"{self.num_workers}-worker runs at per-worker batch {span}"
        if b < self.batches[0]:
            return f"compute: step time of {where} held for batch {b:g}"
        if b > self.batches[-1]:
            return f"compute: samples/s of {where} held for batch {b:g}"
        return f"compute: {where}"


@dataclass(frozen=True)
class OverlapFit:
    fraction: float  # phi in [0, 1]: overlap = phi x min(allreduce, compute)
    raw_fraction: float  # the least-squares value before clipping (< 0: runs slower than the sum)
    num_points: int


def fit_overlap(samples: Iterable[tuple[float, float, float]]) -> OverlapFit | None:
    """phi from measured multi-worker steps, each (compute_s, allreduce_s, measured_s):
    least squares of hidden = compute + allreduce - measured against min(allreduce, compute),
    clipped to [0, 1]. None without a point that has communication."""
    rows = [(c, a, m) for c, a, m in samples if a > 0]
    denominator = sum(min(a, c) ** 2 for c, a, _ in rows)
    if not rows or denominator <= 0:
        return None
    raw = sum((c + a - m) * min(a, c) for c, a, m in rows) / denominator
    return OverlapFit(min(1.0, max(0.0, raw)), raw, len(rows))


@dataclass(frozen=True)
class StepPrediction:
    per_worker_batch_size: float
    num_workers: int
    num_nodes: int
    compute_s: float
    allreduce_s: float | None  # None: no link known for this worker count
    overlap_s: float | None
    step_s: float | None
    link: str  # which link(s) the all-reduce crosses
    assumptions: tuple[str, ...]  # one line each, for the row's note

    @property
    def samples_per_s(self) -> float | None:
        """Global samples per second: b x W / step."""
        return self.per_worker_batch_size * self.num_workers / self.step_s if self.step_s else None

    def note(self) -> str:
        return "; ".join(self.assumptions)


def _mb(n: float) -> str:
    return f"{n / 1e6:.3g} MB"


@dataclass(frozen=True)
class StepModel:
    compute: ComputeCurve
    gradient_bytes: int
    links: Links
    overlap: OverlapFit | None
    bucket_bytes: tuple[float, ...]  # one all-reduce per DDP bucket, per step
    assumptions: tuple[str, ...]  # model-wide, for the planner's list

    def predict(self, per_worker_batch_size: float, num_workers: int) -> StepPrediction:
        b, w = float(per_worker_batch_size), int(num_workers)
        compute_s = self.compute.compute_s(b)
        notes = [self.compute.note(b)]
        nodes = self.links.num_nodes(w)
        link = self.links.describe(w) if w > 1 else "none (one worker)"
        allreduce_s = self.links.allreduce_s(self.gradient_bytes, w, self.bucket_bytes)
        if allreduce_s is None:
            notes.append(f"all-reduce over {w} workers not modelled: {link}")
            return StepPrediction(b, w, nodes, compute_s, None, None, None, link, tuple(notes))
        phi = self.overlap.fraction if self.overlap else 0.0
        overlap_s = phi * min(allreduce_s, compute_s)
        if w > 1:
            notes.append(f"all-reduce {_mb(self.gradient_bytes)} in {len(self.bucket_bytes)} call(s) over {link}: "
                         f"{allreduce_s * 1e3:.3g} ms (ring model)")
            notes.append(f"overlap {phi:.2f} x min(all-reduce, compute) fitted on {self.overlap.num_points} run(s)"
                         if self.overlap else "no overlap assumed (none fitted): an upper bound on the step")
        return StepPrediction(b, w, nodes, compute_s, allreduce_s, overlap_s, compute_s + allreduce_s - overlap_s,
                              link, tuple(notes))


def fit_step_model(points: Sequence[StepPoint], *, gradient_bytes: int, links: Links,
                   bucket_bytes: Sequence[float] | None = None) -> StepModel:
    """The step model from measured points. compute(b) comes from the smallest worker count W0:
    at W0 = 1 directly; at W0 > 1 as the measured step minus the modelled all-reduce at W0 (no
    overlap assumed there, and phi is then not fitted). With W0 = 1, phi is fitted on the
    points at W > 1 whose all-reduce the links can model. ``bucket_bytes`` (the all-reduce
    calls of one step) defaults to DDP's default buckets for ``gradient_bytes``, approximated
    (``bench.comm.ddp_bucket_sizes`` of the parameters' sizes gives them exactly)."""
    if not points:
        raise ValueError("no measured step time: nothing to model")
    if gradient_bytes <= 0:
        raise ValueError(f"gradient_bytes must be positive, got {gradient_bytes}")
    calls = tuple(ddp_bucket_sizes(gradient_bytes) if bucket_bytes is None else (float(b) for b in bucket_bytes))
    if abs(sum(calls) - gradient_bytes) > 1e-6 * gradient_bytes:
        raise ValueError(f"bucket sizes sum to {sum(calls):.0f} B, not the {gradient_bytes} B of gradients")
    w0 = min(p.num_workers for p in points)
    notes = [f"step = compute(per-worker batch) + ring all-reduce of {_mb(gradient_bytes)} of gradients "
             f"({len(calls)} DDP bucket(s)) - overlap", *links.assumptions]
    base = [(p.per_worker_batch_size, p.step_s) for p in points if p.num_workers == w0]
    overlap = None
    if w0 == 1:
        compute = ComputeCurve(base, 1)
        samples = []
        for p in points:
            allreduce_s = links.allreduce_s(gradient_bytes, p.num_workers, calls) if p.num_workers > 1 else None
            if allreduce_s is not None:
                samples.append((compute.compute_s(p.per_worker_batch_size), allreduce_s, p.step_s))
        overlap = fit_overlap(samples)
        if overlap is not None and overlap.raw_fraction != overlap.fraction:
            notes.append(f"overlap fit {overlap.raw_fraction:.2f} clipped to {overlap.fraction:g}"
                         + (" (measured steps slower than compute + all-reduce)" if overlap.raw_fraction < 0 else ""))
    else:
        allreduce_s = links.allreduce_s(gradient_bytes, w0, calls)
        if allreduce_s is None:
            compute = ComputeCurve(base, w0)
            notes.append(f"no 1-worker run and no link at {w0} workers: their step time is taken as compute")
        else:
            short = [(b, t) for b, t in base if t <= allreduce_s]
            if short:
                raise ValueError(f"the link's all-reduce at {w0} workers ({allreduce_s:.4g} s) is not shorter than "
                                 f"the measured step ({short[0][1]:.4g} s at per-worker batch {short[0][0]:g})")
            compute = ComputeCurve([(b, t - allreduce_s) for b, t in base], w0)
            notes.append(f"no 1-worker run: compute = {w0}-worker step - modelled all-reduce (no overlap assumed)")
    return StepModel(compute, int(gradient_bytes), links, overlap, calls, tuple(notes))


def model_from_records(records: Sequence[Any], *, gradient_bytes: int, bucket_bytes: Sequence[float] | None = None,
                       measured: Link | None = None) -> StepModel:
    """The step model for a sweep's stored runs: their step times (``points_from_records``),
    the links from ``measured`` (``bench.comm.AllreduceResult.link`` of an all-reduce file taken
    on the same system) and from the cluster file's ``hardware.interconnect`` and
    ``gpus_per_node`` (when every run's cluster file agrees; else unknown, and said)."""
    hardware = [((r.cluster or {}).get("hardware") or {}) for r in records]
    text = {h.get("interconnect") for h in hardware}
    per_node = {h.get("gpus_per_node") or None for h in hardware}
    notes = [] if len(text) <= 1 and len(per_node) <= 1 else ["the runs' cluster files disagree on the hardware"]
    links = links_for(measured=measured, interconnect=text.pop() if len(text) == 1 else None,
                      workers_per_node=per_node.pop() if len(per_node) == 1 else None)
    links = Links(links.intra, links.inter, links.workers_per_node, (*notes, *links.assumptions))
    return fit_step_model(points_from_records(records), gradient_bytes=gradient_bytes, links=links,
                          bucket_bytes=bucket_bytes)


def planner_seam(records: Sequence[Any], *, measured: Link | None = None, gradient_bytes: int | None = None
                 ) -> tuple[Any, list[str]]:
    """What bench.planner needs for GPU counts beyond those measured: ``(efficiency, notes)``, where
    ``efficiency(num_gpus, per_gpu_batch)`` is the modelled step at one worker over the modelled
    step at ``num_gpus`` (None where no link is known), and ``notes`` the model's assumptions, one
    clause each, for the planner to list after naming the model once (or why there is no model).
    ``gradient_bytes`` defaults to what the runs' summaries recorded; without it there is no model
    (``(None, [why])``)."""
    summaries = [r.summary for r in records if getattr(r, "summary", None) is not None]
    buckets = None
    if gradient_bytes is None:
        known = {s.gradient_bytes for s in summaries if s.gradient_bytes}
        if len(known) != 1:
            return None, ["no communication model: the runs do not record one gradient size "
                          "(runs made before 2026-12; give --gradient-bytes)"]
        gradient_bytes = known.pop()
        buckets = next((s.gradient_bucket_bytes for s in summaries if s.gradient_bucket_bytes), None)
    try:
        model = model_from_records(records, gradient_bytes=int(gradient_bytes), bucket_bytes=buckets,
                                   measured=measured)
    except ValueError as err:
        return None, [f"no communication model: {err}"]

    def efficiency(num_gpus: int, per_gpu_batch: float) -> float | None:
        one, many = model.predict(per_gpu_batch, 1), model.predict(per_gpu_batch, num_gpus)
        return None if many.step_s is None or one.step_s is None else one.step_s / many.step_s

    return efficiency, list(model.assumptions)
