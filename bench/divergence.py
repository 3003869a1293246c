"""Divergence: judged on the training loss the optimizer saw, step by step.

Owns: the rule that stops a run as "diverged" and the verdict it stores. A run diverges at the
first optimizer step whose global minibatch loss (training mode, the loss the update used) is
not finite, or whose smoothed loss — the mean over the last ``window`` steps — exceeds
``factor`` x the initial training loss (the loss of step 0, before any update).

Why not the evaluation-mode loss (the rule before 2026-12): with BatchNorm, evaluation uses
running statistics that have seen only a few steps, so early in training that loss is large
whether or not training is unstable (a batch-4096 run was stored as diverged at an LR below
one at which batch 1024 trained for 25 epochs).

The monitor only sees host floats: the worker keeps each step's loss on the device and reads
them in one go where the loop synchronises anyway (an evaluation, an epoch end), so judging
costs no per-step host synchronisation.

Must not import: torch, ray, pandas, anything from bench.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

WINDOW_STEPS = 20  # the smoothed loss is the mean over this many steps


@dataclass(frozen=True)
class Verdict:
    step: int  # 0-based optimizer step whose loss tripped the rule
    criterion: str  # "non_finite_loss" | "smoothed_loss"
    loss: Optional[float]  # the smoothed loss that crossed the limit; None when not finite
    limit: Optional[float]  # factor x initial loss
    initial: Optional[float]


class DivergenceMonitor:
    """Feed it per-step global training losses in step order; it returns the first verdict.

    Before ``window`` steps have run, the missing steps count as the initial loss, so a single
    early spike is smoothed as much as a late one (a loss that stays high still trips it within
    a few steps)."""

    def __init__(self, factor: float, window: int = WINDOW_STEPS) -> None:
        if not (factor > 1.0 and math.isfinite(factor)):
            raise ValueError(f"divergence factor must be a finite number > 1, got {factor!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.factor, self.window = factor, window
        self.initial: Optional[float] = None
        self.recent: deque[float] = deque(maxlen=window)

    def feed(self, first_step: int, losses: Sequence[float]) -> Optional[Verdict]:
        """Judge the losses of steps first_step, first_step + 1, ...; the first verdict or None."""
        for i, loss in enumerate(losses):
            step = first_step + i
            if not math.isfinite(loss):
                return Verdict(step, "non_finite_loss", None, self.limit, self.initial)
            if self.initial is None:
                self.initial = float(loss)
            self.recent.append(float(loss))
            smoothed = self.smoothed()
            if smoothed > self.limit:
                return Verdict(step, "smoothed_loss", smoothed, self.limit, self.initial)
        return None

    @property
    def limit(self) -> Optional[float]:
        return None if self.initial is None else self.factor * self.initial

    def smoothed(self) -> float:
        missing = self.window - len(self.recent)
        return (sum(self.recent) + missing * (self.initial or 0.0)) / self.window

    def state(self) -> dict:
        """For a checkpoint: a resumed run judges exactly as an uninterrupted one."""
        return {"initial": self.initial, "recent": list(self.recent)}

    def load_state(self, state: dict) -> None:
        self.initial = state["initial"]
        self.recent = deque(state["recent"], maxlen=self.window)


def describe(verdict: Verdict, *, lr: float, peak_lr: float, in_warmup: bool) -> str:
    """One sentence for the failure: what crossed what, at which step and LR, and whether the
    run had reached its planned peak LR (a rule is only tested at its peak)."""
    where = (f"during warm-up at LR {lr:.4g} (peak {peak_lr:.4g} not reached)" if in_warmup
             else f"at peak LR {peak_lr:.4g}" if math.isclose(lr, peak_lr, rel_tol=1e-9)
             else f"at LR {lr:.4g} (after the peak {peak_lr:.4g})")
    if verdict.criterion == "non_finite_loss":
        return f"non-finite training loss at step {verdict.step}, {where}"
    factor = verdict.limit / verdict.initial
    return (f"training loss {verdict.loss:.4g} (mean over {WINDOW_STEPS} steps) at step {verdict.step} exceeded "
            f"{verdict.limit:.4g} = {factor:g} x the initial {verdict.initial:.4g}, {where}")
