"""bench.run_facts (failure wording, memory figures), bench.provenance (hardware seen vs claimed)
and bench.spread (comparisons with their noise): pure functions on hand-made records."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import events as ev
from bench.provenance import describe_seen, hardware_mismatches, hardware_seen
from bench.run_facts import V1_CRITERION, describe_failure, failure_lr, memory_figures
from bench.spread import Sample, compare
from bench.summary import RunSummary
from fixtures_results import make_plan

RESULTS = Path(__file__).resolve().parent.parent / "results"


def _summary(**extra) -> RunSummary:
    base = {"run_id": "r", "sweep": "s", "status": "success", "global_batch_size": 50, "num_workers": 1,
            "per_worker_batch_size": 50, "micro_batch_size": 50, "grad_accum_steps": 1, "seed": 0,
            "peak_lr": 0.125, "epochs_completed": 1, "steps_completed": 10, "samples_seen": 500,
            "train_time_s": 1.0, "eval_time_s": 0.1, "wall_time_s": 1.2}
    return RunSummary.model_validate({**base, **extra})


def _record(summary=None, *, plan=None, events=(), cluster=None, worker_env=None, damage=None):
    plan = plan or make_plan("s", 50, epochs=10, warmup_epochs=5.0).to_dict()  # 10 steps/epoch, warmup 50
    return SimpleNamespace(summary=summary, plan=plan, events=list(events), cluster=cluster or {},
                           worker_env=worker_env or {}, env={}, damage=damage)


# --- divergence wording -----------------------------------------------------------------------

def test_v1_divergence_takes_the_lr_from_the_plan():
    """v1: failure.step = 13 steps completed when an epoch-end evaluation found the loss; the LR in
    force was lr(12) = 0.01 + (0.125 - 0.01) x 12 / 50 = 0.0376, still in the 50-step warmup."""
    failure = {"reason": "training loss 30.4 after step 13 (initial 2.3, limit 23)", "step": 13, "epoch_num": 2}
    record = _record(_summary(status="diverged", failure=failure))
    at = failure_lr(record)
    assert at["lr"] == pytest.approx(0.0376) and at["peak_lr"] == 0.125 and at["in_warmup"] and at["from_plan"]
    text = describe_failure(record)
    assert text.startswith("diverged during warmup at LR 0.0376 (peak 0.125 not reached): training loss 30.4")
    assert text.endswith(V1_CRITERION) and "evaluation-mode training loss" in text


def test_v1_divergence_after_warmup_and_at_the_first_peak_step():
    peak = {"reason": "loss", "step": 51, "epoch_num": 6}  # last step taken: 50 = warmup_steps: at the peak
    assert describe_failure(_record(_summary(status="diverged", failure=peak))).startswith(
        "diverged at peak LR 0.125: loss")


@pytest.mark.parametrize("failure, expected", [
    ({"criterion": "smoothed_loss", "lr": 0.05, "peak_lr": 0.125, "in_warmup": True, "loss": 31.0, "limit": 23.0,
      "step": 20}, "diverged during warmup at LR 0.05 (peak 0.125 not reached): smoothed training loss 31 above "
                   "the limit 23 at step 20"),
    ({"criterion": "non_finite_loss", "lr": 0.125, "peak_lr": 0.125, "in_warmup": False, "step": 70},
     "diverged at peak LR 0.125: non-finite training loss at step 70"),
    ({"criterion": "smoothed_loss", "lr": 0.06, "peak_lr": 0.125, "in_warmup": False, "loss": 40.0, "limit": 23.0,
      "step": 90}, "diverged after warmup at LR 0.06 (peak 0.125): smoothed training loss 40 above the limit 23 "
                   "at step 90"),
])
def test_v2_divergence_wording(failure, expected):
    record = _record(_summary(schema_version=2, status="diverged",
                              failure={"reason": "worker text", "epoch_num": 1, **failure}))
    assert describe_failure(record) == expected


def test_a_warmup_that_starts_at_the_peak_is_at_the_peak():
    """At the reference batch the linear rule's warmup runs from the reference LR to the same peak:
    a divergence there, within the warmup steps, did apply the peak LR (seen on a real v2 run)."""
    failure = {"reason": "x", "step": 11, "epoch_num": 1, "criterion": "smoothed_loss", "lr": 0.05,
               "peak_lr": 0.05, "in_warmup": True, "loss": 5.769, "limit": 5.545}
    record = _record(_summary(schema_version=2, status="diverged", failure=failure))
    assert failure_lr(record)["before_peak"] is False
    assert describe_failure(record).startswith("diverged at peak LR 0.05 (its warmup starts at the peak): ")


def test_other_failures():
    oom = {"reason": "CUDA out of memory", "step": 0, "epoch_num": 1, "micro_batch_size": 512,
           "memory_reserved_gib": 79.5}
    assert describe_failure(_record(_summary(status="oom", failure=oom))) == (
        "out of memory at micro-batch 512 with 79.5 GiB reserved after 0 steps: CUDA out of memory")
    assert describe_failure(_record(_summary())) is None
    assert describe_failure(_record(damage="missing events.jsonl")) == "damaged: missing events.jsonl"
    stop = [{"key": ev.RUN_STOP, "metadata": {"status": "aborted", "reason": "killed"}}]
    assert describe_failure(_record(events=stop)) == "no summary.json; run_stop aborted: killed"


def test_committed_shapes_gpu_divergences_never_reached_their_peak():
    from bench.records import load_results

    if not (RESULTS / "shapes-gpu").is_dir():
        pytest.skip("results/shapes-gpu not in this checkout")
    diverged = [r for r in load_results([RESULTS / "shapes-gpu"]) if r.status == "diverged"]
    assert len(diverged) == 2
    for r in diverged:  # 4096: after 13 of 65 warmup steps; 8192: after 14 of 35
        assert describe_failure(r).startswith("diverged during warmup at LR ")
        assert "not reached" in describe_failure(r)


# --- memory -----------------------------------------------------------------------------------

def test_v2_memory_is_the_summary_training_peak():
    memory = {"baseline_allocated_gib": 0.1, "baseline_reserved_gib": 0.2, "train_peak_allocated_gib": 1.5,
              "train_peak_reserved_gib": 2.0}
    tele = {"kind": "gpu", "peak_memory_gib": 6.0, "baseline_memory_gib": 0.5, "peak_memory_above_baseline_gib": 5.5}
    out = memory_figures(_record(_summary(schema_version=2, memory=memory, telemetry=tele,
                                          torch_peak_allocated_gib=9.9)))
    assert (out["train_peak_allocated_gib"], out["train_peak_reserved_gib"], out["memory_source"]) == (1.5, 2.0, "v2")
    assert (out["nvml_peak_gib"], out["nvml_baseline_gib"], out["nvml_peak_above_baseline_gib"]) == (6.0, 0.5, 5.5)


def test_v1_memory_comes_from_the_epoch_events_not_the_summary():
    events = [{"key": ev.TORCH_MEMORY, "metadata": {"epoch_num": i, "max_allocated_gib": a, "max_reserved_gib": r}}
              for i, (a, r) in enumerate([(1.2, 1.3), (1.0, 4.9), (1.1, 1.3)], start=1)]
    out = memory_figures(_record(_summary(torch_peak_allocated_gib=0.4, telemetry={"kind": "cpu"}), events=events))
    assert (out["train_peak_allocated_gib"], out["train_peak_reserved_gib"], out["memory_source"]) == (1.2, 4.9, "v1")
    assert math.isnan(out["nvml_peak_gib"])  # CPU telemetry is process RSS, not device memory
    none = memory_figures(_record(_summary()))
    assert none["memory_source"] is None and math.isnan(none["train_peak_allocated_gib"])


# --- provenance -------------------------------------------------------------------------------

GPU8 = {"name": "gpu8", "use_gpu": True, "hardware": {"gpu_model": "H100", "gpus_per_node": 8, "nodes": 1}}
H200_ENV = {"device": "cuda:0", "gpu_model": "NVIDIA H200", "gpu_memory_gib": 139.8, "hostname": "vm",
            "world_size": 1, "gpu_uuid": "GPU-1"}


def test_v1_mismatches_from_worker_env():
    record = _record(_summary(), cluster=GPU8, worker_env=H200_ENV)
    seen, partial = hardware_seen(record)
    assert describe_seen(seen, partial) == "1 GPU (NVIDIA H200) on 1 host (vm)"
    assert hardware_mismatches(record) == [
        "cluster file 'gpu8' claims GPU model H100; the workers saw 1 GPU (NVIDIA H200) on 1 host (vm)",
        "cluster file 'gpu8' claims 8 GPUs (8 per node x 1 node); this run's 1 worker saw 1 GPU (NVIDIA H200) "
        "on 1 host (vm), so the claimed count is unconfirmed"]


def test_agreement_and_cpu_runs():
    agree = {"name": "one", "use_gpu": True, "hardware": {"gpu_model": "H200", "gpus_per_node": 1, "nodes": 1}}
    assert hardware_mismatches(_record(_summary(), cluster=agree, worker_env=H200_ENV)) == []
    local = {"name": "local", "use_gpu": False, "hardware": {"gpus_per_node": 0, "nodes": 1}}
    assert hardware_mismatches(_record(_summary(), cluster=local, worker_env={"device": "cpu", "hostname": "h"})) == []
    assert hardware_mismatches(_record(_summary(), cluster=GPU8, worker_env={"device": "cpu", "hostname": "h"})) == [
        "cluster file 'gpu8' has use_gpu: true, but the workers ran on the CPU (CPU on 1 host (h))"]
    assert hardware_mismatches(_record(None, cluster=GPU8)) == []  # nothing recorded: nothing to compare


def test_v2_hardware_seen_two_nodes_on_a_one_node_claim():
    hardware = {"num_workers": 16, "nodes": ["n1", "n2"], "hostnames": ["a", "b"], "device_type": "cuda",
                "gpus": [{"model": "NVIDIA H100 80GB HBM3", "memory_gib": 79.6, "uuid": f"GPU-{i}"} for i in range(16)]}
    plan = make_plan("s", 64, num_workers=16).to_dict()
    record = _record(_summary(schema_version=2, hardware=hardware), plan=plan, cluster=GPU8)
    assert hardware_mismatches(record) == [
        "the run used 16 workers, more than the 8 GPUs (8 per node x 1 node) that cluster file 'gpu8' claims",
        "cluster file 'gpu8' claims 1 node; the workers ran on 2"]


def test_committed_shapes_gpu_claims_eight_gpus_on_a_one_gpu_host():
    from bench.records import load_results

    if not (RESULTS / "shapes-gpu").is_dir():
        pytest.skip("results/shapes-gpu not in this checkout")
    for r in load_results([RESULTS / "shapes-gpu"]):
        assert any("claims 8 GPUs" in m and "NVIDIA H200" in m for m in hardware_mismatches(r))


# --- comparisons with their noise ---------------------------------------------------------------

def test_compare_states_the_rule():
    # gap 0.12; SE = sqrt(0.01^2/3 + 0.02^2/3) = 0.0129; twice: 0.0258 -> beyond
    far = compare(Sample.of([0.64, 0.65, 0.66]), Sample.of([0.75, 0.77, 0.79]), unit="s")
    assert far.kind == "beyond" and far.threshold == pytest.approx(0.0258, abs=1e-4)
    assert far.phrase == "the gap (0.12 s) exceeds twice its standard error over seeds (0.0258 s; n = 3 and 3)"
    near = compare(Sample.of([0.60, 0.70]), Sample.of([0.66, 0.74]))
    assert near.kind == "within" and "not a measured difference" in near.phrase
    one = compare(Sample.of([0.65]), Sample.of([0.77]))
    assert one.kind == "unknown" and "spread between seeds is unknown" in one.phrase
    assert one.short == "spread unknown (1 seed)"
    coarse = compare(Sample.of([5, 5]), Sample.of([6, 6]), unit="epochs", resolution=1.0)
    assert coarse.kind == "unresolved" and "evaluation interval (1 epochs)" in coarse.phrase
    assert compare(Sample.of([]), Sample.of([1.0])).kind == "unknown"
