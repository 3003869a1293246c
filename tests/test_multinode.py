"""Multi-node, proven on one machine (issue 16 part 3): a Ray cluster of a head (no CPUs: the
driver, Ray Train's controllers and the run book only) and two 1-CPU worker nodes, each with its
own custom resource, from ``ray.cluster_utils.Cluster``. The driver is ``python -m bench run`` in
a subprocess joining it through a cluster file's ``address`` (the path a real cluster takes).

- the runs of one sweep land on both nodes at once and every result arrives in the results
  folder; a 2-worker gloo run spread over both nodes gives the model one process gives;
- a node removed mid-sweep costs only the run in flight there, which the other node's lane
  resumes from its checkpoint: nothing lost, nothing done twice.

What only a real cluster shows (NCCL across nodes, shared-storage latency) is in docs/clusters.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench import events as ev
from bench.config import SweepConfig
from bench.plan import plan_sweep
from bench.store import SweepDir
from conftest import REPO, write_yaml
from test_concurrency import blobs_sweep, lane_records, run_span_ms
from test_reliability import _finish

pytestmark = pytest.mark.slow

DEADLINE_S = 400  # three worker-group starts on a loaded 2-core machine; fail rather than hang


@pytest.fixture(scope="module")
def two_nodes():
    """(cluster, {node id: 'a' | 'b'}, the node handles). Independent of the session's own Ray."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        handles = {name: cluster.add_node(num_cpus=1, resources={f"node_{name}": 1}) for name in ("a", "b")}
        cluster.wait_for_nodes()
        names = {h.node_id: name for name, h in handles.items()}
        yield cluster, names, handles
    finally:
        cluster.shutdown()


def driver(tmp_path: Path, cluster, sweep_text: str, cluster_text: str = "") -> subprocess.Popen:
    sweep = write_yaml(tmp_path / "sweep.yaml", sweep_text)
    cfile = write_yaml(tmp_path / "cluster.yaml", f"name: two-nodes\naddress: {cluster.address}\n" + cluster_text)
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHSCALE_FAULT", "RAY_ADDRESS")}
    return subprocess.Popen([sys.executable, "-m", "bench", "run", str(sweep), "--cluster", str(cfile),
                             "--results-dir", str(tmp_path / "r")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


SPREAD = blobs_sweep("spread", max_steps=2000, global_batch_sizes=[10, 20], num_workers=[1, 2],
                     max_concurrent_runs="auto")


def test_runs_land_on_both_nodes_and_a_gloo_run_over_two_nodes_equals_one_process(two_nodes, tmp_path: Path):
    cluster, names, _ = two_nodes
    code, out, err = _finish(driver(tmp_path, cluster, SPREAD), DEADLINE_S)
    assert code == 0, f"{out}\n{err[-3000:]}"
    assert "max_concurrent_runs auto: up to 2 runs of 1 worker at once (the cluster holds 2 workers of {CPU: 1})" in out
    folder = tmp_path / "r" / "spread"
    sweep = SweepConfig.model_validate(yaml.safe_load(SPREAD))
    plans = plan_sweep(sweep)
    summaries = {p.run_id: SweepDir(folder).run(p.run_id).read_summary() for p in plans}
    assert all(s is not None and s.status == "success" for s in summaries.values()), out  # all arrived
    taken = lane_records(folder)
    assert sorted(r["run_id"] for r in taken) == sorted(summaries)  # each run taken once

    # The one-worker runs: one lane per node, at the same time; each summary names its node.
    single = [r for r in taken if summaries[r["run_id"]].hardware.num_workers == 1]
    assert sorted(names[r["node_id"]] for r in single) == ["a", "b"]
    for r in single:
        assert summaries[r["run_id"]].hardware.nodes == [r["node_id"]]
    (s1, e1), (s2, e2) = (run_span_ms(folder / r["run_id"] / "events.jsonl") for r in single)
    assert s1 < e2 and s2 < e1, "the two one-worker runs did not overlap"

    # The two-worker runs: a 1-CPU node holds one worker, so their ranks sit on both nodes (gloo
    # over TCP between them); each trains the model that one worker on one node trains for the
    # same global batch (the sweep's one-worker run; test_worker: that equals 2 ranks on one node).
    for plan in (p for p in plans if p.num_workers == 2):
        spread = summaries[plan.run_id]
        one = summaries[plan.run_id.replace("-w002-", "-w001-")]
        assert sorted(names[n] for n in spread.hardware.nodes) == ["a", "b"]
        assert spread.steps_completed == one.steps_completed == 2000
        assert spread.final_train_loss == pytest.approx(one.final_train_loss, rel=1e-4)  # reduction order
        assert spread.final_test_acc == pytest.approx(one.final_test_acc, abs=0.005)


REMOVAL = blobs_sweep("removal", epochs=40, global_batch_sizes=[5, 8, 10], max_concurrent_runs="auto")


def test_a_removed_node_costs_only_its_run_in_flight_which_resumes_from_its_checkpoint(two_nodes, tmp_path: Path):
    cluster, names, handles = two_nodes
    proc = driver(tmp_path, cluster, REMOVAL, "max_failures: 1\ncheckpoint_every_epochs: 1\n")
    folder = tmp_path / "r" / "removal"
    deadline = time.monotonic() + DEADLINE_S
    on_b = None
    while on_b is None or not (folder / on_b / "checkpoint.pt").exists():  # node b's run checkpointed
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"no checkpoint of a run on node b:\n{out}\n{err[-3000:]}")
        on_b = next((r["run_id"] for r in lane_records(folder) if names.get(r["node_id"]) == "b"), None)
        time.sleep(0.2)
    assert not (folder / on_b / "summary.json").exists(), "node b's run ended before its node could be removed"
    cluster.remove_node(handles["b"])
    try:
        code, out, err = _finish(proc, DEADLINE_S)
    finally:  # the module's cluster gets its second node back
        handles["b"] = cluster.add_node(num_cpus=1, resources={"node_b": 1})
        names[handles["b"].node_id] = "b"
    assert code == 0, f"{out}\n{err[-3000:]}"

    sweep = SweepConfig.model_validate(yaml.safe_load(REMOVAL))
    run_ids = sorted(p.run_id for p in plan_sweep(sweep))
    summaries = {rid: SweepDir(folder).run(rid).read_summary() for rid in run_ids}
    assert all(s is not None and s.status == "success" for s in summaries.values()), out  # nothing lost
    taken = lane_records(folder)
    # Only node b's run was taken twice: on b, then resumed on a from its checkpoint.
    assert sorted(r["run_id"] for r in taken) == sorted(run_ids + [on_b])
    again = [r for r in taken if r["run_id"] == on_b]
    assert [names.get(r["node_id"]) for r in again] == ["b", "a"]
    assert again[0]["resumed_from_epoch"] is None and again[1]["resumed_from_epoch"] >= 1
    assert all(r["resumed_from_epoch"] is None for r in taken if r["run_id"] != on_b)
    assert summaries[on_b].hardware.nodes == [again[1]["node_id"]]  # finished on node a
    # Nothing done twice: one run_start, every epoch once, in the resumed run's log.
    events = ev.read_events(folder / on_b / "events.jsonl")
    assert [e["key"] for e in events].count(ev.RUN_START) == 1
    assert [e["metadata"]["epoch_num"] for e in events if e["key"] == ev.EPOCH_STOP] == list(range(1, 41))
    assert not any((folder / rid / "checkpoint.pt").exists() for rid in run_ids)
    assert "restart after a worker failure" in out, out
