"""LMFeed: the interface the worker drives, and the loss-scaling contract across ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.lm.batching import IGNORE_INDEX, BatchSpec
from bench.lm.corpus import load_python_docs
from bench.lm.feed import LMFeed
from bench.lm.markov import load_markov
from bench.lm.model import build_gpt
from bench.lm.tokenfile import open_token_dir, write_token_dir
from bench.step import IGNORE_INDEX as STEP_IGNORE_INDEX
from bench.step import summed_loss

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def markov():
    return load_markov(num_states=8, mean_doc_tokens=20, num_train_tokens=20_000, num_val_tokens=2_000)


def spec(workers=1, accum=1, packing=True, tokens=512, context=32):
    return BatchSpec(context_length=context, global_batch_tokens=tokens, num_workers=workers,
                     grad_accum_steps=accum, seed=7, packing=packing)


def test_interface_attributes(markov):
    feed = LMFeed(markov, spec(), 0, 1, CPU)
    assert feed.input_shape == (32,) and feed.num_classes == 9 and feed.channels_last is False
    assert feed.steps_per_epoch == 39  # (20,000 - 1) // 32 = 624 windows, 16 per step
    assert 0 < feed.train_eval_samples <= 2_100  # about as many targets as the validation split


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "bucketed"])
def test_steps_yield_micro_batches_and_global_target_counts(markov, packing):
    feed = LMFeed(markov, spec(accum=2, packing=packing), 0, 1, CPU)
    for micro_batches, num_global in feed.steps(epoch=1, count=5):
        pairs = list(micro_batches)
        assert len(pairs) == 2
        targets = 0
        for x, y in pairs:
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.device == CPU
            assert x.shape[1] <= 32 and x.shape[0] * x.shape[1] <= 512 // 2 + x.shape[1]
            assert int(x.max()) < 9 and int(y[y != IGNORE_INDEX].max()) < 9
            targets += int((y != IGNORE_INDEX).sum())
        assert targets == num_global
        if packing:
            assert num_global == 512


def test_two_ranks_give_the_one_worker_gradient(markov):
    """Sum-reduced loss x num_workers / num_global on each rank, then DDP's mean over ranks ==
    one worker's mean gradient over the global batch (bucketed: uneven shares, padding)."""
    torch.manual_seed(0)
    model = build_gpt("gpt-tiny", 9, 32)

    def rank_grad(rank: int, world: int, accum: int) -> torch.Tensor:
        model.zero_grad()
        feed = LMFeed(markov, spec(world, accum, packing=False), rank, world, CPU)
        micro_batches, num_global = next(iter(feed.steps(epoch=3, count=1)))
        for x, y in micro_batches:  # bench.step.TrainStep's loss and scale, without its optimizer step
            (summed_loss(model(x), y) * world / num_global).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    one = rank_grad(0, 1, 1)
    two = (rank_grad(0, 2, 2) + rank_grad(1, 2, 2)) / 2
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-7)


def test_eval_batches_cover_each_split_once_over_ranks(markov):
    feeds = [LMFeed(markov, spec(2, packing=False), r, 2, CPU) for r in range(2)]
    val_targets = sum(int((y != IGNORE_INDEX).sum()) for f in feeds for _, y in f.eval_batches("val"))
    assert val_targets == 2_000  # every validation token is a target once (the first after a virtual EOT)
    train_targets = sum(int((y != IGNORE_INDEX).sum()) for f in feeds for _, y in f.eval_batches("train"))
    assert train_targets == feeds[0].train_eval_samples
    assert list(feeds[0].eval_batches("test"))  # the worker's name for the held-out split
    with pytest.raises(ValueError, match="unknown split"):
        list(feeds[0].eval_batches("dev"))


def test_feed_reads_a_memory_mapped_token_folder(tmp_path):
    data = load_python_docs()
    write_token_dir(tmp_path / "docs", {"train": [np.asarray(data.train.tokens)], "val": [np.asarray(data.val.tokens)]},
                    vocab_size=257, eot_token=256)
    mapped = open_token_dir(tmp_path / "docs")
    a = LMFeed(data, spec(tokens=1024, context=64), 0, 1, CPU)
    b = LMFeed(mapped, spec(tokens=1024, context=64), 0, 1, CPU)
    for (ma, na), (mb, nb) in zip(a.steps(2, 3), b.steps(2, 3)):
        assert na == nb
        for (xa, ya), (xb, yb) in zip(ma, mb):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_feed_refuses_what_cannot_run(markov):
    with pytest.raises(ValueError, match="rank 2 of world 2"):
        LMFeed(markov, spec(2), 2, 2, CPU)
    tiny = load_markov(num_states=8, num_train_tokens=100, num_val_tokens=100)  # 3 windows of 32
    with pytest.raises(ValueError, match="has 3 training sequences, not one global batch"):
        LMFeed(tiny, spec(accum=4, tokens=32 * 4), 0, 1, CPU)  # 4 micro-batch slots to fill
    feed = LMFeed(markov, spec(), 0, 1, CPU)
    with pytest.raises(ValueError, match="steps asked of epoch 1"):
        list(feed.steps(1, feed.steps_per_epoch + 1))


def test_validation_can_be_capped_to_a_fixed_subset(markov):
    feed = LMFeed(markov, spec(), 0, 1, CPU, val_eval_tokens=640)
    targets = sum(int((y != IGNORE_INDEX).sum()) for _, y in feed.eval_batches("val"))
    assert targets == 640 == feed.train_eval_samples  # 20 windows of 32; train matches val's size
    again = LMFeed(markov, spec(), 0, 1, CPU, val_eval_tokens=640)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(feed.eval_batches("val"), again.eval_batches("val")))


def test_padding_target_is_the_one_the_step_ignores():
    assert IGNORE_INDEX == STEP_IGNORE_INDEX == -100
