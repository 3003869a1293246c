"""Bad input is refused at the door: one line naming file and key, exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cli import main
from bench.config import load_sweep
from conftest import TINY_SWEEP, write_yaml

CASES = {
    "unknown key": (TINY_SWEEP + "learning_rate: 0.1\n", r"learning_rate: Extra inputs are not permitted"),
    "wrong type": (TINY_SWEEP.replace("epochs: 3", "epochs: three"), r"epochs: Input should be a valid integer"),
    "batch < 1": (TINY_SWEEP.replace("[32, 64]", "[0, 64]"), r"global_batch_sizes: every value must be >= 1"),
    "not divisible by workers": (TINY_SWEEP.replace("num_workers: [1]", "num_workers: [3]"),
                                 r"global_batch_sizes: 32 is not divisible by num_workers 3"),
    "not divisible by micro": (TINY_SWEEP + "max_micro_batch_size: 12\n",
                               r"not divisible by num_workers x max_micro_batch_size = 1 x 12 = 12"),
    "larger than training set": (TINY_SWEEP.replace("[32, 64]", "[32, 600]"),
                                 r"600 is larger than the training set \(500 samples"),
    "negative LR": (TINY_SWEEP.replace("reference_lr: 0.01", "reference_lr: -0.1"),
                    r"lr\.reference_lr: Input should be greater than 0"),
    "unknown workload": (TINY_SWEEP.replace("workload: blobs", "workload: mnist"), r"unknown 'mnist' \(allowed:"),
    "bad scaling rule": (TINY_SWEEP.replace("scaling: none", "scaling: cubic"),
                         r"lr\.scaling: Input should be 'linear', 'sqrt' or 'none'"),
    "not yaml": ("name: [unclosed\n", r"not valid YAML"),
    "not a mapping": ("- 1\n- 2\n", r"expected a mapping"),
    "name escapes folder": (TINY_SWEEP.replace("name: tiny", "name: ../../etc"), r"sweep name '\.\./\.\./etc' is not allowed"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_sweep_exits_2_with_one_line(case, tmp_path: Path, capsys, monkeypatch):
    text, pattern = CASES[case]
    path = write_yaml(tmp_path / "bad.yaml", text)
    monkeypatch.chdir(tmp_path)
    code = main(["run", str(path), "--results-dir", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert str(path) in err
    import re
    assert re.search(pattern, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "results").exists()  # nothing written


def test_missing_sweep_file(tmp_path: Path, capsys):
    code = main(["run", str(tmp_path / "nope.yaml"), "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "nope.yaml: no such file" in err
    assert not (tmp_path / "r").exists()


def test_unknown_packaged_name(capsys):
    assert main(["run", "no-such-sweep", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no packaged sweep of that name (packaged: " in err and "seed-blobs" in err and "digits-linear" in err


def test_bad_cluster_file(tmp_path: Path, tiny_sweep: Path, capsys):
    cluster = write_yaml(tmp_path / "c.yaml", "name: c\nuse_gpu: maybe\n")
    assert main(["run", str(tiny_sweep), "--cluster", str(cluster), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "c.yaml: use_gpu: Input should be a valid boolean" in err
    cluster = write_yaml(tmp_path / "c2.yaml", "name: c\nlauncher: missing.yaml\n")
    assert main(["run", str(tiny_sweep), "--cluster", str(cluster), "--dry-run"]) == 2
    assert "launcher: file 'missing.yaml' does not exist" in capsys.readouterr().err


def test_alias_bomb_refused(tmp_path: Path, capsys):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 9):
        bomb += f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 10) + "]\n"
    path = write_yaml(tmp_path / "bomb.yaml", bomb)
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "too large or too deeply nested" in capsys.readouterr().err


def test_packaged_sweeps_validate_and_plan(capsys, tmp_path):
    for name in ("seed-blobs", "digits-linear", "digits-huge-batch-no-warmup", "digits-huge-batch-warmup",
                 "shapes-gpu-noise", "digits-linear-noise"):
        sweep, path = load_sweep(name)
        assert path.name == f"{name}.yaml"
        assert main(["run", name, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "gbs000450-w001-s0: per-worker 450 = 1 x 450, 2 steps/epoch x 200 epochs" in out
    assert "gbs008192-w002-s0: per-worker 4096 = 1 x 4096, 7 steps/epoch x 30 epochs, peak lr 3.2" in out
    # shapes-gpu takes its micro-batches from a GPU memory probe: without one, a clear refusal.
    assert load_sweep("shapes-gpu")[0].max_micro_batch_size == "auto"
    assert main(["run", "shapes-gpu", "--dry-run", "--results-dir", str(tmp_path)]) == 2
    assert "auto needs a memory probe; run `batchscale probe-memory shapes-gpu" in capsys.readouterr().err
