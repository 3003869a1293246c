"""The learning-rate search per global batch (``lr_search`` in a sweep file; docs/lr-search.md).

Shallue et al. (2018): conclusions about the batch size change once the learning rate is tuned per
batch size. This module owns:

- **the trial grid** (``lr_grid``, ``search_plans``): at every (global batch, worker count), the
  sweep's ``lr_search.factors`` x the rule's peak LR, or its absolute ``peak_lrs``; the rule's LR
  (factor 1) is always a trial. Stage 1 runs every trial at the search seeds (default: the sweep's
  first seed);
- **the criterion** (``CRITERION``, ``choose``): fewest optimizer steps to the target (the first
  crossing); trials whose crossings lie within one evaluation interval of the fewest are tied and
  the tie goes to the best final test accuracy; where no trial reaches the target, the best final
  test accuracy wins and the choice says so; a trial that did not finish as a success (diverged,
  out of memory) never wins. With several search seeds a trial's steps are the mean over them and
  it counts as reaching the target only if every search seed did;
- **stage 2** (``final_plans``): every sweep seed at the chosen LR *and* at the rule's LR, so that
  both sides of "rule vs tuned" carry the spread between seeds;
- **the orchestration** (``run_search``): both stages go through ``bench.runner.run_sweep(...,
  plans=...)`` into the one sweep folder. A run's id depends only on its batch, workers, seed and
  LR (bench.names: ``gbs000256-w001-s0-lr2x``; the rule's LR keeps the plain id), so a stage-2 plan
  at a search seed *is* the stage-1 run (skipped as complete), and rerunning the same command
  resumes whichever stage was cut short.

No early stopping: every trial runs its full budget, except that the worker stops a run whose loss
diverges (its status says "diverged"); such trials are counted as stopped early in the report's
cost line (bench.report_lrsearch).

Pure apart from ``run_search`` (which reaches the runner and the store). Must not import: torch,
ray, pandas (bench.analysis is imported inside ``run_search`` to read the trials back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from bench.names import lr_tag, run_id
from bench.plan import RunPlan

CRITERION = ("fewest optimizer steps to the target (first crossing); trials whose crossings lie within one "
             "evaluation interval of the fewest are tied, and the tie goes to the best final test accuracy; "
             "where no trial reaches the target, the best final test accuracy; a diverged or failed trial "
             "never wins")
SAME_LR_REL = 1e-9  # an absolute grid value this close to the rule's LR is the rule's run
STAGE_SEARCH, STAGE_FINAL = 1, 2


# --- the grid -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GridLR:
    """One LR of the grid at one batch: its peak LR, its factor over the rule's and its run-id tag."""

    peak_lr: float
    lr_factor: float
    tag: str  # '' for the rule's LR (the plain run id)


def lr_grid(search: Any, rule_peak_lr: float) -> list[GridLR]:
    """The LRs tried at a batch whose rule gives ``rule_peak_lr``, ascending, the rule's included.
    ``search`` is a validated bench.config.LRSearchConfig."""
    out = {1.0: GridLR(rule_peak_lr, 1.0, "")}
    if search.factors is not None:
        for f in search.factors:
            out.setdefault(float(f), GridLR(f * rule_peak_lr, float(f), lr_tag(factor=f)))
    else:
        for v in search.peak_lrs:
            factor = v / rule_peak_lr
            if abs(factor - 1.0) > SAME_LR_REL:
                out.setdefault(factor, GridLR(float(v), factor, lr_tag(peak_lr=v)))
    return sorted(out.values(), key=lambda g: g.lr_factor)


def trial_plan(rule: RunPlan, lr: GridLR, stage: int) -> RunPlan:
    """The rule's run at another LR: same batch, schedule and seed; peak LR, id and stage changed."""
    return replace(rule, run_id=run_id(rule.global_batch_size, rule.num_workers, rule.seed, lr.tag),
                   peak_lr=lr.peak_lr, lr_factor=lr.lr_factor, stage=stage)


def search_seeds(sweep: Any) -> list[int]:
    return list(sweep.lr_search.search_seeds or sweep.seeds[:1])


def search_plans(sweep: Any, rule_plans: list[RunPlan]) -> list[RunPlan]:
    """Stage 1: every LR of the grid at every batch and worker count, at the search seeds. The
    ``rule_plans`` are bench.plan.plan_sweep's (the rule's LR, every seed)."""
    seeds = search_seeds(sweep)
    return [trial_plan(rule, lr, STAGE_SEARCH)
            for rule in rule_plans if rule.seed in seeds
            for lr in lr_grid(sweep.lr_search, rule.peak_lr)]


# --- the criterion ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trial:
    """One stage-1 run as the criterion sees it (built by ``trial_of``)."""

    global_batch_size: int
    num_workers: int
    seed: int
    lr_factor: float
    peak_lr: float
    status: str  # success | diverged | oom | incomplete | damaged
    steps_to_target: float  # NaN: not reached
    steps_resolution: float  # the evaluation interval before the crossing
    final_test_acc: float


@dataclass(frozen=True)
class Candidate:
    """One LR at one batch over the search seeds."""

    lr_factor: float
    peak_lr: float
    statuses: tuple[str, ...]
    steps_to_target: float  # mean over the search seeds; NaN unless every one reached the target
    steps_resolution: float  # the largest of the seeds'
    final_test_acc: float  # mean over the search seeds

    @property
    def eligible(self) -> bool:
        return bool(self.statuses) and all(s == "success" for s in self.statuses)

    @property
    def reached(self) -> bool:
        return self.eligible and math.isfinite(self.steps_to_target)


@dataclass(frozen=True)
class Choice:
    """The LR chosen at one (batch, worker count), and why, in words."""

    global_batch_size: int
    num_workers: int
    rule_peak_lr: float
    lr_factor: float | None  # None: no trial finished as a success
    peak_lr: float | None
    kind: str  # steps | tie | accuracy | none
    reason: str
    candidates: tuple[Candidate, ...]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values and all(math.isfinite(v) for v in values) else math.nan


def _num(value: Any) -> float:
    try:
        return float(value) if value is not None and not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        return math.nan


def trial_of(row: Mapping[str, Any]) -> Trial:
    """A Trial from one bench.analysis run row (runs_frame / run_row)."""
    return Trial(int(row["global_batch_size"]), int(row["num_workers"]), int(row["seed"]),
                 _num(row.get("lr_factor", 1.0)), _num(row.get("peak_lr")), str(row["status"]),
                 _num(row.get("steps_to_target")), _num(row.get("steps_to_target_resolution")),
                 _num(row.get("final_test_acc")))


def candidates(trials: Iterable[Trial]) -> dict[tuple[int, int], list[Candidate]]:
    """Per (global batch, workers): one Candidate per LR, ascending."""
    groups: dict[tuple[int, int], dict[float, list[Trial]]] = {}
    for t in trials:
        groups.setdefault((t.global_batch_size, t.num_workers), {}).setdefault(t.lr_factor, []).append(t)
    out = {}
    for key, by_lr in sorted(groups.items()):
        out[key] = [Candidate(f, ts[0].peak_lr, tuple(t.status for t in ts),
                              _mean([t.steps_to_target for t in ts]),
                              max((t.steps_resolution for t in ts), default=math.nan),
                              _mean([t.final_test_acc for t in ts]))
                    for f, ts in sorted(by_lr.items())]
    return out


def label(factor: float) -> str:
    """'2x', '0.25x', '1x (rule)'."""
    return f"{factor:g}x" + (" (rule)" if factor == 1.0 else "")


def _accuracy_key(c: Candidate) -> tuple[float, float, float]:
    """Best final accuracy first; then the LR closest to the rule's; then the smaller LR."""
    acc = c.final_test_acc if math.isfinite(c.final_test_acc) else -math.inf
    return (acc, -abs(math.log(c.lr_factor)), -c.lr_factor)


def choose(cands: list[Candidate], target: float = math.nan) -> tuple[Candidate | None, str, str]:
    """(the winner, kind, reason) by CRITERION among one batch's candidates."""
    eligible = [c for c in cands if c.eligible]
    if not eligible:
        seen = ", ".join(f"{label(c.lr_factor)} {'/'.join(c.statuses)}" for c in cands)
        return None, "none", f"no trial finished as a success ({seen}): stage 2 runs the rule's LR only"
    reached = [c for c in eligible if c.reached]
    at = f" {target:g}" if math.isfinite(target) else ""
    if not reached:
        win = max(eligible, key=_accuracy_key)
        return win, "accuracy", (f"no trial reached the target{at}: the best final test accuracy, "
                                 f"{win.final_test_acc:.4g} at {label(win.lr_factor)}")
    best = min(reached, key=lambda c: c.steps_to_target)
    # tied: the crossing interval (steps - resolution, steps] overlaps the best's
    tied = [c for c in reached if c is best or c.steps_to_target - _width(c) < best.steps_to_target]
    win = max(tied, key=_accuracy_key)
    if len(tied) == 1:
        runner_up = sorted(reached, key=lambda c: c.steps_to_target)[1:2]
        nxt = (f"; next {label(runner_up[0].lr_factor)} at step {runner_up[0].steps_to_target:g}"
               if runner_up else "")
        return win, "steps", (f"fewest steps to the target{at}: {label(win.lr_factor)} at step "
                              f"{win.steps_to_target:g} (resolved to {_width(win):g} steps){nxt}")
    names = ", ".join(f"{label(c.lr_factor)} at step {c.steps_to_target:g} (acc {c.final_test_acc:.4g})"
                      for c in sorted(tied, key=lambda c: c.lr_factor))
    return win, "tie", (f"tied within one evaluation interval: {names}; the best final test accuracy wins: "
                        f"{label(win.lr_factor)}")


def _width(c: Candidate) -> float:
    return c.steps_resolution if math.isfinite(c.steps_resolution) else 0.0


def choices(trials: Iterable[Trial], rule_peak_lrs: Mapping[tuple[int, int], float],
            target: float = math.nan) -> list[Choice]:
    """The Choice at every (batch, workers) of the stage-1 trials. ``rule_peak_lrs`` gives the
    rule's peak LR per (batch, workers) (for the words only)."""
    out = []
    for (gbs, workers), cands in candidates(trials).items():
        win, kind, reason = choose(cands, target)
        out.append(Choice(gbs, workers, rule_peak_lrs.get((gbs, workers), math.nan),
                          win.lr_factor if win else None, win.peak_lr if win else None, kind, reason,
                          tuple(cands)))
    return out


# --- stage 2 ------------------------------------------------------------------------------------

def final_plans(sweep: Any, rule_plans: list[RunPlan], chosen: Iterable[Choice]) -> list[RunPlan]:
    """Stage 2: every seed at the rule's LR and at the chosen LR (once where they are the same).
    At a search seed the plans are stage 1's runs, unchanged (the runner skips them when complete)."""
    seeds, picks = search_seeds(sweep), {(c.global_batch_size, c.num_workers): c for c in chosen}
    out = []
    for rule in rule_plans:
        stage = STAGE_SEARCH if rule.seed in seeds else STAGE_FINAL
        out.append(replace(rule, stage=stage))
        pick = picks.get((rule.global_batch_size, rule.num_workers))
        if pick is not None and pick.lr_factor is not None and pick.lr_factor != 1.0:
            lr = next(g for g in lr_grid(sweep.lr_search, rule.peak_lr) if g.lr_factor == pick.lr_factor)
            out.append(trial_plan(rule, lr, stage))
    return out


# --- the two stages -----------------------------------------------------------------------------

@dataclass
class SearchOutcome:
    stage1: Any  # bench.runner.SweepOutcome
    stage2: Any | None  # None: stage 1 left runs incomplete, so nothing was chosen
    choices: list[Choice]

    @property
    def statuses(self) -> dict[str, str]:
        return {**self.stage1.statuses, **(self.stage2.statuses if self.stage2 else {})}

    @property
    def wall_s(self) -> float:
        return self.stage1.wall_s + (self.stage2.wall_s if self.stage2 else 0.0)


def read_trials(sweep_path: Path, plans: list[RunPlan], target_accuracy: float | None = None) -> list[Trial]:
    """The stage-1 runs read back from the sweep folder, through bench.analysis's crossings."""
    from bench import analysis
    from bench.records import load_run
    from bench.store import SweepDir

    folder = SweepDir(sweep_path)
    rows = [analysis.run_row(load_run(folder.run(p.run_id), folder.name), target_accuracy) for p in plans]
    return [trial_of(r) for r in rows]


def run_search(sweep: Any, cluster: Any, results_root: Path, *, rule_plans: list[RunPlan],
               cluster_file: str | None = None, say: Callable[[str], None] = print,
               run_sweep: Callable[..., Any] | None = None) -> SearchOutcome:
    """Stage 1, the choice, stage 2; each stage through ``run_sweep`` (bench.runner's by default)."""
    if run_sweep is None:
        from bench.runner import run_sweep
    stage1 = search_plans(sweep, rule_plans)
    say(f"LR search, stage 1: {len(stage1)} trials ({_grid_words(sweep)} at seed(s) "
        f"{', '.join(map(str, search_seeds(sweep)))})")
    first = run_sweep(sweep, cluster, results_root, plans=stage1, cluster_file=cluster_file)
    if any(s == "incomplete" for s in first.statuses.values()):
        say("LR search: stage 1 left runs incomplete; nothing is chosen (rerun the same command to resume)")
        return SearchOutcome(first, None, [])
    rule_lrs = {(p.global_batch_size, p.num_workers): p.peak_lr for p in rule_plans}
    picked = choices(read_trials(first.sweep_dir, stage1), rule_lrs, sweep.target_accuracy)
    for c in picked:
        say(f"  batch {c.global_batch_size} x {c.num_workers} worker(s): "
            + (f"{label(c.lr_factor)} (peak lr {c.peak_lr:.4g}); " if c.lr_factor is not None else "")
            + c.reason)
    stage2 = final_plans(sweep, rule_plans, picked)
    say(f"LR search, stage 2: {len(stage2)} runs (every seed at the chosen and at the rule's LR; "
        f"{sum(p.stage == STAGE_SEARCH for p in stage2)} of them are stage-1 runs)")
    second = run_sweep(sweep, cluster, results_root, plans=stage2, cluster_file=cluster_file)
    return SearchOutcome(first, second, picked)


def _grid_words(sweep: Any) -> str:
    s = sweep.lr_search
    if s.factors is not None:
        return "factors " + ", ".join(f"{f:g}" for f in sorted(set(s.factors) | {1.0})) + " x the rule's LR"
    return "peak LRs " + ", ".join(f"{v:g}" for v in s.peak_lrs) + " and the rule's LR"
