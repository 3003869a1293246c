"""The memory probe's arithmetic and its file: search, linear fit, micro-batch choice and the probe file.

Owns: the search (``search``: doubling from ``start`` until a step runs out of memory, then
bisection between the last fit and the first failure), the linear fit
``memory ~ fixed + per_sample x micro_batch`` over the successful tries (``fit_linear``) with the
largest batch it predicts for a memory budget (``predict_largest``), the choice of micro-batch of
each per-worker batch for ``auto`` (``micro_batch_per_worker_batch``), the memory key (the sweep
settings a step's memory depends on), the result (``Try``, ``ProbeResult``) and the probe file
(``results/<sweep>/memory-probe.json``, written atomically; ``load_probe`` reads it back and
refuses one made for a different model / precision / optimizer; ``micro_batch_for_auto`` is what
``batchscale run`` reads for ``max_micro_batch_size: auto``).

Must not import: torch, ray, pandas (``batchscale run`` imports this module to plan a sweep).

Choice for ``max_micro_batch_size: auto`` (``micro_batch_per_worker_batch``): each per-worker
batch P runs whole when P <= the measured largest fit, else as P / M micro-batches of M, the
largest divisor of P that fits (``plan_sweep`` takes this mapping). Per batch rather than one
sweep-wide cap: a single cap must divide every P above it, so with P = 64, 256, 480 and a fit
of 90 it would be 32 and split the 64 that fits whole; per batch, 64 runs whole and 256, 480
as 4 x 64 and 6 x 80. A P with no large divisor (a prime, say) gets small micro-batches:
the probe command prints each choice so that shows before a sweep runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

SCHEMA = "batchscale.memory-probe/1"
PROBE_FILE = "memory-probe.json"
DEFAULT_SAFETY_MARGIN = 0.10


def format_mib(b: Optional[float]) -> str:
    """Bytes as MiB for messages ("?" when unknown)."""
    return "?" if b is None else f"{b / 2**20:,.1f} MiB"


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
    limit_check: Optional[dict] = None  # the doubling phase's fit vs the searched limit (limit_check())

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

DEFAULT_RESOLUTION = 1 / 128  # bisection stops within 0.8 % of the limit


def search(fits: Callable[[int], bool], start: int = 1, max_batch: int = 65536,
           resolution: float = DEFAULT_RESOLUTION) -> tuple[int, Optional[int]]:
    """(largest fitting batch, smallest failing batch tried) of a monotone `fits`: doubling
    from `start` (the last try is max_batch itself), then bisection between the last fit and
    the first failure until they are within `resolution` of the fit (and at least 1) apart.
    A failing `start` bisects down from it; largest 0 means 1 fails too.

    Why not to the last sample: near the limit each try is the slowest of the probe (the
    ResNet-18 probe on an H200 spent 26 of its 61 s on eight tries inside a bracket already
    within 0.4 % of the limit: 61440 fits, 61696 does not),
    and a micro-batch 0.8 % under the limit changes nothing a sweep chooses."""
    if not 1 <= start <= max_batch:
        raise ValueError(f"need 1 <= start <= max_batch, got start={start}, max_batch={max_batch}")
    if not 0 <= resolution < 1:
        raise ValueError(f"need 0 <= resolution < 1, got {resolution}")
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
    while hi - lo > max(1, int(lo * resolution)):
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


def limit_check(tries: Sequence[Try], largest_fit: int, usable_bytes: float) -> Optional[dict]:
    """Could the cheap doubling phase alone have told the limit? Fit fixed + per-sample bytes to
    the tries before the first failure, predict the largest batch within ``usable_bytes`` (no
    safety margin), and compare it with the limit the bisection found. ``within`` is True when
    they are no further apart than the first bisection step (half the failing doubling interval).
    None when the search never failed or the doubling phase measured fewer than two sizes."""
    doubling: list[Try] = []
    for t in tries:
        if not t.ok:
            break
        doubling.append(t)
    if len(doubling) == len(tries) or largest_fit < 1:
        return None
    fitted = fit_linear([(t.micro_batch, float(t.peak_bytes)) for t in doubling if t.peak_bytes is not None])
    predicted = predict_largest(*fitted, usable_bytes) if fitted else None
    if predicted is None:
        return None
    step = max(1, (tries[len(doubling)].micro_batch - doubling[-1].micro_batch) // 2)
    return {"predicted": predicted, "measured": largest_fit, "difference": predicted - largest_fit,
            "first_bisection_step": step, "within": abs(predicted - largest_fit) <= step,
            "from_tries": [t.micro_batch for t in doubling]}


# --- micro-batch choice --------------------------------------------------------------------------

def sequence_tokens(sweep) -> int:
    """Tokens per probed item: a language model is probed in sequences of context_length tokens."""
    return sweep.options.context_length if sweep.batch_unit == "tokens" else 1


def per_worker_batches(sweep) -> list[int]:
    """Every per-worker batch the sweep plans (global batches divisible by the worker count), in
    the probe's unit: samples, or whole sequences for a language model."""
    per = sequence_tokens(sweep)
    return sorted({g // per // w for w in sweep.num_workers for g in sweep.batch_sizes if g % (w * per) == 0})


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


def nothing_fits(result: ProbeResult) -> str:
    """Why a probe found no micro-batch, for a one-line error."""
    if result.first_fail is None:  # the search never ran: the reserved memory alone did not fit
        return f"the memory reserved for DDP buffers and resident data alone does not fit on {result.device}"
    return f"even {result.first_fail} sample(s) ran out of memory on {result.device}"


def probed_on_gpu(result: ProbeResult) -> bool:
    return not result.device.startswith("cpu")


def micro_batch_for_auto(sweep, results_dir: str | Path = "results", *,
                         use_gpu: bool | None = None) -> tuple[dict[int, int], Path]:
    """``max_micro_batch_size: auto``: the micro-batch of each per-worker batch, chosen from
    RESULTS_DIR/<sweep>/memory-probe.json, and that path. For a language model
    (``max_micro_batch_tokens: auto``) both are in tokens: the probe's sequences x context_length. Raises ProbeMismatch (a ValueError)
    when the file is missing, unreadable, made for another model / precision / optimizer, made
    on the other kind of device than ``use_gpu`` says the run will use, or found that nothing fits."""
    path = default_output(sweep, results_dir)
    if not path.is_file():
        key = "max_micro_batch_tokens" if sweep.batch_unit == "tokens" else "max_micro_batch_size"
        packaged = (Path(__file__).resolve().parent.parent / "sweeps" / f"{sweep.name}.yaml").is_file()
        target = sweep.name if packaged else "SWEEP_FILE"
        raise ProbeMismatch(f"{key}: auto needs a memory probe; run `batchscale probe-memory "
                            f"{target} --results-dir {results_dir}` on the machine the sweep will run on "
                            f"first{'' if packaged else ' (SWEEP_FILE: this YAML file)'} (no {path})")
    try:
        result = load_probe(path, sweep)
    except ProbeMismatch:
        raise
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise ProbeMismatch(f"{path}: not a readable memory probe ({type(err).__name__}: {err})") from None
    if use_gpu is not None and probed_on_gpu(result) != use_gpu:
        raise ProbeMismatch(f"{path} was measured on {result.device}, but the cluster runs workers on "
                            f"{'GPUs' if use_gpu else 'CPUs'}; probe again there")
    if result.largest_fit < 1:
        raise ProbeMismatch(f"{path}: no micro-batch fits: {nothing_fits(result)}")
    per = sequence_tokens(sweep)
    chosen = micro_batch_per_worker_batch(result, per_worker_batches(sweep))
    return {p * per: m * per for p, m in chosen.items()}, path
