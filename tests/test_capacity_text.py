"""The capacity plan as people read it (review 2026-12, C3/C4/B1/L4): numbers written out in units
chosen by magnitude, CPU runs planned in workers, no global batch above the training set, the
communication model named once, a 1-worker row below the measured count said to be unmeasured,
a log time axis labelled densely enough to read every point; every comparison keeps its seed
spread and resolution. Known answers are worked out in the comments."""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest

from bench import analysis
from bench import planner_text as words
from bench.planner import plan_capacity, plan_context, plan_figure
from bench.records import load_results
from fixtures_results import NUM_TRAIN, write_sweep

RAW_NUMBER = re.compile(r"\d[eE][+-]?\d")  # 7.734e-06, 4.66e+03


@pytest.mark.parametrize("x, text", [
    (7.734e-06, "0.00000773"),  # the review's "7.734e-06 GPU-h"
    (0.02784, "0.0278"), (0.6544, "0.654"), (49152, "49,200"),  # shapes-gpu's B_crit "4.915e+04"
    (9.996, "10"),  # rounding carries into the next power of ten: 10.0, zeros dropped
    (365.7, "366"), (0, "0"), (math.nan, "-"),
])
def test_amount_is_written_out_to_three_figures(x, text):
    assert words.amount(x) == text


@pytest.mark.parametrize("seconds, time, device", [
    (0.02784, "0.0278 s", "0.0278 GPU-seconds"),  # seed-blobs' batch 450: 7.734e-06 GPU-h x 3600
    (119.0, "119 s", "119 GPU-seconds"),
    (610.5, "10.2 min", "10.2 GPU-minutes"),  # shapes-hard-cpu: 0.1696 GPU-h x 3600 = 610.5 s
    (9000.0, "2.5 h", "2.5 GPU-hours"),
])
def test_durations_choose_their_unit(seconds, time, device):
    assert words.duration(seconds) == time and words.device_time(seconds, "GPU") == device


def _runs(workers: int = 1, batches=(32, 64, 128), seeds=(0, 1)) -> pd.DataFrame:
    """steps S_min (1 + B_crit / B) = 100 (1 + 64 / B); to-target time steps x B / 6400 samples/s
    = (B + 64) / 64 s: 1.5 s at 32, 2.0 at 64, 3.0 at 128; seed 1 slower by 1 %."""
    rows = []
    for b in batches:
        for seed in seeds:
            steps = 100 * (1 + 64 / b)
            rows.append({"sweep": "hand", "run_id": f"b{b}-s{seed}", "global_batch_size": b, "num_workers": workers,
                         "seed": seed, "steps_to_target": steps, "time_to_target_s": steps * b / 6400 * (1 + 0.01 * seed),
                         "samples_per_s": 6400.0, "status": "success", "target_accuracy": 0.9})
    return pd.DataFrame(rows)


def test_no_global_batch_larger_than_the_training_set():
    """The plan adds 2x and 4x the largest measured batch (256, 512); a training set of 300 samples
    allows neither 512 (> 300) ... but 256 fits. seed-blobs: 900 and 1800 against 500 samples."""
    plan = plan_capacity(_runs(), target_accuracy=0.9, max_global_batch_size=300)
    assert sorted(plan.table["global_batch_size"].unique()) == [32, 64, 128, 256]
    assert any("global batch 512 left out: larger than the training set (300 samples)" in s for s in plan.scope)
    unlimited = plan_capacity(_runs(), target_accuracy=0.9)
    assert 512 in set(unlimited.table["global_batch_size"]) and not any("left out" in s for s in unlimited.scope)


def test_plan_context_reads_the_device_and_the_training_set(tmp_path):
    cpu = load_results([write_sweep(tmp_path, "cpu", batches=(16, 64), seeds=(0,), epochs=10)])
    gpu = load_results([write_sweep(tmp_path, "gpu", batches=(16, 64), seeds=(0,), epochs=10, v2=True,
                                    telemetry_kind="gpu")])
    assert plan_context(cpu) == {"device": "worker", "max_global_batch_size": NUM_TRAIN,
                                 "device_note": plan_context(cpu)["device_note"]}
    assert "CPU workers" in plan_context(cpu)["device_note"]
    assert plan_context(gpu)["device"] == "GPU" and plan_context(gpu)["device_note"] is None


def test_cpu_runs_are_planned_in_workers():
    plan = plan_capacity(_runs(), target_accuracy=0.9, device="worker", device_note="CPU workers",
                         gpu_hour_price=2.0)
    text = "\n".join([plan.recommendation, *plan.assumptions, *plan.table["note"]])
    assert "GPU" not in text and "GPU-h" not in text
    # cheapest: batch 32 on 1 worker, 1.5 and 1.515 s: mean 1.5075 s; cost 1.5075 / 3600 x 2 = 0.000838
    assert plan.recommendation.startswith("cheapest (no deadline): global batch 32 on 1 worker: 1.51 s to target, "
                                          "1.51 worker-seconds, cost 0.000838 per run at 2 per worker-hour")
    assert plan_figure(plan).axes[0].get_title().endswith("times known on 1 worker only")


def test_rows_below_the_measured_worker_count_say_so():
    """Runs on 2 workers only (digits-linear): the 1-worker rows are extrapolated downwards with
    efficiency 1 and must say they are not measured."""
    plan = plan_capacity(_runs(workers=2), target_accuracy=0.9, device="worker")
    row = plan.table[(plan.table["global_batch_size"] == 128) & (plan.table["num_gpus"] == 1)].iloc[0]
    # per-worker batch 128, above the measured 16-64: the 2-worker runs' samples/s per worker at 64 is held,
    # 150 x 128 / 3.015 / 2 = 3184; one worker: 150 x 128 / 3184 = 6.03 s, twice the 2-worker time
    assert row["time_to_target_s"] == pytest.approx(2 * 3.015)
    assert row["source"] == "extrapolated"
    assert "1 worker: not measured (the runs used 2); the 2-worker runs' per-worker speed is assumed " \
           "(efficiency 1), an upper bound on the time" in row["note"]
    assert "1 GPUs" not in row["note"]
    assert any(a.startswith("fewer workers than the measured 2 were not measured") for a in plan.assumptions)


def test_comparisons_keep_spread_and_resolution_in_readable_units():
    """The cheapest and the fastest are the same row here (32 on 1 GPU): described once, and each
    comparison still carries the rule. 32 against 64: per run 1.5/1.515 against 2.0/2.02 s, means
    1.5075 and 2.01, gap 0.5025 s; std 0.0106 and 0.0141, 2 SE = 2 sqrt(0.0106^2/2 + 0.0141^2/2) = 0.025 s."""
    plan = plan_capacity(_runs(), target_accuracy=0.9)
    lines = plan.recommendation.splitlines()
    assert lines[0].startswith("cheapest (no deadline): global batch 32 on 1 GPU: 1.51 s to target, 1.51 GPU-seconds")
    assert "against the next cheapest (batch 64 on 1 GPU): the gap (0.502 GPU-seconds) exceeds twice its " \
           "standard error over seeds (0.025 GPU-seconds; n = 2 and 2)" in lines[0]
    assert lines[1] == ("fastest: the same configuration; against the next fastest (batch 64 on 1 GPU): the gap "
                        "(0.502 s) exceeds twice its standard error over seeds (0.025 s; n = 2 and 2)")
    assert not RAW_NUMBER.search(plan.recommendation + " ".join(plan.assumptions))


def test_the_communication_model_is_named_once(tmp_path):
    """Runs that record their gradient bytes: the report's capacity caption names bench.stepmodel
    once and then lists its assumptions (it used to prefix each of the 3-4 with the name)."""
    from bench.report import _capacity_figure

    sweep = write_sweep(tmp_path, "nv", batches=(16, 64, 128), seeds=(0, 1), epochs=60, v2=True)
    for summary in sweep.glob("*/summary.json"):
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "gradient_bytes": 4_000_000}))
    records = load_results([sweep])
    caption = _capacity_figure(analysis.runs_frame(records), records).caption
    assert caption.count("communication model") == 1 and caption.count("bench.stepmodel") == 1
    assert "workers per node unknown" in caption and "no hardware.interconnect" in caption
    assert "Worker counts above the measured 1" in caption and "CPU workers" in caption  # CPU runs
    assert not re.search(r"GPU\(s\)|GPU-|GPU count|on \d+ GPU", caption)
    # the plan adds 2x and 4x the largest measured batch: 256 fits the 500 training samples, 512 does not
    assert "Global batch 512 left out: larger than the training set (500 samples)" in caption
    assert not RAW_NUMBER.search(caption)


def _labels_in_view(ax) -> list[float]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(ax.figure).draw()
    lo, hi = ax.get_ylim()
    return [float(t.get_text().replace(",", "")) for t, v in zip(ax.get_yticklabels(), ax.get_yticks())
            if t.get_text() and lo <= v <= hi]


@pytest.mark.parametrize("times", [
    [3.024, 1.452, 1.053, 0.768, 0.6544],  # shapes-gpu: labels were only "1" and "2"
    [0.0941, 0.0679, 0.0619, 0.0517, 0.0358, 0.0561, 0.0302, 0.0278],  # seed-blobs: none below 0.05
    [0.8723, 0.4863, 0.3004, 0.1957, 0.1113, 0.1008],  # digits-linear on 2 workers
])
def test_every_point_lies_between_two_labels(times):
    runs = pd.DataFrame([{"sweep": "hand", "run_id": f"b{2 ** k}", "global_batch_size": 2 ** (k + 4), "num_workers": 1,
                          "seed": 0, "steps_to_target": 100.0, "time_to_target_s": t, "status": "success",
                          "target_accuracy": 0.9} for k, t in enumerate(times)])
    plan = plan_capacity(runs, target_accuracy=0.9, batch_sizes=sorted(runs["global_batch_size"]))
    ax = plan_figure(plan).axes[0]
    labels = _labels_in_view(ax)
    assert len(labels) >= 5, labels
    for t in plan.table["time_to_target_s"].dropna():
        assert min(labels) <= t <= max(labels), (t, labels)
    lo, hi = ax.get_ylim()
    assert lo < min(times) / 1.05 and max(times) * 1.05 < hi  # a margin from the frame
