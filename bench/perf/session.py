"""The GPU measurements still owed, run within a device-time budget (``python -m bench.perf
gpu-session``).

Owns: the ordered plan of those measurements (``build_plan``: the README's "GPU measurements:
still to do"), deciding which are done, running the rest one process group at a time against a
deadline (and each sweep against its own cap), the session log, one archive of everything they
wrote, and the summary printed last.

Why it exists: a lent GPU comes with minutes, not hours, of device time, in calls of at most
ten minutes on a machine that forgets everything between leases. So a call runs whatever fits
in ``--budget-s`` and stops cleanly; a step is done when its outputs exist, so the next call,
started with the previous archive unpacked into the repo, takes up where this one stopped.
Sweeps resume by themselves (``batchscale run`` keeps completed runs), so a sweep cut off by
its cap or the deadline keeps its finished runs; a step that ``needs`` another waits until that
one is done. Reports, submissions and plans need no GPU and are made afterwards.

Per step: ``estimate_s`` is the time the step is expected to take on one Hopper GPU, from the
seconds the 2026-11-30 H200 lease logged (results/h200/session-log.jsonl; the throughput table
and the noise sweep are still guesses): a non-resumable step is not started with less time left
than its estimate, a resumable one not with less than ``MIN_RESUMABLE_S``. ``--force`` starts
them anyway.

Outputs: what each step writes, in the repo (``results/<gpu>/``, ``results/<sweep>/``); the
session log ``results/<gpu>/session-log.jsonl`` (one line per step started:
name, command, exit code, seconds, device, commit); with ``--archive PATH`` a tar.gz of all of that.

Must not import: torch or ray (each step runs in its own process; this one only waits).
"""

from __future__ import annotations

import argparse
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
LOG_TEMPLATE = "results/{tag}/session-log.jsonl"
LOG = LOG_TEMPLATE.format(tag="gpu")  # where main() has no tag of its own to give


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]  # run as [python, *argv] in the repo root
    creates: tuple[str, ...] = ()  # done when all exist (repo-relative)
    estimate_s: int = 60
    sweep: Optional[str] = None  # a packaged sweep: done when its planned runs are complete
    keep: tuple[str, ...] = ()  # more paths to archive
    headline: Optional[Callable[[Path], str]] = None
    resumable: bool = False
    needs: Optional[str] = None  # a step that must be done first
    cap_s: Optional[float] = None  # at most this long in one call (a resumable sweep), then the next step


@dataclass
class Outcome:
    step: Step
    status: str  # done before | ok | failed | cut off | not started: ...
    seconds: float = 0.0
    rc: Optional[int] = None
    headline: str = ""
    log_tail: list[str] = field(default_factory=list)


# --- headlines: one line per step from what it wrote ---------------------------------------------

def _json(root: Path, rel: str) -> dict:
    return json.loads((root / rel).read_text(encoding="utf-8"))


def _ratio(rel: str, target: str) -> Callable[[Path], str]:
    def line(root: Path) -> str:
        d = _json(root, rel)
        r = d["ratio"]
        return (f"B/A median {r['median']:.4f} (min {r['min']:.4f}, max {r['max']:.4f}) on "
                f"{d.get('device_name')}; target {target}")
    return line


def _overhead_ratios(rel: str, target: str) -> Callable[[Path], str]:
    def line(root: Path) -> str:
        d = _json(root, rel)
        parts = ", ".join(f"{k} {v:.4f}" for k, v in d["overhead_ratio"].items())
        return f"median ratio {parts} on {d.get('device')}; target {target}"
    return line


def _throughput(rel: str) -> Callable[[Path], str]:
    def line(root: Path) -> str:
        rows = [r for r in _json(root, rel)["rows"] if r.get("status") == "ok"]
        if not rows:
            return "no batch size ran"
        best = max(rows, key=lambda r: r.get("samples_per_s") or 0)
        return (f"{len(rows)} batch sizes, {rows[0].get('batch_size')}..{rows[-1].get('batch_size')}; "
                f"best {best.get('samples_per_s', 0):,.0f} samples/s at {best.get('batch_size')}"
                + (f", {best['tflops']:.1f} TFLOP/s" if best.get("tflops") is not None else ""))
    return line


def _probe(rel: str) -> Callable[[Path], str]:
    def line(root: Path) -> str:
        d = _json(root, rel)
        check = d.get("limit_check") or {}
        return (f"largest micro-batch {d['largest_fit']} on {d.get('device')}"
                + (f"; doubling fit predicted {check['predicted']} (within one bisection step: "
                   f"{check['within']})" if check else ""))
    return line


def _sweep_line(name: str) -> Callable[[Path], str]:
    def line(root: Path) -> str:
        done, total = sweep_progress(root, name)
        return f"{done}/{total} runs complete"
    return line


# --- the plan ------------------------------------------------------------------------------------

_ONE_GPU = "clusters/single-node-multi-gpu.yaml"
_SHARED_GPU = "clusters/one-gpu-two-workers.yaml"


def _perf(name: str, script: str, out: str, *args: str, estimate_s: int,
          headline: Callable[[str], Callable[[Path], str]], extra: tuple[str, ...] = ()) -> Step:
    """A ``python -m bench.perf SCRIPT ... --json OUT`` step, done when OUT (and ``extra``) exist."""
    return Step(name, ("-m", "bench.perf", script, *args, "--json", out), creates=(out, *extra),
                estimate_s=estimate_s, headline=headline(out))


def _probe_step(name: str, sweep: str, out: Optional[str], estimate_s: int, *args: str) -> Step:
    path = out or f"results/{sweep}/memory-probe.json"
    return Step(name, ("-m", "bench", "probe-memory", sweep, *args, *(("-o", out) if out else ())),
                creates=(path,), estimate_s=estimate_s, headline=_probe(path))


def _sweep(sweep: str, cluster: str, cap_s: int, needs: Optional[str] = None) -> Step:
    """A packaged sweep; reports are made afterwards, on any machine, from the committed runs."""
    return Step(f"sweep-{sweep}", ("-m", "bench", "run", sweep, "--cluster", cluster), sweep=sweep,
                estimate_s=cap_s, resumable=True, headline=_sweep_line(sweep), needs=needs, cap_s=cap_s)


def build_plan(tag: str) -> tuple[Step, ...]:
    """The plan, writing the single-file measurements under ``results/<tag>/`` (tag: the GPU
    model, e.g. h200). Order: what the open issues' "done when" needs, and the code paths never
    yet run on a GPU (the sweep) early, so that a first short call finds their faults while
    there is device time left to fix them. Each sweep gets at most ``cap_s`` per call so that
    the steps after it get their turn, and takes up where it stopped in the next call."""
    d = f"results/{tag}"
    return (
        # New file names where the code measured changed after a lease: the old figure stays as
        # it was measured, and the step counts as not done.
        _perf("telemetry-overhead", "telemetry-overhead", f"{d}/telemetry-overhead-300steps.json", "--device", "cuda",
              estimate_s=90, headline=lambda out: _overhead_ratios(out, "<= 1.005 at 10 Hz")),
        # The shapes sweep's largest batch is 8192: a probe past it would only cost time.
        _probe_step("probe-shapes-gpu", "shapes-gpu", None, 30, "--max-batch", "8192"),
        _sweep("shapes-gpu", _ONE_GPU, cap_s=180, needs="probe-shapes-gpu"),
        _perf("overhead-resnet18", "overhead", f"{d}/overhead-r18.json", "--preset", "resnet18-cifar-512",
              estimate_s=215, headline=lambda out: _ratio(out, ">= 0.98")),
        _perf("overhead-resnet50", "overhead", f"{d}/overhead-r50.json", "--preset", "resnet50-224-256",
              estimate_s=235, headline=lambda out: _ratio(out, ">= 0.98")),
        _probe_step("probe-resnet18-cifar", "probe-resnet18-cifar", f"{d}/probe-r18.json", 60,
                    "--max-batch", "262144"),  # a 139 GiB card holds more than the default's 65536
        _probe_step("probe-resnet50-224", "probe-resnet50-224", f"{d}/probe-r50.json", 60),
        _perf("noise-overhead", "noise-overhead", f"{d}/noise-overhead-epoch-read.json", "--device", "cuda",
              estimate_s=60, headline=lambda out: _overhead_ratios(out, "< 1.01")),
        _sweep("shapes-gpu-noise", _SHARED_GPU, cap_s=240),
        _perf("throughput-resnet18", "throughput", f"{d}/throughput-r18.json", "--preset", "resnet18-cifar-512",
              "--csv", f"{d}/throughput-r18.csv", extra=(f"{d}/throughput-r18.csv",),
              estimate_s=120, headline=_throughput),
    )


def device_tag(name: str) -> str:
    """results/ folder name for a GPU model: 'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3'
    -> 'h100'; 'gpu' when no model is recognised."""
    for token in name.replace(",", " ").replace("-", " ").split():
        t = token.lower()
        if len(t) >= 3 and t[0] in "abhlv" and t[1:].isdigit():  # A100, B200, H100, L4.., V100
            return t
    return "gpu"


# --- done or not ---------------------------------------------------------------------------------

def sweep_progress(root: Path, name: str) -> tuple[int, int]:
    """(complete runs, planned runs) of a packaged sweep under root/results/<name>."""
    from bench.config import load_sweep  # pydantic + yaml only
    from bench.plan import run_id
    from bench.store import SweepDir

    sweep = load_sweep(name)[0]
    ids = [run_id(g, w, s) for w in sweep.num_workers for g in sweep.global_batch_sizes for s in sweep.seeds]
    sweep_dir = SweepDir(root / "results" / name)
    return sum(sweep_dir.run(i).is_complete() for i in ids), len(ids)


def is_done(step: Step, root: Path) -> bool:
    if step.sweep is not None:
        done, total = sweep_progress(root, step.sweep)
        return done == total
    return bool(step.creates) and all((root / p).exists() for p in step.creates)


def outputs(step: Step) -> list[str]:
    return [*step.creates, *step.keep] + ([f"results/{step.sweep}"] if step.sweep else [])


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


def _device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
        if names:
            return ", ".join(names)
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"no GPU seen ({platform.node()})"


def run_session(plan: Sequence[Step], root: Path, *, budget_s: float, python: str = sys.executable,
                force: bool = False, log_rel: str = LOG, all_steps: Sequence[Step] = ()) -> list[Outcome]:
    """Run `plan`; a step's ``needs`` is looked up in it and in `all_steps` (the whole plan,
    when `plan` is a selection of it)."""
    from bench.fingerprint import fingerprint

    deadline = time.monotonic() + budget_s
    device = _device_name()
    git_sha = fingerprint(None)["git_sha"]  # from BATCHSCALE_GIT_SHA on a copy without .git
    log_path = root / log_rel
    outcomes: list[Outcome] = []
    by_name = {s.name: s for s in all_steps} | {s.name: s for s in plan}
    unknown = sorted({s.needs for s in plan if s.needs is not None and s.needs not in by_name})
    if unknown:
        raise ValueError(f"steps needed but not in any plan: {', '.join(unknown)}")
    for step in plan:
        if is_done(step, root):
            outcomes.append(Outcome(step, "done before"))
            continue
        if step.needs is not None and not is_done(by_name[step.needs], root):
            outcomes.append(Outcome(step, f"not started: needs {step.needs}"))
            continue
        left = deadline - time.monotonic()
        need = MIN_RESUMABLE_S if step.resumable else step.estimate_s
        if left < need and not force:
            outcomes.append(Outcome(step, f"not started: {left:.0f} s left, needs {need} s"))
            continue
        print(f"--- {step.name} ({left:.0f} s left): {' '.join(step.argv)}", flush=True)
        step_deadline = deadline if step.cap_s is None else min(deadline, time.monotonic() + step.cap_s)
        outcome = run_step(step, root, python, step_deadline, log_path.with_suffix(".log"))
        if outcome.status == "ok" and step.creates and not is_done(step, root):
            outcome.status = "failed"  # exit 0 without its outputs
        outcomes.append(outcome)
        with log_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step.name, "argv": list(step.argv), "status": outcome.status,
                                 "rc": outcome.rc, "seconds": round(outcome.seconds, 1), "device": device,
                                 "git_sha": git_sha,
                                 "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    for o in outcomes:
        if o.step.headline is not None and o.status in ("done before", "ok", "cut off"):
            try:
                o.headline = o.step.headline(root)
            except (OSError, KeyError, ValueError, TypeError, IndexError) as err:
                o.headline = f"(no headline: {type(err).__name__}: {err})"
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


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.perf gpu-session", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=540,
                   help="stop starting steps, and cut a running one off, after this many seconds (default 540)")
    p.add_argument("--only", nargs="+", metavar="STEP", help="these steps, in plan order (default: all)")
    p.add_argument("--archive", type=Path, help="write a tar.gz of everything the plan has written here")
    p.add_argument("--force", action="store_true", help="start steps even when their estimate exceeds the time left")
    p.add_argument("--list", action="store_true", help="print the plan and which steps are done, and exit")
    p.add_argument("--tag", help="results/ folder for the measurements and the log (default: the GPU model "
                   "nvidia-smi names, e.g. h200; 'gpu' when it names none)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    root = Path.cwd()
    names = [s.name for s in build_plan("gpu")]  # the names do not depend on the tag
    unknown = [n for n in args.only or [] if n not in names]
    if unknown:
        print(f"error: unknown step(s) {', '.join(unknown)}; the plan: {', '.join(names)}", file=sys.stderr)
        return 2
    if not (root / "bench" / "perf" / "session.py").exists():
        print("error: run this from the repository root (it writes results/ and reports/ there)", file=sys.stderr)
        return 2
    tag = args.tag or device_tag(_device_name())
    full = build_plan(tag)
    plan = [s for s in full if not args.only or s.name in args.only]
    log_rel = LOG_TEMPLATE.format(tag=tag)
    if args.list:
        for s in plan:
            print(f"{s.name:26} {'done' if is_done(s, root) else 'to do':6} ~{s.estimate_s:4d} s  "
                  f"{' '.join(s.argv)}")
        return 0
    if args.budget_s <= 0:
        print("error: --budget-s must be positive", file=sys.stderr)
        return 2
    outcomes = run_session(plan, root, budget_s=args.budget_s, force=args.force, log_rel=log_rel, all_steps=full)
    if args.archive is not None:
        kept = write_archive(plan, root, args.archive, log_rel)
        print(f"archive {args.archive}: {', '.join(kept) or 'nothing yet'}")
    print(summary_table(outcomes))
    left = [o for o in outcomes if o.status not in ("done before", "ok")]
    return 0 if not left else 1


if __name__ == "__main__":
    sys.exit(main())
