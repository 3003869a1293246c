"""Token arithmetic: pure functions from a batch in tokens to sequences, micro-batches and steps.

Owns: how a global batch counted in tokens splits over workers and micro-batches
(``split_global_tokens``), how many fixed-context windows a token stream holds, the length
buckets of variable-length batching and their per-bucket capacities and steps per epoch,
Kaplan et al.'s critical-batch trend B_crit(L), and model FLOPs utilisation against a GPU's
dense bf16 peak (``PEAK_BF16_FLOPS``). Every impossible
combination raises ``PlanError`` naming the key and the numbers.

Must not import: torch, ray, pandas.

Units: a *token* here is one loss term (a target position). ``global_batch_tokens`` is the
budget of one optimizer step: with packing every step holds exactly that many targets; with
length buckets it bounds the padded size of the step (targets = budget minus padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.errors import PlanError

# Kaplan et al. 2020, "Scaling Laws for Neural Language Models", eq. 1.4 / table 1:
# B_crit(L) ~ B* / L^(1 / alpha_B), L the loss in nats per token (GPT-2 BPE tokens on WebText2).
KAPLAN_B_STAR_TOKENS = 2e8
KAPLAN_ALPHA_B = 0.21


@dataclass(frozen=True)
class TokenSplit:
    """One global batch in tokens, split as ``bench.plan.split_batch`` splits samples."""

    global_batch_tokens: int
    context_length: int
    num_workers: int
    global_sequences: int       # global_batch_tokens / context_length
    per_worker_sequences: int
    micro_batch_sequences: int
    grad_accum_steps: int

    @property
    def micro_batch_tokens(self) -> int:
        return self.micro_batch_sequences * self.context_length

    @property
    def per_worker_tokens(self) -> int:
        return self.per_worker_sequences * self.context_length


def split_global_tokens(global_batch_tokens: int, context_length: int, num_workers: int,
                        max_micro_batch_tokens: int | None = None) -> TokenSplit:
    """Sequences per global batch, per worker and per micro-batch, and the accumulation.

    The budget must be a whole number of full-context sequences per worker; accumulation is
    used only when a worker's share exceeds ``max_micro_batch_tokens``, which must then be a
    whole number of sequences dividing that share (as ``split_batch`` asks of samples)."""
    g, t, w = global_batch_tokens, context_length, num_workers
    if g < 1 or t < 1 or w < 1:
        raise PlanError(f"global_batch_tokens {g}, context_length {t}, num_workers {w}: all must be >= 1")
    if g % t:
        raise PlanError(f"global_batch_tokens: {g} is not a multiple of context_length {t} "
                        f"({g} / {t} = {g / t:g} sequences)")
    sequences = g // t
    if sequences % w:
        raise PlanError(f"global_batch_tokens: {g} = {sequences} sequences of {t} tokens, not divisible "
                        f"by num_workers {w}")
    per_worker = sequences // w
    if max_micro_batch_tokens is None or per_worker * t <= max_micro_batch_tokens:
        return TokenSplit(g, t, w, sequences, per_worker, per_worker, 1)
    micro = max_micro_batch_tokens // t
    if micro < 1:
        raise PlanError(f"max_micro_batch_tokens: {max_micro_batch_tokens} is less than one sequence "
                        f"of context_length {t}")
    if per_worker % micro:
        raise PlanError(f"global_batch_tokens: {g} gives {per_worker} sequences per worker, not "
                        f"divisible by the {micro} sequences ({micro * t} tokens) that fit in "
                        f"max_micro_batch_tokens {max_micro_batch_tokens}")
    return TokenSplit(g, t, w, sequences, per_worker, micro, per_worker // micro)


# --- fixed-context packing ---------------------------------------------------------------------

def packed_windows(num_tokens: int, context_length: int) -> int:
    """Windows of ``context_length`` targets in a stream of ``num_tokens`` tokens. Window k
    predicts tokens 1 + kT ... (k + 1)T from the T tokens before each: targets never repeat,
    and the stream's first token is only ever an input."""
    return max(0, (num_tokens - 1) // context_length)


def steps_per_epoch_packed(num_tokens: int, split: TokenSplit) -> int:
    """Optimizer steps in one pass over a packed stream (a final partial batch counts when every
    worker's micro-batches still get a sequence each, as ``bench.plan.steps_per_epoch`` counts
    images): one bucket of full-context windows."""
    return steps_per_epoch_bucketed((packed_windows(num_tokens, split.context_length),), (split.global_sequences,),
                                    split.num_workers * split.grad_accum_steps)


# --- length buckets ------------------------------------------------------------------------------

BUCKET_MULTIPLE = 8  # bucket lengths are rounded up to a multiple of this (tensor-core friendly)


def geometric_bucket_lengths(context_length: int, min_length: int = 16, per_doubling: int = 2) -> tuple[int, ...]:
    """Padded lengths of the buckets, ascending, the largest = ``context_length``: T * 2^(-k /
    per_doubling) rounded up to a multiple of 8, down to ``min_length``. With 2 per doubling
    neighbours differ by a factor of about sqrt(2) (rounding stretches it for the short ones:
    T = 128 gives 16, 24, 32, 48, 64, 96, 128), so padding stays a fraction of a piece's length."""
    if context_length < 1 or min_length < 1 or per_doubling < 1:
        raise PlanError(f"bucket lengths: context_length {context_length}, min_length {min_length} and "
                        f"per_doubling {per_doubling} must be >= 1")
    lengths, k = {context_length}, 1
    while True:
        raw = context_length * 2 ** (-k / per_doubling)
        if raw < min_length:
            break
        lengths.add(min(context_length, math.ceil(raw / BUCKET_MULTIPLE) * BUCKET_MULTIPLE))
        k += 1
    return tuple(sorted(lengths))


def check_bucket_lengths(lengths: tuple[int, ...], context_length: int) -> tuple[int, ...]:
    """Ascending, unique, positive, the last equal to the context (every sequence fits one)."""
    if not lengths or list(lengths) != sorted(set(lengths)) or lengths[0] < 1 or lengths[-1] != context_length:
        raise PlanError(f"bucket_lengths: {list(lengths)} must be ascending, unique, >= 1 and end at "
                        f"context_length {context_length}")
    return tuple(lengths)


def bucket_capacities(global_batch_tokens: int, lengths: tuple[int, ...]) -> tuple[int, ...]:
    """Sequences per global batch of each bucket: as many of its padded length as the budget holds."""
    return tuple(global_batch_tokens // length for length in lengths)


def steps_per_epoch_bucketed(counts: tuple[int, ...], capacities: tuple[int, ...], min_sequences: int) -> int:
    """Global batches of one epoch: per bucket, its full batches plus a partial one holding at
    least ``min_sequences`` (num_workers x grad_accum_steps: one per micro-batch slot)."""
    if len(counts) != len(capacities):
        raise PlanError(f"{len(counts)} bucket counts for {len(capacities)} buckets")
    total = 0
    for count, cap in zip(counts, capacities):
        full, remainder = divmod(count, cap)
        total += full + (1 if remainder >= min_sequences else 0)
    return total


# --- scaling trends and utilisation ------------------------------------------------------------------

def kaplan_critical_batch_tokens(loss_nats: float, b_star_tokens: float = KAPLAN_B_STAR_TOKENS,
                                 alpha_b: float = KAPLAN_ALPHA_B) -> float:
    """Kaplan et al.'s critical batch (tokens) at loss L (nats/token): B* / L^(1/alpha_B).
    Their fit is for GPT-2 BPE tokens on WebText2 (about 4 bytes each); a byte-level loss is on
    another scale, so on our axes the curve shows the trend's slope, not a prediction."""
    if not loss_nats > 0:
        raise ValueError(f"loss must be > 0 nats, got {loss_nats}")
    return b_star_tokens / loss_nats ** (1.0 / alpha_b)


# Dense bf16 tensor-core peaks (FLOP/s) from NVIDIA's data sheets (the sparsity figures halved);
# matched against torch's device name, the first listed fragment that occurs in it wins.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
    ("A100", 312e12),
)


def peak_bf16_flops(device_name: str | None) -> float | None:
    """The GPU's dense bf16 peak, or None for a CPU or a GPU not in ``PEAK_BF16_FLOPS``."""
    for fragment, flops in PEAK_BF16_FLOPS:
        if device_name and fragment in device_name:
            return flops
    return None


def model_flops_utilisation(tokens_per_s: float, flops_per_token: float,
                            peak_flops_per_s: float | None) -> float | None:
    """Achieved model FLOP/s (flops_per_token x tokens/s, e.g. 6 N) over the device's peak;
    None when the peak is unknown (an unlisted GPU)."""
    if peak_flops_per_s is None:
        return None
    if peak_flops_per_s <= 0:
        raise ValueError(f"peak FLOP/s must be > 0, got {peak_flops_per_s}")
    return tokens_per_s * flops_per_token / peak_flops_per_s
