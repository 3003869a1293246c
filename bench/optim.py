"""Optimizers: build the one a sweep asks for, with bias/norm exclusion, and LARS/LAMB.

Owns: ``build_optimizer`` (sgd, adamw, lars, lamb from ``bench.config.OptimizerConfig``),
``param_groups`` (which parameters get weight decay and layer-wise trust-ratio
adaptation), and our own ``LARS`` and ``LAMB`` (small ``torch.optim.Optimizer``
subclasses written from the published update equations).

Must not import: ray, pandas, bench.noise.

The worker loop writes ``group["lr"]`` before every step (warmup, schedule), so
nothing else may live in ``"lr"``: the per-group switches are ``weight_decay``
and ``trust_ratio`` (bool; read by LARS/LAMB, ignored by SGD/AdamW), and
``group_name`` ("decay" / "no_decay") for logs.

References:
- You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks" (LARS),
  Algorithm 1: local lr  lambda = eta * |w| / (|g| + beta * |w|)  (eta: trust coefficient,
  beta: weight decay);  v <- m * v + lr * lambda * (g + beta * w);  w <- w - v.
  The global lr sits inside the momentum buffer, as in the paper.
- You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
  minutes" (LAMB), Algorithm 2 with Adam bias correction:  m, v Adam moments;
  r = m_hat / (sqrt(v_hat) + eps) + lambda * w;  w <- w - lr * (|w| / |r|) * r.
Zero norms (a zero-initialised weight, a zero gradient): the trust ratio is 1 whenever
the formula's numerator or denominator is 0, as in NVIDIA apex LARC.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from bench.config import OptimizerConfig

# Parameters of these layers never get weight decay or a trust ratio when excluded
# (their weights are 1-D anyway; the type check documents intent and catches odd shapes).
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())  # RMSNorm: torch >= 2.4


def param_groups(model: nn.Module, weight_decay: float,
                 exclude_bias_and_norm: bool = True) -> list[dict[str, Any]]:
    """Split trainable parameters into a "decay" group and a "no_decay" group.

    Excluded (when ``exclude_bias_and_norm``): every parameter with ndim <= 1 (biases,
    norm scales/shifts) and every parameter of a normalisation layer. They get
    weight_decay 0 and trust_ratio False. Empty groups are left out; shared
    parameters appear once.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            excluded = exclude_bias_and_norm and (p.ndim <= 1 or isinstance(module, NORM_LAYERS))
            (no_decay if excluded else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "trust_ratio": True, "group_name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "trust_ratio": False, "group_name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: OptimizerConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg`` over ``model``'s parameters, starting at ``lr``."""
    groups = param_groups(model, cfg.weight_decay, cfg.exclude_bias_and_norm)
    if cfg.nesterov and (cfg.name != "sgd" or cfg.momentum == 0.0):
        raise ValueError(f"optimizer: nesterov needs name 'sgd' and momentum > 0 "
                         f"(got name {cfg.name!r}, momentum {cfg.momentum})")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    if cfg.name == "lamb":
        return LAMB(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)
    raise ValueError(f"optimizer: unknown name {cfg.name!r} (allowed: sgd, adamw, lars, lamb)")


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where both are > 0, else 1 (0-d tensors; no host sync)."""
    ok = (num > 0) & (den > 0)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.ones_like(num))


class _LayerwiseOptimizer(torch.optim.Optimizer):
    """Shared step(): closure, no_grad, dense gradients; subclasses update one tensor."""

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                self._update(p, p.grad, group, self.state[p])
        return loss

    def _update(self, p: torch.Tensor, g: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        raise NotImplementedError


class LARS(_LayerwiseOptimizer):
    """Layer-wise Adaptive Rate Scaling on momentum SGD (You et al. 2017, Algorithm 1).

    Per parameter tensor w with gradient g, in a group with weight decay wd:
        local = trust_coefficient * |w| / (|g| + wd * |w|)   (1 if trust_ratio is False
                                                             or a norm is 0)
        v <- momentum * v + lr * local * (g + wd * w)
        w <- w - v
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coefficient: float = 0.001) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(f"LARS: bad lr={lr} momentum={momentum} weight_decay={weight_decay} "
                             f"trust_coefficient={trust_coefficient}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, trust_ratio=True)
        super().__init__(params, defaults)

    def _update(self, p: torch.Tensor, g: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        wd = group["weight_decay"]
        d = g.add(p, alpha=wd) if wd != 0 else g.clone()
        if group["trust_ratio"]:
            w_norm = torch.linalg.vector_norm(p)
            g_norm = torch.linalg.vector_norm(g)
            d.mul_(_safe_ratio(group["trust_coefficient"] * w_norm, g_norm + wd * w_norm))
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(d, alpha=group["lr"])   # lr inside the buffer (paper)
        p.sub_(buf)


class LAMB(_LayerwiseOptimizer):
    """Layer-wise Adaptive Moments for Batch training (You et al. 2019, Algorithm 2).

    Per parameter tensor w with gradient g at step t (1-based), group weight decay wd:
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * w
        w <- w - lr * ratio * r,  ratio = |w| / |r|   (1 if trust_ratio is False or a norm is 0)
    """

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"LAMB: bad lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, trust_ratio=True)
        super().__init__(params, defaults)

    def _update(self, p: torch.Tensor, g: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        (b1, b2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
        r = (m / (1 - b1 ** t)).div_(denom)
        if wd != 0:
            r.add_(p, alpha=wd)
        if group["trust_ratio"]:
            r.mul_(_safe_ratio(torch.linalg.vector_norm(p), torch.linalg.vector_norm(r)))
        p.sub_(r, alpha=group["lr"])
