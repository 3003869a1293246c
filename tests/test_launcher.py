"""The launcher's parts that need no Ray: will a worker group fit (known answers), refusals before
a local Ray starts, fault hooks, checkpoints in the run folder, the driver-alive probe, start-up and
restart times, and the progress tail across a rewritten event log. Ray's own behaviour that these
rely on is pinned in tests/test_launcher_ray.py."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from bench import faults, launcher
from bench.cli import main
from bench.clusterprobe import check_reachable, host_port, probe_cause
from bench.config import ClusterConfig
from bench.errors import LauncherError, UserError
from bench.groupstate import (CheckpointWriter, DriverLock, Restart, attempts, driver_lock,
                              load_checkpoint)
from bench.placement import placement_problem, worker_resources
from bench.runner import describe_group
from bench.store import SweepDir
from conftest import TINY_SWEEP, write_yaml

# --- will it fit? -----------------------------------------------------------------------------

# clusters/aws-gpu.yaml: a CPU head and two p5.48xlarge nodes
HEAD, P5 = {"CPU": 16.0}, {"CPU": 192.0, "GPU": 8.0, "node:10.0.0.7": 1.0, "accelerator_type:H100": 1.0}
AWS = [HEAD, P5, P5]


def test_worker_resources_follow_ray_train():
    assert worker_resources({"CPU": 8, "GPU": 0}, use_gpu=False) == {"CPU": 8.0}  # zeros dropped
    assert worker_resources({"CPU": 1}, use_gpu=True) == {"CPU": 1.0, "GPU": 1.0}  # one GPU by default
    assert worker_resources({"CPU": 4, "GPU": 0.5}, use_gpu=True) == {"CPU": 4.0, "GPU": 0.5}


def test_sixteen_h100_workers_fit_two_p5_nodes_and_seventeen_do_not():
    need = {"CPU": 8.0, "GPU": 1.0}
    assert placement_problem(need, 16, AWS) is None  # 8 per node: 8 x 8 CPUs = 64 <= 192
    assert placement_problem(need, 17, AWS) == "17 workers x 1 GPU = 17 GPU, but the cluster has 16 GPU"


def test_totals_that_fit_are_not_enough_when_no_node_holds_a_worker_bundle():
    # 3 x {CPU: 100, GPU: 1}: 300 of 400 CPUs and 3 of 16 GPUs in total, but a p5 node holds one
    # such worker (192 // 100) and the head none (no GPU): 2 places.
    problem = placement_problem({"CPU": 100.0, "GPU": 1.0}, 3, AWS)
    assert problem == ("each worker needs {CPU: 100, GPU: 1} on one node, and the nodes of the cluster hold "
                       "only 2 such workers (1 node with {CPU: 16, GPU: 0}: 0 each; "
                       "2 nodes with {CPU: 192, GPU: 8}: 1 each)")


def test_a_resource_no_node_has_is_named_and_ray_markers_are_not_listed():
    problem = placement_problem({"CPU": 1.0, "TPU": 1.0}, 1, AWS)
    assert problem == "each worker needs {CPU: 1, TPU: 1}, but the cluster has no 'TPU' resource at all (it has CPU, GPU)"


def test_two_workers_share_one_gpu_exactly():
    node = {"CPU": 8.0, "GPU": 1.0}
    assert placement_problem({"CPU": 4.0, "GPU": 0.5}, 2, [node]) is None
    assert placement_problem({"CPU": 2.0, "GPU": 0.5}, 3, [node]) == "3 workers x 0.5 GPU = 1.5 GPU, but the cluster has 1 GPU"


def test_an_autoscaler_ceiling_replaces_the_live_nodes():
    ceiling = {"CPU": 400.0, "GPU": 16.0}  # head + 2 x p5 at most; only the head is up yet
    need = {"CPU": 8.0, "GPU": 1.0}
    assert placement_problem(need, 16, [HEAD], max_totals=ceiling) is None
    assert placement_problem(need, 17, [HEAD], max_totals=ceiling) == \
        "17 workers x 1 GPU = 17 GPU, but the cluster has at most 16 GPU"
    assert "nor can its autoscaler add it" in placement_problem({"TPU": 1.0}, 1, [HEAD], max_totals=ceiling)


# --- refusals before a local Ray starts ---------------------------------------------------------

def _forbid_ray(monkeypatch) -> None:
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started or joined before the refusal")

    monkeypatch.setattr(launcher, "connect", no_ray)
    monkeypatch.setattr(launcher, "run_groups", no_ray)
    monkeypatch.setattr(launcher, "_ray_connected", lambda: False)  # as in a fresh CLI process


@pytest.mark.parametrize("cluster_yaml, expect", [
    ("use_gpu: true\nresources_per_worker: {CPU: 1, GPU: 1}\n",
     "cluster 'c': cannot start 1 worker: each worker needs {CPU: 1, GPU: 1}, but a local Ray on this machine "
     "has no 'GPU' resource at all (it has CPU); torch sees no CUDA device here: set use_gpu: false (backend "
     "gloo) or run where a GPU is visible"),
    ("use_gpu: true\nbackend: nccl\n", "has no 'GPU' resource at all"),
    ("resources_per_worker: {CPU: 1, foo: 1}\n", "has no 'foo' resource at all (it has CPU); a custom resource "
     "needs a cluster whose nodes declare it (`ray start --resources`)"),
    # These two are contradictions within the cluster file: refused earlier, at validation (exit 2).
    ("resources_per_worker: {CPU: 1, TPU: 1}\n", "resources_per_worker: TPU: batchscale runs workers on CPUs or GPUs"),
    ("local_num_cpus: 1\nresources_per_worker: {CPU: 2}\n",
     "resources_per_worker.CPU is 2 but local_num_cpus is 1: not even one worker fits in the local Ray"),
], ids=["use-gpu", "nccl", "custom", "tpu", "cpus"])
def test_a_local_ray_that_could_not_hold_the_workers_is_refused_before_it_starts(
        cluster_yaml, expect, tmp_path: Path, capsys, monkeypatch):
    _forbid_ray(monkeypatch)
    monkeypatch.setattr(launcher, "local_num_gpus", lambda: 0)  # a machine without a GPU, wherever this runs
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    sweep = write_yaml(tmp_path / "s.yaml", TINY_SWEEP)
    cluster = write_yaml(tmp_path / "c.yaml", "name: c\n" + cluster_yaml)
    code = main(["run", str(sweep), "--cluster", str(cluster), "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expect in err, err
    if expect.startswith("resources_per_worker"):
        assert code == 2 and err.startswith(f"batchscale: error: {cluster}: ")
    else:
        assert code == 1 and err.startswith("batchscale: error: cluster 'c': cannot start 1 worker: ")
    assert not (tmp_path / "r").exists()  # nothing written, no lock taken


def test_a_ray_address_that_is_not_host_port_is_refused():
    with pytest.raises(LauncherError, match=r"'ray://head:10001' is not host:port"):
        host_port("ray://head:10001")
    assert host_port("[::1]:6379") == ("::1", 6379)
    with pytest.raises(LauncherError, match="cannot reach the Ray cluster at 127.0.0.1:9 within 2 s"):
        check_reachable("127.0.0.1:9", 2.0)


def test_probe_cause_takes_the_childs_error_else_rays_last_log_line():
    assert probe_cause(["imported", "error: ConnectionError: Could not find any running Ray instance."], "") == \
        "ConnectionError: Could not find any running Ray instance."
    stderr = ("[2026-12-02 16:52:23,320 W 23898 23898] rpc_client.h:153: Failed to connect to GCS at address "
              "192.0.2.2:18765 within 5 seconds.\n"
              "[2026-12-02 16:52:58,332 W 23898 23898] gcs_client.cc:210: Failed to get cluster ID from GCS "
              "server: TimedOut: Timed out while waiting for GCS to become available.\n")
    assert probe_cause(["imported"], stderr) == ("Failed to get cluster ID from GCS server: TimedOut: Timed out "
                                                 "while waiting for GCS to become available.")
    assert probe_cause(["imported"], "") == ""


# --- fault hooks (bench.faults) ------------------------------------------------------------------

class Exited(Exception):
    pass


def _exit(code: int):
    raise Exited(code)


def test_fault_spec_parsing():
    assert faults.parse("gbs000050-w002-s3:3") == faults.Fault("gbs000050-w002-s3", 3)
    assert faults.parse("r:1:stall") == faults.Fault("r", 1, stall=True)
    assert faults.parse("r:1:stall").spec == "r:1:stall"
    assert faults.from_environment({}) is None and faults.from_environment({"BATCHSCALE_FAULT": " "}) is None
    assert faults.from_environment({"BATCHSCALE_FAULT": "r:2"}) == faults.Fault("r", 2)
    for bad in ("r", "r:x", ":3", "r:3:explode", "r:3:stall:x"):
        with pytest.raises(UserError, match="BATCHSCALE_FAULT="):
            faults.parse(bad)


def test_kill_fault_hits_the_last_rank_once_at_its_epoch(monkeypatch):
    monkeypatch.setattr(os, "_exit", _exit)
    hook = faults.Fault("run", 3)
    hook("run", 2, False, 1, 2)  # another epoch
    hook("other", 3, False, 1, 2)  # another run
    hook("run", 3, False, 0, 2)  # rank 0 lives
    hook("run", 3, True, 1, 2)  # resumed from a checkpoint: already past it
    with pytest.raises(Exited) as exited:
        hook("run", 3, False, 1, 2)
    assert exited.value.args == (faults.KILL_EXIT_CODE,)


def test_stall_fault_sleeps_on_every_rank(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    hook = faults.Fault("run", 1, stall=True)
    for rank in (0, 1):
        hook("run", 1, True, rank, 2)
    hook("run", 2, False, 0, 2)
    assert slept == [faults.STALL_S, faults.STALL_S]


# --- checkpoints in the run folder (bench.groupstate) --------------------------------------------

def _state(run_id: str, epoch: int) -> dict:
    torch = pytest.importorskip("torch")
    torch.manual_seed(epoch)
    model = torch.nn.Linear(3, 2)
    return {"run_id": run_id, "epoch": epoch, "model": model.state_dict(), "metrics": {"test_acc": 0.5}}


def test_rank0_checkpoint_round_trip_and_other_ranks_write_nothing(tmp_path: Path):
    torch = pytest.importorskip("torch")
    run = SweepDir(tmp_path / "s").run("r1")
    run.path.mkdir(parents=True)
    writer = CheckpointWriter(str(tmp_path / "s"))
    assert load_checkpoint(run) is None
    writer("r1", None)  # rank 1: nothing
    assert not run.checkpoint_path.exists() and writer.count == 0
    writer("r1", _state("r1", 2))
    writer("r1", _state("r1", 4))
    got = load_checkpoint(run)
    assert got["epoch"] == 4 and torch.equal(got["model"]["weight"], _state("r1", 4)["model"]["weight"])
    assert writer.count == 2 and writer.seconds > 0
    assert sorted(p.name for p in run.path.iterdir()) == ["checkpoint.pt"]  # no temp file left


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path):
    run = SweepDir(tmp_path / "s").run("r1")
    run.path.mkdir(parents=True)
    CheckpointWriter(str(tmp_path / "s"))("r1", _state("r1", 2))

    def half_then_fail(fh):
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        run.write_checkpoint(half_then_fail)
    assert load_checkpoint(run)["epoch"] == 2
    assert sorted(p.name for p in run.path.iterdir()) == ["checkpoint.pt"]


def test_a_checkpoint_of_another_run_or_behind_a_link_is_refused(tmp_path: Path):
    from bench.safeio import UnsafeFile

    sweep = SweepDir(tmp_path / "s")
    for rid in ("r1", "r2"):
        sweep.run(rid).path.mkdir(parents=True)
    CheckpointWriter(str(sweep.path))("r1", _state("r1", 2))
    os.replace(sweep.run("r1").checkpoint_path, sweep.run("r2").checkpoint_path)
    with pytest.raises(LauncherError, match="is not a checkpoint of run r2"):
        load_checkpoint(sweep.run("r2"))
    sweep.run("r1").checkpoint_path.symlink_to(sweep.run("r2").checkpoint_path)
    with pytest.raises(UnsafeFile, match="symbolic link"):
        load_checkpoint(sweep.run("r1"))


# --- is the driver alive? (bench.groupstate.DriverLock) ------------------------------------------

def test_driver_alive_while_this_process_holds_the_lock_and_not_after(tmp_path: Path):
    sweep = SweepDir(tmp_path / "s")
    sweep.claim("s", "hash")
    sweep.lock()
    alive = driver_lock(sweep)
    assert alive.token == str(os.getpid()).encode()
    assert alive() is True and alive() is True  # probing leaves the lock as it was
    sweep.unlock()
    assert alive() is False
    assert DriverLock(str(tmp_path / "nowhere" / ".lock"), b"1")() is False


# --- start-up and restarts, reported apart -------------------------------------------------------

def test_start_up_and_restart_times_from_the_attempt_records():
    fit = 1000.0
    entered = [(1009.1, ""), (1081.5, "")]  # the second attempt entered 81.5 s after fit()
    failed = [(1069.2, "ActorDiedError"), (1070.0, "ActorDiedError")]
    start_s, restarts = attempts(entered, failed, fit)
    assert start_s == pytest.approx(9.1)  # not 81.5: the first attempt's training is not start-up
    assert restarts == [Restart("ActorDiedError", pytest.approx(12.3))]
    assert attempts(entered, [], fit)[1] == [Restart("", None)]  # failure not recorded: unknown
    assert attempts([], [], fit) == (None, [])


def test_describe_group_says_start_up_and_restarts_separately():
    g = launcher.GroupStart(num_workers=2, num_runs=1, start_s=9.1,
                            restarts=[Restart("ActorDiedError", 12.3)], checkpoint_s=0.0412, num_checkpoints=3)
    assert describe_group(1, g) == ("worker group 1 (2 workers, 1 run): start-up 9.1 s; 1 restart after a "
                                    "worker failure (ActorDiedError), 12.3 s to resume; 3 checkpoints written in 41 ms")
    plain = launcher.GroupStart(num_workers=1, num_runs=2, start_s=None)
    assert describe_group(2, plain) == "worker group 2 (1 worker, 2 runs): start-up unknown"


# --- fit() off the main thread ---------------------------------------------------------------------

class FakeTrainer:
    def __init__(self, fit):
        self.fit = fit


def test_fit_runs_where_no_signal_handler_can_be_installed():
    """Ray Train installs its SIGINT handler only from the main thread (checked with the real
    trainer in tests/test_launcher_ray.py); _fit's thread cannot install one at all."""
    before = signal.getsignal(signal.SIGINT)

    def tries_to_take_sigint():
        signal.signal(signal.SIGINT, lambda *a: None)

    with pytest.raises(ValueError, match="main thread"):
        launcher._fit(FakeTrainer(tries_to_take_sigint))
    assert signal.getsignal(signal.SIGINT) is before
    assert launcher._fit(FakeTrainer(lambda: "result")) == "result"


def test_fit_failures_become_one_line():
    class TrainingFailedError(Exception):
        pass

    def fails():
        raise TrainingFailedError("Training failed.\nTraceback ...\nActorDiedError: the worker died")

    with pytest.raises(LauncherError, match="^training failed in the worker group: ActorDiedError: the worker died$"):
        launcher._fit(FakeTrainer(fails))


# --- the progress tail across a rewritten log ----------------------------------------------------

def _event(key: str, **metadata) -> str:
    return json.dumps({"key": key, "value": None, "metadata": metadata}) + "\n"


def test_progress_tail_rereads_a_log_cut_back_to_a_checkpoint(tmp_path: Path):
    from bench import events as ev
    from bench.progress import _Tail

    log = tmp_path / "events.jsonl"
    head = _event(ev.RUN_START) + "".join(_event(ev.EPOCH_STOP, epoch_num=e, step=10 * e) for e in (1, 2))
    log.write_text(head + _event(ev.EPOCH_STOP, epoch_num=3, step=30))
    tail = _Tail(log, total_epochs=4)
    tail.poll()
    assert tail.epochs == 3
    # the group restarts from epoch 2's checkpoint and has already redone epoch 3 (and more)
    log.write_text(head + _event(ev.EPOCH_STOP, epoch_num=3, step=30, redone=True))
    tail.poll()
    assert tail.epochs == 3
    with open(log, "a") as fh:
        fh.write(_event(ev.EPOCH_STOP, epoch_num=4, step=40) + _event(ev.RUN_STOP, status="success"))
    tail.poll()
    assert tail.epochs == 4 and tail.stopped == {"status": "success"}
    log.write_text(_event(ev.RUN_START))  # restarted from scratch (no checkpoint): shorter
    tail.poll()
    assert (tail.epochs, tail.stopped, tail.started) == (0, None, True)


def test_local_cluster_needs_no_gpu_check(monkeypatch):
    """Without use_gpu a local preflight does not import torch (the driver stays light)."""
    monkeypatch.setattr(launcher, "_ray_connected", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(launcher, "local_num_gpus", lambda: (_ for _ in ()).throw(AssertionError("asked")))
    launcher.preflight(ClusterConfig(name="local"), max_workers=1)


def test_checkpoint_cost_arithmetic():
    """bench.perf checkpoint-cost: costs in % of training time, median over rounds."""
    from bench.perf.checkpoint_cost import costs, summarise

    a = {"train_s": 20.0, "run_s": 28.0, "checkpoint_s": 0.0}
    b = {"train_s": 20.5, "run_s": 29.0, "checkpoint_s": 0.41}
    assert costs(a, b) == {"direct_pct": pytest.approx(2.0), "end_to_end_pct": pytest.approx(5.0)}
    stats = summarise([{"direct_pct": 1.0, "end_to_end_pct": 3.0}, {"direct_pct": 2.0, "end_to_end_pct": -1.0},
                       {"direct_pct": 4.0, "end_to_end_pct": 2.0}])
    assert stats == {"direct_pct": {"median": 2.0, "min": 1.0, "max": 4.0},
                     "end_to_end_pct": {"median": 2.0, "min": -1.0, "max": 3.0}}
