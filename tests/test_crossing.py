"""bench.crossing through bench.analysis.runs_frame: first and sustained crossings, their
resolutions, fractional epochs for step-based evaluation, and runs that end below a target
they once reached. Every expected value is worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest

from bench import analysis as an
from bench import crossing
from bench.records import load_results
from fixtures_results import Eval, RunSpec, make_plan, sweep_config, write_run


def _write(tmp_path, evals, *, batch=16, hold=None, epochs=None, target=0.8):
    plan = make_plan("s", batch, epochs=epochs or max(e.epoch for e in evals))
    config = sweep_config("s", target=target)
    if hold is not None:
        config["target_hold_evals"] = hold
    write_run(tmp_path / "s", RunSpec(plan, evals, epoch_time_s=0.5), config=config)
    return an.runs_frame(load_results([tmp_path / "s"])).iloc[0]


def test_transient_crossing_at_epoch_84_is_not_sustained(tmp_path):
    """The issue's known answer: credited with a crossing at epoch 84, the run ends at 0.516."""
    accs = [0.5] * 84 + [0.81] + [0.6] * 10 + [0.516]  # epochs 0..95
    row = _write(tmp_path, [Eval(i, a, a) for i, a in enumerate(accs)], batch=100)  # 5 steps per epoch
    assert row.epochs_to_target == 84 and row.steps_to_target == 84 * 5
    assert row.epochs_to_target_resolution == 1 and row.steps_to_target_resolution == 5
    assert math.isnan(row.epochs_to_target_sustained) and math.isnan(row.steps_to_target_sustained)
    assert bool(row.ends_below_target)
    assert row.final_test_acc == pytest.approx(0.516)


def test_sustained_needs_target_hold_evals_in_a_row(tmp_path):
    # crossings at epochs 2 (one eval), 4-5 (two), 7-9 (three): hold 3 -> 7; hold 2 -> 4; hold 1 -> 2
    accs = [0.3, 0.5, 0.8, 0.7, 0.81, 0.82, 0.6, 0.85, 0.86, 0.9]
    evals = [Eval(i, a, a) for i, a in enumerate(accs)]
    row = _write(tmp_path / "a", evals)
    assert (row.epochs_to_target, row.epochs_to_target_sustained, row.target_hold_evals) == (2, 7, 3)
    assert row.epochs_to_target_sustained_resolution == 1
    assert row.time_to_target_sustained_s == pytest.approx(7 * 0.5)
    assert row.time_to_target_sustained_resolution_s == pytest.approx(0.5)
    assert not row.ends_below_target
    assert _write(tmp_path / "b", evals, hold=2).epochs_to_target_sustained == 4
    assert _write(tmp_path / "c", evals, hold=1).epochs_to_target_sustained == 2


def test_step_based_evaluation_gives_fractional_epochs_and_resolution(tmp_path):
    """Batch 50: 10 steps per epoch of 500 samples. Evaluations after steps 1, 2, 3, 4, 5, 6, 7, 8,
    10, 11, 13, 16 (eval_every_steps: auto) and at the epoch ends 10 and 20."""
    steps = [1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 16, 20]
    accs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.79, 0.8, 0.82, 0.83, 0.85]
    evals = [Eval(0, 0.1, 0.1)] + [Eval(math.ceil(s / 10), a, a, step=s) for s, a in zip(steps, accs)]
    row = _write(tmp_path, evals, batch=50, epochs=2)
    # first >= 0.8 after step 11; the evaluation before was step 10
    assert row.steps_to_target == 11 and row.steps_to_target_resolution == 1
    assert row.samples_to_target == 550 and row.samples_to_target_resolution == 50
    assert row.epochs_to_target == pytest.approx(1.1)  # 550 samples / 500 per epoch
    assert row.epochs_to_target_resolution == pytest.approx(0.1)
    assert row.time_to_target_s == pytest.approx(11 / 10 * 0.5)  # 0.5 s per 10-step epoch
    assert row.time_to_target_resolution_s == pytest.approx(0.05)
    # sustained: steps 11, 13, 16 all >= 0.8 -> starts at 11
    assert row.steps_to_target_sustained == 11
    curves = an.curves_frame(load_results([tmp_path / "s"]))
    assert list(curves["epoch_num"].iloc[:3]) == [0, 1, 1]  # as logged, display only
    assert curves["epoch"].iloc[11] == pytest.approx(1.3)


def test_crossing_at_the_first_evaluation_is_resolved_from_the_start():
    evals = [{"step": 8.0, "epoch": 0.5, "samples": 64.0, "train_time_s": 2.0, "elapsed_s": 3.0, "test_acc": 0.9}]
    out = crossing.crossings(evals, 0.8, hold_evals=1)
    assert out["steps_to_target"] == 8 and out["steps_to_target_resolution"] == 8
    assert out["time_to_target_resolution_s"] == 2.0 and out["elapsed_to_target_s"] == 3.0
    never = crossing.crossings(evals, 0.95)
    assert all(math.isnan(never[c]) for c in crossing.columns() if c != "ends_below_target")
    assert never["ends_below_target"] is False


def test_column_names_carry_their_unit_last():
    assert crossing.column("time_to_target", sustained=True, resolution=True) == "time_to_target_sustained_resolution_s"
    assert crossing.resolution_of("time_to_target_sustained_s") == "time_to_target_sustained_resolution_s"
    assert crossing.resolution_of("steps_to_target") == "steps_to_target_resolution"


def test_committed_seed_blobs_batch_4_ends_below_the_target_it_reached():
    """results/seed-blobs (committed): batch 4 first reaches 0.80 at epoch 2, holds three
    evaluations from epoch 4, and ends at 0.778; no other run of that sweep ends below."""
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "results" / "seed-blobs"
    if not folder.is_dir():
        pytest.skip("results/seed-blobs not in this checkout")
    df = an.runs_frame(load_results([folder])).set_index("global_batch_size")
    assert (df.loc[4, "epochs_to_target"], df.loc[4, "epochs_to_target_sustained"]) == (2, 4)
    assert df.loc[4, "final_test_acc"] == pytest.approx(0.778)
    assert list(df.index[df["ends_below_target"].astype(bool)]) == [4]
