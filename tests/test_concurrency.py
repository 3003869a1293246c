"""Concurrent runs (issue 16 part 1). Without Ray: the run book hands each run to one lane attempt
at a time, hands a dead attempt's run back (to the front, within the failure budget), never
loses or duplicates a run; how many lanes start; how many workers a cluster holds at once.
With Ray (slow): a sweep with two lanes overlaps in time, and each run gives exactly what it
gives alone; each run records the Ray node it ran on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from bench import events as ev
from bench.cli import main
from bench.config import SweepConfig
from bench.perf.concurrency import makespan, paper, parse_side
from bench.placement import worker_slots
from bench.plan import plan_sweep
from bench.pool import RunBook, Snapshot, lanes_to_start
from bench.progress import SweepProgress
from bench.store import SweepDir
from bench.worker import WorkerContext, execute_run
from conftest import write_yaml


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def book(runs: list[tuple[str, int]], max_failures: int = 1) -> RunBook:
    return RunBook(runs, max_failures, clock=Clock())


# --- the run book ------------------------------------------------------------------------------

def test_runs_go_out_in_plan_order_one_holder_each_per_worker_count():
    b = book([("a", 1), ("x", 2), ("b", 1), ("c", 1)])
    b.enter(1, "t1", 1, "n1")
    b.enter(2, "t2", 1, "n2")
    b.enter(3, "t3", 2, "n1")
    assert [b.take("t1"), b.take("t2"), b.take("t3"), b.take("t3")] == ["a", "b", "x", None]
    assert b.owns("t1", "a") and not b.owns("t2", "a")
    assert b.snapshot() == Snapshot(queued={1: 1}, held={1: 2, 2: 1},
                                    holders={"a": (1, "n1"), "b": (2, "n2"), "x": (3, "n1")}, given_up=[])
    b.done("t1", "a")
    assert b.take("t1") == "c" and b.take("t1") is None and b.take("unknown") is None
    assert not b.owns("t1", "a")  # done: held by nobody, and never handed out again


def test_a_failed_attempts_run_goes_back_to_the_front_and_a_late_report_spares_the_restart():
    clock = Clock()
    b = RunBook([("a", 1), ("b", 1), ("c", 1)], max_failures=2, clock=clock)
    b.enter(1, "first", 1, "nodeB")  # entered at t=101
    b.enter(2, "other", 1, "nodeA")  # t=102
    assert (b.take("first"), b.take("other")) == ("a", "b")
    # Ray Train's controller saw lane 1's worker die at t=103.5: its run goes to the front, so the
    # next lane to ask (here the other one, once it is done) resumes it from its checkpoint
    assert b.release(1, before_unix_s=103.5) == ["a"]
    assert not b.owns("first", "a")  # the dead attempt cannot complete it any more
    b.done("other", "b")
    assert b.take("other") == "a"
    # lane 1's restart enters after the failure; the controller's report of that same failure
    # arriving late must not take the restart's run away
    clock.now = 110.0
    b.enter(1, "restart", 1, "nodeA")  # t=111
    assert b.take("restart") == "c"
    assert b.release(1, before_unix_s=103.5) == [] and b.owns("restart", "c")


def test_a_restarted_attempt_hands_back_what_its_dead_predecessor_held():
    b = book([("a", 1), ("b", 1)])
    b.enter(1, "first", 1, None)
    assert b.take("first") == "a"
    b.enter(1, "second", 1, None)  # no failure report came: entering is enough
    assert not b.owns("first", "a") and b.take("second") == "a"


@pytest.mark.parametrize("max_failures, handed_back", [(0, 0), (1, 1), (2, 2), (-1, 5)])
def test_the_failure_budget_per_run(max_failures, handed_back):
    """A run whose lanes died more than max_failures times is given up (stays incomplete);
    -1 hands it back forever."""
    b = book([("a", 1)], max_failures=max_failures)
    back = 0
    for attempt in range(5):
        b.enter(1, f"t{attempt}", 1, None)
        if b.take(f"t{attempt}") is None:
            break
        back += len(b.release(1))
    assert back == handed_back
    assert b.snapshot().given_up == ([] if max_failures == -1 else ["a"])


OPS = st.lists(st.tuples(st.sampled_from(["enter", "take", "done", "release", "late"]),
                         st.integers(1, 3)), max_size=60)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(OPS)
def test_no_run_is_lost_or_held_twice_whatever_happens(ops):
    """Any interleaving of lanes entering, taking, finishing and failing: every run is in exactly
    one place (waiting, held by one attempt, done, given up), and two attempts never hold the same
    run."""
    runs = [f"r{i}" for i in range(5)]
    b = book([(r, 1) for r in runs], max_failures=2)
    current: dict[int, str] = {}  # lane -> its live attempt's token
    held: dict[str, str] = {}  # token -> run it was given and has not finished
    finished: set[str] = set()
    for i, (op, lane) in enumerate(ops):
        token = current.get(lane)
        if op == "enter" or token is None:
            token = current[lane] = f"l{lane}-{i}"
            b.enter(lane, token, 1, None)
        elif op == "take" and token not in held:
            got = b.take(token)
            if got is not None:
                held[token] = got
        elif op == "done" and token in held:
            run = held.pop(token)
            if b.owns(token, run):  # else it was handed back: the lane learns so before its summary
                finished.add(run)
            b.done(token, run)
        elif op in ("release", "late"):
            b.release(lane, before_unix_s=float("inf") if op == "release" else 0.0)
        owners = [t for t, r in held.items() if b.owns(t, r)]
        assert len({held[t] for t in owners}) == len(owners)  # nobody holds a run another holds
    snap = b.snapshot()
    waiting = sum(snap.queued.values())
    holding = sum(snap.held.values())
    assert waiting + holding + len(snap.given_up) + len(finished) == len(runs)


# --- the progress display with runs at once ------------------------------------------------------

def test_progress_shows_runs_in_flight_together_and_where_they_are(tmp_path: Path):
    logs = {rid: ev.EventLog(tmp_path / f"{rid}.jsonl", mode="w") for rid in ("r1", "r2")}
    printed: list[str] = []
    where = {"r1": "lane 1, node 1a2b3c4d", "r2": "lane 2, node 9f8e7d6c"}
    progress = SweepProgress([(rid, tmp_path / f"{rid}.jsonl", 2) for rid in logs], print_fn=printed.append,
                             use_rich=False, where=where.get)
    for log in logs.values():
        log.log(ev.RUN_START, None, event_type=ev.INTERVAL_START)
    progress._update()
    assert printed == ["r1: started (lane 1, node 1a2b3c4d) (1 running)", "r2: started (lane 2, node 9f8e7d6c) (2 running)"]
    logs["r2"].log(ev.RUN_STOP, None, event_type=ev.INTERVAL_END, metadata={"status": "success"})
    progress._update()
    assert printed[-1] == "[1/2] r2: success after 0 epochs (lane 2, node 9f8e7d6c)"
    for log in logs.values():
        log.close()


# --- how many lanes, how many workers ------------------------------------------------------------

def snapshot(queued: dict[int, int], held: dict[int, int] | None = None) -> Snapshot:
    return Snapshot(queued=queued, held=held or {}, holders={}, given_up=[])


def test_lanes_to_start_within_the_limit_and_the_workers_the_cluster_holds():
    assert lanes_to_start(snapshot({1: 3}), {}, max_lanes=10, worker_slots=2) == [1, 1]
    assert lanes_to_start(snapshot({1: 3}), {}, max_lanes=1, worker_slots=2) == [1]  # max_concurrent_runs: 1
    assert lanes_to_start(snapshot({1: 1, 2: 1}), {}, max_lanes=4, worker_slots=4) == [1, 2]
    assert lanes_to_start(snapshot({1: 1, 2: 1}), {}, max_lanes=4, worker_slots=2) == [1]  # the 2-worker run waits
    assert lanes_to_start(snapshot({2: 1}), {}, max_lanes=4, worker_slots=2) == [2]  # ... for the slots to free
    # two lanes alive, one holding a run and one about to take the one waiting: nothing to add
    assert lanes_to_start(snapshot({1: 1}, {1: 1}), {1: 2}, max_lanes=4, worker_slots=4) == []
    # a run handed back while no lane of its worker count is left: a new lane takes it
    assert lanes_to_start(snapshot({1: 1}), {2: 1}, max_lanes=4, worker_slots=4) == [1]


HEAD, P5 = {"CPU": 16.0}, {"CPU": 192.0, "GPU": 8.0, "node:10.0.0.7": 1.0}


def test_worker_slots_node_by_node_or_from_the_autoscaler_ceiling():
    need = {"CPU": 8.0, "GPU": 1.0}
    assert worker_slots(need, [HEAD, P5, P5]) == 16  # 8 one-GPU workers per p5, none on the head
    assert worker_slots({"CPU": 100.0, "GPU": 1.0}, [HEAD, P5, P5]) == 2  # CPUs bind: one per node
    assert worker_slots(need, [HEAD], max_totals={"CPU": 400.0, "GPU": 16.0}) == 16
    assert worker_slots({"CPU": 1.0}, [{"CPU": 2.0}]) == 2  # this 2-core machine's local Ray
    assert worker_slots({"CPU": 0.5, "GPU": 0.5}, [{"CPU": 8.0, "GPU": 1.0}]) == 2


def test_makespan_of_lanes_taking_runs_in_plan_order():
    assert makespan([3, 3, 3, 3], 2, 1.0) == 7.0  # each lane starts once, then two runs
    assert makespan([3, 3, 3, 3], 2, 1.0, per_run_start=True) == 8.0  # a start before every run
    assert makespan([5, 1, 1, 1], 2, 0.0) == 5.0  # the short runs go to the free lane
    assert makespan([1, 1, 1, 5], 2, 0.0) == 6.0  # plan order: the long run comes last, on the lane free at 1
    assert makespan([2.0] * 10, 64, 14.0) == 16.0  # more lanes than runs: all at once
    assert makespan([], 4, 10.0) == 0.0


def test_paper_estimate_holds_the_cluster_for_the_wall_clock():
    ways = paper([10.0, 20.0, 30.0], gpus_per_run=1, gpus=2, startup_s=5.0)
    assert ways["1"]["wall_s"] == 65.0  # 5 + 10 + 20 + 30
    assert ways["2"]["wall_s"] == 45.0  # lane 1: 5 + 10, then 30; lane 2: 5 + 20
    assert ways["2/per-run"]["wall_s"] == 50.0  # lane 1: 15, then 5 + 30; lane 2: 25
    assert ways["2"]["gpu_hours_held"] == pytest.approx(2 * 45.0 / 3600)
    assert ways["2"]["gpu_hours_saved"] == pytest.approx(2 * 20.0 / 3600)
    assert set(paper([1.0], gpus_per_run=8, gpus=64, startup_s=0.0)) == {"1", "1/per-run"}  # one run: one lane


def test_a_side_is_n_or_auto_with_or_without_a_start_per_run():
    assert parse_side("2") == (2, False) and parse_side("auto/per-run") == ("auto", True)
    for bad in ("0", "two", "2/tune", ""):
        with pytest.raises(ValueError, match="give N, auto"):
            parse_side(bad)


# --- through Ray (slow) --------------------------------------------------------------------------

BLOBS = {"workload": "blobs", "lr": {"reference_lr": 0.02, "reference_batch_size": 32, "scaling": "none"},
         "epochs": 100, "num_workers": [1], "seeds": [0], "target_accuracy": 0.5, "telemetry": {"enabled": False}}


def blobs_sweep(name: str, **keys) -> str:
    """A small blobs sweep's YAML (shared with tests/test_multinode.py)."""
    return yaml.safe_dump({"name": name, **BLOBS, **keys}, sort_keys=False)


CONCURRENT = blobs_sweep("together", max_steps=1500, global_batch_sizes=[10, 16, 20, 25], max_concurrent_runs=2)


def run_span_ms(events_path: Path) -> tuple[int, int]:
    """When a run held its lane: init_start (its set-up is part of it) to run_stop."""
    events = ev.read_events(events_path)
    start = next(e["time_ms"] for e in events if e["key"] == ev.INIT_START)
    return start, next(e["time_ms"] for e in events if e["key"] == ev.RUN_STOP)


def lane_records(sweep_dir: Path) -> list[dict]:
    """Every run taken by a lane (results/<sweep>/.ray/*.runs.jsonl), in the order taken."""
    out = [json.loads(line) for path in sorted((sweep_dir / ".ray").glob("*.runs.jsonl"))
           for line in path.read_text().splitlines() if line.strip()]
    return sorted(out, key=lambda r: r["unix_s"])


@pytest.mark.slow
def test_two_lanes_overlap_and_each_run_gives_what_it_gives_alone(ray_session, tmp_path: Path, capsys):
    sweep_file = write_yaml(tmp_path / "together.yaml", CONCURRENT)
    assert main(["run", str(sweep_file), "--results-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "max_concurrent_runs 2: up to 2 runs of 1 worker at once (the cluster holds 4 workers of {CPU: 1})" in out
    assert "2 worker-group start(s)" in out, out  # two lanes, each started once for its runs
    folder = tmp_path / "r" / "together"
    taken = lane_records(folder)
    assert sorted(r["run_id"] for r in taken) == sorted(p.name for p in folder.glob("gbs*"))  # each once
    assert {r["lane"] for r in taken} == {1, 2}
    # Overlap: a run of one lane was running while a run of the other lane was.
    spans = {r["run_id"]: (r["lane"], *run_span_ms(folder / r["run_id"] / "events.jsonl")) for r in taken}
    assert any(la != lb and sa < eb and sb < ea
               for la, sa, ea in spans.values() for lb, sb, eb in spans.values()), spans

    sweep = SweepConfig.model_validate(yaml.safe_load(CONCURRENT))
    for plan in plan_sweep(sweep):
        together = SweepDir(folder).run(plan.run_id).read_summary()
        record = next(r for r in taken if r["run_id"] == plan.run_id)
        assert together.hardware.nodes == [record["node_id"]]  # the Ray node it ran on
        # Alone: in this process, one thread, no Ray (test_worker: that equals a Ray worker).
        alone_dir = SweepDir(tmp_path / "alone").run(plan.run_id)
        alone_dir.path.mkdir(parents=True)
        alone = execute_run(plan, sweep, alone_dir, WorkerContext())
        assert (together.status, together.steps_completed) == (alone.status, alone.steps_completed)
        # same seed on CPU with the same threads: the same numbers, not merely close ones
        assert together.final_test_acc == alone.final_test_acc
        assert together.final_train_loss == alone.final_train_loss
