"""End to end through Ray Train on CPU: two gloo workers, resume, and a dead cluster address."""

from __future__ import annotations

import csv
import io
import signal
import time
from pathlib import Path

import pytest

from bench.cli import main
from conftest import TINY_SWEEP, write_yaml

pytestmark = pytest.mark.slow

TWO_WORKERS = TINY_SWEEP.replace("num_workers: [1]", "num_workers: [2]").replace("epochs: 3", "epochs: 4")


def results_rows(capsys, path: Path) -> list[dict]:
    capsys.readouterr()
    assert main(["results", str(path), "--format", "csv"]) == 0
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


def test_sweep_two_gloo_workers_then_resume(ray_session, tmp_path: Path, capsys):
    sweep = write_yaml(tmp_path / "two.yaml", TWO_WORKERS)
    results = tmp_path / "results"
    sigint = signal.getsignal(signal.SIGINT)
    assert main(["run", str(sweep), "--results-dir", str(results)]) == 0
    # fit() ran off the main thread, so Ray Train installed no SIGINT handler of its own (in the main
    # thread it does: abort and exit 1); Ctrl-C stays batchscale's (tests/test_reliability.py)
    assert signal.getsignal(signal.SIGINT) is sigint
    out = capsys.readouterr().out
    assert "2 to run" in out and "1 worker-group start(s)" in out  # one group for both runs
    assert "worker group 1 (2 workers, 2 runs): start-up " in out and "restart" not in out
    rows = results_rows(capsys, results / "tiny")
    assert [r["run_id"] for r in rows] == ["gbs000032-w002-s0", "gbs000064-w002-s0"]
    assert all(r["status"] == "success" and r["per_worker_batch_size"] in ("16", "32") for r in rows)
    assert all(float(r["final_test_acc"]) > 0.5 for r in rows)
    run = results / "tiny" / "gbs000064-w002-s0"
    assert (run / "telemetry-rank0.csv").exists() and (run / "telemetry-rank1.csv").exists()

    # An interrupted run (no summary) is redone; the complete one is skipped.
    (run / "summary.json").unlink()
    assert main(["run", str(sweep), "--results-dir", str(results)]) == 0
    assert "1 already complete, 1 to run" in capsys.readouterr().out
    rows = results_rows(capsys, results / "tiny")
    assert sorted(r["run_id"] for r in rows) == ["gbs000032-w002-s0", "gbs000064-w002-s0"]

    # Nothing left to do: no Ray work at all.
    assert main(["run", str(sweep), "--results-dir", str(results)]) == 0
    assert "2 already complete, 0 to run" in capsys.readouterr().out


def test_changed_config_refuses_to_mix_results(tmp_path: Path, capsys):
    results = tmp_path / "results"
    (results / "tiny").mkdir(parents=True)
    (results / "tiny" / "sweep.json").write_text('{"sweep": "tiny", "config_hash": "0000"}')
    sweep = write_yaml(tmp_path / "s.yaml", TINY_SWEEP)
    assert main(["run", str(sweep), "--results-dir", str(results)]) == 1
    assert "holds results of a different configuration" in capsys.readouterr().err


def test_unreachable_cluster_fails_fast(tmp_path: Path, capsys):
    cluster = write_yaml(tmp_path / "c.yaml", "name: dead\naddress: 127.0.0.1:9\nconnect_timeout_s: 2\n")
    sweep = write_yaml(tmp_path / "s.yaml", TINY_SWEEP)
    t0 = time.monotonic()
    code = main(["run", str(sweep), "--cluster", str(cluster), "--results-dir", str(tmp_path / "r")])
    assert code == 1 and time.monotonic() - t0 < 10
    assert not (tmp_path / "r").exists()  # nothing written
    err = capsys.readouterr().err
    assert "cannot reach the Ray cluster at 127.0.0.1:9" in err and "Traceback" not in err


def test_ray_address_from_the_environment_is_joined_not_restarted(tmp_path: Path, capsys, monkeypatch):
    # A `ray job submit` entrypoint runs with RAY_ADDRESS set; the default (address: null) cluster
    # file must join that cluster (here a dead one: fail fast, naming it), never pass num_cpus.
    from bench.config import ClusterConfig
    from bench.launcher import cluster_address

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    assert cluster_address(ClusterConfig(name="local")) == "127.0.0.1:9"
    assert cluster_address(ClusterConfig(name="c", address="10.0.0.5:6379")) == "10.0.0.5:6379"
    sweep = write_yaml(tmp_path / "s.yaml", TINY_SWEEP)
    cluster = write_yaml(tmp_path / "c.yaml", "name: local\nconnect_timeout_s: 2\n")
    code = main(["run", str(sweep), "--cluster", str(cluster), "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and "cannot reach the Ray cluster at 127.0.0.1:9" in err and "Traceback" not in err
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster_address(ClusterConfig(name="local")) is None
