"""Feeds: resident and streamed data give a run the same samples; ImageNet folders train end to end."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import psutil
import pytest
import torch
from torch.utils.data import Dataset

from bench import events as ev
from bench.config import SweepConfig
from bench.feed import STREAM_EVAL_BATCH, global_count, step_indices
from bench.plan import plan_sweep
from bench.store import SweepDir
from bench.worker import Trainer, WorkerContext, execute_run
from bench.workloads import imagenet
from bench.workloads.data import Data, epoch_permutation, normalise
from bench.workloads.streaming import StepBatchSampler, StreamingData

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec (docs/workloads.md)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


class U8Images(Dataset):
    """(uint8 CHW image, label) items, as ImageFolderDataset yields them, from tensors."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def _synthetic_sweep(**over) -> SweepConfig:
    # 60 samples at batch 24: steps of 24, 24 and a partial 12; micro-batches of 8 (accumulation).
    return SweepConfig.model_validate({
        "name": "feed", "workload": "synthetic", "model": "small_cnn",
        "workload_options": {"num_train": 60, "num_test": 20, "image_size": 8, "num_classes": 3},
        "lr": {"reference_lr": 0.05, "reference_batch_size": 24, "scaling": "none"}, "epochs": 3,
        "global_batch_sizes": [24], "max_micro_batch_size": 8, "seeds": [0], "target_accuracy": 0.5,
        "telemetry": {"enabled": False}, **over})


@pytest.mark.parametrize("loader_processes", [0, 2])
def test_streamed_and_resident_data_train_identically(tmp_path: Path, loader_processes: int):
    g = torch.Generator().manual_seed(3)
    x_tr, x_te = (torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8) for n in (60, 20))
    y_tr, y_te = torch.randint(0, 3, (60,), generator=g), torch.randint(0, 3, (20,), generator=g)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    resident = Data(normalise(x_tr, mean, std), y_tr, normalise(x_te, mean, std), y_te, num_classes=3)
    streamed = StreamingData(U8Images(x_tr, y_tr), U8Images(x_te, y_te), U8Images(x_tr, y_tr),
                                    num_classes=3, mean=mean, std=std, input_shape=(3, 8, 8),
                                    num_loader_workers=loader_processes, prefetch_factor=2)
    sweep = _synthetic_sweep()
    plan = plan_sweep(sweep)[0]
    assert (plan.steps_per_epoch, plan.grad_accum_steps) == (3, 3)
    finals = []
    for name, data in (("resident", resident), ("streamed", streamed)):
        run_dir = SweepDir(tmp_path / name).run(plan.run_id)
        run_dir.path.mkdir(parents=True)
        trainer = Trainer(plan, sweep, run_dir, WorkerContext(), data=data)
        try:
            summary = trainer.run()
            finals.append((summary, {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}))
        finally:
            trainer.close()
    (a, wa), (b, wb) = finals
    assert a.status == b.status == "success" and a.steps_completed == b.steps_completed == 9
    for key in wa:  # same samples, same order, same micro-batches: the same weights, bit for bit
        assert torch.equal(wa[key], wb[key]), key
    for key in ("final_train_loss", "final_test_loss", "final_train_acc", "final_test_acc", "samples_seen"):
        assert getattr(a, key) == getattr(b, key), key


def test_stream_sampler_shards_exactly_as_resident_steps():
    sweep = _synthetic_sweep(num_workers=[3], global_batch_sizes=[24], max_micro_batch_size=None)
    plan = plan_sweep(sweep)[0]
    perm = epoch_permutation(plan.num_train, plan.seed, 5)
    for rank in range(3):
        sampler = StepBatchSampler(60, 24, plan.steps_per_epoch, rank, 3, plan.seed)
        sampler.set_epoch(5)
        for step, indices in enumerate(sampler):
            expected, num_global = step_indices(perm, step, plan, rank)
            assert indices == expected.tolist()
            assert num_global == global_count(plan, step) == (24 if step < 2 else 12)


# --- ImageNet folders through the worker ---------------------------------------------------------

def _jpeg_folder(root: Path, per_class: dict[str, int]) -> Path:
    from PIL import Image

    for split, count in per_class.items():
        for c, name in enumerate(("n01", "n02")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                colour = (200, 30, 30) if c == 0 else (30, 30, 200)  # separable by colour
                Image.new("RGB", (240 + 10 * i, 230), colour).save(root / split / name / f"{i}.JPEG")
    return root


@pytest.mark.slow  # ~5 s each: DataLoader processes and JPEG decoding
@pytest.mark.parametrize("decode_on", ["loader", "device"])
def test_imagenet_folder_trains_in_process_and_leaves_no_loader_processes(tmp_path: Path, decode_on: str):
    root = _jpeg_folder(tmp_path / "imagenet", {"train": 4, "val": 2})
    sweep = SweepConfig.model_validate({
        "name": "inet", "workload": "imagenet", "model": "resnet18",
        "workload_options": {"root": str(root), "num_loader_workers": 2, "prefetch_factor": 1,
                             "train_eval_samples": 5, "decode_on": decode_on},
        "lr": {"reference_lr": 0.05, "reference_batch_size": 4, "scaling": "linear"}, "epochs": 2,
        "global_batch_sizes": [4], "max_micro_batch_size": 2, "seeds": [0], "target_accuracy": 0.9})
    plan = plan_sweep(sweep)[0]
    assert (plan.num_train, plan.num_test, plan.steps_per_epoch) == (8, 4, 2)
    run_dir = SweepDir(tmp_path / "results" / "inet").run(plan.run_id)
    run_dir.path.mkdir(parents=True)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    summary = execute_run(plan, sweep, run_dir, WorkerContext())
    assert summary.status == "success" and summary.steps_completed == 4 and summary.samples_seen == 16
    assert 0.0 <= summary.final_train_acc <= 1.0 and 0.0 <= summary.final_test_acc <= 1.0
    events = ev.read_events(run_dir.events_path)
    hyper = {e["key"]: e["value"] for e in events if e["event_type"] == ev.POINT_IN_TIME}
    assert hyper[ev.TRAIN_EVAL_SAMPLES] == 5 and hyper[ev.TRAIN_SAMPLES] == 8
    assert [e["metadata"]["epoch_num"] for e in events if e["key"] == ev.EVAL_ACCURACY] == [0, 1, 2]
    from types import SimpleNamespace

    from bench.report import _train_eval  # the report says what the train metrics (and the gap) cover

    assert _train_eval(SimpleNamespace(plan=plan.to_dict(), events=events)) == "5 of 8 training samples"
    # The feed stopped the persistent decoders; eval loaders' processes ended with their pass.
    new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    _, alive = psutil.wait_procs(new, timeout=10)  # an exiting loader process may take a moment
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
             and not p.name().startswith(("ray::", "raylet"))]  # the session's Ray, not ours
    assert alive == []


def test_train_eval_view_is_evenly_spaced_and_deterministic(tmp_path: Path):
    root = _jpeg_folder(tmp_path / "imagenet", {"train": 5, "val": 1})
    scan = imagenet.scan_split(str(root / "train"))
    train_tf, val_tf = imagenet.imagenet_train_transform(), imagenet.imagenet_val_transform()
    train = imagenet.ImageFolderDataset(scan, train_tf)
    view = train.evaluation_view(4, val_tf)
    assert view.paths.tolist() == scan.paths[[0, 3, 6, 9]].tolist() and train.transform is train_tf
    assert view.transform is val_tf
    assert [view[i][1] for i in range(4)] == [0, 0, 1, 1]  # both classes
    assert torch.equal(view[1][0], view[1][0])  # val transform: no randomness
    assert len(train.evaluation_view(100, val_tf)) == 10  # never more than the set
    assert STREAM_EVAL_BATCH >= 1


@pytest.mark.slow
def test_imagenet_sweep_through_ray_with_two_workers(ray_session, tmp_path: Path, capsys):
    from bench.cli import main

    root = _jpeg_folder(tmp_path / "imagenet", {"train": 4, "val": 2})
    sweep = tmp_path / "inet.yaml"
    sweep.write_text(f"""\
name: inet
workload: imagenet
model: resnet18
workload_options: {{root: {root}, num_loader_workers: 1, prefetch_factor: 1}}
lr: {{reference_lr: 0.05, reference_batch_size: 4, scaling: linear}}
epochs: 2
global_batch_sizes: [4]
num_workers: [2]
seeds: [0]
target_accuracy: 0.9
""")
    results = tmp_path / "results"
    assert main(["run", str(sweep), "--results-dir", str(results)]) == 0
    capsys.readouterr()
    assert main(["results", str(results / "inet"), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["run_id"], r["status"], r["per_worker_batch_size"]) for r in rows] == [("gbs000004-w002-s0", "success", "2")]
    summary = json.loads((results / "inet" / "gbs000004-w002-s0" / "summary.json").read_text())
    assert summary["samples_seen"] == 16 and summary["steps_completed"] == 4
    assert (results / "inet" / "gbs000004-w002-s0" / "telemetry-rank1.csv").exists()


def test_a_process_loads_a_workload_once_and_no_run_changes_it(tmp_path: Path):
    from bench import workloads
    from bench.workloads.tabular import load_digits
    from bench.workloads.vision_catalog import SyntheticOptions

    opts = SweepConfig.model_validate({
        "name": "d", "workload": "digits", "lr": {"reference_lr": 0.1, "reference_batch_size": 32}, "epochs": 2,
        "global_batch_sizes": [64], "seeds": [0, 1], "target_accuracy": 0.5,
        "telemetry": {"enabled": False}})
    first = workloads.load("digits", opts.options, 0)
    assert workloads.load("digits", opts.options, 1) is first  # the data do not depend on the seed
    for plan in plan_sweep(opts):  # two runs through the worker, each taking the shared copy
        run_dir = SweepDir(tmp_path / "d").run(plan.run_id)
        run_dir.path.mkdir(parents=True)
        assert execute_run(plan, opts, run_dir, WorkerContext()).status == "success"
    fresh = load_digits(opts.options)
    assert workloads.load("digits", opts.options, 0) is first
    assert torch.equal(first.x_train, fresh.x_train) and torch.equal(first.y_test, fresh.y_test)
    synthetic = SyntheticOptions(num_train=8, num_test=4, image_size=8)
    a = workloads.load("synthetic", synthetic, 0)
    assert workloads.load("synthetic", synthetic, 0) is a and workloads.load("synthetic", synthetic, 1) is not a
    other = workloads.load("digits", opts.options.model_copy(update={"test_fraction": 0.5}), 0)
    assert other is not first and other.num_test == 899
