"""workload: lm in the sweep file, the plan, the registry and the models: batches in tokens, a loss target."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from bench.config import ConfigError, SweepConfig, load_sweep
from bench.errors import PlanError
from bench.plan import RunPlan, lr_at_step, plan_sweep
from bench.schema import first_error

MARKOV = {"corpus": "markov", "context_length": 32,
          "markov": {"num_states": 16, "num_train_tokens": 20_000, "num_val_tokens": 2_000}}
LM = dict(name="lm-t", workload="lm", workload_options=MARKOV, model="gpt-tiny",
          lr=dict(reference_lr=1e-2, reference_batch_size=1024, scaling="sqrt"),
          optimizer=dict(name="adamw", betas=[0.9, 0.95], weight_decay=0.1),
          epochs=5, global_batch_tokens=[256, 1024], target_loss=2.5)


def lm_sweep(**over) -> SweepConfig:
    return SweepConfig.model_validate({**LM, **over})


def refused(**over) -> str:
    """The one line the sweep file's loader would print."""
    with pytest.raises(ValidationError) as err:
        lm_sweep(**over)
    return first_error(err.value)


# --- the sweep file ----------------------------------------------------------------------------

def test_batches_are_counted_in_tokens_for_lm_and_samples_elsewhere():
    s = lm_sweep()
    assert (s.batch_unit, s.batch_sizes, s.target) == ("tokens", [256, 1024], ("loss", 2.5))
    assert "global_batch_sizes: not for workload 'lm'" in refused(global_batch_sizes=[256])
    assert "global_batch_tokens: required for workload 'lm'" in refused(global_batch_tokens=None)
    assert "use max_micro_batch_tokens" in refused(max_micro_batch_size=64)
    blobs = dict(name="b", workload="blobs", lr=dict(reference_lr=0.1, reference_batch_size=32), epochs=1,
                 target_accuracy=0.5)
    assert SweepConfig.model_validate({**blobs, "global_batch_sizes": [32]}).batch_unit == "samples"
    for key, value in (("global_batch_tokens", [32]), ("max_tokens", 100), ("max_micro_batch_tokens", 64)):
        with pytest.raises(ValueError, match=f"{key}: not for workload 'blobs'"):
            SweepConfig.model_validate({**blobs, "global_batch_sizes": [32], key: value})


def test_exactly_one_target():
    assert "give one target" in refused(target_accuracy=0.5)
    assert "give one target" in refused(target_loss=None)
    assert "target_loss" in refused(target_loss=-1.0)
    assert lm_sweep(target_loss=None, target_accuracy=0.4).target == ("accuracy", 0.4)


def test_lm_refusals_name_the_key():
    assert "noise_scale_every_steps: needs equal micro-batches" in refused(
        noise_scale_every_steps=4, workload_options={**MARKOV, "batching": "bucket"})
    assert "lr_search: " in refused(lr_search={"factors": [0.5, 1, 2]})
    assert "global_batch_tokens: values must be unique integers" in refused(global_batch_tokens=[256, 256])


def test_token_dir_is_taken_from_the_sweep_files_folder(tmp_path, monkeypatch):
    import numpy as np

    from bench.lm.tokenfile import write_token_dir

    write_token_dir(tmp_path / "corpus", {"train": [np.arange(300) % 50], "val": [np.arange(100) % 50]},
                    vocab_size=51, eot_token=50)
    (tmp_path / "s.yaml").write_text("name: own\nworkload: lm\nworkload_options: {corpus: tokens, token_dir: corpus, "
                                     "context_length: 8}\nlr: {reference_lr: 0.001, reference_batch_size: 64}\n"
                                     "epochs: 1\nglobal_batch_tokens: [64]\ntarget_loss: 3.0\n")
    monkeypatch.chdir("/")  # not where the sweep file is
    sweep, _ = load_sweep(tmp_path / "s.yaml")
    assert sweep.workload_options["token_dir"] == str((tmp_path / "corpus").resolve())
    assert sweep.dataset_sizes() == (300, 100)
    (tmp_path / "bad.yaml").write_text((tmp_path / "s.yaml").read_text().replace("token_dir: corpus", "token_dir: nope"))
    with pytest.raises(ConfigError, match="bad.yaml: workload_options: token_dir: .*nope"):
        load_sweep(tmp_path / "bad.yaml")


# --- the plan ----------------------------------------------------------------------------------

def test_plan_in_tokens_with_a_token_budget():
    s = lm_sweep(max_micro_batch_tokens=256, max_tokens=6_000, num_workers=[1, 2])
    plans = {(p.num_workers, p.global_batch_size): p for p in plan_sweep(s)}
    one = plans[(1, 1024)]
    # 1,024 tokens = 32 sequences of 32; a micro-batch of 256 tokens = 8 sequences: 4 micro-steps
    assert (one.per_worker_batch_size, one.micro_batch_size, one.grad_accum_steps) == (1024, 256, 4)
    assert (one.batch_unit, one.context_length, one.num_train) == ("tokens", 32, 20_000)
    # (20,000 - 1) // 32 = 624 windows: 19 batches of 32 and a partial one of 16 (>= its 4 micro-batch slots)
    assert one.steps_per_epoch == 20
    assert one.total_steps == 6  # ceil(6,000 / 1,024): the budget, well inside 5 epochs
    assert plans[(1, 256)].total_steps == 24 and plans[(1, 256)].grad_accum_steps == 1
    assert (plans[(2, 1024)].per_worker_batch_size, plans[(2, 1024)].grad_accum_steps) == (512, 2)
    assert one.peak_lr == pytest.approx(1e-2) and plans[(1, 256)].peak_lr == pytest.approx(5e-3)  # sqrt rule


def test_plan_refuses_what_does_not_divide_with_the_numbers():
    with pytest.raises(PlanError, match="global_batch_tokens: 1000 is not a multiple of context_length 32"):
        plan_sweep(lm_sweep(global_batch_tokens=[1000]))
    with pytest.raises(PlanError, match="max_micro_batch_tokens: auto needs the memory probe"):
        plan_sweep(lm_sweep(max_micro_batch_tokens="auto"))
    with pytest.raises(PlanError, match="global_batch_tokens: 32768 is larger than the training set"):
        plan_sweep(lm_sweep(global_batch_tokens=[32_768]))


def test_linear_and_cosine_decay_to_a_floor_value_by_value():
    kw = dict(start_lr=0.0, peak_lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at_step(0, **kw) == 0.0  # warmup from zero: the first step only primes Adam's moments
    assert lr_at_step(5, **kw) == pytest.approx(0.5)
    assert lr_at_step(10, schedule="linear", **kw) == pytest.approx(1.0)  # peak at the end of warmup
    assert lr_at_step(60, schedule="linear", **kw) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 / 2
    assert lr_at_step(110, schedule="linear", **kw) == pytest.approx(0.1)  # the floor, and no lower
    assert lr_at_step(60, schedule="cosine", **kw) == pytest.approx(0.55)  # cos(pi / 2) = 0
    assert lr_at_step(35, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at_step(500, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at_step(60, schedule="cosine", **{**kw, "min_lr_ratio": 0.0}) == pytest.approx(0.5)  # as before


def test_run_plan_applies_warmup_from_zero_and_the_floor():
    plan = plan_sweep(lm_sweep(lr=dict(reference_lr=1e-2, reference_batch_size=1024, scaling="sqrt", warmup_steps=4,
                                       warmup_from="zero", schedule="cosine", min_lr_ratio=0.1)))[1]
    assert (plan.lr(0), plan.lr(2), plan.lr(4)) == pytest.approx((0.0, 5e-3, 1e-2))
    assert plan.lr(plan.total_steps) == pytest.approx(1e-3)


def test_old_run_plans_load_with_the_new_fields_at_their_defaults():
    d = plan_sweep(lm_sweep())[0].to_dict()
    for key in ("batch_unit", "context_length", "min_lr_ratio", "warmup_from"):
        d.pop(key)
    old = RunPlan.from_dict(d)
    assert (old.batch_unit, old.context_length, old.min_lr_ratio, old.warmup_from) == ("samples", None, 0.0, "reference")


# --- registry and models -----------------------------------------------------------------------

def test_registry_names_every_gpt_size_and_the_models_build_them():
    from bench.lm.model import SIZES
    from bench.models import build_model
    from bench.workloads import get
    from bench.workloads.lm_catalog import GPT_MODELS

    info = get("lm")
    from bench.lm.corpus import BYTE_VOCAB

    assert info.models == GPT_MODELS == tuple(SIZES) and info.default_model == "gpt-tiny"
    assert info.num_classes == BYTE_VOCAB and info.sizes(info.options()) == (419_691, 46_505)  # python-docs
    model = build_model("gpt-tiny", (64,), 257)
    assert model.cfg.context_length == 64 and model.cfg.vocab_size == 257
    with pytest.raises(ValueError, match="gpt-tiny needs token inputs"):
        build_model("gpt-tiny", (3, 32, 32), 10)
    assert "model: 'resnet50' does not fit workload 'lm'" in refused(model="resnet50")


def test_the_packaged_sweeps_plan():
    tiny = plan_sweep(load_sweep("lm-tiny")[0])
    assert [p.global_batch_size for p in tiny] == [256, 512, 1024, 2048]
    assert all(p.batch_unit == "tokens" and p.context_length == 64 for p in tiny)
    assert all(p.total_steps * p.global_batch_size == pytest.approx(419_691, rel=0.01) for p in tiny)  # one epoch
    gpu, _ = load_sweep("lm-gpu")
    assert gpu.batch_sizes[0] == 2**15 and gpu.batch_sizes[-1] == 2**20 and gpu.micro_batch_cap == "auto"


def test_lm_gpu_plans_with_the_probes_micro_batches(tmp_path):
    """lm-gpu plans once the probe has said how many sequences fit (here: 16 of 1,024 tokens)."""
    from bench.memprobe.fit import sequence_tokens

    gpu, _ = load_sweep("lm-gpu")
    per = sequence_tokens(gpu)
    micro = {b: min(b, 16 * per) for b in gpu.batch_sizes}
    plans = plan_sweep(gpu, max_micro_batch_size=micro)
    top = [p for p in plans if p.global_batch_size == 2**20][0]
    assert (top.micro_batch_size, top.grad_accum_steps) == (16_384, 64)


def test_dry_run_prints_batches_in_tokens(capsys):
    from bench.cli import main

    assert main(["run", "lm-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "per-worker 2048 tokens = 4 x 512" in out and "(205 steps)" in out


def test_sweep_file_docs_name_the_lm_keys():
    text = (Path(__file__).resolve().parent.parent / "docs" / "sweep-files.md").read_text()
    for key in ("global_batch_tokens", "max_micro_batch_tokens", "max_tokens", "target_loss", "min_lr_ratio",
                "warmup_from"):
        assert key in text


@pytest.mark.parametrize("key, value, message", [
    ("global_batch_tokens", "[1024]", "global_batch_tokens: Input should be a valid list"),
    ("global_batch_tokens", [1.5], "global_batch_tokens[0]: Input should be a valid integer"),
    ("global_batch_tokens", [0], "global_batch_tokens: values must be unique integers in 1..2147483648"),
    ("target_loss", "3", "target_loss: Input should be a valid number"),
    ("target_loss", float("nan"), "target_loss: Input should be a finite number"),
    ("max_tokens", -1, "max_tokens: Input should be greater than 0"),
    ("max_micro_batch_tokens", "half", "max_micro_batch_tokens: must be a whole number or 'auto'"),
    ("lr", {"reference_lr": 1e-3, "reference_batch_size": 64, "min_lr_ratio": 1.0}, "lr.min_lr_ratio: Input should be less than 1"),
    ("lr", {"reference_lr": 1e-3, "reference_batch_size": 64, "warmup_from": "one"}, "lr.warmup_from: Input should be"),
    ("workload_options", {"context_length": "64"}, "workload_options: context_length: Input should be a valid integer"),
])
def test_a_bad_lm_key_is_one_line_naming_it(tmp_path, key, value, message):
    import yaml

    data = {**LM, key: value}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert str(err.value).startswith(f"{path}: {message}") and "\n" not in str(err.value)
