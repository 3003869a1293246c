"""The training step: one optimizer step over one global batch, shared by every tool.

Owns: how a step turns this rank's micro-batches into one optimizer update — gradient
accumulation with DDP's all-reduce only on the last micro-step (``no_sync`` before it),
autocast, the loss summed over this rank's targets and scaled so that, after DDP's mean over
ranks, the gradient is exactly the mean over every target of the global batch (also for a
partial last batch), the LR written into the optimizer, and ``zero_grad``. The worker loop
(``bench.worker``), the memory probe and the benchmarks call this one function, so a change
here reaches all of them. Also the evaluation pass (``evaluate``), shared the same way.

A "target" is what one loss term is about: a sample for classification (logits [n, C],
labels [n]), a token for a language model (logits [n, T, V], labels [n, T], padding -100).

Must not import: ray, pandas, anything from bench (it sits below the worker).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Protocol

import torch
import torch.nn.functional as F

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets) on the device
IGNORE_INDEX = -100  # target value that contributes no loss term (padding)


class MicroStepObserver(Protocol):
    """Sees the gradients during a step (the noise-scale probe): after each micro-step's
    backward, and once more before the optimizer consumes and clears them."""

    def after_micro_backward(self) -> None: ...

    def before_optimizer_step(self) -> None: ...


def summed_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy summed over every target (float32 accumulation, padding ignored)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum",
                           label_smoothing=label_smoothing, ignore_index=IGNORE_INDEX)


@dataclass
class TrainStep:
    """Applies one optimizer step; ``__call__`` returns the summed loss of this rank's
    micro-batches as a 0-d tensor on the device (no host synchronisation).

    ``model`` is what the forward pass calls (DDP-wrapped and/or compiled); ``optimizer``
    holds the raw model's parameters. ``distributed``: several ranks, so DDP all-reduces.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    num_workers: int = 1
    grad_accum_steps: int = 1
    distributed: bool = False
    label_smoothing: float = 0.0
    autocast: Callable[[], Any] = field(default=contextlib.nullcontext)

    def __call__(self, micro_batches: Iterable[Batch], num_global: int, lr: float, *,
                 observer: Optional[MicroStepObserver] = None) -> torch.Tensor:
        """``num_global``: targets in the whole global batch (all ranks). ``observer``: called
        after each micro-step's backward, while .grad holds the gradient accumulated so far on
        this rank (DDP all-reduces only after the last micro-step's backward)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Sum-reduced loss x world / num_global: after DDP's mean over ranks the gradient is the
        # mean over the global batch's targets.
        scale = self.num_workers / num_global
        loss_sum: torch.Tensor | None = None
        for i, (x, y) in enumerate(micro_batches):
            last = i == self.grad_accum_steps - 1
            no_sync = self.distributed and not last
            with self.model.no_sync() if no_sync else contextlib.nullcontext():
                with self.autocast():
                    logits = self.model(x)
                loss = summed_loss(logits, y, self.label_smoothing)
                (loss * scale).backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            del x, y, logits, loss  # only one micro-batch's activations and inputs alive at a time
            if observer is not None:
                observer.after_micro_backward()
        if observer is not None:
            observer.before_optimizer_step()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        assert loss_sum is not None, "a step needs at least one micro-batch"
        return loss_sum


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Batch], distributed: bool,
             autocast: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over a split's targets; each rank scores its share (the
    feed's batches) and one all-reduce combines them: a single host read per evaluation."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    for x, y in batches:
        with autocast():
            logits = model(x)
        valid = y != -100
        totals[0] += ((logits.argmax(-1) == y) & valid).sum()
        totals[1] += summed_loss(logits, y)
        totals[2] += valid.sum()
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(totals)
    correct, loss_sum, count = totals.tolist()
    model.train()
    return correct / count, loss_sum / count
