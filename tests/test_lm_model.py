"""The GPT decoder: shapes, causality, tied weights, GPT-2's parameter count and init, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch

from bench.lm.model import (GPT, SIZES, GPTConfig, build_gpt, count_parameters, gpt_config,
                            non_embedding_parameters, train_flops_per_token)

GPT2_SMALL = GPTConfig(vocab_size=50_257, context_length=1_024, n_layer=12, n_head=12, d_model=768)


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{"vocab_size": 11, "context_length": 16, "n_layer": 2, "n_head": 2,
                            "d_model": 32, **kw}))


def test_gpt2_small_parameter_count_closed_form():
    # wte 50257*768 = 38,597,376; wpe 1024*768 = 786,432; per block 7,087,872 (LN 2*1536,
    # qkv 768*2304+2304, proj 768*768+768, fc 768*3072+3072, proj 3072*768+768); ln_f 1,536.
    assert count_parameters(GPT2_SMALL) == 38_597_376 + 786_432 + 12 * 7_087_872 + 1_536 == 124_439_808
    assert non_embedding_parameters(GPT2_SMALL) == 12 * 7_087_872 + 1_536 == 85_056_000


@pytest.mark.slow
def test_gpt2_small_module_has_124m_parameters():
    with torch.device("meta"):  # shapes only: no 0.5 GB of weights on a shared CPU
        model = GPT(GPT2_SMALL)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


@pytest.mark.parametrize("size", list(SIZES))
def test_closed_form_matches_module(size):
    cfg = gpt_config(size, vocab_size=257, context_length=64)
    with torch.device("meta"):
        model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)


def test_no_bias_variant_counts():
    cfg = GPTConfig(vocab_size=11, context_length=16, n_layer=2, n_head=2, d_model=32, bias=False)
    assert sum(p.numel() for p in GPT(cfg).parameters()) == count_parameters(cfg)


def test_shapes_and_shorter_inputs():
    model = tiny()
    x = torch.randint(0, 11, (3, 16))
    assert model(x).shape == (3, 16, 11)
    assert model(x[:, :5]).shape == (3, 5, 11)  # a length bucket shorter than the context
    with pytest.raises(ValueError, match="longer than the context of 16"):
        model(torch.randint(0, 11, (1, 17)))


def test_causal_logits_at_t_ignore_tokens_after_t():
    model = tiny().eval()
    x = torch.randint(0, 11, (2, 16))
    changed = x.clone()
    changed[:, 9:] = (changed[:, 9:] + 1 + torch.randint(0, 10, (2, 7))) % 11  # every later token differs
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])  # the test can see a change where one is allowed


def test_tied_embeddings_share_storage_and_gradient():
    model = tiny()
    assert model.head.weight is model.tok_emb.weight
    model(torch.randint(0, 11, (2, 8))).sum().backward()
    assert model.tok_emb.weight.grad is not None
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})


def test_gpt2_initialisation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, context_length=64, n_layer=4, n_head=4, d_model=256))
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * 4)
    for block in model.blocks:
        assert block.attn.proj.weight.std().item() == pytest.approx(residual, rel=0.05)
        assert block.mlp.proj.weight.std().item() == pytest.approx(residual, rel=0.05)
        assert block.attn.qkv.bias.abs().max().item() == 0.0
        assert block.ln_1.weight.eq(1).all()


def test_initial_loss_is_near_uniform():
    """GPT-2's small init makes the first logits almost flat: loss ~ log(V)."""
    torch.manual_seed(0)
    model = build_gpt("gpt-tiny", vocab_size=257, context_length=32)
    x, y = torch.randint(0, 257, (2, 4, 32))  # targets independent of the inputs
    loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 257), y.reshape(-1))
    assert loss.item() == pytest.approx(math.log(257), abs=0.1)


def test_train_flops_per_token():
    assert train_flops_per_token(GPT2_SMALL) == 6 * 85_056_000
    assert train_flops_per_token(GPT2_SMALL, with_attention=True) == 6 * 85_056_000 + 6 * 12 * 1024 * 768


def test_bad_config_and_unknown_size():
    with pytest.raises(ValueError, match="not divisible by n_head"):
        GPTConfig(vocab_size=11, context_length=8, n_layer=1, n_head=3, d_model=32)
    with pytest.raises(KeyError, match="gpt-tiny"):
        gpt_config("gpt-huge", 257, 64)
