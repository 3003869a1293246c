"""Which tokens form each step: fixed-context packing, or documents batched by length buckets.

Owns: ``BatchSpec`` (context, budget in tokens, workers, accumulation, seed, mode), ``Pieces``
(the training sequences of a stream: where each one's targets start and how many it has),
the global batches of an epoch, this rank's micro-batches of one, and ``gather`` (token ids
and next-token targets of some pieces, padded to their bucket's length).

Must not import: torch, ray, pandas.

- Packing: the stream is cut into windows of T targets (window k predicts tokens 1 + kT ..
  (k + 1)T from the T tokens before each); documents run on across windows, separated by EOT.
  Every global batch holds global_batch_tokens / T windows (the last of an epoch may hold fewer).
- Length buckets: each document (its tokens and the EOT that ends it) is one sequence, a
  longer one cut into pieces of T targets; a piece is padded to the shortest bucket length
  that holds it, and a global batch of bucket length L holds global_batch_tokens // L pieces
  of that bucket (so its padded size never exceeds the budget; its targets are the budget
  minus the padding). The first input of a piece is the token before its first target (for
  a document: the EOT of the previous one, or a virtual EOT before the stream).

An epoch (both modes): shuffle the pieces with a generator seeded by (seed, epoch), assign
each to its bucket, cut each bucket's pieces into global batches in that order, shuffle the
batches, and drop a bucket's final partial batch when it holds fewer pieces than there are
micro-batch slots (num_workers x grad_accum_steps). The partial batches that are kept (at most
one per bucket) run after the full ones, as an image epoch's partial batch runs last: a run cut
short by a token budget trains on full batches only. The batches depend on (seed, epoch), the
budget and the buckets only, never on the world size: rank r takes positions r, r + W, ... of
each batch, so the ranks of a W-worker run together see what one worker sees. Every piece
is used at most once per epoch, and pieces never share a target, so neither does a token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.errors import PlanError
from bench.lm.tokenplan import (bucket_capacities, check_bucket_lengths, geometric_bucket_lengths,
                                packed_windows, steps_per_epoch_bucketed)

IGNORE_INDEX = -100  # target of a padding position: bench.step.IGNORE_INDEX, which the loss skips
BATCHING_STREAM = 0x42415443  # "BATC": this module's random stream, apart from model init


@dataclass(frozen=True)
class BatchSpec:
    """How one run batches its tokens (derived by the plan; written with the run)."""

    context_length: int       # T: the most targets (and inputs) in one sequence
    global_batch_tokens: int  # per optimizer step: targets (packing) or padded tokens (buckets)
    num_workers: int
    grad_accum_steps: int
    seed: int
    packing: bool = True      # False: variable-length documents in length buckets
    bucket_lengths: tuple[int, ...] = ()  # buckets only; () = geometric_bucket_lengths(T)

    def __post_init__(self) -> None:
        t, g, slots = self.context_length, self.global_batch_tokens, self.num_workers * self.grad_accum_steps
        if min(t, g, self.num_workers, self.grad_accum_steps) < 1:
            raise PlanError(f"context_length {t}, global_batch_tokens {g}, num_workers {self.num_workers}, "
                            f"grad_accum_steps {self.grad_accum_steps}: all must be >= 1")
        if self.packing and self.bucket_lengths:
            raise PlanError("bucket_lengths: only for length-bucketed batching, not packing")
        check_bucket_lengths(self.lengths, t)
        if g // t < slots:
            raise PlanError(f"global_batch_tokens: {g} holds {g // t} sequences of context_length {t}, fewer "
                            f"than the {slots} micro-batch slots (num_workers {self.num_workers} x "
                            f"grad_accum_steps {self.grad_accum_steps}); every slot needs one")

    @property
    def lengths(self) -> tuple[int, ...]:
        """Padded lengths of the buckets, ascending (packing: one bucket of T)."""
        if self.packing:
            return (self.context_length,)
        return self.bucket_lengths or geometric_bucket_lengths(self.context_length)

    @property
    def capacities(self) -> tuple[int, ...]:
        return bucket_capacities(self.global_batch_tokens, self.lengths)

    @property
    def min_sequences(self) -> int:
        return self.num_workers * self.grad_accum_steps


@dataclass(frozen=True)
class Pieces:
    """Training sequences of one stream: targets stream[start : start + length] (1 <= length <= T)."""

    starts: np.ndarray   # int64
    lengths: np.ndarray  # int64

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    @property
    def num_targets(self) -> int:
        return int(self.lengths.sum())


def packed_pieces(num_tokens: int, context_length: int) -> Pieces:
    w = packed_windows(num_tokens, context_length)
    return Pieces(1 + np.arange(w, dtype=np.int64) * context_length, np.full(w, context_length, dtype=np.int64))


def document_pieces(doc_starts: np.ndarray, num_tokens: int, context_length: int) -> Pieces:
    """Each document (doc_starts[i] up to the next start, its EOT included) cut into pieces of
    at most T targets, in stream order."""
    starts = np.asarray(doc_starts, dtype=np.int64)
    ends = np.append(starts[1:], num_tokens)
    per_doc = -(-(ends - starts) // context_length)  # ceil: pieces of each document
    doc = np.repeat(np.arange(len(starts)), per_doc)
    k = np.arange(int(per_doc.sum())) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    piece_starts = starts[doc] + k * context_length
    return Pieces(piece_starts, np.minimum(context_length, ends[doc] - piece_starts))


def stream_pieces(tokens_len: int, doc_starts: np.ndarray | None, spec: BatchSpec) -> Pieces:
    """The pieces a spec trains on: windows (packing) or document pieces (buckets)."""
    if spec.packing:
        return packed_pieces(tokens_len, spec.context_length)
    if doc_starts is None:
        raise PlanError("length-bucketed batching needs document boundaries: the corpus has no eot_token")
    return document_pieces(doc_starts, tokens_len, spec.context_length)


def bucket_index(lengths: np.ndarray, bucket_lengths: tuple[int, ...]) -> np.ndarray:
    """For each length, the first bucket that holds it."""
    return np.searchsorted(np.asarray(bucket_lengths), lengths, side="left")


GlobalBatch = tuple[int, np.ndarray]  # (padded length, piece indices)


def epoch_batches(pieces: Pieces, spec: BatchSpec, epoch: int) -> list[GlobalBatch]:
    """The global batches of one epoch, in step order (see the module docstring)."""
    rng = np.random.default_rng([spec.seed, epoch, BATCHING_STREAM])
    perm = rng.permutation(len(pieces))
    bucket = bucket_index(pieces.lengths[perm], spec.lengths)
    chunks: list[GlobalBatch] = []
    for b, (length, cap) in enumerate(zip(spec.lengths, spec.capacities)):
        members = perm[bucket == b]
        chunks += [(length, members[i:i + cap]) for i in range(0, len(members), cap)]
    order = rng.permutation(len(chunks))
    capacity = dict(zip(spec.lengths, spec.capacities))
    full = [chunks[i] for i in order if len(chunks[i][1]) == capacity[chunks[i][0]]]
    partial = [chunks[i] for i in order if spec.min_sequences <= len(chunks[i][1]) < capacity[chunks[i][0]]]
    return full + partial


def steps_in_epoch(pieces: Pieces, spec: BatchSpec) -> int:
    """len(epoch_batches(...)) for any epoch, from the bucket counts alone."""
    counts = np.bincount(bucket_index(pieces.lengths, spec.lengths), minlength=len(spec.lengths))
    return steps_per_epoch_bucketed(tuple(int(c) for c in counts), spec.capacities, spec.min_sequences)


def rank_micro_batches(batch: np.ndarray, rank: int, num_workers: int, grad_accum_steps: int) -> list[np.ndarray]:
    """This rank's share of a global batch (positions rank, rank + W, ...), in
    ``grad_accum_steps`` micro-batches whose sizes differ by at most one piece."""
    return np.array_split(batch[rank::num_workers], grad_accum_steps)


def gather(tokens: np.ndarray, pieces: Pieces, idx: np.ndarray, padded_length: int,
           eot_token: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y), int64 (len(idx), padded_length): y the targets of each piece, x the token before
    each target; past a piece's length x is the pad token (EOT, or 0) and y is IGNORE_INDEX.
    Reads one row of length + 1 tokens per piece from the stream (a memmap reads just those)."""
    starts, lengths = pieces.starts[idx], pieces.lengths[idx]
    offsets = np.arange(padded_length + 1)
    pos = starts[:, None] - 1 + offsets[None, :]          # the input before the first target, then targets
    inside = (offsets[None, :] <= lengths[:, None]) & (pos >= 0)
    rows = np.asarray(tokens[np.where(inside, pos, 0)]).astype(np.int64)
    pad = eot_token if eot_token is not None else 0
    rows[pos < 0] = pad                                   # a virtual EOT before the stream's first document
    x, y = rows[:, :-1].copy(), rows[:, 1:].copy()
    beyond = offsets[None, 1:] > lengths[:, None]
    x[beyond] = pad
    y[beyond] = IGNORE_INDEX
    return x, y


def evenly_spaced(pieces: Pieces, target_tokens: int) -> np.ndarray:
    """Indices of a fixed subset of pieces spread over the whole stream, about
    ``target_tokens`` targets in all (all pieces when they hold fewer)."""
    n = len(pieces)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = min(n, max(1, round(target_tokens * n / max(1, pieces.num_targets))))
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def eval_plan(pieces: Pieces, idx: np.ndarray, spec: BatchSpec, rank: int, num_workers: int,
              batch_tokens: int) -> list[GlobalBatch]:
    """This rank's evaluation batches of a fixed set of pieces: its strided share, grouped by
    bucket, each batch at most ``batch_tokens`` padded tokens (one piece at least)."""
    share = idx[rank::num_workers]
    bucket = bucket_index(pieces.lengths[share], spec.lengths)
    batches: list[GlobalBatch] = []
    for b, length in enumerate(spec.lengths):
        members = share[bucket == b]
        cap = max(1, batch_tokens // length)
        batches += [(length, members[i:i + cap]) for i in range(0, len(members), cap)]
    return batches
