"""A Ray Train worker dies mid-run: the group restarts and the run resumes from its checkpoint,
which rank 0 wrote into the run folder (no ray.train.report); start-up and the restart are
reported apart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import yaml

from bench import events as ev
from bench.cli import main
from bench.config import SweepConfig
from bench.plan import plan_sweep
from bench.store import SweepDir
from bench.worker import WorkerContext, execute_run
from conftest import write_yaml

pytestmark = pytest.mark.slow

SWEEP = """\
name: faulty
workload: blobs
lr: {reference_lr: 0.01, reference_batch_size: 32, scaling: none}
epochs: 6
global_batch_sizes: [50]
num_workers: [2]
seeds: [3]
target_accuracy: 0.7
"""
CLUSTER = """\
name: local-restarts
max_failures: 1
checkpoint_every_epochs: 2
"""


def test_worker_killed_mid_run_resumes_from_checkpoint(ray_session, tmp_path: Path, monkeypatch, capsys):
    sweep = write_yaml(tmp_path / "s.yaml", SWEEP)
    cluster = write_yaml(tmp_path / "c.yaml", CLUSTER)
    # Reference: the same run uninterrupted, in-process on one worker (which test_worker shows
    # equals two gloo ranks), so the test pays for one worker-group start, not two.
    ref_sweep = SweepConfig.model_validate({**yaml.safe_load(SWEEP), "num_workers": [1]})
    plan = plan_sweep(ref_sweep)[0]
    ref_dir = SweepDir(tmp_path / "ref").run(plan.run_id)
    ref_dir.path.mkdir(parents=True)
    ref = execute_run(plan, ref_sweep, ref_dir, WorkerContext())
    # Kill rank 1 right after epoch 3; the last checkpoint is after epoch 2.
    monkeypatch.setenv("BATCHSCALE_FAULT", "gbs000050-w002-s3:3")
    assert main(["run", str(sweep), "--cluster", str(cluster), "--results-dir", str(tmp_path / "hit")]) == 0
    out = capsys.readouterr().out
    # start-up is the first attempt's alone; the restart is reported with its own time
    assert re.search(r"worker group 1 \(2 workers, 1 run\): start-up \d+\.\d s; 1 restart after a worker "
                     r"failure( \([A-Za-z, ]+\))?, \d+\.\d s to resume; \d checkpoints? written in \d+( ms|\.\d s)", out), out

    run = "faulty/gbs000050-w002-s3"
    assert not (tmp_path / "hit" / run / "checkpoint.pt").exists()  # deleted once the run completed
    events = ev.read_events(tmp_path / "hit" / run / "events.jsonl")
    epochs = [e["metadata"]["epoch_num"] for e in events if e["key"] == ev.EPOCH_STOP]
    assert epochs == [1, 2, 3, 4, 5, 6]  # every epoch exactly once: none missing, none twice
    evals = [e["metadata"]["epoch_num"] for e in events if e["key"] == ev.EVAL_ACCURACY]
    assert evals == [0, 1, 2, 3, 4, 5, 6]
    assert [e["key"] for e in events].count(ev.RUN_START) == 1
    steps = [e["metadata"]["step"] for e in events if e["key"] == ev.EVAL_ACCURACY]
    assert steps == [0, 10, 20, 30, 40, 50, 60]

    import json
    hit = json.loads((tmp_path / "hit" / run / "summary.json").read_text())
    assert hit["status"] == "success" and hit["steps_completed"] == ref.steps_completed == 60
    # Same seed, same data order, same LR schedule: the same model up to reduction-order noise.
    assert hit["final_train_loss"] == pytest.approx(ref.final_train_loss, rel=1e-3)
    assert hit["final_test_acc"] == pytest.approx(ref.final_test_acc, abs=0.01)
