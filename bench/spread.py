"""Comparisons with their noise: the one place that words "A differs from B" for the report and
the planner, saying whether the difference exceeds the spread between seeds.

Owns: the rule (``RULE``, quoted in docs/results.md and the report):
- with at least two runs on each side, a gap between the means counts as exceeding the seed
  spread when it is larger than twice its standard error, 2 sqrt(s_a^2/n_a + s_b^2/n_b)
  (s: std over the runs, ddof 1) -- roughly a two-sided 95 % test, and nothing stronger: with
  two or three seeds read it as a screen, not a proof;
- with one run on either side the spread is unknown, and the phrase says so;
- a to-target value is also bounded by the evaluation interval: a gap no larger than the
  resolution of the values compared is not resolved, whatever the seeds say.

Must not import: torch, ray, pandas, matplotlib.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

RULE = ("a difference counts as beyond the seed spread when the gap between the means exceeds twice its "
        "standard error, 2·sqrt(s_a²/n_a + s_b²/n_b) (s: std over runs, ddof 1); with one run on either side "
        "the spread is unknown; a gap no larger than the evaluation interval is not resolved. The rule is a "
        "screen, not a significance test: with 3 runs a side, a gap just at the threshold has a Welch t-test "
        "p of about 0.12 to 0.18")


@dataclass(frozen=True)
class Sample:
    """Mean, std (ddof 1; NaN below two values) and count of one group of runs."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> "Sample":
        v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
        if not v:
            return cls(math.nan, math.nan, 0)
        mean = sum(v) / len(v)
        std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan
        return cls(mean, std, len(v))


@dataclass(frozen=True)
class Verdict:
    kind: str  # "beyond" | "within" | "unresolved" | "unknown"
    gap: float
    threshold: float  # twice the standard error of the gap (NaN when unknown)
    phrase: str  # for a caption: "the gap ... exceeds ..." / "... one seed: the spread is unknown"

    @property
    def short(self) -> str:
        """For a table cell."""
        return {"beyond": "beyond seed spread", "within": "within seed spread",
                "unresolved": "within eval interval", "unknown": "spread unknown (1 seed)"}[self.kind]


def _fmt(x: float, digits: int) -> str:
    if not math.isfinite(x):
        return "unknown"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}g}"


def compare(a: Sample, b: Sample, *, unit: str = "", resolution: float = math.nan, digits: int = 3) -> Verdict:
    """Whether the gap between a's and b's means exceeds the spread between seeds (see RULE)."""
    gap = abs(a.mean - b.mean)
    u = f" {unit}" if unit else ""
    n = f"n = {a.n} and {b.n}"
    if not (math.isfinite(a.mean) and math.isfinite(b.mean)):
        return Verdict("unknown", math.nan, math.nan, "one side has no value, so there is nothing to compare")
    if math.isfinite(resolution) and gap <= resolution:
        return Verdict("unresolved", gap, math.nan,
                       f"the gap ({_fmt(gap, digits)}{u}) is no larger than the evaluation interval "
                       f"({_fmt(resolution, digits)}{u}), so it is not resolved")
    if a.n < 2 or b.n < 2:
        return Verdict("unknown", gap, math.nan,
                       f"one run on at least one side ({n}): the spread between seeds is unknown, "
                       "so this difference is not established")
    threshold = 2 * math.sqrt(a.std**2 / a.n + b.std**2 / b.n)
    if gap > threshold:
        return Verdict("beyond", gap, threshold, f"the gap ({_fmt(gap, digits)}{u}) exceeds twice its standard "
                       f"error over seeds ({_fmt(threshold, digits)}{u}; {n})")
    return Verdict("within", gap, threshold, f"the gap ({_fmt(gap, digits)}{u}) is within twice its standard "
                   f"error over seeds ({_fmt(threshold, digits)}{u}; {n}): not a measured difference")
