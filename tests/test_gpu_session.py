"""The GPU session runner: budget, cut-off, resume by outputs, archive, and a plan whose every
command its own parser accepts."""

from __future__ import annotations

import importlib
import json
import sys
import tarfile
import time
from pathlib import Path

from bench import cli
from bench.config import load_sweep
from bench.perf.__main__ import SCRIPTS
from bench.perf import session as gs
from bench.plan import run_id

REPO = Path(__file__).resolve().parent.parent


def _py(code: str) -> tuple[str, ...]:
    return ("-c", code)


def test_runs_skips_cuts_off_and_resumes(tmp_path: Path, capsys) -> None:
    plan = [
        gs.Step("writes", _py("import pathlib; pathlib.Path('results/h100').mkdir(parents=True, exist_ok=True);"
                              "pathlib.Path('results/h100/a.json').write_text('{\"x\": 1}'); print('wrote a')"),
                creates=("results/h100/a.json",), estimate_s=1, headline=lambda root: "x is 1"),
        gs.Step("fails", _py("import sys; print('bad input'); sys.exit(3)"), creates=("results/h100/b.json",),
                estimate_s=1),
        gs.Step("exits-0-without-output", _py("print('nothing')"), creates=("results/h100/c.json",), estimate_s=1),
        # A partial line, then a long wait: the deadline, not the line, decides when it stops.
        gs.Step("slow", _py("import sys, time; sys.stdout.write('50%|#####'); sys.stdout.flush(); time.sleep(60)"),
                creates=("results/h100/d.json",), estimate_s=1),
        gs.Step("no-time-left", _py("print('never')"), creates=("results/h100/e.json",), estimate_s=3600),
    ]
    t0 = time.monotonic()
    outcomes = gs.run_session(plan, tmp_path, budget_s=8)
    took = time.monotonic() - t0
    assert [o.status for o in outcomes][:4] == ["ok", "failed", "failed", "cut off"]
    assert outcomes[4].status.startswith("not started")
    assert outcomes[0].headline == "x is 1" and outcomes[1].rc == 3 and outcomes[1].log_tail == ["bad input"]
    assert took < 8 + gs.KILL_GRACE_S  # SIGINT ended the slow step at once
    out = capsys.readouterr().out
    assert "wrote a" in out and "50%|#####" in out

    log = [json.loads(line) for line in (tmp_path / gs.LOG).read_text().splitlines()]
    assert [(e["step"], e["status"]) for e in log] == [
        ("writes", "ok"), ("fails", "failed"), ("exits-0-without-output", "failed"), ("slow", "cut off")]
    assert all(e["device"] and e["seconds"] >= 0 and len(e["git_sha"]) == 40 for e in log)
    assert "bad input" in (tmp_path / gs.LOG).with_suffix(".log").read_text()

    archive = tmp_path / "out" / "h100.tar.gz"
    kept = gs.write_archive(plan, tmp_path, archive)
    assert kept == sorted(["results/h100/a.json", gs.LOG, str(Path(gs.LOG).with_suffix(".log"))])
    with tarfile.open(archive) as tar:
        assert json.loads(tar.extractfile("results/h100/a.json").read()) == {"x": 1}

    waits = gs.Step("report", _py("print('made')"), creates=("reports/r.html",), needs="slow")
    slow_later = gs.Step("slow", plan[3].argv, creates=plan[3].creates, estimate_s=3600)
    again = gs.run_session([*plan[:2], slow_later, waits], tmp_path, budget_s=5)
    assert again[2].status.startswith("not started: ") and again[2].status.endswith("left, needs 3600 s")
    assert again[3].status == "not started: needs slow"
    assert [o.status for o in again][:2] == ["done before", "failed"]
    assert again[0].headline == "x is 1"
    table = gs.summary_table(outcomes)
    assert "cut off" in table and "| bad input" in table


def test_a_sweep_step_is_done_when_all_its_runs_are_complete(tmp_path: Path) -> None:
    sweep = load_sweep("shapes-gpu-noise")[0]
    ids = [run_id(g, w, s) for w in sweep.num_workers for g in sweep.global_batch_sizes for s in sweep.seeds]
    step = next(s for s in gs.build_plan("h200") if s.sweep == "shapes-gpu-noise")
    assert gs.sweep_progress(tmp_path, "shapes-gpu-noise") == (0, len(ids)) and not gs.is_done(step, tmp_path)
    for i in ids:
        (tmp_path / "results" / sweep.name / i).mkdir(parents=True)
        if i != ids[-1]:
            (tmp_path / "results" / sweep.name / i / "summary.json").write_text("{}")
    assert gs.sweep_progress(tmp_path, sweep.name) == (len(ids) - 1, len(ids)) and not gs.is_done(step, tmp_path)
    (tmp_path / "results" / sweep.name / ids[-1] / "summary.json").write_text("{}")
    assert gs.is_done(step, tmp_path)
    assert step.headline(tmp_path) == f"{len(ids)}/{len(ids)} runs complete"
    (tmp_path / "results" / sweep.name / ".ray").mkdir()
    (tmp_path / "results" / sweep.name / ".ray" / "big").write_text("scratch")
    with tarfile.open(_archive(tmp_path, [step])) as tar:
        names = tar.getnames()
    assert f"results/{sweep.name}/{ids[0]}/summary.json" in names and not any(".ray" in n for n in names)


def _archive(root: Path, plan) -> Path:
    path = root / "a.tar.gz"
    gs.write_archive(plan, root, path)
    return path


def test_every_planned_command_is_accepted_by_its_own_parser() -> None:
    """The plan names scripts, presets, sweeps and a cluster file: none may drift away."""
    names = [s.name for s in gs.build_plan("h200")]
    assert len(set(names)) == len(names)
    for step in gs.build_plan("h200"):
        assert step.needs is None or step.needs in names[:names.index(step.name)], step.name
        assert step.argv[0] == "-m", step.name
        module, args = step.argv[1], list(step.argv[2:])
        if module == "bench.perf":
            importlib.import_module(SCRIPTS[args[0]]).parse_args(args[1:])
        else:
            assert module == "bench"
            parsed = cli.build_parser().parse_args(args)
            if args[0] in ("run", "probe-memory"):
                load_sweep(parsed.sweep)
            if getattr(parsed, "cluster", None):
                assert (REPO / parsed.cluster).is_file()
        for p in step.creates:
            assert not Path(p).is_absolute() and p.split("/")[0] in ("results", "reports")


def test_headlines_read_what_the_scripts_write(tmp_path: Path) -> None:
    h = tmp_path / "results" / "h100"
    h.mkdir(parents=True)
    (h / "overhead-r18.json").write_text(json.dumps(
        {"device_name": "NVIDIA H100 80GB HBM3", "ratio": {"median": 0.991, "min": 0.982, "max": 0.997}}))
    (h / "noise-overhead-epoch-read.json").write_text(json.dumps({"device": "x", "overhead_ratio": {"every 10": 1.004}}))
    (h / "throughput-r18.json").write_text(json.dumps({"rows": [
        {"batch_size": 32, "status": "ok", "samples_per_s": 1000.0, "tflops": 1.0},
        {"batch_size": 64, "status": "ok", "samples_per_s": 1900.0, "tflops": 2.0},
        {"batch_size": 128, "status": "oom", "samples_per_s": None, "tflops": None}]}))
    (h / "probe-r18.json").write_text(json.dumps(
        {"largest_fit": 488, "device": "cpu", "limit_check": {"predicted": 493, "within": True}}))
    by_name = {s.name: s for s in gs.build_plan("h100")}
    assert by_name["overhead-resnet18"].headline(tmp_path).startswith("B/A median 0.9910 (min 0.9820")
    assert "every 10 1.0040" in by_name["noise-overhead"].headline(tmp_path)
    assert by_name["throughput-resnet18"].headline(tmp_path) == \
        "2 batch sizes, 32..64; best 1,900 samples/s at 64, 2.0 TFLOP/s"
    assert "predicted 493 (within one bisection step: True)" in by_name["probe-resnet18-cifar"].headline(tmp_path)


def test_cli_lists_the_plan_and_refuses_unknown_steps(capsys, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    assert gs.main(["--list", "--only", "overhead-resnet18"]) == 0
    assert "overhead-resnet18" in capsys.readouterr().out
    assert gs.main(["--only", "nope"]) == 2
    assert "unknown step(s) nope" in capsys.readouterr().err
    assert gs.main(["--budget-s", "0"]) == 2


def test_the_runner_imports_neither_torch_nor_ray() -> None:
    code = ("import sys, bench.perf.session as s; s.sweep_progress(__import__('pathlib').Path('.'), 'shapes-gpu');"
            "print('torch' in sys.modules, 'ray' in sys.modules)")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_device_tag_names_the_gpu_model() -> None:
    assert gs.device_tag("NVIDIA H200") == "h200"
    assert gs.device_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert gs.device_tag("NVIDIA A100-SXM4-80GB") == "a100"
    assert gs.device_tag("no GPU seen (vm)") == "gpu"
    assert all(p.startswith("results/h200/") for s in gs.build_plan("h200") for p in s.creates
               if not p.startswith("results/shapes"))


def test_a_capped_step_is_cut_off_at_its_cap_and_the_next_one_runs(tmp_path: Path) -> None:
    (tmp_path / "bench" / "perf").mkdir(parents=True)
    plan = [gs.Step("capped", _py("import time; print('working', flush=True); time.sleep(60)"),
                    creates=("results/x.json",), estimate_s=1, cap_s=2),
            gs.Step("next", _py("import pathlib; pathlib.Path('results').mkdir(exist_ok=True);"
                                "pathlib.Path('results/y.json').write_text('1')"),
                    creates=("results/y.json",), estimate_s=1)]
    t0 = time.monotonic()
    out = gs.run_session(plan, tmp_path, budget_s=120)
    assert [o.status for o in out] == ["cut off", "ok"]
    assert time.monotonic() - t0 < 40  # the cap, plus SIGINT's grace at most
