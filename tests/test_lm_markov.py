"""The generated corpus: exact entropy floors (closed forms), unbiased samples, and a tiny GPT
trained in-process that approaches the floor from above."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from bench.lm.batching import BatchSpec
from bench.lm.feed import LMFeed
from bench.lm.markov import (MarkovChain, document_chain, entropy_nats, load_markov, markov_token_chain,
                             random_transition, sample_documents)
from bench.lm.model import build_gpt
from bench.step import TrainStep, evaluate


def binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_two_state_chain_closed_form():
    # P = [[1-a, a], [b, 1-b]]: pi = (b, a) / (a + b); H = pi_0 h(a) + pi_1 h(b).
    a, b = 0.1, 0.3
    chain = MarkovChain(np.array([[1 - a, a], [b, 1 - b]]))
    np.testing.assert_allclose(chain.stationary(), [0.75, 0.25], atol=1e-12)
    assert chain.entropy_rate() == pytest.approx(0.75 * binary_entropy(0.1) + 0.25 * binary_entropy(0.3), abs=1e-12)
    assert chain.entropy_rate() == pytest.approx(0.396528, abs=1e-6)  # 0.75 * 0.325083 + 0.25 * 0.610864


def test_document_chain_closed_form():
    # Uniform i.i.d. tokens over V = 4, documents end with p = 1/4 after each token.
    # mu_EOT = p / (1 + p) = 0.2; H = 0.8 (h(p) + (1 - p) ln 4) + 0.2 ln 4 = 1.558904 nats.
    v, p = 4, 0.25
    chain = document_chain(MarkovChain(np.full((v, v), 1 / v)), p)
    assert chain.stationary()[v] == pytest.approx(0.2, abs=1e-12)
    expected = 0.8 * (binary_entropy(p) + (1 - p) * math.log(v)) + 0.2 * math.log(v)
    assert chain.entropy_rate() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(1.558904, abs=1e-6)


def test_entropy_nats_handles_zeros():
    np.testing.assert_allclose(entropy_nats(np.array([[1.0, 0.0], [0.5, 0.5]])), [0.0, math.log(2)])


def test_transition_must_be_stochastic():
    with pytest.raises(ValueError, match="row-stochastic"):
        MarkovChain(np.array([[0.5, 0.6], [0.5, 0.5]]))


def test_sampled_stream_scores_the_entropy_rate():
    """The true chain's loss on a long sample converges to the entropy rate: documents are not
    biased towards short ones, and starts/ends follow the chain."""
    rng = np.random.default_rng(1)
    tokens = MarkovChain(random_transition(8, 0.3, rng))
    p = 1 / 40
    stream = sample_documents(tokens, p, 400_000, rng)
    doc = document_chain(tokens, p)
    assert doc.cross_entropy(np.r_[8, stream]) == pytest.approx(doc.entropy_rate(), abs=0.01)
    ends = np.flatnonzero(stream == 8)
    assert np.diff(ends).mean() - 1 == pytest.approx(40, rel=0.05)  # mean document length 1/p


def test_corpus_is_fixed_by_its_parameters_and_floor_is_below_uniform():
    a = load_markov(num_states=8, num_train_tokens=5_000, num_val_tokens=1_000, chain_seed=3)
    b = load_markov(num_states=8, num_train_tokens=5_000, num_val_tokens=1_000, chain_seed=3)
    c = load_markov(num_states=8, num_train_tokens=5_000, num_val_tokens=1_000, chain_seed=4)
    assert a.sha256 == b.sha256 != c.sha256
    assert (a.train.num_tokens, a.val.num_tokens, a.vocab_size, a.eot_token) == (5_000, 1_000, 9, 8)
    assert 0 < a.entropy_floor_nats < math.log(9)
    assert not np.array_equal(a.train.tokens[:1000], a.val.tokens)  # independent samples


# --- training approaches the floor --------------------------------------------------------------

V, CONCENTRATION, MEAN_DOC, CONTEXT = 16, 0.2, 32, 32
STEPS, PEAK_LR, WARMUP = 100, 1e-2, 10  # AdamW, linear warmup then cosine to 0


def val_loss(model, feed) -> float:
    """The worker's own evaluation (next-token accuracy and mean loss over non-padding targets)."""
    _, loss = evaluate(model, feed.eval_batches("val"), False, contextlib.nullcontext, torch.device("cpu"))
    return loss


@pytest.mark.slow
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "bucketed"])
def test_tiny_gpt_approaches_the_entropy_floor(packing):
    """100 steps of 1,024 tokens through the shared training step (bench.step.TrainStep; a few
    seconds): the validation loss falls from about ln(17)
    to within 0.06 nats of what the true chain scores on the same validation tokens, and never
    below it by more than sampling noise (which would mean a wrong floor or a leak)."""
    data = load_markov(num_states=V, concentration=CONCENTRATION, mean_doc_tokens=MEAN_DOC,
                       num_train_tokens=200_000, num_val_tokens=20_000)
    true_loss = document_chain(markov_token_chain(V, CONCENTRATION), 1 / MEAN_DOC).cross_entropy(
        np.r_[V, data.val.tokens])  # the val stream follows a (virtual) EOT
    assert true_loss == pytest.approx(data.entropy_floor_nats, abs=0.03)
    spec = BatchSpec(context_length=CONTEXT, global_batch_tokens=1024, num_workers=1, grad_accum_steps=1,
                     seed=0, packing=packing)
    feed = LMFeed(data, spec, rank=0, world_size=1, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = build_gpt("gpt-tiny", data.vocab_size, CONTEXT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.0)
    initial = val_loss(model, feed)
    train_step = TrainStep(model, optimizer)  # the step the worker runs
    for step, (micro_batches, num_global) in enumerate(feed.steps(epoch=1, count=STEPS)):
        lr = PEAK_LR * min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * step / STEPS))
        train_step(micro_batches, num_global, lr)
    final = val_loss(model, feed)
    assert initial > true_loss + 1.0
    assert -0.01 < final - true_loss < 0.06
