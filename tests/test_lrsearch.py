"""The LR search (bench.lrsearch): the grid and its run ids, the criterion on hand-made trials, the
two stages with a fake runner that writes synthetic runs (bench.store through tests/fixtures_results),
resuming either stage, the rule-only default views, and the report's "rule vs tuned" section."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import analysis as an
from bench import lrsearch as ls
from bench.config import SweepConfig
from bench.names import lr_tag, parse_lr_tag, parse_run_id, run_id
from bench.plan import plan_sweep
from bench.records import load_results
from bench.report import render_report
from bench.report_lrsearch import search_view, verdict
from bench.store import SweepDir
from fixtures_results import RunSpec, curve, sweep_config, write_run

# --- run ids --------------------------------------------------------------------------------------


def test_trial_ids_round_trip_and_the_plain_form_still_parses():
    assert run_id(256, 1, 0, lr_tag(factor=2.0)) == "gbs000256-w001-s0-lr2x"
    assert run_id(256, 1, 0, lr_tag(factor=0.25)) == "gbs000256-w001-s0-lr0.25x"
    assert run_id(16, 8, 3, lr_tag(peak_lr=0.1)) == "gbs000016-w008-s3-lr0.1"
    assert lr_tag(factor=1.0) == ""  # the rule's LR keeps the plain id
    assert lr_tag(peak_lr=1e-5) == "-lr0.00001"  # no exponent: '+' cannot go into a folder name
    assert lr_tag(peak_lr=1e3) == "-lr1000"
    for name, tag in (("gbs000256-w001-s0-lr2x", ("factor", 2.0)), ("gbs000016-w008-s3-lr0.1", ("peak_lr", 0.1)),
                      ("gbs000016-w008-s3-lr0.00001", ("peak_lr", 1e-5)), ("gbs000256-w001-s0", None)):
        assert parse_lr_tag(name) == tag
        assert parse_run_id(name) == tuple(int(x) for x in re.findall(r"\d+", name)[:3])
    for bad in ("gbs000256-w001-s0-lr", "gbs000256-w001-s0-lrx", "gbs000256-w001-s0-lr2xx", "gbs000256-w001-s0-lr-2x"):
        assert parse_run_id(bad) is None and parse_lr_tag(bad) is None
    with pytest.raises(ValueError):
        lr_tag(factor=2.0, peak_lr=0.1)
    with pytest.raises(ValueError):
        lr_tag(factor=0.0)


# --- the sweep file -------------------------------------------------------------------------------

BASE = {"name": "s", "workload": "blobs", "lr": {"reference_lr": 0.01, "reference_batch_size": 4},
        "epochs": 2, "global_batch_sizes": [4, 16], "seeds": [0, 1, 2], "target_accuracy": 0.8}


@pytest.mark.parametrize("search, message", [
    ({"factors": [0.5, 2]}, None),  # with the rule: 3 LRs
    ({"peak_lrs": [0.01, 0.03, 0.1]}, None),
    ({"factors": [1, 2]}, "a search needs at least 3"),
    ({"peak_lrs": [0.01, 0.1]}, "a search needs at least 3"),
    ({"factors": [0.5, 2], "peak_lrs": [0.1, 0.2, 0.3]}, "give one of factors"),
    ({}, "give one of factors"),
    ({"factors": [0.5, 0.5, 2]}, "distinct"),
    ({"factors": [0, 2, 4]}, "distinct numbers in"),
    ({"factors": [0.5, True]}, "got a boolean"),
    ({"factors": [0.5, 2], "search_seeds": [7]}, "search_seeds"),
    ({"factors": [0.5, 2], "tries": 3}, "Extra inputs"),
])
def test_lr_search_key_is_validated(search, message):
    from pydantic import ValidationError

    from bench.schema import first_error

    if message is None:
        assert SweepConfig.model_validate({**BASE, "lr_search": search}).lr_search is not None
        return
    with pytest.raises(ValidationError) as err:
        SweepConfig.model_validate({**BASE, "lr_search": search})
    assert message in first_error(err.value)


def test_a_sweep_without_lr_search_keeps_its_hash():
    # computed with main's bench.config before lr_search existed: an old sweep folder still matches
    assert SweepConfig.model_validate(BASE).config_hash() == "5c3fd0e123ee7610"


# --- the grid and the two stages' plans ------------------------------------------------------------

def _sweep(**search) -> SweepConfig:
    return SweepConfig.model_validate({**BASE, "lr_search": search or {"factors": [0.5, 2]}})


def test_stage_one_runs_every_lr_at_every_batch_at_the_search_seed():
    sweep = _sweep(factors=[2, 0.5])
    plans = ls.search_plans(sweep, plan_sweep(sweep))
    assert [p.run_id for p in plans] == [
        "gbs000004-w001-s0-lr0.5x", "gbs000004-w001-s0", "gbs000004-w001-s0-lr2x",
        "gbs000016-w001-s0-lr0.5x", "gbs000016-w001-s0", "gbs000016-w001-s0-lr2x"]
    # rule at B=16: 0.01 x 16/4 = 0.04; the trials scale it
    assert [p.peak_lr for p in plans[3:]] == pytest.approx([0.02, 0.04, 0.08])
    assert [p.lr_factor for p in plans[3:]] == [0.5, 1.0, 2.0] and {p.stage for p in plans} == {1}
    assert {p.total_steps for p in plans[3:]} == {plans[4].total_steps}  # only the LR differs


def test_an_absolute_grid_value_equal_to_the_rules_lr_is_the_rules_run():
    sweep = _sweep(peak_lrs=[0.01, 0.04, 0.1])  # the rule gives 0.01 at B=4 and 0.04 at B=16
    plans = ls.search_plans(sweep, plan_sweep(sweep))
    assert [p.run_id for p in plans] == ["gbs000004-w001-s0", "gbs000004-w001-s0-lr0.04", "gbs000004-w001-s0-lr0.1",
                                         "gbs000016-w001-s0-lr0.01", "gbs000016-w001-s0", "gbs000016-w001-s0-lr0.1"]
    assert [p.lr_factor for p in plans[:3]] == pytest.approx([1.0, 4.0, 10.0])
    assert plans[3].lr_factor == pytest.approx(0.25)


def _choice(batch: int, factor: float | None) -> ls.Choice:
    return ls.Choice(batch, 1, math.nan, factor, None, "steps", "", ())


def test_stage_two_runs_every_seed_at_the_chosen_and_the_rules_lr():
    sweep = _sweep()
    rule = plan_sweep(sweep)
    stage1 = {p.run_id: p for p in ls.search_plans(sweep, rule)}
    plans = ls.final_plans(sweep, rule, [_choice(4, 2.0), _choice(16, 1.0)])
    assert [p.run_id for p in plans] == [
        "gbs000004-w001-s0", "gbs000004-w001-s0-lr2x", "gbs000016-w001-s0",
        "gbs000004-w001-s1", "gbs000004-w001-s1-lr2x", "gbs000016-w001-s1",
        "gbs000004-w001-s2", "gbs000004-w001-s2-lr2x", "gbs000016-w001-s2"]
    # at the search seed, stage 2's plans are stage 1's runs unchanged (the runner skips them)
    assert all(p == stage1[p.run_id] for p in plans if p.seed == 0)
    assert {p.stage for p in plans if p.seed > 0} == {2}
    # nothing chosen (every trial failed): the rule's LR only
    assert [p.run_id for p in ls.final_plans(sweep, rule, [_choice(4, None)]) if p.global_batch_size == 4] == [
        "gbs000004-w001-s0", "gbs000004-w001-s1", "gbs000004-w001-s2"]


# --- the criterion --------------------------------------------------------------------------------

def cand(factor, steps=math.nan, res=10.0, acc=0.9, status="success") -> ls.Candidate:
    return ls.Candidate(factor, factor * 0.1, (status,), steps, res, acc)


def test_fewest_steps_wins_and_says_so():
    win, kind, why = ls.choose([cand(0.5, 300), cand(1.0, 200, res=20), cand(2.0, 120, res=16, acc=0.85)], 0.9)
    assert (win.lr_factor, kind) == (2.0, "steps")
    assert why == "fewest steps to the target 0.9: 2x at step 120 (resolved to 16 steps); next 1x (rule) at step 200"


def test_crossings_within_one_evaluation_interval_tie_and_accuracy_breaks_the_tie():
    # 2x crosses at 100 (interval (84, 100]); 4x at 110 (interval (94, 110]) overlaps it: a tie
    win, kind, why = ls.choose([cand(2.0, 100, res=16, acc=0.90), cand(4.0, 110, res=16, acc=0.93)])
    assert (win.lr_factor, kind) == (4.0, "tie") and "the best final test accuracy wins: 4x" in why
    # 4x at 120 resolved to 16 (interval (104, 120]) does not overlap (84, 100]: fewest steps wins
    win, kind, _ = ls.choose([cand(2.0, 100, res=16, acc=0.90), cand(4.0, 120, res=16, acc=0.93)])
    assert (win.lr_factor, kind) == (2.0, "steps")
    # a tie in accuracy too goes to the LR closest to the rule's
    win, _, _ = ls.choose([cand(0.5, 100, acc=0.9), cand(4.0, 100, acc=0.9)])
    assert win.lr_factor == 0.5


def test_a_diverged_trial_never_wins():
    win, kind, _ = ls.choose([cand(4.0, 50, status="diverged"), cand(1.0, 200)])
    assert (win.lr_factor, kind) == (1.0, "steps")
    win, kind, why = ls.choose([cand(1.0, status="diverged"), cand(2.0, 10, status="oom")])
    assert (win, kind) == (None, "none")
    assert why == "no trial finished as a success (1x (rule) diverged, 2x oom): stage 2 runs the rule's LR only"


def test_no_trial_reached_the_target_best_final_accuracy_and_says_so():
    win, kind, why = ls.choose([cand(0.5, acc=0.80), cand(1.0, acc=0.86), cand(2.0, acc=0.84)], 0.95)
    assert (win.lr_factor, kind) == (1.0, "accuracy")
    assert why == "no trial reached the target 0.95: the best final test accuracy, 0.86 at 1x (rule)"


def test_several_search_seeds_reach_only_together_and_average():
    t = lambda f, seed, steps, acc=0.9: ls.Trial(64, 1, seed, f, f * 0.1, "success", steps, 8.0, acc)  # noqa: E731
    by_batch = ls.candidates([t(1.0, 0, 100), t(1.0, 1, 140), t(2.0, 0, 60), t(2.0, 1, math.nan)])
    rule, double = by_batch[(64, 1)]
    assert rule.steps_to_target == 120 and rule.reached
    assert math.isnan(double.steps_to_target) and not double.reached  # seed 1 never reached it
    assert ls.choose([rule, double])[0] is rule


# --- both stages, with a fake runner --------------------------------------------------------------

SEARCH_YAML = {**sweep_config("search", target=0.8, batches=(4, 16, 64), seeds=(0, 1, 2), epochs=20),
               "eval_every_steps": "auto", "lr_search": {"factors": [0.5, 2]}}
# (batch, factor) -> (epochs to target, test-accuracy ceiling, status); ceilings above 0.8 reach it
WORLD = {(4, 0.5): (6, 0.95, "success"), (4, 1.0): (3, 0.95, "success"), (4, 2.0): (4, 0.95, "success"),
         (16, 0.5): (8, 0.93, "success"), (16, 1.0): (6, 0.93, "success"), (16, 2.0): (3, 0.93, "success"),
         (64, 0.5): (10, 0.86, "success"), (64, 1.0): (10, 0.79, "success"), (64, 2.0): (2, 0.9, "diverged")}


def fake_runner(world: dict, calls: list, *, stop_after: int | None = None):
    """run_sweep's contract: run the given plans that are not complete into root/<sweep>, report statuses."""

    def run_sweep(sweep, cluster, root, *, plans, cluster_file=None):
        folder = SweepDir(Path(root) / sweep.name)
        ran = []
        for plan in plans:
            if folder.run(plan.run_id).is_complete():
                continue
            if stop_after is not None and len(ran) == stop_after:
                break  # interrupted: the rest stay incomplete
            epochs_to, ceiling, status = world[(plan.global_batch_size, plan.lr_factor)]
            ceiling -= 0.004 * plan.seed
            evals = curve(plan.epochs, epochs_to, target=0.8, ceiling=ceiling, plan=plan)
            write_run(folder.path, RunSpec(plan, evals if status == "success" else evals[:4], status=status,
                                                 reason=None if status == "success" else "loss above the limit"),
                      config={**SEARCH_YAML, "name": sweep.name})
            ran.append(plan.run_id)
        calls.append(ran)
        statuses = {p.run_id: (folder.run(p.run_id).read_summary().status if folder.run(p.run_id).is_complete()
                               else "incomplete") for p in plans}
        return SimpleNamespace(sweep_dir=folder.path, statuses=statuses, groups=[], wall_s=0.0)

    return run_sweep


def search(root: Path, world: dict = WORLD, yaml: dict = SEARCH_YAML, **kw) -> tuple[ls.SearchOutcome, list]:
    sweep = SweepConfig.model_validate(yaml)
    rule = [replace(p, eval_auto=True) for p in plan_sweep(sweep)]
    calls: list = []
    outcome = ls.run_search(sweep, None, root, rule_plans=rule, say=lambda _: None,
                            run_sweep=fake_runner(world, calls, **kw))
    return outcome, calls


def test_two_stages_choose_by_the_criterion_and_reuse_the_search_seed(tmp_path: Path):
    outcome, calls = search(tmp_path)
    picked = {c.global_batch_size: (c.lr_factor, c.kind) for c in outcome.choices}
    assert picked == {4: (1.0, "steps"), 16: (2.0, "steps"), 64: (0.5, "steps")}  # 64 x 2 diverged, 64 x 1 never reached
    assert len(calls[0]) == 9  # stage 1: 3 LRs x 3 batches at seed 0
    # stage 2: seeds 1 and 2 at the rule's LR everywhere and at the chosen LR where it is not the rule's
    assert sorted(calls[1]) == sorted(f"gbs{b:06d}-w001-s{s}{t}" for s in (1, 2)
                                      for b, t in ((4, ""), (16, ""), (16, "-lr2x"), (64, ""), (64, "-lr0.5x")))
    assert all(s != "incomplete" for s in outcome.statuses.values())
    # ">= 3 LRs per batch" in the folder
    runs = an.runs_frame(load_results([tmp_path / "search"]))
    assert runs.groupby("global_batch_size")["lr_factor"].nunique().to_dict() == {4: 3, 16: 3, 64: 3}
    # the default views average only the rule's runs: 3 seeds per batch, never 5
    table = an.batch_table(runs)
    assert table["n_runs"].tolist() == [3, 3, 3] and table["peak_lr"].tolist() == pytest.approx([0.01, 0.04, 0.16])


def test_a_rerun_resumes_whichever_stage_was_cut_short(tmp_path: Path):
    first, calls = search(tmp_path, stop_after=4)  # stage 1 interrupted after 4 of its 9 trials
    assert first.stage2 is None and first.choices == [] and len(calls) == 1 and len(calls[0]) == 4
    second, calls = search(tmp_path)
    assert len(calls[0]) == 5 and len(calls[1]) == 10  # the other 5 trials, then stage 2
    third, calls = search(tmp_path)
    assert calls == [[], []]  # all complete: nothing run, the same choice
    assert [c.lr_factor for c in third.choices] == [c.lr_factor for c in second.choices]


# --- the report -----------------------------------------------------------------------------------

def _view(tmp_path: Path, world: dict = WORLD, yaml: dict = SEARCH_YAML):
    search(tmp_path, world, yaml)
    runs = an.runs_frame(load_results([tmp_path / yaml["name"]]))
    return search_view(runs, yaml["name"], 1), runs


def test_verdict_yes_when_a_larger_batch_loses_beyond_the_seed_spread(tmp_path: Path):
    view, _ = _view(tmp_path)
    assert view.tuned_factor == {4: 1.0, 16: 2.0, 64: 0.5}
    assert sorted(view.tuned["run_id"]) == sorted(
        [f"gbs000004-w001-s{s}" for s in range(3)] + [f"gbs000016-w001-s{s}-lr2x" for s in range(3)]
        + [f"gbs000064-w001-s{s}-lr0.5x" for s in range(3)])
    text = verdict(view)
    # ceilings 0.95 / 0.93 / 0.86 less 0.004 per seed: both larger batches lost, beyond the spread
    assert text.startswith("Did a larger batch lose test accuracy once its LR was tuned? Yes: at the tuned LR, "
                           "batches 16 and 64 lost test accuracy against batch 4")
    assert "largest loss is at batch 64" in text and "exceeds twice its standard error" in text


def test_verdict_no_when_every_batch_is_within_the_spread(tmp_path: Path):
    tuned = {(4, 1.0), (16, 2.0), (64, 0.5)}  # the same curve at every batch's tuned LR, slower elsewhere
    flat = {k: (3 if k in tuned else 6, 0.95, s) for k, (_, _, s) in WORLD.items()}
    view, _ = _view(tmp_path, flat)
    text = verdict(view)
    assert "? No: at the tuned LR no larger batch lost test accuracy against batch 4 (" in text
    assert "beyond the seed spread; the largest gap is at batch" in text and "not a measured difference" in text


def test_verdict_cannot_tell_with_one_seed(tmp_path: Path):
    one = {**SEARCH_YAML, "name": "one", "seeds": [0]}
    view, _ = _view(tmp_path, yaml=one)
    assert "? The data cannot tell: at the tuned LR the data cannot tell" in verdict(view)


def test_report_has_the_section_and_keeps_trials_out_of_the_other_views(tmp_path: Path):
    search(tmp_path)
    page = render_report(load_results([tmp_path / "search"]))
    assert "<h2>Rule vs tuned learning rate</h2>" in page and 'id="fig-lr-search"' in page
    assert "Chosen by: fewest optimizer steps to the target" in page
    assert "No early stopping: 1 of 9 stage-1 trials (11%) ended before their budget (1 diverged" in page
    assert "<b>3 · 0.950</b>" not in page  # accuracies are the run's own, not the ceiling
    summary = page.split("<h2>Summary per global batch size</h2>")[1].split("<h2>Critical batch size</h2>")[0]
    assert "-lr2x" not in summary and "-lr0.5x" not in summary
    figures = page.split("<h2>Figures</h2>")[1].split("<h2>All runs</h2>")[0]
    assert "lr2x" not in figures
    assert page.count("gbs000064-w001-s0-lr2x") >= 1  # the diverged trial is still listed (failures, all runs)


# --- the command line -----------------------------------------------------------------------------

def test_dry_run_prints_both_stages(capsys):
    from bench.cli import main

    assert main(["run", "digits-lr-search", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "an LR search in two stages" in out and "stage 1 (LR search): 35 trials" in out
    assert "gbs000016-w002-s0-lr0.25x: " in out and "peak lr 0.003125" in out  # 0.25 x 0.05 x 16/64
    assert "stage 2 (every seed at the LR chosen after stage 1 and at the rule's LR): 14 runs" in out
    assert "  gbs001024-w002-s2: " in out and "chosen after stage 1 by: fewest optimizer steps" in out


TINY_SEARCH = """\
name: tiny-search
workload: blobs
lr: {reference_lr: 0.01, reference_batch_size: 32, scaling: linear}
epochs: 3
global_batch_sizes: [32, 64]
seeds: [0, 1]
target_accuracy: 0.5
eval_every_steps: auto
lr_search: {factors: [0.5, 2]}
"""


@pytest.mark.slow
def test_lr_search_end_to_end_through_ray(ray_session, tmp_path: Path, capsys):
    from bench.cli import main

    (tmp_path / "s.yaml").write_text(TINY_SEARCH)
    results = tmp_path / "results"
    assert main(["run", str(tmp_path / "s.yaml"), "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "LR search, stage 1: 6 trials" in out and "LR search, stage 2: " in out
    runs = an.runs_frame(load_results([results / "tiny-search"]))
    assert runs.groupby("global_batch_size")["lr_factor"].nunique().tolist() == [3, 3]
    assert set(runs.loc[runs["lr_factor"] == 1.0, "seed"]) == {0, 1}  # the rule's LR at every seed
    assert (runs["stage"] == 2).sum() >= 2 and (runs["status"] != "incomplete").all()
    # the same command again: both stages complete, nothing runs
    assert main(["run", str(tmp_path / "s.yaml"), "--results-dir", str(results)]) == 0
    assert "6 already complete, 0 to run" in capsys.readouterr().out
    assert main(["report", str(results / "tiny-search"), "-o", str(tmp_path / "r.html")]) == 0
    assert "Rule vs tuned learning rate" in (tmp_path / "r.html").read_text()


def test_the_words_say_where_tuning_chose_the_rule_and_what_the_choice_rests_on(tmp_path: Path):
    from bench.report_lrsearch import caption

    view, _ = _view(tmp_path)  # batch 4 chose the rule's LR; stage 1 ran seed 0 only
    assert ("At batch 4 the search chose the rule's LR, so there the tuned and the rule's runs are the same runs."
            in verdict(view))
    fits = {"rule": {"B_crit": math.nan, "reason": "x"}, "tuned": {"B_crit": math.nan, "reason": "x"}}
    assert ("chosen in stage 1 from seed 0 alone, so whether another seed would choose the same LR is unknown"
            in caption(view, fits))
