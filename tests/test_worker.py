"""The worker loop run in-process, without Ray (one rank, and two gloo ranks via spawn)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench import events as ev
from bench.config import SweepConfig
from bench.plan import plan_sweep
from bench.store import SweepDir
from bench.worker import WorkerContext, execute_run

BASE = dict(name="t", workload="blobs", lr=dict(reference_lr=0.01, reference_batch_size=32, scaling="none"),
            epochs=4, global_batch_sizes=[50], seeds=[0], target_accuracy=0.5)


def sweep_of(**over) -> SweepConfig:
    return SweepConfig.model_validate({**BASE, **over})


def run_one(tmp_path: Path, sweep: SweepConfig, index: int = 0, ctx: WorkerContext | None = None):
    plan = plan_sweep(sweep)[index]
    run_dir = SweepDir(tmp_path / sweep.name).run(plan.run_id)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    summary = execute_run(plan, sweep, run_dir, ctx or WorkerContext())
    return plan, run_dir, summary


def test_single_worker_run_writes_events_and_summary(tmp_path: Path):
    plan, run_dir, summary = run_one(tmp_path, sweep_of())
    assert run_dir.is_complete()
    assert summary["status"] == "success"
    assert summary["steps_completed"] == plan.total_steps == 4 * 10
    assert summary["samples_seen"] == 4 * 500
    events = ev.read_events(run_dir.events_path)
    keys = [e["key"] for e in events]
    assert keys[0] == ev.RUN_START and keys[-1] == ev.RUN_STOP
    evals = [e for e in events if e["key"] == ev.EVAL_ACCURACY]
    assert [e["metadata"]["epoch_num"] for e in evals] == [0, 1, 2, 3, 4]
    assert [e["metadata"]["step"] for e in evals] == [0, 10, 20, 30, 40]
    assert evals[-1]["value"] > evals[0]["value"]  # it learns
    assert evals[-1]["value"] == summary["final_test_acc"]
    train_times = [e["metadata"]["train_time_s"] for e in evals]
    assert train_times == sorted(train_times) and train_times[0] == 0.0
    lrs = [e for e in events if e["key"] == ev.OPT_LEARNING_RATE]
    assert all(e["value"] == pytest.approx(0.01) for e in lrs)
    assert summary["telemetry"]["kind"] == "cpu" and summary["telemetry"]["num_samples"] >= 1
    assert run_dir.telemetry_paths()


def test_warmup_applied_per_step(tmp_path: Path):
    sweep = sweep_of(lr=dict(reference_lr=0.01, reference_batch_size=25, scaling="linear", warmup_epochs=2))
    plan, run_dir, _ = run_one(tmp_path, sweep)
    assert plan.peak_lr == pytest.approx(0.02) and plan.warmup_steps == 20
    lrs = {e["metadata"]["step"]: e["value"] for e in ev.read_events(run_dir.events_path)
           if e["key"] == ev.OPT_LEARNING_RATE}
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[10] == pytest.approx(0.015)
    assert lrs[20] == pytest.approx(0.02)
    assert lrs[30] == pytest.approx(0.02)


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path):
    # Same global batch, 1 x 100 vs 4 x 25 micro-batches: identical trajectory up to fp rounding.
    a = run_one(tmp_path / "a", sweep_of(global_batch_sizes=[100]))[2]
    b = run_one(tmp_path / "b", sweep_of(global_batch_sizes=[100], max_micro_batch_size=25))[2]
    assert b["grad_accum_steps"] == 4
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-4)
    assert b["final_test_acc"] == pytest.approx(a["final_test_acc"], abs=0.004)


def test_noise_scale_probe_is_logged_and_leaves_training_unchanged(tmp_path: Path):
    # One worker: the micro-batches of gradient accumulation are the small batches.
    base = dict(global_batch_sizes=[100], max_micro_batch_size=25)
    off = run_one(tmp_path / "off", sweep_of(**base))[2]
    plan, run_dir, on = run_one(tmp_path / "on", sweep_of(**base, noise_scale_every_steps=2))
    assert on["final_train_loss"] == pytest.approx(off["final_train_loss"], rel=1e-5)
    gns = [e for e in ev.read_events(run_dir.events_path) if e["key"] == ev.GRADIENT_NOISE_SCALE]
    assert len(gns) == plan.total_steps // 2
    # read in one sync per epoch, but logged with the step each probe ran at, in order
    assert [e["metadata"]["step"] for e in gns] == list(range(0, plan.total_steps, 2))
    last = gns[-1]
    assert last["metadata"]["b_small"] == 25 and last["metadata"]["b_big"] == 100
    assert last["value"] is not None and last["value"] > 0


def test_divergence_is_a_result(tmp_path: Path):
    sweep = sweep_of(lr=dict(reference_lr=50.0, reference_batch_size=50, scaling="none"), divergence_loss_factor=3)
    _, run_dir, summary = run_one(tmp_path, sweep)
    assert summary["status"] == "diverged"
    assert "training loss" in summary["failure"]["reason"]
    stop = ev.read_events(run_dir.events_path)[-1]
    assert stop["key"] == ev.RUN_STOP and stop["metadata"]["status"] == "diverged"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, root: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sweep = sweep_of(num_workers=[2], global_batch_sizes=[50])
        summary = run_one(Path(root), sweep, ctx=WorkerContext(rank=rank, world_size=world))[2]
        out[rank] = summary
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_worker(tmp_path: Path):
    """Data parallelism must not change the algorithm: 2 x 25 equals 1 x 50."""
    single = run_one(tmp_path / "one", sweep_of(global_batch_sizes=[50]))[2]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "two"), out), nprocs=2, join=True)
    double = out[0]
    assert double["per_worker_batch_size"] == 25
    assert double["final_train_loss"] == pytest.approx(single["final_train_loss"], rel=1e-3)
    assert double["final_test_acc"] == pytest.approx(single["final_test_acc"], abs=0.004)
    assert (tmp_path / "two" / "t" / "gbs000050-w002-s0" / "telemetry-rank1.csv").exists()
