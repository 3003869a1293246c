"""The language-model sides of ``python -m bench.perf overhead`` (``--preset gpt2-124m-1024``, or
``--model gpt-tiny`` and the other GPT sizes).

A  plain: a GPT (``bench.lm.model``) trained on one fixed random batch of ``micro_batch_size``
   sequences of ``context_length`` token ids already on the device; AdamW (0.9, 0.95) with
   weight decay 0.1 on the matrices only (two parameter groups, as nanoGPT), bf16 autocast on
   CUDA, cross-entropy over the flattened logits, ``zero_grad(set_to_none=True)``, no host sync.
B  batchscale: a one-run ``workload: lm`` sweep on the generated Markov corpus (256 states +
   EOT = the byte vocabulary, 257) sized so that one epoch is exactly ``steps`` steps of
   ``micro_batch_size x context_length`` tokens: packed windows, the same AdamW, bf16 on CUDA,
   evaluation only at the start and the end. Its throughput is epoch 2's, in tokens/s.

Both are counted in tokens per second; the model FLOPs utilisation of each is tokens/s x 6 N
(``bench.lm.model.train_flops_per_token``) over the GPU's dense bf16 peak
(``bench.lm.tokenplan.PEAK_BF16_FLOPS``; None on a CPU or an unlisted GPU). ``compile`` compiles
both sides' models (``torch.compile``), or neither.

Must not import: ray (side B reaches it through bench.runner, called by bench.perf.overhead).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bench.lm.model import build_gpt, gpt_config, train_flops_per_token
from bench.lm.tokenplan import model_flops_utilisation, peak_bf16_flops

VOCAB = 257  # bytes + EOT, and the Markov corpus of side B (256 states + EOT)
BETAS, WEIGHT_DECAY, LR = (0.9, 0.95), 0.1, 6e-4


def tokens_per_step(params: dict[str, Any]) -> int:
    return params["micro_batch_size"] * params["context_length"]


def flops_per_token(params: dict[str, Any]) -> float:
    return train_flops_per_token(gpt_config(params["model"], VOCAB, params["context_length"]))


def plain_lm_step(params: dict[str, Any], device: torch.device):
    """Side A on one fixed random token batch: (model, optimizer, forward_backward, step), the
    fields of ``bench.perf.overhead.PlainStep``."""
    torch.manual_seed(0)
    on_cuda = device.type == "cuda"
    model = build_gpt(params["model"], VOCAB, params["context_length"]).to(device).train()
    forward = torch.compile(model) if params.get("compile") else model
    shape = (params["micro_batch_size"], params["context_length"])
    x = torch.randint(0, VOCAB, shape, device=device)
    y = torch.randint(0, VOCAB, shape, device=device)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": WEIGHT_DECAY},
                                   {"params": others, "weight_decay": 0.0}], lr=LR, betas=BETAS)

    def forward_backward() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
            logits = forward(x)
        F.cross_entropy(logits.float().view(-1, VOCAB), y.view(-1)).backward()

    def step() -> None:
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, optimizer, forward_backward, step


def lm_sweep_for(params: dict[str, Any], name: str):
    """Side B: one run of ``workload: lm``, 2 epochs of ``steps`` steps, evaluated at start and end."""
    from bench.config import SweepConfig

    on_cuda = params["device"] == "cuda"
    step_tokens, context = tokens_per_step(params), params["context_length"]
    return SweepConfig.model_validate({
        "name": name, "workload": "lm", "model": params["model"], "description": "bench.perf.overhead side B (lm)",
        "workload_options": {"corpus": "markov", "context_length": context, "val_eval_tokens": step_tokens,
                             "markov": {"num_states": VOCAB - 1, "num_train_tokens": params["steps"] * step_tokens + 1,
                                        "num_val_tokens": max(100, step_tokens + 1)}},
        "lr": {"reference_lr": LR, "reference_batch_size": step_tokens, "scaling": "none"},
        "optimizer": {"name": "adamw", "betas": list(BETAS), "weight_decay": WEIGHT_DECAY},
        "epochs": 2, "eval_every_epochs": 2, "global_batch_tokens": [step_tokens], "num_workers": [1],
        "train_eval_samples": step_tokens, "target_loss": 0.01, "divergence_loss_factor": 1e9,
        "precision": "bf16" if on_cuda else "fp32", "compile": bool(params.get("compile")),
        "telemetry": {"enabled": params["telemetry"]},
    })


def utilisation(tokens_per_s: float, params: dict[str, Any], device_name: str) -> float | None:
    """Model FLOPs utilisation of a side: None on a CPU or a GPU without a listed peak."""
    return model_flops_utilisation(tokens_per_s, flops_per_token(params), peak_bf16_flops(device_name))
