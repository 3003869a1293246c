"""Language-model runs read back: a loss target crossed, token columns, MFU, the noise scale through
training, the planner at a loss target, the memory probe in sequences; and one tiny lm sweep run
in-process end to end (worker, results, report)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import crossing
from bench import events as ev
from bench.analysis_lm import noise_rows, target_spec, token_columns
from bench.lm.tokenplan import kaplan_critical_batch_tokens, peak_bf16_flops
from bench.records import RunRecord
from bench.summary import GpuSeen, HardwareSeen, RunSummary


def evals(losses, steps=None):
    steps = steps or list(range(0, 10 * len(losses), 10))
    return [{"step": s, "epoch": s / 100, "samples": s * 512, "train_time_s": s / 10, "elapsed_s": s / 8,
             "test_acc": math.nan, "test_loss": v} for s, v in zip(steps, losses)]


def test_a_loss_target_is_reached_at_or_below_it():
    e = evals([5.5, 4.0, 3.1, 2.9, 3.05, 2.8, 2.7, 2.6])  # steps 0, 10, ..., 70
    out = crossing.crossings(e, 3.0, hold_evals=3, metric="loss")
    assert out["steps_to_target"] == 30 and out["steps_to_target_resolution"] == 10
    assert out["samples_to_target"] == 30 * 512
    assert out["steps_to_target_sustained"] == 50  # 2.9 then 3.05 breaks the streak; 2.8, 2.7, 2.6 hold
    assert out["ends_below_target"] is False
    ends_above = crossing.crossings(evals([5.0, 2.9, 3.2]), 3.0, metric="loss")
    assert ends_above["steps_to_target"] == 10 and ends_above["ends_below_target"] is True  # ends short of it
    assert math.isnan(crossing.crossings(evals([5.0, 4.0]), 3.0, metric="loss")["steps_to_target"])
    assert crossing.crossings(evals([5.0, 3.0]), 3.0, metric="loss")["steps_to_target"] == 10  # equal counts


def record(plan=None, config=None, summary=None, events=()) -> RunRecord:
    return RunRecord(sweep="s", run_id="gbs001024-w001-s0", path=Path("/nonexistent"), plan=plan or {},
                     config=config or {}, cluster={}, env={}, worker_env={}, summary=summary, events=list(events))


def summary(**over) -> RunSummary:
    base = dict(schema_version=2, run_id="r", sweep="s", status="success", global_batch_size=1024, num_workers=2,
                per_worker_batch_size=512, micro_batch_size=512, grad_accum_steps=1, seed=0, peak_lr=1e-3,
                epochs_completed=1, steps_completed=10, samples_seen=10240, train_time_s=1.0, eval_time_s=0.1,
                wall_time_s=1.2)
    return RunSummary(**{**base, **over})


def test_target_spec_reads_the_sweeps_target_and_an_override_wins():
    assert target_spec(record(config={"target_loss": 3.0, "target_accuracy": None})) == ("loss", 3.0)
    assert target_spec(record(config={"target_accuracy": 0.9})) == ("accuracy", 0.9)
    assert target_spec(record(summary=summary(target_loss=2.5))) == ("loss", 2.5)  # config.yaml missing
    assert target_spec(record(config={"target_loss": 3.0}), loss=2.0) == ("loss", 2.0)
    assert target_spec(record(config={"target_loss": 3.0}), accuracy=0.5) == ("accuracy", 0.5)


def test_token_columns_and_mfu_against_the_dense_bf16_peak():
    hardware = HardwareSeen(num_workers=2, nodes=["n"], device_type="cuda",
                            gpus=[GpuSeen(model="NVIDIA H200", memory_gib=139.8)])
    rec = record(plan={"batch_unit": "tokens", "global_batch_size": 1024, "context_length": 64},
                 summary=summary(batch_unit="tokens", hardware=hardware),
                 events=[{"key": ev.MODEL_FLOPS_PER_TOKEN, "value": 6e8}, {"key": ev.ENTROPY_FLOOR_NATS, "value": 1.6}])
    row = {"samples_per_s": 1e6, **{c: 1.0 for c in crossing.columns()}, "samples_to_target": 262_144.0}
    out = token_columns(rec, row)
    assert out["global_batch_tokens"] == 1024 and out["context_length"] == 64
    assert out["tokens_to_target"] == 262_144.0 and out["tokens_per_s"] == 1e6
    assert out["mfu"] == pytest.approx(1e6 * 6e8 / (2 * 989e12))  # two H200s: 0.03 %
    assert out["entropy_floor_nats"] == 1.6
    assert token_columns(record(plan={"batch_unit": "samples"}), row) == {}
    on_cpu = record(plan={"batch_unit": "tokens"}, events=[{"key": ev.MODEL_FLOPS_PER_TOKEN, "value": 6e8}])
    assert math.isnan(token_columns(on_cpu, row)["mfu"])  # unknown, never a guess


def test_gpu_peaks_by_name():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA GeForce RTX 4090") is None and peak_bf16_flops(None) is None


def test_noise_estimates_pair_with_the_latest_evaluation_at_or_before_them():
    events = [{"key": ev.EVAL_LOSS, "value": 5.0, "metadata": {"step": 0}},
              {"key": ev.GRADIENT_NOISE_SCALE, "value": 100.0, "metadata": {"step": 8}},
              {"key": ev.EVAL_LOSS, "value": 3.0, "metadata": {"step": 16}},
              {"key": ev.GRADIENT_NOISE_SCALE, "value": 400.0, "metadata": {"step": 16}},
              {"key": ev.GRADIENT_NOISE_SCALE, "value": 500.0, "metadata": {"step": 24}}]
    rows = noise_rows(record(plan={"global_batch_size": 2048, "num_workers": 1, "seed": 0}, events=events))
    assert [(r["step"], r["eval_step"], r["eval_loss"], r["b_simple_tokens"]) for r in rows] == [
        (8, 0, 5.0, 100.0), (16, 16, 3.0, 400.0), (24, 16, 3.0, 500.0)]
    assert rows[1]["kaplan_b_crit_tokens"] == pytest.approx(2e8 / 3.0 ** (1 / 0.21))
    assert kaplan_critical_batch_tokens(3.0) == pytest.approx(1.0691e6, rel=1e-3)  # 2e8 / 3^4.762 = 2e8 / 187.1


def test_planner_at_a_loss_target():
    import pandas as pd

    from bench.planner import plan_capacity

    rows = [{"sweep": "lm", "run_id": f"b{b}-s{s}", "global_batch_size": b, "num_workers": 1, "seed": s,
             "steps_to_target": steps * (1 + s / 100), "samples_to_target": steps * b * (1 + s / 100),
             "time_to_target_s": steps * b / 1e4, "samples_per_s": 1e4, "status": "success",
             "target_loss": 3.0, "target_accuracy": math.nan, "peak_memory_gib": 1.0}
            for b, steps in ((1024, 400), (2048, 220), (4096, 130)) for s in (0, 1)]
    result = plan_capacity(pd.DataFrame(rows), target_loss=3.0, max_gpus=1)
    assert result.target_metric == "loss" and result.target_text == "loss 3"
    assert result.fastest["global_batch_size"] == 1024  # fewest tokens: 400 x 1,024 at 10 K tokens/s
    with pytest.raises(ValueError, match="target loss"):
        plan_capacity(pd.DataFrame(rows), target_loss=2.0)
    with pytest.raises(ValueError, match="give one target"):
        plan_capacity(pd.DataFrame(rows))


def test_memory_probe_counts_sequences_and_auto_answers_in_tokens(tmp_path):
    from bench.config import SweepConfig
    from bench.memprobe.fit import ProbeResult, Try, memory_key, micro_batch_for_auto, per_worker_batches, write_probe

    sweep = SweepConfig.model_validate(dict(
        name="lmp", workload="lm", workload_options={"corpus": "markov", "context_length": 64}, epochs=1,
        lr=dict(reference_lr=1e-3, reference_batch_size=1024), global_batch_tokens=[1024, 4096], num_workers=[1, 2],
        max_micro_batch_tokens="auto", target_loss=3.0))
    assert per_worker_batches(sweep) == [8, 16, 32, 64]  # sequences of 64 tokens: 512 ... 4,096 tokens
    result = ProbeResult(tries=[Try(8, True, 1), Try(24, False, None)], largest_fit=20, first_fail=24,
                         fixed_bytes=None, per_sample_bytes=None, predicted_largest=None, device="cpu (memory cap)",
                         total_bytes=1, budget_bytes=1, safety_margin=0.1, memory_cap_bytes=1, device_type="cpu",
                         measurement="rss", reserved_bytes={}, try_details=[], eval_check=None,
                         per_worker_batches=per_worker_batches(sweep), sweep="lmp", config_hash=sweep.config_hash(),
                         memory_key=memory_key(sweep), limit_check=None, setup={}, notes=[])
    write_probe(result, tmp_path / "lmp" / "memory-probe.json")
    chosen, _ = micro_batch_for_auto(sweep, tmp_path, use_gpu=False)
    # 8 and 16 sequences fit whole; 32 runs as 2 x 16, 64 as 4 x 16 (16 = largest divisor <= 20)
    assert chosen == {512: 512, 1024: 1024, 2048: 1024, 4096: 1024}


def test_memory_probe_inputs_are_token_ids():
    import torch

    from bench.config import SweepConfig
    from bench.memprobe.device import Training, input_spec

    sweep = SweepConfig.model_validate(dict(
        name="lmp", workload="lm", workload_options={"corpus": "markov", "context_length": 16,
                                                     "markov": {"num_states": 10}},
        epochs=1, lr=dict(reference_lr=1e-3, reference_batch_size=64), global_batch_tokens=[64], target_loss=3.0,
        optimizer={"name": "adamw"}))
    spec = input_spec(sweep)
    assert (spec.shape, spec.num_classes, spec.tokens, spec.resident_bytes) == ((16,), 11, True, 0)
    training = Training(sweep, spec, torch.device("cpu"))
    x, y = training.batch(3), training.labels(3)
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64 and int(x.max()) < 11
    training.step(2)  # the worker's step runs on them


def test_token_files_have_their_own_bound(tmp_path, monkeypatch):
    import numpy as np

    from bench import safeio
    from bench.errors import UserError
    from bench.lm.tokenfile import open_token_dir, write_token_dir

    assert safeio.LIMITS["tokens"] == 2**40  # 1 TiB: mapped, never read whole (a 4 GiB cap stopped at 2 G tokens)
    write_token_dir(tmp_path / "c", {"train": [np.arange(1000) % 50], "val": [np.arange(100) % 50]},
                    vocab_size=51, eot_token=50)
    monkeypatch.setitem(safeio.LIMITS, "tokens", 1000)
    with pytest.raises(UserError, match="above the 1,000-byte limit for a tokens file"):
        open_token_dir(tmp_path / "c")


def test_overhead_side_b_is_one_epoch_of_the_plain_steps():
    import torch

    from bench.perf import overhead_lm
    from bench.plan import plan_sweep

    params = {"device": "cpu", "model": "gpt-tiny", "context_length": 32, "micro_batch_size": 4, "steps": 10,
              "telemetry": False, "workload": "lm"}
    (plan,) = plan_sweep(overhead_lm.lm_sweep_for(params, "o"))
    assert (plan.global_batch_size, plan.steps_per_epoch, plan.grad_accum_steps) == (128, 10, 1)
    model, _, _, step = overhead_lm.plain_lm_step(params, torch.device("cpu"))
    before = model.tok_emb.weight.detach().clone()
    step()
    assert not torch.equal(before, model.tok_emb.weight)  # one AdamW step moved the weights
    assert overhead_lm.utilisation(1e6, params, "cpu") is None
    assert overhead_lm.utilisation(1e6, params, "NVIDIA H200") == pytest.approx(
        1e6 * overhead_lm.flops_per_token(params) / 989e12)


# --- end to end, in-process ----------------------------------------------------------------------

CORPUS = {"corpus": "markov", "context_length": 32, "val_eval_tokens": 4096,
          "markov": {"num_states": 16, "num_train_tokens": 200_000, "num_val_tokens": 20_000}}


@pytest.mark.slow
def test_a_tiny_lm_sweep_trains_crosses_its_loss_target_and_reports(tmp_path):
    """Two batches in tokens through the worker (bench.worker.execute_run, no Ray), read back and
    reported: the loss target is crossed, tokens columns are right, the loss approaches the
    corpus's entropy floor, and the report has its language-model sections."""
    from bench import analysis
    from bench.analysis_lm import noise_frame
    from bench.config import SweepConfig
    from bench.plan import plan_sweep
    from bench.records import load_results
    from bench.report import render_report
    from bench.store import SweepDir
    from bench.worker import WorkerContext, execute_run

    sweep = SweepConfig.model_validate(dict(
        name="lm-int", workload="lm", workload_options=CORPUS, model="gpt-tiny",
        optimizer=dict(name="adamw", betas=[0.9, 0.95], weight_decay=0.0),
        lr=dict(reference_lr=1e-2, reference_batch_size=1024, scaling="sqrt", warmup_steps=10, warmup_from="zero",
                schedule="cosine", min_lr_ratio=0.1),
        epochs=4, max_tokens=102_400, global_batch_tokens=[1024, 2048], max_micro_batch_tokens=1024,
        target_loss=2.2, eval_every_steps="auto", train_eval_samples=2048, noise_scale_every_steps=4,
        telemetry=dict(enabled=False)))
    folder = SweepDir(tmp_path / sweep.name)
    for plan in plan_sweep(sweep):
        run_dir = folder.run(plan.run_id)
        run_dir.prepare(config=sweep.model_dump(mode="json"), cluster={"name": "local"}, run_plan=plan.to_dict(),
                        env={"torch": "test"})
        summary = execute_run(plan, sweep, run_dir, WorkerContext())
        assert summary.status == "success" and summary.batch_unit == "tokens" and summary.target_loss == 2.2
        assert summary.samples_seen == plan.total_steps * plan.global_batch_size  # packed: every step full
    records = load_results([tmp_path])
    runs = analysis.runs_frame(records).set_index("global_batch_tokens")
    assert list(runs.index) == [1024, 2048] and set(runs["status"]) == {"success"}
    assert runs["steps_to_target"].notna().all()
    assert (runs["tokens_to_target"] == runs["steps_to_target"] * runs.index).all()
    floor = runs.loc[1024, "entropy_floor_nats"]
    assert 0 < runs.loc[1024, "final_test_loss"] - floor < 0.1  # 100 steps of 1,024 tokens near the floor
    noise = noise_frame(records)
    assert len(noise) and (noise["global_batch_size"] == 2048).all()  # only the accumulating batch probes
    assert noise["eval_loss"].notna().all() and (noise["b_simple_tokens"].notna()).all()
    page = render_report(records)
    for text in ("Steps and tokens to the target loss vs global batch (tokens)", "Gradient noise scale through "
                 "training", "Validation loss against tokens", "target loss (nats per token)",
                 "final validation loss"):
        assert text in page
    assert "could not be drawn" not in page


@pytest.mark.parametrize("argv, message", [
    (["report", "{dir}", "-o", "{dir}/r.html", "--target-loss", "0"], "--target-loss 0: must be a loss in nats > 0"),
    (["report", "{dir}", "-o", "{dir}/r.html", "--target-loss", "3", "--target-accuracy", "0.5"],
     "--target-loss 3: must be a loss"),
    (["plan", "{dir}", "--target-loss", "-1"], "--target-loss '-1': out of range; must be a validation loss"),
    (["plan", "{dir}"], "plan: give one target, --target-accuracy (e.g. 0.93) or --target-loss"),
    (["plan", "{dir}", "--target-loss", "3", "--target-accuracy", "0.9"], "plan: give one target"),
])
def test_a_loss_target_on_the_command_line_is_checked_in_one_line(tmp_path, capsys, argv, message):
    from bench.cli import main

    assert main([a.format(dir=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchscale: error: " + message) and err.count("\n") == 1


def test_a_submissions_seed_check_reads_a_token_sweeps_batches():
    """bench.compliance listed the declared batches from global_batch_sizes, None for an lm sweep."""
    from bench.compliance import _seed_problems

    rec = record(plan={"global_batch_size": 256, "num_workers": 1, "seed": 0},
                 config={"global_batch_sizes": None, "global_batch_tokens": [256, 512], "seeds": [0]})
    assert _seed_problems([rec]) == ["sweep s: global batch 512 x 1 worker(s): 0 of 1 declared seeds present "
                                     "(missing seeds [0])"]


def test_kaplan_level_is_given_to_two_figures_and_not_compared():
    from bench.report_lm import _approx_tokens

    assert _approx_tokens(2_925_003) == "about 2.9 million"
    assert _approx_tokens(2.1e9) == "about 2.1 billion" and _approx_tokens(4_321) == "about 4,321"
