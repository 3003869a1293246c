"""Bad input is refused at the door: one line naming file and key, exit code 2, nothing written.

Sweep files, cluster files (including what Ray Train would refuse only once it runs), the files
themselves (kind, size) and the command-line options of `run`, `results` and `report`."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from bench.cli import main
from bench.config import ClusterConfig, SweepConfig, load_cluster, load_sweep
from bench.safeio import read_yaml
from conftest import REPO, TINY_SWEEP, write_yaml

CASES = {
    "unknown key": (TINY_SWEEP + "learning_rate: 0.1\n", r"learning_rate: Extra inputs are not permitted"),
    "misspelt required key": (TINY_SWEEP.replace("{reference_lr:", "{refernce_lr:"),
                              r"lr.refernce_lr: unknown key; did you mean 'reference_lr'\?"),
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
    # Strict types (issue 14 item 12): YAML values are not guessed at.
    "epochs: true": (TINY_SWEEP.replace("epochs: 3", "epochs: true"),
                     r"epochs: Input should be a valid integer \(got a boolean\)"),
    "epochs: 3.0": (TINY_SWEEP.replace("epochs: 3", "epochs: 3.0"),
                    r"epochs: Input should be a valid integer \(got a number with a fraction\)"),
    "seeds as booleans": (TINY_SWEEP.replace("seeds: [0]", "seeds: [false, true]"),
                          r"seeds\[0\]: Input should be a valid integer \(got a boolean\) \(and 1 more problem\)"),
    "batch as a string": (TINY_SWEEP.replace("[32, 64]", '["64"]'),
                          r"global_batch_sizes\[0\]: Input should be a valid integer \(got a string\)"),
    "reference_lr as a string": (TINY_SWEEP.replace("reference_lr: 0.01", "reference_lr: '0.05'"),
                                 r"lr\.reference_lr: Input should be a valid number \(got a string\)"),
    "base_lr as a string": (TINY_SWEEP.replace("reference_lr: 0.01", "base_lr: '0.05'"),
                            r"lr\.base_lr: Input should be a valid number \(got a string\)"),
    "max_micro_batch_size as a string": (TINY_SWEEP + 'max_micro_batch_size: "16"\n',
                                         r"max_micro_batch_size: must be a whole number or 'auto' \(got a string\)"),
    "eval_every_steps true": (TINY_SWEEP + "eval_every_steps: true\n",
                              r"eval_every_steps: must be a whole number or 'auto' \(got a boolean\)"),
    "channels_last: yes": (TINY_SWEEP + 'channels_last: "yes"\n',
                           r"channels_last: Input should be a valid boolean \(got a string\)"),
    "name is a date": (TINY_SWEEP.replace("name: tiny", "name: 2026-12-01"),
                       r"name: Input should be a valid string \(got a date\)"),
    "infinite factor": (TINY_SWEEP + "divergence_loss_factor: .inf\n",
                        r"divergence_loss_factor: Input should be a finite number"),
    "workload option as a string": (TINY_SWEEP.replace("workload: blobs", "workload: digits")
                                    + 'workload_options: {test_fraction: "0.2"}\n',
                                    r"workload_options: test_fraction: Input should be a valid number"),
    "duplicate key": (TINY_SWEEP + "epochs: 5\n", r"line 9: key 'epochs' is given twice \(first on line 4\)"),
    "duplicate nested key": (TINY_SWEEP.replace("scaling: none}", "scaling: none, scaling: sqrt}"),
                             r"line 3: key 'scaling' is given twice \(first on line 3\)"),
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


def test_every_committed_config_still_validates():
    """Sweep and cluster files a run stored (written by earlier versions, e.g. base_lr), the
    packaged sweeps and the cluster files all validate under the strict rules."""
    stored = sorted((REPO / "results").glob("**/config.yaml"))
    clusters = sorted((REPO / "results").glob("**/cluster.yaml"))
    assert len(stored) >= 30 and len(clusters) >= 30
    for path in stored:
        SweepConfig.model_validate(read_yaml(path))
    for path in clusters:
        ClusterConfig.model_validate(read_yaml(path))
    for path in sorted((REPO / "bench" / "sweeps").glob("*.yaml")):
        load_sweep(path)
    for path in sorted((REPO / "clusters").glob("*.yaml")):
        if "name" in read_yaml(path):  # the others are launcher / KubeRay manifests
            load_cluster(path)


def _refused(argv: list[str], capsys, pattern: str, code: int = 2) -> str:
    assert main(argv) == code
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    return err


# --- the file itself: kind and size (issue 14 item 13) --------------------------------------------

def test_a_folder_a_device_or_a_fifo_is_not_a_sweep_file(tmp_path: Path, capsys):
    (tmp_path / "dir.yaml").mkdir()
    _refused(["run", str(tmp_path / "dir.yaml"), "--dry-run"], capsys, rf"{tmp_path}/dir.yaml: is a directory")
    _refused(["run", "/dev/zero", "--dry-run"], capsys, r"/dev/zero: is not a regular file")
    os.mkfifo(tmp_path / "fifo.yaml")  # reading it would block forever
    _refused(["run", str(tmp_path / "fifo.yaml"), "--dry-run"], capsys, r"fifo.yaml: is not a regular file")
    cluster = tmp_path / "cluster-dir"
    cluster.mkdir()
    _refused(["run", str(write_yaml(tmp_path / "s.yaml", TINY_SWEEP)), "--cluster", str(cluster), "--dry-run"],
             capsys, r"cluster-dir: is a directory")


def test_large_files_are_refused_naming_the_file(tmp_path: Path, capsys):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:
        fh.truncate(1_000_001)
    _refused(["run", str(big), "--dry-run"], capsys,
             r"big.yaml: is 1,000,001 bytes, above the 1,000,000-byte limit for a config file")
    flat = tmp_path / "flat.yaml"  # 990 KB, under the byte limit: refused while parsing
    flat.write_text(TINY_SWEEP.replace("seeds: [0]", "seeds: [" + ", ".join(["1"] * 330_000) + "]"))
    assert 980_000 < flat.stat().st_size < 1_000_000
    _refused(["run", str(flat), "--dry-run"], capsys, r"flat.yaml: has more than 10,000 YAML values; refused")


def test_alias_bomb_error_names_the_file(tmp_path: Path, capsys):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 9):
        bomb += f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 10) + "]\n"
    path = write_yaml(tmp_path / "bomb.yaml", bomb)
    _refused(["run", str(path), "--dry-run"], capsys, rf"{path}: too large or too deeply nested")


def test_a_linked_sweep_file_is_followed(tmp_path: Path, capsys):
    real = write_yaml(tmp_path / "real.yaml", TINY_SWEEP)
    (tmp_path / "link.yaml").symlink_to(real)
    assert main(["run", str(tmp_path / "link.yaml"), "--dry-run"]) == 0
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "gone.yaml")
    _refused(["run", str(tmp_path / "dangling.yaml"), "--dry-run"], capsys, r"dangling.yaml: no such file")


# --- cluster files: contradictions Ray would refuse only once it runs (issue 14 items 9-10) -------

CLUSTER_CASES = {
    "use_gpu: yes": ("use_gpu: 'yes'", r"use_gpu: Input should be a valid boolean \(got a string\)"),
    "GPU without use_gpu": ("resources_per_worker: {CPU: 1, GPU: 1}",
                            r"resources_per_worker.GPU is 1 but use_gpu is false \(Ray Train refuses that\)"),
    "GPU count a string": ("use_gpu: true\nresources_per_worker: {GPU: '2'}",
                           r"resources_per_worker.GPU: Input should be a valid number \(got a string\)"),
    "GPU count a word": ("use_gpu: true\nresources_per_worker: {GPU: two}",
                         r"resources_per_worker.GPU: Input should be a valid number \(got a string\)"),
    "lower-case gpu": ("resources_per_worker: {CPU: 1, gpu: 1}",
                       r"resources_per_worker: gpu: Ray's resource names are case-sensitive: write GPU"),
    "num_gpus as a key": ("resources_per_worker: {CPU: 1, num_gpus: 1}", r"num_gpus: .*write GPU"),
    "TPU": ("resources_per_worker: {CPU: 1, TPU: 4}", r"TPU: batchscale runs workers on CPUs or GPUs"),
    "nothing asked for": ("resources_per_worker: {CPU: 0}", r"resources_per_worker asks for nothing"),
    "empty resources": ("resources_per_worker: {}", r"resources_per_worker asks for nothing"),
    "finer than Ray's precision": ("resources_per_worker: {CPU: 0.00001}", r"finer than Ray's resource precision"),
    "one and a half GPUs": ("use_gpu: true\nresources_per_worker: {GPU: 1.5}",
                            r"GPU: 1.5; Ray allocates more than one GPU only in whole GPUs"),
    "GPU use_gpu but 0": ("use_gpu: true\nresources_per_worker: {CPU: 1, GPU: 0}",
                          r"use_gpu is true but resources_per_worker.GPU is 0"),
    "more GPUs than a node": ("use_gpu: true\nresources_per_worker: {GPU: 2}\nhardware: {gpus_per_node: 1}",
                              r"GPU is 2 but hardware.gpus_per_node is 1: no node can hold one worker"),
    "more CPUs than the local Ray": ("resources_per_worker: {CPU: 4}\nlocal_num_cpus: 2",
                                     r"CPU is 4 but local_num_cpus is 2: not even one worker fits"),
    "relative storage_path": ("storage_path: results/ray", r"storage_path: must be an absolute path"),
    "ray:// address": ("address: ray://head:10001",
                       r"address: ray:// \(Ray Client\) is not supported.*`ray job submit --address http://HEAD:8265"),
    "dashboard address": ("address: http://head:8265", r"address: http:// is the address of Ray's dashboard"),
    "address without port": ("address: head", r"address: must be auto or host:port"),
    "address port out of range": ("address: head:99999", r"address: must be auto or host:port"),
    "duplicate key": ("use_gpu: false\nuse_gpu: true", r"line 3: key 'use_gpu' is given twice \(first on line 2\)"),
}


@pytest.mark.parametrize("case", sorted(CLUSTER_CASES))
def test_bad_cluster_exits_2_before_anything_is_written(case, tmp_path: Path, capsys, monkeypatch):
    body, pattern = CLUSTER_CASES[case]
    cluster = write_yaml(tmp_path / "c.yaml", f"name: c\n{body}\n")
    sweep = write_yaml(tmp_path / "s.yaml", TINY_SWEEP)
    monkeypatch.chdir(tmp_path)
    # Without --dry-run: the refusal must come before Ray or the results folder is touched.
    err = _refused(["run", str(sweep), "--cluster", str(cluster), "--results-dir", str(tmp_path / "r")],
                   capsys, pattern)
    assert f"{cluster}:" in err
    assert not (tmp_path / "r").exists()


GOOD_CLUSTERS = {
    "memory in bytes": "resources_per_worker: {CPU: 1, memory: 4.0e+9}",  # refused before (limit 1e6)
    "two workers share a GPU": "use_gpu: true\nbackend: gloo\nresources_per_worker: {CPU: 1, GPU: 0.5}",
    "GPU from use_gpu alone": "use_gpu: true\nresources_per_worker: {CPU: 2}",
    "custom resource": "resources_per_worker: {CPU: 1, node_b: 1}",
    "address auto": "address: auto",
    "address host:port": "address: '10.0.0.5:6379'",
    "ipv6 address": "address: '[::1]:6379'",
    "URI storage": "storage_path: s3://bucket/results",
    "int for a float": "connect_timeout_s: 30",
}


@pytest.mark.parametrize("case", sorted(GOOD_CLUSTERS))
def test_good_cluster_files_validate(case, tmp_path: Path):
    load_cluster(write_yaml(tmp_path / "c.yaml", f"name: c\n{GOOD_CLUSTERS[case]}\n"))


def test_what_ray_train_refuses_is_refused_at_validation():
    """Pins our rules to Ray's: every (use_gpu, resources) that Ray Train's ScalingConfig or
    Ray's placement-group check refuses, ClusterConfig refuses too (launcher adds GPU: 1 with
    use_gpu, as bench.launcher.run_groups does)."""
    from ray.train import ScalingConfig
    from ray.util.placement_group import validate_placement_group

    grids = [{}, {"CPU": 0}, {"CPU": 1}, {"GPU": 1}, {"CPU": 1, "GPU": 0}, {"CPU": 1, "GPU": 0.5},
             {"CPU": 2, "GPU": 2}, {"TPU": 1}, {"CPU": 1, "TPU": 1}, {"memory": 1e9}]
    ray_refusals = 0
    for use_gpu in (False, True):
        for resources in grids:
            per_worker = dict(resources)
            if use_gpu:
                per_worker.setdefault("GPU", 1)
            try:
                scaling = ScalingConfig(num_workers=2, use_gpu=use_gpu, resources_per_worker=per_worker)
                bundle = scaling._resources_per_worker_not_none  # what Ray Train asks of each node
                validate_placement_group([bundle] * 2)
                ray_refuses = False
            except ValueError:
                ray_refuses = True
                ray_refusals += 1
            try:
                ClusterConfig.model_validate({"name": "c", "use_gpu": use_gpu, "resources_per_worker": resources,
                                              **({"backend": "gloo"} if use_gpu else {})})
                ours_refuses = False
            except ValueError:
                ours_refuses = True
            assert ours_refuses or not ray_refuses, (use_gpu, resources)
    assert ray_refusals >= 6  # the grid does reach Ray's checks (GPU/use_gpu, TPU, empty bundles)


def test_ray_address_from_the_environment_is_checked_too(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    sweep = write_yaml(tmp_path / "s.yaml", TINY_SWEEP)
    _refused(["run", str(sweep), "--results-dir", str(tmp_path / "r")], capsys,
             r"environment variable RAY_ADDRESS: ray:// \(Ray Client\) is not supported")
    assert not (tmp_path / "r").exists()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # what `ray job submit` sets: fine
    assert main(["run", str(sweep), "--dry-run"]) == 0


# --- command-line options (issue 14 item 14) ------------------------------------------------------

@pytest.fixture
def results(tmp_path: Path) -> Path:
    from fixtures_results import write_sweep

    return write_sweep(tmp_path / "results", "demo", batches=(4, 16), seeds=(0,), epochs=4)


def test_results_dir_that_is_a_file_is_refused_before_ray(tmp_path: Path, capsys, monkeypatch):
    import bench.launcher

    monkeypatch.setattr(bench.launcher, "connect", lambda *a, **k: pytest.fail("connected to Ray"))
    sweep = write_yaml(tmp_path / "s.yaml", TINY_SWEEP)
    (tmp_path / "file").write_text("x")
    _refused(["run", str(sweep), "--results-dir", str(tmp_path / "file")], capsys,
             rf"--results-dir {tmp_path}/file: {tmp_path}/file is not a folder")
    _refused(["run", str(sweep), "--results-dir", str(tmp_path / "file" / "r")], capsys, r"is not a folder")


@pytest.mark.parametrize("command", ["results", "report"])
def test_results_and_report_need_an_existing_folder(command, tmp_path: Path, capsys):
    extra = ["-o", str(tmp_path / "r.html")] if command == "report" else []
    _refused([command, str(tmp_path / "nope"), *extra], capsys, rf"{tmp_path}/nope: no such results folder")
    (tmp_path / "file").write_text("x")
    _refused([command, str(tmp_path / "file"), *extra], capsys, rf"{tmp_path}/file: not a folder")
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("value", ["-5", "0", "1.5", "nan", "inf"])
def test_report_target_accuracy_is_a_fraction(value, results: Path, tmp_path: Path, capsys):
    out = tmp_path / "out" / "r.html"
    _refused(["report", str(results), "-o", str(out), "--target-accuracy", value], capsys,
             r"--target-accuracy .*: must be a fraction in \(0, 1\]")
    assert not out.parent.exists()


def test_report_output_must_be_a_writable_file(results: Path, tmp_path: Path, capsys):
    (tmp_path / "folder").mkdir()
    _refused(["report", str(results), "-o", str(tmp_path / "folder")], capsys, r"-o .*folder: is a folder")
    (tmp_path / "plain").write_text("x")
    _refused(["report", str(results), "-o", str(tmp_path / "plain" / "r.html")], capsys,
             rf"-o .*: {tmp_path}/plain is not a folder")
    os.mkfifo(tmp_path / "fifo.html")
    _refused(["report", str(results), "-o", str(tmp_path / "fifo.html")], capsys, r"exists and is not a regular file")
    if os.geteuid() != 0:  # root ignores permission bits; the cases above hold for root too
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _refused(["report", str(results), "-o", str(locked / "r.html")], capsys, r"not writable")


def test_argparse_mistakes_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["report", "x", "-o", "r.html", "--target-accuracy", "abc"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid float value: 'abc'" in err and "batchscale report --help" in err
