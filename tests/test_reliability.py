"""Reliability (issue 8): faults survived, bad input refused, nothing lost.

- results store: atomic writes never leave a half file or a temp file; a second driver is
  refused by the lock (and a crashed driver's lock goes with its process, which is how its
  workers learn that it is gone); an unwritable
  results folder fails with exit 1 before anything starts; a corrupt run folder is skipped by
  ``batchscale results`` with one warning line naming it while the healthy runs still print.
- security: YAML is safe-loaded (a ``!!python/object/apply`` payload is refused, not run); the
  local Ray starts without its dashboard; only the CIFAR loader unpickles; the HTML report
  escapes text from configs.
- driver interruption (slow): SIGINT / SIGTERM during a sweep stops the driver with exit 130
  and one line, keeps the complete run, and the same command then redoes only what is missing;
  a run prints nothing of Ray's own (no token-authentication notice). A driver killed with
  SIGKILL leaves no worker that completes a run, and no worker process, behind.
- refusals come before Ray: a second driver (lock) and leftovers that cannot be removed are
  refused without starting or joining Ray.

The results folders here are made by the worker loop in-process (no Ray); only the
interruption tests start Ray, in a subprocess.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from bench import events as ev
from bench import launcher
from bench.cli import main
from bench.config import ClusterConfig, SweepConfig
from bench.groupstate import driver_lock
from bench.plan import plan_sweep
from bench.store import (EVENTS, RUN_PLAN, SUMMARY, StoreError, SweepDir, atomic_write_json,
                         atomic_write_text)
from conftest import REPO, TINY_SWEEP, write_yaml

EVIL = "<script>alert(1)</script>"


# --- helpers ----------------------------------------------------------------------------------

def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def stderr_lines(err: str) -> list[str]:
    return err.strip().splitlines()


def forbid_cluster(monkeypatch) -> list[str]:
    """Make reaching the cluster a test failure: refusals must come before Ray starts."""
    calls: list[str] = []

    def no_cluster(*args, **kwargs):
        calls.append("connect")
        raise AssertionError("the cluster was contacted before the results folder was checked")

    monkeypatch.setattr(launcher, "connect", no_cluster)
    monkeypatch.setattr(launcher, "run_groups", no_cluster)
    return calls


# --- results store: atomic writes ----------------------------------------------------------------

def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc
    return fail


FAILURES = {
    # where the write breaks -> (what to patch, what it raises)
    "fsync fails after the data is in the temp file": ("fsync", OSError(28, "No space left on device")),
    "Ctrl-C just before the rename": ("replace", KeyboardInterrupt()),
    "rename fails": ("replace", OSError(18, "Invalid cross-device link")),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_failed_atomic_write_keeps_old_file_and_leaves_no_temp(case, tmp_path: Path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"status": "old"})
    name, exc = FAILURES[case]
    monkeypatch.setattr(os, name, _raise(exc))
    with pytest.raises(type(exc)):
        atomic_write_json(target, {"status": "new", "big": "x" * 100_000})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"status": "old"}  # old or new, never half
    assert files_in(tmp_path) == ["summary.json"]  # the temp file is gone


def test_failed_first_write_leaves_nothing(tmp_path: Path, monkeypatch):
    """A summary that fails mid-write must not exist at all: its presence marks a run complete."""
    monkeypatch.setattr(os, "fsync", _raise(OSError(5, "Input/output error")))
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / SUMMARY, "{}\n")
    assert files_in(tmp_path) == []


def test_unserialisable_object_writes_nothing(tmp_path: Path):
    loop: dict = {}
    loop["self"] = loop  # json: circular reference
    atomic_write_json(tmp_path / "a.json", {"ok": 1})
    with pytest.raises(ValueError, match="Circular"):
        atomic_write_json(tmp_path / "a.json", loop)
    assert json.loads((tmp_path / "a.json").read_text()) == {"ok": 1}
    assert files_in(tmp_path) == ["a.json"]


# --- results store: one driver per folder ------------------------------------------------------

def test_second_lock_on_the_same_folder_is_refused(tmp_path: Path):
    first, second = SweepDir(tmp_path / "tiny"), SweepDir(tmp_path / "tiny")
    first.claim("tiny", "hash")
    first.lock()
    with pytest.raises(StoreError, match=re.escape(str(tmp_path / "tiny")) + ".*in use by another batchscale run"):
        second.lock()
    first.unlock()
    second.lock()  # released: the next driver may go
    second.unlock()


HOLD_LOCK = ("import sys\nfrom bench.store import SweepDir\nSweepDir(sys.argv[1]).lock()\n"
             "print('locked', flush=True)\nsys.stdin.read()\n")


@contextlib.contextmanager
def lock_holder(folder: Path):
    """Another process holding ``folder``'s lock, as a driver does, until the block ends (or the
    block kills it)."""
    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)


def test_lock_held_by_another_process_then_released_when_it_dies(tmp_path: Path):
    """flock belongs to the process: a driver killed with SIGKILL leaves no stale lock."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    with lock_holder(folder):
        with pytest.raises(StoreError, match="in use by another batchscale run"):
            SweepDir(folder).lock()
    survivor = SweepDir(folder)
    survivor.lock()
    survivor.unlock()


def test_driver_killed_with_sigkill_reads_as_gone_and_a_newer_driver_is_not_ours(tmp_path: Path):
    """WorkerContext.driver_alive (bench.groupstate.DriverLock), in isolation."""
    folder = tmp_path / "s"
    folder.mkdir()
    with lock_holder(folder) as driver:
        alive = driver_lock(SweepDir(folder))  # what the workers of that driver were given
        assert alive.token == str(driver.pid).encode() and alive() is True
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    assert alive() is False  # the kernel dropped the dead driver's flock
    newer = SweepDir(folder)
    newer.lock()  # a second driver took over the folder
    try:
        assert alive() is False and driver_lock(newer)() is True
    finally:
        newer.unlock()


def test_second_driver_exits_1_with_one_line(tmp_path: Path, capsys, monkeypatch):
    calls = forbid_cluster(monkeypatch)  # refused by the lock before any Ray starts (issue 14 item 11)
    sweep = write_yaml(tmp_path / "s.yaml", TINY_SWEEP)
    holder = SweepDir(tmp_path / "results" / "tiny")
    holder.claim("tiny", SweepConfig.model_validate(yaml.safe_load(TINY_SWEEP)).config_hash())
    holder.lock()
    try:
        code = main(["run", str(sweep), "--results-dir", str(tmp_path / "results")])
    finally:
        holder.unlock()
    err = capsys.readouterr().err
    assert code == 1 and calls == []
    assert stderr_lines(err) == [f"batchscale: error: {holder.path} is in use by another batchscale run "
                                 "(lock held); wait for it or use another --results-dir"]


# --- results store: unwritable folder -------------------------------------------------------------

def _under_a_file(tmp_path: Path) -> Path:
    """A results folder that can never be created, even by root: its parent is a regular file."""
    (tmp_path / "a-file").write_text("not a folder\n")
    return tmp_path / "a-file" / "results"


def _read_only_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits; the under-a-file case covers root")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    return folder / "results"


@pytest.mark.parametrize("make", [_under_a_file, _read_only_folder], ids=["under-a-file", "chmod-500"])
def test_unwritable_results_folder_fails_before_anything_starts(make, tmp_path: Path, capsys, monkeypatch):
    calls = forbid_cluster(monkeypatch)
    sweep = write_yaml(tmp_path / "s.yaml", TINY_SWEEP)
    try:
        results = make(tmp_path)
        code = main(["run", str(sweep), "--results-dir", str(results)])
    finally:
        for p in tmp_path.iterdir():
            if p.is_dir():
                p.chmod(0o700)
    err = capsys.readouterr().err
    assert calls == [] and len(stderr_lines(err)) == 1, err
    if make is _under_a_file:  # --results-dir itself can never be a folder: a usage mistake (exit 2)
        assert code == 2 and err.startswith(f"batchscale: error: --results-dir {results}: ") and "is not a folder" in err
    else:
        assert code == 1 and err.startswith(f"batchscale: error: results folder {results / 'tiny'} is not writable")
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted([sweep.name, results.parent.name])


# --- results store: leftovers of an interrupted attempt that cannot be removed -------------------

def _read_only_leftover(run: Path, monkeypatch) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits; the denied-access case covers root")
    run.chmod(0o500)


def _access_denied_leftover(run: Path, monkeypatch) -> None:
    """What a read-only folder looks like to a user other than root, whatever user runs the test."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == run and mode & os.W_OK
                        else real(p, mode, **kw))


@pytest.mark.parametrize("make", [_read_only_leftover, _access_denied_leftover], ids=["chmod-500", "access-denied"])
def test_leftover_that_cannot_be_removed_is_refused_before_ray(make, tmp_path: Path, capsys, monkeypatch):
    """Issue 14 item 7: a PermissionError traceback came after Ray had started."""
    calls = forbid_cluster(monkeypatch)
    sweep = write_yaml(tmp_path / "s.yaml", TINY_SWEEP)
    config = SweepConfig.model_validate(yaml.safe_load(TINY_SWEEP))
    sweep_dir = SweepDir(tmp_path / "results" / "tiny")
    sweep_dir.claim("tiny", config.config_hash())
    run = sweep_dir.run(plan_sweep(config)[0].run_id).path
    (run / "sub").mkdir(parents=True)
    (run / "sub" / EVENTS).write_text("{}\n")  # what an interrupted attempt left
    try:
        make(run, monkeypatch)
        code = main(["run", str(sweep), "--results-dir", str(tmp_path / "results")])
    finally:
        run.chmod(0o700)
    err = capsys.readouterr().err
    assert code == 1 and calls == []
    assert stderr_lines(err) == [f"batchscale: error: {run} is left from an interrupted attempt and cannot be "
                                 f"removed ({run} is not writable); fix its permissions or delete it"]
    assert (run / "sub" / EVENTS).exists()


# --- results store: corrupt run folders are skipped, healthy ones kept --------------------------

RESULTS_SWEEP = dict(name="reliab", description=f"escape test {EVIL}", workload="blobs",
                     lr=dict(reference_lr=0.05, reference_batch_size=50, scaling="none"), epochs=2,
                     global_batch_sizes=[50, 100, 125, 250, 500], target_accuracy=0.5,
                     telemetry=dict(enabled=False))


@pytest.fixture(scope="module")
def results_folder(tmp_path_factory) -> Path:
    """Five complete runs, made by the worker loop in-process the way the driver lays them out."""
    from bench.fingerprint import fingerprint
    from bench.worker import WorkerContext, execute_run

    sweep = SweepConfig.model_validate(RESULTS_SWEEP)
    cluster = ClusterConfig(name="local")
    sweep_dir = SweepDir(tmp_path_factory.mktemp("results") / sweep.name)
    sweep_dir.claim(sweep.name, sweep.config_hash())
    env = fingerprint(None)
    for plan in plan_sweep(sweep):
        run = sweep_dir.run(plan.run_id)
        run.prepare(config=sweep.model_dump(mode="json"), cluster=cluster.model_dump(mode="json"),
                    run_plan=plan.to_dict(), env=env)
        assert execute_run(plan, sweep, run, WorkerContext()).status == "success"
    return sweep_dir.path


def _break_middle_event_line(run: Path) -> None:
    lines = (run / EVENTS).read_text().splitlines(keepends=True)
    lines[2] = lines[2][: len(lines[2]) // 2] + "\n"
    (run / EVENTS).write_text("".join(lines))


def _tear_last_event_line(run: Path) -> None:
    """What a crash mid-write leaves: the last line cut short (readers ignore it)."""
    with open(run / EVENTS, "a") as fh:
        fh.write('{"time_ms": 17640000')


CORRUPTIONS = {  # run id -> what is done to it; None: left healthy
    "gbs000050-w001-s0": _break_middle_event_line,
    "gbs000100-w001-s0": lambda run: (run / RUN_PLAN).write_text('{"run_id": "gbs0001'),
    "gbs000125-w001-s0": lambda run: (run / SUMMARY).write_text('{"status": "succ'),
    "gbs000250-w001-s0": _tear_last_event_line,
    "gbs000500-w001-s0": None,
}


def test_corrupt_run_folders_marked_damaged_with_one_line_each(results_folder: Path, tmp_path: Path, capsys):
    """A corrupt run folder is listed as damaged (never silently dropped) and warned about once."""
    import shutil

    sweep_dir = tmp_path / results_folder.name
    shutil.copytree(results_folder, sweep_dir)
    for run_id, corrupt in CORRUPTIONS.items():
        if corrupt:
            corrupt(sweep_dir / run_id)
    code = main(["results", str(sweep_dir), "--format", "csv"])
    out, err = capsys.readouterr()
    assert code == 0
    rows = {r["run_id"]: r["status"] for r in csv.DictReader(io.StringIO(out))}
    assert rows == {"gbs000050-w001-s0": "damaged", "gbs000100-w001-s0": "damaged",
                    "gbs000125-w001-s0": "damaged", "gbs000250-w001-s0": "success",
                    "gbs000500-w001-s0": "success"}
    warnings = stderr_lines(err)
    assert len(warnings) == 3, err
    for line, run_id in zip(warnings, ["gbs000050-w001-s0", "gbs000100-w001-s0", "gbs000125-w001-s0"]):
        assert line.startswith("batchscale: ") and f"damaged run folder {sweep_dir / run_id}:" in line
    assert ":3: broken event line" in warnings[0]  # the file and line number of the damage


# --- security ---------------------------------------------------------------------------------

def test_python_object_payload_is_refused_and_not_executed(tmp_path: Path, capsys):
    pwned = tmp_path / "pwned"
    payload = f'payload: !!python/object/apply:os.system ["touch {pwned}"]\n'
    sweep = write_yaml(tmp_path / "evil.yaml", TINY_SWEEP + payload)
    code = main(["run", str(sweep), "--results-dir", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 2
    assert stderr_lines(err) == [f"batchscale: error: {sweep}: is not valid YAML (line 9: could not determine "
                                 "a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system')"]
    assert not pwned.exists() and not (tmp_path / "results").exists()


def test_local_ray_starts_without_dashboard(monkeypatch):
    ray = pytest.importorskip("ray")
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(launcher, "_STARTED_HERE", False)
    monkeypatch.setattr(launcher, "check_resources", lambda *a: None)  # no live nodes behind the mock
    monkeypatch.setenv("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    launcher.connect(ClusterConfig(name="local"), max_workers=1)
    assert len(calls) == 1 and calls[0]["include_dashboard"] is False
    assert "address" not in calls[0]


UNPICKLING_MODULES = {"pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader"}


def _dotted(node: ast.AST) -> str:
    """'torch.load' for the call target torch.load, '' for anything not a plain name chain."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _kwarg(call: ast.Call, name: str) -> ast.AST | None:
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def unsafe_loading(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for every place that can turn bytes into arbitrary objects or code."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [(node.lineno, f"import {m}") for m in modules if m.split(".")[0] in UNPICKLING_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in ("eval", "exec") or name.endswith(("yaml.unsafe_load", "yaml.full_load")):
            found.append((node.lineno, name))
        elif name.endswith("yaml.load") and _dotted(_kwarg(node, "Loader") or ast.Constant(None)).split(".")[-1] \
                not in SAFE_YAML_LOADERS:
            found.append((node.lineno, name))
        elif name == "torch.load" and not getattr(_kwarg(node, "weights_only"), "value", False) is True:
            found.append((node.lineno, "torch.load without weights_only=True"))
        elif name.endswith(("np.load", "numpy.load")) and getattr(_kwarg(node, "allow_pickle"), "value", False):
            found.append((node.lineno, "np.load(allow_pickle=True)"))
    return found


def scan_package() -> dict[str, list[tuple[int, str]]]:
    """unsafe_loading() of every module under bench/, by path relative to the repo."""
    hits = {}
    for path in sorted((REPO / "bench").rglob("*.py")):
        found = unsafe_loading(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        if found:
            hits[str(path.relative_to(REPO))] = found
    return hits


def test_only_the_cifar_loader_unpickles():
    """Turning untrusted bytes into objects happens in one place: CIFAR's python-pickle files,
    read through an allow-list unpickler. YAML only with the safe loader, no eval/exec."""
    hits = {path: [h for h in found if not h[1].startswith("torch.load")] for path, found in scan_package().items()}
    hits = {path: found for path, found in hits.items() if found}
    assert set(hits) <= {"bench/workloads/vision.py"}, hits
    assert {what for _, what in hits.get("bench/workloads/vision.py", [])} <= {"import pickle"}, hits


def test_checkpoints_load_with_weights_only():
    hits = {path: [h for h in found if h[1].startswith("torch.load")] for path, found in scan_package().items()}
    assert {path: found for path, found in hits.items() if found} == {}


def test_the_unsafe_loading_scan_finds_what_it_looks_for():
    """The scan above is only as good as its patterns: each of these must be found."""
    code = ("import pickle\nfrom dill import loads\nimport yaml, torch\nyaml.load(s)\n"
            "yaml.load(s, Loader=yaml.SafeLoader)\ntorch.load(f)\ntorch.load(f, weights_only=True)\n"
            "eval(x)\nmodel.eval()\n")
    assert [line for line, _ in unsafe_loading(ast.parse(code))] == [1, 2, 4, 6, 8]


def test_report_escapes_text_from_the_config(results_folder: Path, tmp_path: Path):
    report = pytest.importorskip("bench.report")
    page = report.write_report([results_folder], tmp_path / "r.html").read_text()
    assert EVIL not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the description is shown, as text


# --- driver interruption (starts Ray in a subprocess) -------------------------------------------

# Runs go in batch order. The first and second runs are both capped at max_steps (6000 steps,
# ~5-10 s each on a loaded 2-core machine), so that the signal lands well inside the second;
# the third is 200 steps.
INTERRUPT_SWEEP = """\
name: intr
workload: blobs
lr: {reference_lr: 0.01, reference_batch_size: 32, scaling: none}
epochs: 100
max_steps: 6000
global_batch_sizes: [5, 10, 250]
num_workers: [1]
seeds: [0]
target_accuracy: 0.5
telemetry: {enabled: false}
"""
FIRST, SECOND, THIRD = "gbs000005-w001-s0", "gbs000010-w001-s0", "gbs000250-w001-s0"
DEADLINE_S = 300  # Ray start-up on a loaded 2-core machine takes ~30 s; fail rather than hang


class DriverDidNotStopCleanly(Exception):
    """The driver did not end with exit code 130 and its one-line message (or printed a traceback)."""


def _driver(sweep: Path, results: Path, fault: str | None = None, **extra_env: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "BATCHSCALE_FAULT"}
    return subprocess.Popen([sys.executable, "-m", "bench", "run", str(sweep), "--results-dir", str(results)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, **({"BATCHSCALE_FAULT": fault} if fault else {}), **extra_env})


def rays_own_lines(err: str) -> list[str]:
    """Lines on a driver's stderr that batchscale did not print: Ray's Python logging
    ("2026-12-02 16:57:39,344\tWARNING ...") or its C++ core ("[2026-12-02 16:52:23,320 W ...")."""
    return [line for line in stderr_lines(err) if re.match(r"^\[?\d{4}-\d\d-\d\d[ T]", line)]


def _wait_for(predicate, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"driver exited ({proc.returncode}) before {what}:\n{out}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            pytest.fail(f"no {what} within {DEADLINE_S} s")
        time.sleep(0.1)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"driver did not exit within {DEADLINE_S} s:\n{out}\n{err[-3000:]}")
    return proc.returncode, out, err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_sweep_keeps_complete_runs_and_resumes(sig, tmp_path: Path, capsys):
    sweep = write_yaml(tmp_path / "intr.yaml", INTERRUPT_SWEEP)
    results = tmp_path / "results"
    runs = results / "intr"
    # The second run takes under a second here: it stalls after epoch 1 so that the signal
    # always lands mid-run (it once finished first on a 2-core machine).
    proc = _driver(sweep, results, fault=f"{SECOND}:1:stall")
    _wait_for(lambda: (runs / FIRST / SUMMARY).exists() and (runs / SECOND / EVENTS).exists(), proc,
              "the first run complete and the second started")
    proc.send_signal(sig)
    code, out, err = _finish(proc)

    # Nothing lost: the complete run is intact, the interrupted one is not marked complete.
    assert json.loads((runs / FIRST / SUMMARY).read_text())["status"] == "success"
    assert not (runs / SECOND / SUMMARY).exists(), "the second run finished before the signal landed"
    assert not (runs / THIRD / SUMMARY).exists()

    if sig == signal.SIGINT:  # resume once (the same for both signals; each costs a Ray start)
        code2, out2, err2 = _finish(_driver(sweep, results))
        assert code2 == 0, err2
        assert rays_own_lines(err2) == [] and "Token authentication" not in err2, err2  # issue 14 item 11
        assert "3 runs planned, 1 already complete, 2 to run" in out2
        assert "done in" in out2 and "3 success;" in out2 and "1 worker-group start(s)" in out2, out2
        capsys.readouterr()
        assert main(["results", str(runs), "--format", "csv"]) == 0
        rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
        assert sorted(r["run_id"] for r in rows) == [FIRST, SECOND, THIRD]
        assert all(r["status"] == "success" for r in rows)

    # Ray's background threads may still print while the process exits: the message must be
    # there, not necessarily last.
    said = any(line.startswith("batchscale: error: interrupted;") for line in stderr_lines(err))
    if code != 130 or "Traceback" in err or not said:
        raise DriverDidNotStopCleanly(f"exit code {code}, interrupted message printed: {said}\n{err[-2000:]}")


# Ray's per-node agents (process titles). After their raylet dies they wait up to 60 s to report
# that to the GCS, which died with it (ray/_private/utils.py publish_error_to_driver), then exit;
# they run no batchscale code and write nothing under results/ (docs/reliability.md).
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _processes_with(tag: str) -> list[str]:
    """'pid title' of every process whose environment holds ``tag`` (the driver and, since they
    inherit it, the local Ray it started: GCS, raylet, workers), Ray's agents left out."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and tag.encode() in (proc / "environ").read_bytes():
                title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
                if not title.startswith(RAY_AGENTS):
                    found.append(f"{proc.name} {title}")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _worker_checks_its_driver() -> bool:
    from bench.worker import WorkerContext

    return "driver_alive" in getattr(WorkerContext, "__dataclass_fields__", {})


ORPHAN_WAIT_S = 30.0


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
@pytest.mark.skipif(not _worker_checks_its_driver(),
                    reason="needs bench.worker to ask WorkerContext.driver_alive before writing a summary")
def test_sigkilled_driver_leaves_no_run_completed_and_no_worker_behind(tmp_path: Path):
    """Issue 14 item 15: after SIGKILL of the driver, orphaned workers completed two more runs with
    no lock held, and Ray processes lived on ~100 s. The driver dies while the second run trains
    its last epochs (an orphan would finish it within a second); the third would take a second."""
    sweep = write_yaml(tmp_path / "intr.yaml", INTERRUPT_SWEEP)
    results = tmp_path / "results"
    runs = results / "intr"
    tag = f"batchscale-test-{uuid.uuid4().hex}"
    proc = _driver(sweep, results, BATCHSCALE_TEST_TAG=tag)

    def second_near_its_end() -> bool:  # 97 of its 100 epochs done
        events = runs / SECOND / EVENTS
        return events.exists() and len(re.findall(rf'"key":\s*"{ev.EPOCH_STOP}"', events.read_text())) >= 97

    _wait_for(second_near_its_end, proc, "the second run near its end")
    proc.kill()
    proc.communicate(timeout=DEADLINE_S)
    complete = sorted(p.parent.name for p in runs.glob("*/" + SUMMARY))
    deadline = time.monotonic() + ORPHAN_WAIT_S
    while _processes_with(tag) and time.monotonic() < deadline:
        time.sleep(1)
    survivors = _processes_with(tag)
    time.sleep(2)  # a write in flight lands
    assert FIRST in complete
    assert sorted(p.parent.name for p in runs.glob("*/" + SUMMARY)) == complete, "an orphan completed a run"
    assert survivors == [], f"still running {ORPHAN_WAIT_S:g} s after the driver's SIGKILL: {survivors}"


def test_fingerprint_takes_the_commit_from_the_environment_when_named(monkeypatch) -> None:
    """A lent GPU machine gets the working tree without .git: the caller names the commit."""
    from bench import fingerprint as fp

    monkeypatch.delenv("BATCHSCALE_GIT_SHA", raising=False)
    with_git = fp.fingerprint(None)
    assert with_git["git_sha_from"] == "git" and len(with_git["git_sha"]) == 40
    # a copy whose .git is at another commit (the lent H200's held the last landed one): the
    # named commit wins, and what git said is kept beside it
    monkeypatch.setenv("BATCHSCALE_GIT_SHA", "0123abcd")
    both = fp.fingerprint(None)
    assert (both["git_sha"], both["git_sha_from"], both["git_checkout_sha"]) == (
        "0123abcd", "BATCHSCALE_GIT_SHA", with_git["git_sha"])
    monkeypatch.delenv("BATCHSCALE_GIT_SHA")
    monkeypatch.setattr(fp, "_git", lambda *args: None)
    monkeypatch.delenv("BATCHSCALE_GIT_SHA", raising=False)
    assert (fp.fingerprint(None)["git_sha"], fp.fingerprint(None)["git_sha_from"]) == (None, None)
    monkeypatch.setenv("BATCHSCALE_GIT_SHA", "0123abcd")
    env = fp.fingerprint(None)
    assert (env["git_sha"], env["git_sha_from"], env["git_dirty"]) == ("0123abcd", "BATCHSCALE_GIT_SHA", None)
