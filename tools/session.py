"""Running a plan of measurements within a device-time budget, resumably (the runner behind
``tools/gpu_session.py``).

Owns: ``Step`` (a command, what it creates, its estimate, cap and dependencies, and the files
it needs to exist at all), deciding which steps are done (their outputs exist; a sweep: all
its planned runs complete) or not built yet, running the rest one process group at a time
against a deadline (and each capped step against its cap), the session log, one archive of
everything they wrote, and the summary table. For a sweep step it also records what the call
cost beside training: wall-clock from the step's start to its last completed run over the sum
of those runs' training times (``sweep_overhead``).

Why resumable: a lent GPU comes with minutes, not hours, of device time, on a machine that
forgets everything between leases. A call runs whatever fits and stops cleanly; a step is done
when its outputs exist, so the next call, started with the previous archive unpacked into the
repo, takes up where this one stopped. Sweeps resume by themselves (``batchscale run`` keeps
completed runs).

Must not import: torch or ray (each step runs in its own process; this one only waits).
"""

from __future__ import annotations

import json
import os
import platform
import selectors
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

MIN_RESUMABLE_S = 90  # a sweep step needs at least a Ray start and one run
KILL_GRACE_S = 20  # SIGINT first (the CLI keeps completed runs), then SIGKILL
LOG = "results/gpu/session-log.jsonl"  # where a caller gives no log of its own


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]  # run as [python, *argv] in the repo root
    creates: tuple[str, ...] = ()  # done when all exist (repo-relative)
    estimate_s: int = 60
    sweep: Optional[str] = None  # a packaged sweep: done when its planned runs are complete; resumable
    headline: Optional[Callable[[Path], str]] = None
    needs: Optional[str] = None  # a step that must be done first
    cap_s: Optional[float] = None  # at most this long in one call (a resumable sweep), then the next step
    requires: tuple[str, ...] = ()  # repo-relative files without which the step is not built yet
    min_gpus: int = 0  # a machine with fewer GPUs cannot run it


@dataclass
class Outcome:
    step: Step
    status: str  # done before | ok | failed | cut off | skipped: ... (cannot run here) | not started: ...
    seconds: float = 0.0
    rc: Optional[int] = None
    headline: str = ""
    log_tail: list[str] = field(default_factory=list)
    sweep_overhead: Optional[dict] = None  # a sweep step's cost beside training in this call


# --- built, done or not ----------------------------------------------------------------------------

def missing(step: Step, root: Path) -> list[str]:
    """The files the step needs that this checkout does not have (it is not built yet)."""
    return [p for p in step.requires if not (root / p).exists()]


def sweep_progress(root: Path, name: str) -> tuple[int, int]:
    """(complete runs, planned runs) of a packaged sweep under root/results/<name>."""
    from bench.config import load_sweep  # pydantic + yaml only
    from bench.plan import run_id
    from bench.store import SweepDir

    sweep = load_sweep(name)[0]
    ids = [run_id(g, w, s) for w in sweep.num_workers for g in sweep.batch_sizes for s in sweep.seeds]
    sweep_dir = SweepDir(root / "results" / name)
    return sum(sweep_dir.run(i).is_complete() for i in ids), len(ids)


def sweep_overhead(root: Path, name: str, since: float) -> Optional[dict]:
    """What the runs completed after wall-clock time ``since`` cost beside their training:
    (last completion - since) / sum of their ``train_time_s``, and over their ``wall_time_s``
    (what the driver, Ray and start-up add on top of the runs). None when no run completed."""
    from bench.errors import BatchscaleError
    from bench.store import SweepDir

    runs = []
    for run_dir in SweepDir(root / "results" / name).run_dirs():
        path = run_dir.summary_path
        if path.is_file() and path.stat().st_mtime >= since:
            try:
                summary = run_dir.read_summary()
            except BatchscaleError:  # a damaged run: not counted
                continue
            if summary is not None:
                runs.append((path.stat().st_mtime, summary))
    if not runs:
        return None
    wall_s = max(t for t, _ in runs) - since
    train_s = sum(s.train_time_s for _, s in runs)
    run_wall_s = sum(s.wall_time_s for _, s in runs)
    return {"runs": len(runs), "wall_s": round(wall_s, 1), "train_s": round(train_s, 1),
            "runs_wall_s": round(run_wall_s, 1), "wall_over_train": round(wall_s / train_s, 3) if train_s else None,
            "wall_over_runs": round(wall_s / run_wall_s, 3) if run_wall_s else None}


def is_done(step: Step, root: Path) -> bool:
    if missing(step, root):
        return False
    if step.sweep is not None:
        done, total = sweep_progress(root, step.sweep)
        return done == total
    return bool(step.creates) and all((root / p).exists() for p in step.creates)


def outputs(step: Step) -> list[str]:
    return [*step.creates] + ([f"results/{step.sweep}"] if step.sweep else [])


def blocked(step: Step, root: Path, by_name: dict[str, Step], num_gpus: int) -> Optional[str]:
    """Why the step cannot run in this checkout or on this machine at all (not built, too few
    GPUs, or waits on a step that cannot run), else None."""
    lacking = missing(step, root)
    if lacking:
        return f"skipped: not built (no {', '.join(lacking)})"
    if num_gpus < step.min_gpus:
        return f"skipped: needs {step.min_gpus} GPUs, this machine has {num_gpus}"
    if step.needs is not None and step.needs in by_name and blocked(by_name[step.needs], root, by_name, num_gpus):
        return f"skipped: needs {step.needs}, which cannot run here"
    return None


# --- running -------------------------------------------------------------------------------------

def _stop(proc: subprocess.Popen) -> None:
    """SIGINT to the step's process group (the CLI then keeps completed runs and exits), then
    SIGKILL to whatever is left of it (Ray's processes included)."""
    for sig, wait_s in ((signal.SIGINT, KILL_GRACE_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            if sig == signal.SIGKILL:
                return
        except subprocess.TimeoutExpired:
            continue
    try:  # the leader is gone; members (Ray's raylet, workers) may still hold the group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_step(step: Step, root: Path, python: str, deadline: float, log_path: Path) -> Outcome:
    """Run one step in its own process group until it ends or the deadline passes. Its output
    is passed through to this process's stdout as it comes (partial lines too: a progress
    line must not hold the deadline up) and appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    seen = b""
    with log_path.open("ab") as log:
        log.write(f"\n=== {step.name}: {' '.join(step.argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen([python, *step.argv], cwd=root, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        cut_off = False
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)

            def pump(timeout: float) -> Optional[bool]:
                """Pass on what is there; False at end of output, None when nothing came."""
                nonlocal seen
                if not sel.select(timeout=timeout):
                    return None
                chunk = os.read(fd, 65536)
                if not chunk:
                    return False
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
                seen = (seen + chunk)[-4096:]
                return True

            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    cut_off = True
                    _stop(proc)
                    break
                got = pump(min(left, 0.5))
                if got is False or (got is None and proc.poll() is not None):
                    break  # ended (a child that kept the pipe open is not waited for)
            drain_until = time.monotonic() + 2.0  # what it printed while ending or being stopped
            while time.monotonic() < drain_until and pump(0.2):
                pass
        rc = proc.wait()
        try:  # a step's stray children (Ray's) must not outlive it into the next step
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    tail = [ln for ln in seen.decode("utf-8", "replace").replace("\r", "\n").splitlines() if ln.strip()][-5:]
    status = "cut off" if cut_off else ("ok" if rc == 0 else "failed")
    return Outcome(step, status, time.monotonic() - t0, rc, log_tail=tail)


def gpu_names() -> list[str]:
    """One model name per GPU nvidia-smi lists (none without it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [n.strip() for n in out.stdout.splitlines() if n.strip()]


def device_name(names: Optional[Sequence[str]] = None) -> str:
    """The GPU models, for the log; says so when there are none."""
    names = gpu_names() if names is None else names
    return ", ".join(names) if names else f"no GPU seen ({platform.node()})"


def run_session(plan: Sequence[Step], root: Path, *, budget_s: float, python: str = sys.executable,
                force: bool = False, log_rel: str = LOG, all_steps: Sequence[Step] = (),
                gpus: Optional[Sequence[str]] = None) -> list[Outcome]:
    """Run `plan` in order: each step not done, built, with what it needs done and time left for
    it (a resumable one: ``MIN_RESUMABLE_S``; else its estimate; ``force`` starts it anyway).
    A step's ``needs`` is looked up in `plan` and in `all_steps` (the whole plan, when `plan`
    is a selection of it). `gpus`: the machine's GPU models (default: nvidia-smi's)."""
    from bench.fingerprint import fingerprint

    deadline = time.monotonic() + budget_s
    gpus = gpu_names() if gpus is None else list(gpus)
    device = device_name(gpus)
    git_sha = fingerprint(None)["git_sha"]  # from BATCHSCALE_GIT_SHA on a copy without .git
    log_path = root / log_rel
    outcomes: list[Outcome] = []
    by_name = {s.name: s for s in all_steps} | {s.name: s for s in plan}
    unknown = sorted({s.needs for s in plan if s.needs is not None and s.needs not in by_name})
    if unknown:
        raise ValueError(f"steps needed but not in any plan: {', '.join(unknown)}")
    for step in plan:
        why_not = blocked(step, root, by_name, len(gpus))
        if why_not:
            outcomes.append(Outcome(step, why_not))
            continue
        if is_done(step, root):
            outcomes.append(Outcome(step, "done before"))
            continue
        if step.needs is not None and not is_done(by_name[step.needs], root):
            outcomes.append(Outcome(step, f"not started: needs {step.needs}"))
            continue
        left = deadline - time.monotonic()
        need = MIN_RESUMABLE_S if step.sweep is not None else step.estimate_s
        if left < need and not force:
            outcomes.append(Outcome(step, f"not started: {left:.0f} s left, needs {need} s"))
            continue
        print(f"--- {step.name} ({left:.0f} s left): {' '.join(step.argv)}", flush=True)
        step_deadline = deadline if step.cap_s is None else min(deadline, time.monotonic() + step.cap_s)
        started_at = time.time()
        outcome = run_step(step, root, python, step_deadline, log_path.with_suffix(".log"))
        if outcome.status == "ok" and step.creates and not is_done(step, root):
            outcome.status = "failed"  # exit 0 without its outputs
        if step.sweep is not None:
            outcome.sweep_overhead = sweep_overhead(root, step.sweep, started_at)
        outcomes.append(outcome)
        with log_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step.name, "argv": list(step.argv), "status": outcome.status,
                                 "rc": outcome.rc, "seconds": round(outcome.seconds, 1), "device": device,
                                 "git_sha": git_sha, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                 **({"sweep_overhead": outcome.sweep_overhead} if outcome.sweep_overhead else {})})
                     + "\n")
    for o in outcomes:
        if o.step.headline is not None and o.status in ("done before", "ok", "cut off"):
            try:
                o.headline = o.step.headline(root)
            except Exception as err:  # noqa: BLE001 - a headline never stops the summary
                o.headline = f"(no headline: {type(err).__name__}: {err})"
        if o.sweep_overhead:
            c = o.sweep_overhead
            o.headline += ("; " if o.headline else "") + (
                f"this call: {c['runs']} runs, wall {c['wall_s']:.0f} s / training {c['train_s']:.0f} s = "
                f"{c['wall_over_train']} (goal <= 1.10)")
    return outcomes


def write_archive(plan: Sequence[Step], root: Path, archive: Path, log_rel: str = LOG) -> list[str]:
    """tar.gz of every step's outputs that exist, plus the session log, without Ray's
    scratch (``.ray``) and lock files. Returns the archived top-level paths."""
    paths = [p for step in plan for p in outputs(step)] + [log_rel, str(Path(log_rel).with_suffix(".log"))]
    present = sorted({p for p in paths if (root / p).exists()})

    def keep(info: tarfile.TarInfo) -> Optional[tarfile.TarInfo]:
        parts = Path(info.name).parts
        return None if ".ray" in parts or info.name.endswith(".lock") else info

    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for p in present:
            tar.add(root / p, arcname=p, filter=keep)
    tmp.replace(archive)
    return present


def unfinished(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """Steps this checkout could run that are not done yet (a call with none exits 0)."""
    return [o for o in outcomes if o.status not in ("done before", "ok") and not o.status.startswith("skipped")]


def summary_table(outcomes: Sequence[Outcome]) -> str:
    width = max(len(o.step.name) for o in outcomes)
    status_w = max(len("status"), *(len(o.status) for o in outcomes))
    lines = [f"{'step'.ljust(width)}  {'status'.ljust(status_w)}  seconds  result"]
    for o in outcomes:
        secs = f"{o.seconds:7.0f}" if o.seconds else ""
        lines.append(f"{o.step.name.ljust(width)}  {o.status.ljust(status_w)}  {secs:>7}  {o.headline}".rstrip())
        if o.status == "failed" and o.log_tail:
            lines += [" " * (width + 2) + "| " + t for t in o.log_tail]
    return "\n".join(lines)


