"""The GPU session (tools/gpu_session.py, tools/session.py): budget, cut-off, resume by outputs,
archive, steps not built yet, a sweep's overhead and memory check, and a plan whose every command
its own parser accepts."""

from __future__ import annotations

import importlib
import json
import sys
import tarfile
import time
from pathlib import Path

import pytest

from bench import cli
from bench.config import load_sweep
from bench.perf.__main__ import SCRIPTS
from bench.plan import run_id
from bench.store import RunDir
from bench.summary import MemorySummary, RunSummary
from tools import gpu_session as gs
from tools import session

REPO = Path(__file__).resolve().parent.parent


def _py(code: str) -> tuple[str, ...]:
    return ("-c", code)


@pytest.mark.slow
def test_runs_skips_cuts_off_and_resumes(tmp_path: Path, capsys) -> None:
    plan = [
        session.Step("writes", _py("import pathlib; pathlib.Path('results/h100').mkdir(parents=True, exist_ok=True);"
                              "pathlib.Path('results/h100/a.json').write_text('{\"x\": 1}'); print('wrote a')"),
                creates=("results/h100/a.json",), estimate_s=1, headline=lambda root: "x is 1"),
        session.Step("fails", _py("import sys; print('bad input'); sys.exit(3)"), creates=("results/h100/b.json",),
                estimate_s=1),
        session.Step("exits-0-without-output", _py("print('nothing')"), creates=("results/h100/c.json",), estimate_s=1),
        # A partial line, then a long wait: the deadline, not the line, decides when it stops.
        session.Step("slow", _py("import sys, time; sys.stdout.write('50%|#####'); sys.stdout.flush(); time.sleep(60)"),
                creates=("results/h100/d.json",), estimate_s=1),
        session.Step("no-time-left", _py("print('never')"), creates=("results/h100/e.json",), estimate_s=3600),
    ]
    t0 = time.monotonic()
    outcomes = session.run_session(plan, tmp_path, budget_s=8)
    took = time.monotonic() - t0
    assert [o.status for o in outcomes][:4] == ["ok", "failed", "failed", "cut off"]
    assert outcomes[4].status.startswith("not started")
    assert outcomes[0].headline == "x is 1" and outcomes[1].rc == 3 and outcomes[1].log_tail == ["bad input"]
    assert took < 8 + session.KILL_GRACE_S  # SIGINT ended the slow step at once
    out = capsys.readouterr().out
    assert "wrote a" in out and "50%|#####" in out

    log = [json.loads(line) for line in (tmp_path / session.LOG).read_text().splitlines()]
    assert [(e["step"], e["status"]) for e in log] == [
        ("writes", "ok"), ("fails", "failed"), ("exits-0-without-output", "failed"), ("slow", "cut off")]
    assert all(e["device"] and e["seconds"] >= 0 and len(e["git_sha"]) == 40 for e in log)
    assert "bad input" in (tmp_path / session.LOG).with_suffix(".log").read_text()

    archive = tmp_path / "out" / "h100.tar.gz"
    kept = session.write_archive(plan, tmp_path, archive)
    assert kept == sorted(["results/h100/a.json", session.LOG, str(Path(session.LOG).with_suffix(".log"))])
    with tarfile.open(archive) as tar:
        assert json.loads(tar.extractfile("results/h100/a.json").read()) == {"x": 1}

    waits = session.Step("report", _py("print('made')"), creates=("reports/r.html",), needs="slow")
    slow_later = session.Step("slow", plan[3].argv, creates=plan[3].creates, estimate_s=3600)
    again = session.run_session([*plan[:2], slow_later, waits], tmp_path, budget_s=5)
    assert again[2].status.startswith("not started: ") and again[2].status.endswith("left, needs 3600 s")
    assert again[3].status == "not started: needs slow"
    assert [o.status for o in again][:2] == ["done before", "failed"]
    assert again[0].headline == "x is 1"
    table = session.summary_table(outcomes)
    assert "cut off" in table and "| bad input" in table


def test_a_sweep_step_is_done_when_all_its_runs_are_complete(tmp_path: Path) -> None:
    sweep = load_sweep("shapes-gpu-noise")[0]
    ids = [run_id(g, w, s) for w in sweep.num_workers for g in sweep.global_batch_sizes for s in sweep.seeds]
    step = next(s for s in gs.build_plan("h200") if s.sweep == "shapes-gpu-noise")
    assert session.sweep_progress(tmp_path, "shapes-gpu-noise") == (0, len(ids)) and not session.is_done(step, tmp_path)
    for i in ids:
        (tmp_path / "results" / sweep.name / i).mkdir(parents=True)
        if i != ids[-1]:
            (tmp_path / "results" / sweep.name / i / "summary.json").write_text("{}")
    assert session.sweep_progress(tmp_path, sweep.name) == (len(ids) - 1, len(ids)) and not session.is_done(step, tmp_path)
    (tmp_path / "results" / sweep.name / ids[-1] / "summary.json").write_text("{}")
    assert session.is_done(step, tmp_path)
    assert step.headline(tmp_path) == f"{len(ids)}/{len(ids)} runs complete"
    (tmp_path / "results" / sweep.name / ".ray").mkdir()
    (tmp_path / "results" / sweep.name / ".ray" / "big").write_text("scratch")
    with tarfile.open(_archive(tmp_path, [step])) as tar:
        names = tar.getnames()
    assert f"results/{sweep.name}/{ids[0]}/summary.json" in names and not any(".ray" in n for n in names)


def _archive(root: Path, plan) -> Path:
    path = root / "a.tar.gz"
    session.write_archive(plan, root, path)
    return path


def test_every_planned_command_is_accepted_by_its_own_parser() -> None:
    """The plan names scripts, presets, sweeps and a cluster file: none may drift away."""
    names = [s.name for s in gs.build_plan("h200")]
    assert len(set(names)) == len(names)
    from bench.perf import overhead

    for step in gs.build_plan("h200"):
        assert step.needs is None or step.needs in names[:names.index(step.name)], step.name
        assert step.argv[0] == "-m", step.name
        module, args = step.argv[1], list(step.argv[2:])
        if module == "bench.perf":
            parsed = importlib.import_module(SCRIPTS[args[0]]).parse_args(args[1:])
            if args[0] == "overhead":  # side B's synthetic set must fit the workload's size limit
                overhead.sweep_for({**vars(parsed), "device": "cuda"}, "x")
        elif module == "pytest":
            assert args[:2] == ["-m", "gpu"] and (REPO / args[-1]).is_dir()
            assert any(m.startswith("gpu:") for m in __import__("tomllib").loads(
                (REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"])
        else:
            assert module == "bench"
            parsed = cli.build_parser().parse_args(args)
            if args[0] in ("run", "probe-memory") and not session.missing(step, REPO):
                load_sweep(parsed.sweep)
            if getattr(parsed, "cluster", None):
                assert (REPO / parsed.cluster).is_file()
        for p in step.creates:
            assert not Path(p).is_absolute() and p.split("/")[0] in ("results", "reports")


def test_headlines_read_what_the_scripts_write(tmp_path: Path) -> None:
    h = tmp_path / "results" / "h100"
    h.mkdir(parents=True)
    (h / "overhead-r18-9pairs.json").write_text(json.dumps(
        {"device_name": "NVIDIA H100 80GB HBM3", "ratio": {"median": 0.991, "min": 0.982, "max": 0.997},
         "pairs": [{}] * 9}))
    (h / "noise-overhead-epoch-read.json").write_text(json.dumps({"device": "x", "overhead_ratio": {"every 10": 1.004}}))
    (h / "throughput-r18.json").write_text(json.dumps({"rows": [
        {"batch_size": 32, "status": "ok", "samples_per_s": 1000.0, "tflops": 1.0},
        {"batch_size": 64, "status": "ok", "samples_per_s": 1900.0, "tflops": 2.0},
        {"batch_size": 128, "status": "oom", "samples_per_s": None, "tflops": None}]}))
    (h / "probe-r50.json").write_text(json.dumps(
        {"largest_fit": 488, "device": "cpu", "limit_check": {"predicted": 493, "within": True}}))
    by_name = {s.name: s for s in gs.build_plan("h100")}
    assert by_name["overhead-resnet18"].headline(tmp_path).startswith("B/A median 0.9910 (min 0.9820, max 0.9970) "
                                                                      "over 9 pairs")
    assert "every 10 1.0040" in by_name["noise-overhead"].headline(tmp_path)
    assert by_name["throughput-resnet18"].headline(tmp_path) == \
        "2 batch sizes, 32..64; best 1,900 samples/s at 64, 2.0 TFLOP/s"
    assert "predicted 493 (within one bisection step: True)" in by_name["probe-resnet50-224"].headline(tmp_path)
    (h / "allreduce-nccl-w2.json").write_text(json.dumps({"num_workers": 2, "device": "2 x H100", "rows": [
        {"size_bytes": 4, "busbw_gb_s": 0.0, "num_wrong": 0}, {"size_bytes": 256 * 2**20, "busbw_gb_s": 361.5,
                                                               "num_wrong": 0}]}))
    assert by_name["allreduce-nccl"].headline(tmp_path) == "2 ranks on 2 x H100: busbw 361.5 GB/s at 256 MiB, 0 wrong values"


def test_cli_lists_the_plan_and_refuses_unknown_steps(capsys) -> None:
    assert gs.main(["--list", "--only", "overhead-resnet18", "--tag", "h200"]) == 0
    assert "overhead-resnet18" in capsys.readouterr().out
    assert gs.main(["--list", "--tag", "h200"]) == 0
    listed = capsys.readouterr().out
    assert "pytest-gpu" in listed and "LR search: not built yet" in listed
    assert "needs 2 GPUs, this machine has 0" in listed  # allreduce-nccl, on this GPU-less machine
    assert gs.main(["--only", "nope"]) == 2
    assert "unknown step(s) nope" in capsys.readouterr().err
    assert gs.main(["--budget-s", "0"]) == 2


def test_the_runner_imports_neither_torch_nor_ray() -> None:
    code = ("import sys, tools.gpu_session as g, tools.session as s; g.build_plan('h200');"
            "s.sweep_progress(__import__('pathlib').Path('.'), 'shapes-gpu');"
            "print('torch' in sys.modules, 'ray' in sys.modules)")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_device_tag_names_the_gpu_model() -> None:
    assert gs.device_tag("NVIDIA H200") == "h200"
    assert gs.device_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert gs.device_tag("NVIDIA A100-SXM4-80GB") == "a100"
    assert gs.device_tag("no GPU seen (vm)") == "gpu"
    assert all(p.startswith("results/h200/") or p == f"results/{s.argv[3]}/memory-probe.json"
               for s in gs.build_plan("h200") for p in s.creates)


def test_a_capped_step_is_cut_off_at_its_cap_and_the_next_one_runs(tmp_path: Path) -> None:
    plan = [session.Step("capped", _py("import time; print('working', flush=True); time.sleep(60)"),
                    creates=("results/x.json",), estimate_s=1, cap_s=2),
            session.Step("next", _py("import pathlib; pathlib.Path('results').mkdir(exist_ok=True);"
                                "pathlib.Path('results/y.json').write_text('1')"),
                    creates=("results/y.json",), estimate_s=1)]
    t0 = time.monotonic()
    out = session.run_session(plan, tmp_path, budget_s=120)
    assert [o.status for o in out] == ["cut off", "ok"]
    assert time.monotonic() - t0 < 40  # the cap, plus SIGINT's grace at most


def test_steps_not_built_are_skipped_with_a_message_and_do_not_fail_the_call(tmp_path: Path) -> None:
    plan = [session.Step("probe-new", _py("print('never')"), creates=("results/new/p.json",),
                         requires=("bench/sweeps/new.yaml",)),
            session.Step("sweep-new", _py("print('never')"), creates=("results/new/x",), needs="probe-new"),
            session.Step("runs", _py("import pathlib; pathlib.Path('r.json').write_text('1')"), creates=("r.json",),
                         estimate_s=1)]
    plan.append(session.Step("nccl", _py("print('never')"), creates=("n.json",), min_gpus=2))
    out = session.run_session(plan, tmp_path, budget_s=60, gpus=["NVIDIA H200"])
    assert [o.status for o in out] == ["skipped: not built (no bench/sweeps/new.yaml)",
                                       "skipped: needs probe-new, which cannot run here", "ok",
                                       "skipped: needs 2 GPUs, this machine has 1"]
    assert session.unfinished(out) == []  # the call did all it could: exit 0
    (tmp_path / "bench" / "sweeps").mkdir(parents=True)
    (tmp_path / "bench" / "sweeps" / "new.yaml").write_text("")
    by_name = {s.name: s for s in plan}
    assert session.blocked(plan[1], tmp_path, by_name, 1) is None and session.blocked(plan[3], tmp_path, by_name, 2) is None


def test_the_packaged_sweeps_the_plan_waits_for(capsys) -> None:
    """Which sweeps are still to come: when one lands in bench/sweeps/ its steps run (and this
    test says so, so the plan's comments can be updated)."""
    waiting = sorted({p for s in gs.build_plan("h200") for p in session.missing(s, REPO)})
    assert set(waiting) <= {"bench/sweeps/shapes-hard-gpu.yaml", "bench/sweeps/lm-gpu.yaml"}
    print("not built yet:", ", ".join(waiting) or "nothing")


def _summary(run: str, train_s: float, micro: int, seed: int, peak_gib: float | None) -> RunSummary:
    memory = None if peak_gib is None else MemorySummary(
        baseline_allocated_gib=0.1, baseline_reserved_gib=0.1, train_peak_allocated_gib=peak_gib - 0.1,
        train_peak_reserved_gib=peak_gib)
    return RunSummary(run_id=run, sweep="s", status="success", global_batch_size=micro, num_workers=1,
                      per_worker_batch_size=micro, micro_batch_size=micro, grad_accum_steps=1, seed=seed, peak_lr=0.1,
                      epochs_completed=1, steps_completed=1, samples_seen=micro, train_time_s=train_s, eval_time_s=1.0,
                      wall_time_s=train_s + 2.0, memory=memory)


def _write_run(root: Path, run: str, summary: RunSummary | None, mtime: float | None = None) -> None:
    run_dir = RunDir(root / "results" / "s" / run)
    run_dir.path.mkdir(parents=True)
    (run_dir.path / "run.json").write_text("{}")
    if summary is not None:
        run_dir.write_summary(summary)
        if mtime is not None:
            import os

            os.utime(run_dir.summary_path, (mtime, mtime))


def test_sweep_overhead_is_wall_clock_over_the_training_of_the_runs_this_call_completed(tmp_path: Path) -> None:
    start = 1_000_000.0
    _write_run(tmp_path, "old", _summary("old", 50.0, 128, 0, None), mtime=start - 10)  # an earlier call's
    _write_run(tmp_path, "a", _summary("a", 40.0, 128, 1, None), mtime=start + 50)
    _write_run(tmp_path, "b", _summary("b", 50.0, 256, 1, None), mtime=start + 110)
    _write_run(tmp_path, "cut", None)  # cut off: no summary
    assert session.sweep_overhead(tmp_path, "s", start) == {
        "runs": 2, "wall_s": 110.0, "train_s": 90.0, "runs_wall_s": 94.0, "wall_over_train": round(110 / 90, 3),
        "wall_over_runs": round(110 / 94, 3)}
    assert session.sweep_overhead(tmp_path, "s", start + 200) is None


def test_memory_check_of_a_gpu_sweep(tmp_path: Path) -> None:
    for run, micro, seed, peak in [("a", 128, 0, 1.00), ("b", 128, 1, 1.05), ("c", 256, 0, 1.50), ("d", 256, 1, 1.52)]:
        _write_run(tmp_path, run, _summary(run, 10.0, micro, seed, peak))
    (tmp_path / "results" / "s" / "memory-probe.json").write_text(json.dumps(
        {"fixed_bytes": 0.5 * 2**30, "per_sample_bytes": 2**30 / 256}))
    assert gs.memory_check(tmp_path, "s") == (
        "seeds within 5.0% (goal 10 %); training peak rises with the micro-batch (1.02 .. 1.51 GiB reserved); "
        "probe fit at micro-batch 256: 1.50 GiB, run measured 1.51")
    _write_run(tmp_path, "e", _summary("e", 10.0, 512, 0, 1.2))
    assert "training peak does NOT rise" in gs.memory_check(tmp_path, "s")
    assert gs.memory_check(tmp_path, "none") == "no per-run memory yet"


@pytest.mark.parametrize("failures", [0, 1])
def test_pytest_headline_reads_the_junit_file(tmp_path: Path, failures: int) -> None:
    (tmp_path / "j.xml").write_text(f'<testsuites><testsuite name="pytest" tests="4" failures="{failures}" '
                                    'errors="1" skipped="1"></testsuite></testsuites>')
    assert gs._pytest("j.xml")(tmp_path) == f"{2 - failures} passed, {failures} failed, 1 errors, 1 skipped"
