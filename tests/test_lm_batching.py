"""Token arithmetic and batching: budgets, buckets, epochs, rank shares, gathered windows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.errors import PlanError
from bench.lm.batching import (IGNORE_INDEX, BatchSpec, Pieces, document_pieces, epoch_batches, eval_plan,
                               evenly_spaced, gather, packed_pieces, rank_micro_batches, steps_in_epoch)
from bench.lm.tokenplan import (geometric_bucket_lengths, kaplan_critical_batch_tokens,
                                model_flops_utilisation, packed_windows, split_global_tokens,
                                steps_per_epoch_packed)
from bench.plan import steps_per_epoch

# --- tokenplan ------------------------------------------------------------------------------------


def test_split_global_tokens_nanogpt_arithmetic():
    # nanoGPT's GPT-2 config: 12 batch * 1024 block * 5 accum * 8 GPUs = 491,520 tokens.
    s = split_global_tokens(491_520, 1024, 8, max_micro_batch_tokens=12 * 1024)
    assert (s.global_sequences, s.per_worker_sequences, s.micro_batch_sequences, s.grad_accum_steps) == (480, 60, 12, 5)
    assert (s.micro_batch_tokens, s.per_worker_tokens) == (12_288, 61_440)
    # without a cap no accumulation
    assert split_global_tokens(2**20, 1024, 1).grad_accum_steps == 1


def test_split_global_tokens_refuses_with_the_numbers():
    with pytest.raises(PlanError, match=r"global_batch_tokens: 1000 is not a multiple of context_length 256"):
        split_global_tokens(1000, 256, 1)
    with pytest.raises(PlanError, match=r"3 sequences of 256 tokens, not divisible by num_workers 2"):
        split_global_tokens(768, 256, 2)
    with pytest.raises(PlanError, match=r"max_micro_batch_tokens: 100 is less than one sequence"):
        split_global_tokens(2048, 256, 1, max_micro_batch_tokens=100)
    with pytest.raises(PlanError, match=r"6 sequences per worker, not divisible by the 4 sequences \(1024 tokens\)"):
        split_global_tokens(1536, 256, 1, max_micro_batch_tokens=1024)


def test_packed_windows_and_steps():
    assert packed_windows(1, 4) == 0
    assert packed_windows(9, 4) == 2   # targets 1..8
    assert packed_windows(10, 4) == 2
    split = split_global_tokens(8, 4, 1)  # 2 windows per step
    assert steps_per_epoch_packed(4 * 7 + 1, split) == 4  # 7 windows: 3 full steps + a partial of 1


def test_geometric_bucket_lengths():
    # 256 * 2^(-k/2) rounded up to a multiple of 8, down to 16
    assert geometric_bucket_lengths(256) == (16, 24, 32, 48, 64, 96, 128, 184, 256)
    assert geometric_bucket_lengths(32, min_length=8) == (8, 16, 24, 32)
    with pytest.raises(PlanError):
        geometric_bucket_lengths(0)


def test_kaplan_critical_batch():
    # B* / L^(1/0.21): at L = 1 nat the critical batch is B* itself; it grows as the loss falls.
    assert kaplan_critical_batch_tokens(1.0) == pytest.approx(2e8)
    assert kaplan_critical_batch_tokens(3.0) == pytest.approx(2e8 / 3.0 ** (1 / 0.21))
    assert kaplan_critical_batch_tokens(3.0) == pytest.approx(1.06e6, rel=0.01)
    assert kaplan_critical_batch_tokens(2.0) > kaplan_critical_batch_tokens(3.0)
    with pytest.raises(ValueError):
        kaplan_critical_batch_tokens(0.0)


def test_model_flops_utilisation():
    # 6 N = 6 * 85,056,000 FLOPs/token at 500k tokens/s on a 989.5 TFLOP/s (dense bf16) device
    assert model_flops_utilisation(5e5, 6 * 85_056_000, 989.5e12) == pytest.approx(0.2579, abs=1e-4)
    assert model_flops_utilisation(5e5, 1.0, None) is None


# --- pieces -----------------------------------------------------------------------------------------


def test_document_pieces_cut_long_documents():
    # documents of 3, 10 and 1 targets (each including its EOT) in a 14-token stream, T = 4
    p = document_pieces(np.array([0, 3, 13]), 14, 4)
    assert p.starts.tolist() == [0, 3, 7, 11, 13]
    assert p.lengths.tolist() == [3, 4, 4, 2, 1]


def test_gather_packed_windows_are_next_token_pairs():
    tokens = np.arange(100, 121, dtype=np.uint16)  # 21 tokens
    p = packed_pieces(21, 5)
    assert len(p) == 4
    x, y = gather(tokens, p, np.array([0, 3]), 5, eot_token=None)
    assert x.tolist() == [[100, 101, 102, 103, 104], [115, 116, 117, 118, 119]]
    assert y.tolist() == [[101, 102, 103, 104, 105], [116, 117, 118, 119, 120]]
    assert x.dtype == y.dtype == np.int64


def test_gather_documents_padding_and_virtual_eot():
    eot = 9
    tokens = np.array([1, 2, eot, 3, 4, 5, 6, eot], dtype=np.uint16)
    p = document_pieces(np.array([0, 3]), 8, 8)
    x, y = gather(tokens, p, np.array([0, 1]), 8, eot_token=eot)
    assert x.tolist() == [[eot, 1, 2, eot, eot, eot, eot, eot], [eot, 3, 4, 5, 6, eot, eot, eot]]
    assert y.tolist() == [[1, 2, eot] + [IGNORE_INDEX] * 5, [3, 4, 5, 6, eot] + [IGNORE_INDEX] * 3]


# --- specs and epochs -----------------------------------------------------------------------------


def test_spec_needs_a_sequence_per_slot():
    with pytest.raises(PlanError, match="holds 2 sequences of context_length 64, fewer than the 4 micro-batch"):
        BatchSpec(context_length=64, global_batch_tokens=128, num_workers=2, grad_accum_steps=2, seed=0)
    with pytest.raises(PlanError, match="bucket_lengths"):
        BatchSpec(64, 1024, 1, 1, 0, packing=False, bucket_lengths=(32, 48))  # must end at 64


def random_documents(rng, num_docs: int, max_len: int) -> tuple[np.ndarray, int]:
    sizes = rng.integers(1, max_len, size=num_docs)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return starts, int(sizes.sum())


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "bucketed"])
def test_epoch_uses_each_piece_at_most_once_within_the_budget(packing):
    rng = np.random.default_rng(0)
    starts, n = random_documents(rng, 300, 200)
    spec = BatchSpec(context_length=64, global_batch_tokens=512, num_workers=2, grad_accum_steps=2,
                     seed=5, packing=packing)
    pieces = packed_pieces(n, 64) if packing else document_pieces(starts, n, 64)
    batches = epoch_batches(pieces, spec, epoch=1)
    used = np.concatenate([idx for _, idx in batches])
    assert len(used) == len(set(used.tolist()))                       # at most once per epoch
    covered = np.zeros(n, dtype=int)
    for i in used:
        covered[pieces.starts[i]:pieces.starts[i] + pieces.lengths[i]] += 1
    assert covered.max() == 1                                          # no target token twice
    for length, idx in batches:
        assert (pieces.lengths[idx] <= length).all()                   # each piece fits its bucket
        assert len(idx) * length <= spec.global_batch_tokens           # padded size within the budget
        assert len(idx) >= spec.min_sequences
    assert len(batches) == steps_in_epoch(pieces, spec)
    assert len(used) > 0.9 * len(pieces)                               # only small remainders dropped


def test_packed_epoch_matches_the_image_arithmetic():
    spec = BatchSpec(context_length=16, global_batch_tokens=16 * 6, num_workers=2, grad_accum_steps=1, seed=0)
    pieces = packed_pieces(16 * 50 + 1, 16)  # 50 windows, 6 per step: 8 full + a partial of 2 (>= 2 slots)
    assert steps_in_epoch(pieces, spec) == steps_per_epoch(50, 6, 2, 1) == 9


@pytest.mark.parametrize("seed", range(6))
def test_partial_batches_run_after_the_full_ones(seed):
    """As an image epoch's partial batch runs last: a token budget that ends mid-epoch trains on
    full batches only (packed: exactly global_batch_tokens targets per step)."""
    spec = BatchSpec(context_length=16, global_batch_tokens=16 * 6, num_workers=2, grad_accum_steps=1, seed=seed)
    sizes = [len(idx) for _, idx in epoch_batches(packed_pieces(16 * 50 + 1, 16), spec, 1)]
    assert sizes == [6] * 8 + [2]
    docs = np.cumsum(np.r_[0, np.random.default_rng(seed).integers(1, 60, size=80)])
    bucketed = BatchSpec(context_length=32, global_batch_tokens=256, num_workers=1, grad_accum_steps=1, seed=seed,
                         packing=False)
    batches = epoch_batches(document_pieces(docs[:-1], int(docs[-1]), 32), bucketed, 1)
    full = [len(idx) == 256 // length for length, idx in batches]
    assert full == sorted(full, reverse=True) and not all(full)  # every full batch before any partial one


def test_epochs_differ_and_repeat_with_the_seed():
    pieces = packed_pieces(64 * 40 + 1, 64)
    spec = BatchSpec(64, 256, 1, 1, seed=1)
    a, b = epoch_batches(pieces, spec, 1), epoch_batches(pieces, spec, 2)
    again = epoch_batches(pieces, spec, 1)
    assert all(np.array_equal(i, j) for (_, i), (_, j) in zip(a, again))
    assert not all(np.array_equal(i, j) for (_, i), (_, j) in zip(a, b))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), epoch=st.integers(1, 50), workers=st.sampled_from([1, 2, 4]),
       accum=st.sampled_from([1, 2, 3]))
def test_ranks_together_see_the_one_worker_batch(seed, epoch, workers, accum):
    """The global batches do not depend on the world size or accumulation; the rank shares of
    each (over all micro-batches) partition it."""
    rng = np.random.default_rng(seed % 1000)
    starts, n = random_documents(rng, 120, 150)
    pieces = document_pieces(starts, n, 32)
    one = BatchSpec(32, 32 * 12, 1, 1, seed, packing=False)
    many = BatchSpec(32, 32 * 12, workers, accum, seed, packing=False)
    single = {(length, tuple(idx)) for length, idx in epoch_batches(pieces, one, epoch)}
    for length, idx in epoch_batches(pieces, many, epoch):
        assert (length, tuple(idx)) in single  # same batches (the W x A run may drop tiny remainders)
        shares = [m for r in range(workers) for m in rank_micro_batches(idx, r, workers, accum)]
        assert len(shares) == workers * accum and all(len(m) >= 1 for m in shares)
        assert sorted(np.concatenate(shares).tolist()) == sorted(idx.tolist())


def test_eval_plan_covers_the_split_once_across_ranks():
    rng = np.random.default_rng(3)
    starts, n = random_documents(rng, 80, 100)
    pieces = document_pieces(starts, n, 32)
    spec = BatchSpec(32, 256, 3, 1, 0, packing=False)
    idx = np.arange(len(pieces))
    seen = [i for r in range(3) for _, part in eval_plan(pieces, idx, spec, r, 3, 128) for i in part.tolist()]
    assert sorted(seen) == idx.tolist()
    for r in range(3):
        for length, part in eval_plan(pieces, idx, spec, r, 3, 128):
            assert len(part) * length <= max(128, length)


def test_evenly_spaced_subset():
    pieces = Pieces(np.arange(100, dtype=np.int64) * 10, np.full(100, 10, dtype=np.int64))
    sub = evenly_spaced(pieces, 200)
    assert len(sub) == 20 and sub[0] == 0 and sub[-1] == 99
    assert len(evenly_spaced(pieces, 10**9)) == 100
