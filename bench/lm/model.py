"""The GPT-style decoder: causal self-attention, pre-norm blocks, tied embeddings.

Owns: ``GPTConfig`` and the named sizes a sweep can pick (``SIZES``: ``gpt-tiny`` for CPU
tests up to ``gpt2-124m``, GPT-2 small's shape), the ``GPT`` module with GPT-2's weight
initialisation, and the closed-form counts the planner and the report use: parameters,
Kaplan et al.'s non-embedding parameters N, and training FLOPs per token (6 N).

Must not import: ray, pandas, anything from bench outside bench.lm.

The architecture is GPT-2's (Radford et al. 2019) as nanoGPT writes it: token + learned
position embeddings; per block ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))`` (pre-norm);
attention through ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` so the
fused kernels (flash / memory-efficient) run where the device has them; a 4x MLP with GELU
(tanh approximation, as GPT-2); a final LayerNorm; an output projection that *is* the token
embedding matrix (tied), without bias. Initialisation as GPT-2: every Linear and Embedding
weight N(0, 0.02), biases 0, and the two residual output projections of each block
N(0, 0.02 / sqrt(2 * n_layer)) so the residual stream's variance does not grow with depth.

Parameter count (tied, with biases), vocabulary V, context T, width d, L layers:
    V d + T d + L (12 d^2 + 13 d) + 2 d
GPT-2 small (V 50,257, T 1,024, d 768, L 12): 124,439,808. Kaplan et al. 2020 count
N = L (12 d^2 + 13 d) + 2 d (embeddings excluded) and C ~ 6 N FLOPs per training token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTSize:
    """The shape that names a model size; vocabulary and context come from the data."""

    n_layer: int
    n_head: int
    d_model: int


# Sizes a sweep names with ``model:``. Non-embedding parameters N in the comments.
SIZES: dict[str, GPTSize] = {
    "gpt-tiny": GPTSize(n_layer=2, n_head=2, d_model=64),     # N = 0.10 M: CPU tests, seconds
    "gpt-mini": GPTSize(n_layer=4, n_head=4, d_model=128),    # N = 0.79 M: CPU sweeps, minutes
    "gpt-10m": GPTSize(n_layer=6, n_head=6, d_model=384),     # N = 10.6 M: nanoGPT's char baseline
    "gpt2-124m": GPTSize(n_layer=12, n_head=12, d_model=768),  # N = 85.1 M: GPT-2 small
}


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    context_length: int  # longest input (positions); T
    n_layer: int
    n_head: int
    d_model: int
    dropout: float = 0.0  # attention-probability and residual dropout; 0 for pre-training
    bias: bool = True     # biases in Linear and LayerNorm (GPT-2 has them)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig: d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout}")


def gpt_config(size: str, vocab_size: int, context_length: int, dropout: float = 0.0) -> GPTConfig:
    """The config of a named size for this vocabulary and context."""
    if size not in SIZES:
        raise KeyError(f"unknown GPT size {size!r} (known: {', '.join(SIZES)})")
    s = SIZES[size]
    return GPTConfig(vocab_size=vocab_size, context_length=context_length, n_layer=s.n_layer,
                     n_head=s.n_head, d_model=s.d_model, dropout=dropout)


# --- closed-form counts ----------------------------------------------------------------------

def non_embedding_parameters(cfg: GPTConfig) -> int:
    """Kaplan et al.'s N: every parameter but the token and position embeddings."""
    d = cfg.d_model
    per_norm = 2 * d if cfg.bias else d
    linear_bias = 3 * d + d + 4 * d + d if cfg.bias else 0
    per_layer = 2 * per_norm + 12 * d * d + linear_bias
    return cfg.n_layer * per_layer + per_norm


def count_parameters(cfg: GPTConfig) -> int:
    """All trainable parameters, the tied output projection counted once."""
    return (cfg.vocab_size + cfg.context_length) * cfg.d_model + non_embedding_parameters(cfg)


def train_flops_per_token(cfg: GPTConfig, with_attention: bool = False) -> float:
    """FLOPs of one training step per token: Kaplan et al.'s C = 6 N (forward 2 N, backward 4 N).
    ``with_attention`` adds their context term 6 * n_layer * T * d (the attention scores and
    weighted sum at full context); neither counts the output projection onto the vocabulary,
    which Kaplan leave out with the embeddings (2 V d per token forward)."""
    flops = 6.0 * non_embedding_parameters(cfg)
    if with_attention:
        flops += 6.0 * cfg.n_layer * cfg.context_length * cfg.d_model
    return flops


# --- the module --------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)  # residual output
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (n, t, d) -> (n, heads, t, d / heads)
        q, k, v = (z.view(n, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).contiguous().view(n, t, d)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)  # residual output
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """token ids (n, t) int64, t <= context_length -> logits (n, t, vocab_size)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: one matrix embeds and un-embeds
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # two residual additions per block
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        n, t = idx.shape
        if t > self.cfg.context_length:
            raise ValueError(f"GPT: input of {t} tokens is longer than the context of "
                             f"{self.cfg.context_length}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build_gpt(size: str, vocab_size: int, context_length: int, dropout: float = 0.0) -> GPT:
    """A freshly initialised model of a named size (the caller seeds torch first)."""
    return GPT(gpt_config(size, vocab_size, context_length, dropout))
