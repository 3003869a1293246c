"""bench.optim: parameter groups, the optimizer factory, and LARS/LAMB against the papers'
update equations computed by hand in numpy (float64) for a few steps on tiny tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bench.config import OptimizerConfig
from bench.optim import LAMB, LARS, build_optimizer, param_groups

RNG = np.random.default_rng(0)
W0 = RNG.normal(size=(2, 3))              # a weight matrix
GRADS = [RNG.normal(size=(2, 3)) for _ in range(3)]
LRS = [0.5, 1.0, 2.0]                     # the worker changes group["lr"] every step (warmup)


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2), nn.LayerNorm(2))


def names_by_group(model: nn.Module, groups: list[dict]) -> dict[str, set[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {g["group_name"]: {name_of[id(p)] for p in g["params"]} for g in groups}


# --- parameter groups ----------------------------------------------------------------------

def test_bias_and_norm_params_are_excluded() -> None:
    model = tiny_model()
    groups = param_groups(model, weight_decay=5e-4, exclude_bias_and_norm=True)
    names = names_by_group(model, groups)
    assert names["decay"] == {"0.weight", "3.weight"}
    assert names["no_decay"] == {"0.bias", "1.weight", "1.bias", "3.bias", "4.weight", "4.bias"}
    by_name = {g["group_name"]: g for g in groups}
    assert by_name["decay"]["weight_decay"] == 5e-4 and by_name["decay"]["trust_ratio"] is True
    assert by_name["no_decay"]["weight_decay"] == 0.0 and by_name["no_decay"]["trust_ratio"] is False


def test_no_exclusion_puts_everything_in_one_group() -> None:
    model = tiny_model()
    groups = param_groups(model, weight_decay=1e-4, exclude_bias_and_norm=False)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-4
    assert len(groups[0]["params"]) == len(list(model.parameters()))


def test_shared_and_frozen_params_appear_at_most_once() -> None:
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(3, 1))
    model[3].weight.requires_grad_(False)
    groups = param_groups(model, 0.1)
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == 3  # lin.weight, lin.bias, 3.bias


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW),
                                      ("lars", LARS), ("lamb", LAMB)])
def test_build_optimizer_types_and_groups(name: str, cls: type) -> None:
    cfg = OptimizerConfig(name=name, weight_decay=1e-3)
    opt = build_optimizer(cfg, tiny_model(), lr=0.1)
    assert type(opt) is cls
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]
    assert all(g["lr"] == 0.1 for g in opt.param_groups)


def test_build_optimizer_passes_hyperparameters() -> None:
    sgd = build_optimizer(OptimizerConfig(name="sgd", momentum=0.8, nesterov=True), tiny_model(), 0.1)
    assert sgd.param_groups[0]["momentum"] == 0.8 and sgd.param_groups[0]["nesterov"] is True
    lars = build_optimizer(OptimizerConfig(name="lars", trust_coefficient=0.02), tiny_model(), 1.0)
    assert lars.param_groups[0]["trust_coefficient"] == 0.02
    lamb = build_optimizer(OptimizerConfig(name="lamb", betas=(0.8, 0.99), eps=1e-6), tiny_model(), 1e-3)
    assert lamb.param_groups[0]["betas"] == (0.8, 0.99) and lamb.param_groups[0]["eps"] == 1e-6


def test_nesterov_outside_momentum_sgd_is_refused() -> None:
    with pytest.raises(ValueError, match="nesterov"):
        build_optimizer(OptimizerConfig(name="lars", nesterov=True), tiny_model(), 0.1)
    with pytest.raises(ValueError, match="momentum > 0"):
        build_optimizer(OptimizerConfig(name="sgd", momentum=0.0, nesterov=True), tiny_model(), 0.1)


# --- LARS ----------------------------------------------------------------------------------

def run_steps(opt_cls: type, w0: np.ndarray, grads: list[np.ndarray], lrs: list[float],
              **group: object) -> np.ndarray:
    p = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = opt_cls([{"params": [p], **group}], lr=lrs[0])
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach().numpy()


def lars_numpy(w: np.ndarray, grads: list[np.ndarray], lrs: list[float], momentum: float,
               wd: float, eta: float, trust: bool = True) -> np.ndarray:
    """You et al. 2017, Algorithm 1, line by line."""
    w, v = w.copy(), np.zeros_like(w)
    for g, lr in zip(grads, lrs):
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
        local = eta * w_norm / (g_norm + wd * w_norm) if trust and w_norm > 0 and g_norm > 0 else 1.0
        v = momentum * v + lr * local * (g + wd * w)
        w = w - v
    return w


def test_lars_matches_the_paper_for_three_steps() -> None:
    got = run_steps(LARS, W0, GRADS, LRS, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02)
    want = lars_numpy(W0, GRADS, LRS, momentum=0.9, wd=0.01, eta=0.02)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert not np.allclose(got, W0)


def test_lars_without_trust_ratio_is_momentum_sgd() -> None:
    got = run_steps(LARS, W0, GRADS, [0.1] * 3, momentum=0.9, weight_decay=0.0, trust_ratio=False)
    np.testing.assert_allclose(got, lars_numpy(W0, GRADS, [0.1] * 3, 0.9, 0.0, 1.0, trust=False),
                               rtol=1e-12)
    ref = run_steps(torch.optim.SGD, W0, GRADS, [0.1] * 3, momentum=0.9)  # constant lr: same thing
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_lars_zero_norms_use_trust_ratio_one() -> None:
    zero_w = np.zeros((2, 3))
    got = run_steps(LARS, zero_w, GRADS[:1], [0.5], momentum=0.9, weight_decay=0.01,
                    trust_coefficient=0.001)
    np.testing.assert_allclose(got, -0.5 * GRADS[0], rtol=1e-12)   # local lr 1, no NaN
    got = run_steps(LARS, W0, [np.zeros((2, 3))], [0.5], momentum=0.9, weight_decay=0.0)
    np.testing.assert_allclose(got, W0)                              # zero gradient: no move


# --- LAMB ----------------------------------------------------------------------------------

def lamb_numpy(w: np.ndarray, grads: list[np.ndarray], lrs: list[float], b1: float, b2: float,
               eps: float, wd: float, trust: bool = True) -> np.ndarray:
    """You et al. 2019, Algorithm 2 with Adam's bias correction, line by line."""
    w, m, v = w.copy(), np.zeros_like(w), np.zeros_like(w)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        r = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) + wd * w
        w_norm, r_norm = np.linalg.norm(w), np.linalg.norm(r)
        ratio = w_norm / r_norm if trust and w_norm > 0 and r_norm > 0 else 1.0
        w = w - lr * ratio * r
    return w


def test_lamb_matches_the_paper_for_three_steps() -> None:
    lrs = [1e-3, 2e-3, 4e-3]
    got = run_steps(LAMB, W0, GRADS, lrs, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    want = lamb_numpy(W0, GRADS, lrs, 0.9, 0.99, 1e-6, 0.01)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert not np.allclose(got, W0)


def test_lamb_without_trust_ratio_or_decay_is_adam() -> None:
    lrs = [1e-2] * 3
    got = run_steps(LAMB, W0, GRADS, lrs, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, trust_ratio=False)
    ref = run_steps(torch.optim.Adam, W0, GRADS, lrs, betas=(0.9, 0.999), eps=1e-8)
    np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_lamb_zero_weight_uses_trust_ratio_one() -> None:
    got = run_steps(LAMB, np.zeros((2, 3)), GRADS[:1], [0.1], betas=(0.9, 0.999), eps=1e-8)
    want = lamb_numpy(np.zeros((2, 3)), GRADS[:1], [0.1], 0.9, 0.999, 1e-8, 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.isfinite(got).all() and np.abs(got).max() > 0.09   # first Adam step ~ lr * sign(g)


def test_optimizers_train_a_tiny_model_with_excluded_groups() -> None:
    """Every optimizer takes real steps on a model with norm layers and lowers the loss."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    lrs = {"sgd": 0.1, "adamw": 0.01, "lars": 2.0, "lamb": 0.01}
    for name, lr in lrs.items():
        torch.manual_seed(1)
        model = tiny_model()
        cfg = OptimizerConfig(name=name, weight_decay=1e-4, trust_coefficient=0.01)
        opt = build_optimizer(cfg, model, lr)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], (name, losses[0], losses[-1])


@pytest.mark.parametrize("cls", [LARS, LAMB])
def test_sparse_gradients_are_refused(cls: type) -> None:
    emb = nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        cls(emb.parameters(), lr=0.1).step()
