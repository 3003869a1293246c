"""The GPU measurements still owed (issue 18), run within a lease's device time, resumably:
``python tools/gpu_session.py [--list] [--budget-s S] [--only STEP…] [--archive F] [--tag T]``.

Owns: the plan (``build_plan``: issue 18's owed list in its priority order), one headline per
step read from what it wrote (with, for a GPU sweep, the per-run memory check: the same
micro-batch within 10 % across seeds, the training peak rising with the micro-batch, and the
memory probe's prediction beside it), what the plan cannot run (``NOT_PLANNED``), and the
command line. Running, resuming and archiving are tools/session.py's.

A lease is 15 minutes of device time, start-up included, in calls of at most ten minutes, so a
call (``--budget-s``, default 540) runs the steps in plan order while they fit: a step is not
started with less time left than its estimate (a resumable sweep: ``MIN_RESUMABLE_S``), each
sweep runs at most its ``cap_s`` per call so the steps after it get their turn, and the next
call, with the archive unpacked into the repo, resumes. Estimates are seconds on one Hopper GPU:
from the 2026-11-30 H200 lease's log (results/h200/session-log.jsonl), scaled by the longer
blocks and more rounds asked for here; the throughput tables and the GPU tests are guesses.
A step that cannot run here (a sweep not packaged yet, NCCL on a machine with one GPU) is listed
and skipped with the reason ("skipped: ..."); the call still exits 0 when all else is done.

Must not import: torch or ray (each step runs in its own process; this one only waits).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a script (python tools/gpu_session.py): bench from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.session import (MIN_RESUMABLE_S, Step, blocked, device_name, gpu_names, is_done, run_session,
                           summary_table, sweep_progress, unfinished, write_archive)

REPO = Path(__file__).resolve().parent.parent
LOG_TEMPLATE = "results/{tag}/session-log.jsonl"
_ONE_GPU = "clusters/single-node-multi-gpu.yaml"  # one worker per GPU
_SHARED_GPU = "clusters/one-gpu-two-workers.yaml"  # two gloo workers sharing one GPU

# Owed, but no step can run it in this checkout yet.
NOT_PLANNED = (
    ("LR search", "not built yet: no command to run"),
    ("concurrent runs across the cluster", "not built yet: no command to run"),
)


# --- headlines: one line per step from what it wrote ---------------------------------------------

def _json(root: Path, rel: str) -> dict:
    return json.loads((root / rel).read_text(encoding="utf-8"))


def _ratio(rel: str, target: str) -> Callable[[Path], str]:
    def line(root: Path) -> str:
        d = _json(root, rel)
        r = d["ratio"]
        return (f"B/A median {r['median']:.4f} (min {r['min']:.4f}, max {r['max']:.4f}) over "
                f"{len(d.get('pairs', []))} pairs on {d.get('device_name')}; target {target}")
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


def _allreduce(rel: str) -> Callable[[Path], str]:
    def line(root: Path) -> str:
        d = _json(root, rel)
        big = max(d["rows"], key=lambda r: r["size_bytes"])
        return (f"{d['num_workers']} ranks on {d.get('device')}: busbw {big['busbw_gb_s']:.1f} GB/s at "
                f"{big['size_bytes'] / 2**20:.0f} MiB, {sum(r['num_wrong'] for r in d['rows'])} wrong values")
    return line


def _pytest(rel: str) -> Callable[[Path], str]:
    def line(root: Path) -> str:
        import xml.etree.ElementTree as ET

        suite = ET.parse(root / rel).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
        return f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
    return line


def memory_check(root: Path, name: str) -> str:
    """The per-run memory of a GPU sweep's complete runs (``summary.memory``): the same
    micro-batch within 10 % across seeds, the training peak rising with the micro-batch, and
    the memory probe's linear fit at the largest micro-batch beside what that run measured."""
    from bench.errors import BatchscaleError
    from bench.store import SweepDir

    peaks: dict[int, list[float]] = {}
    for run_dir in SweepDir(root / "results" / name).run_dirs():
        try:
            s = run_dir.read_summary() if run_dir.is_complete() else None
        except BatchscaleError:
            continue
        if s is not None and s.memory is not None:
            peaks.setdefault(s.micro_batch_size, []).append(s.memory.train_peak_reserved_gib)
    if not peaks:
        return "no per-run memory yet"
    spreads = [max(v) / min(v) - 1 for v in peaks.values() if len(v) > 1 and min(v) > 0]
    means = [statistics.mean(peaks[m]) for m in sorted(peaks)]
    rising = all(b >= a for a, b in zip(means, means[1:]))
    line = ((f"seeds within {max(spreads):.1%} (goal 10 %)" if spreads else "one seed per micro-batch so far")
            + f"; training peak {'rises' if rising else 'does NOT rise'} with the micro-batch "
              f"({means[0]:.2f} .. {means[-1]:.2f} GiB reserved)")
    probe = root / "results" / name / "memory-probe.json"
    if probe.is_file():
        d = json.loads(probe.read_text(encoding="utf-8"))
        if d.get("fixed_bytes") is not None and d.get("per_sample_bytes") is not None:
            m = max(peaks)
            predicted = (d["fixed_bytes"] + d["per_sample_bytes"] * m) / 2**30
            line += f"; probe fit at micro-batch {m}: {predicted:.2f} GiB, run measured {means[-1]:.2f}"
    return line


def _sweep_line(name: str, memory: bool = False) -> Callable[[Path], str]:
    def line(root: Path) -> str:
        done, total = sweep_progress(root, name)
        return f"{done}/{total} runs complete" + (f"; memory: {memory_check(root, name)}" if memory else "")
    return line


# --- the plan ------------------------------------------------------------------------------------

def _perf(name: str, script: str, out: str, *args: str, estimate_s: int,
          headline: Callable[[str], Callable[[Path], str]], extra: tuple[str, ...] = ()) -> Step:
    """A ``python -m bench.perf SCRIPT ... --json OUT`` step, done when OUT (and ``extra``) exist."""
    return Step(name, ("-m", "bench.perf", script, *args, "--json", out), creates=(out, *extra),
                estimate_s=estimate_s, headline=headline(out))


def _probe_step(name: str, sweep: str, out: Optional[str], estimate_s: int, *args: str, built: bool = True) -> Step:
    path = out or f"results/{sweep}/memory-probe.json"
    return Step(name, ("-m", "bench", "probe-memory", sweep, *args, *(("-o", out) if out else ())),
                creates=(path,), estimate_s=estimate_s, headline=_probe(path),
                requires=() if built else (f"bench/sweeps/{sweep}.yaml",))


def _sweep(sweep: str, cluster: str, cap_s: int, needs: Optional[str] = None, built: bool = True,
           memory: bool = False) -> Step:
    """A packaged sweep; its report is made afterwards, on any machine, from the archived runs."""
    return Step(f"sweep-{sweep}", ("-m", "bench", "run", sweep, "--cluster", cluster), sweep=sweep,
                estimate_s=cap_s, headline=_sweep_line(sweep, memory), needs=needs, cap_s=cap_s,
                requires=() if built else (f"bench/sweeps/{sweep}.yaml",))


def build_plan(tag: str) -> tuple[Step, ...]:
    """Issue 18's owed list in its order, single-file measurements under ``results/<tag>/``
    (tag: the GPU model, e.g. h200). Steps marked ``built=False`` wait for a sweep another
    change packages; they are skipped as not built until its file exists."""
    d = f"results/{tag}"
    return (
        # (1) the harder GPU sweep (3 seeds, 128..8192, eval_every_steps resolution, per-run memory),
        # micro-batches chosen by its probe (max_micro_batch_size: auto)
        _probe_step("probe-shapes-hard-gpu", "shapes-hard-gpu", None, 30, "--max-batch", "8192", built=False),
        _sweep("shapes-hard-gpu", _ONE_GPU, cap_s=240, needs="probe-shapes-hard-gpu", built=False, memory=True),
        # (2) per-run memory on the GPU (tests/test_memory.py's GPU test) and the probe on CUDA
        # (a test module that needs a package the GPU image lacks is a collection error, not a stop)
        Step("pytest-gpu", ("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                            "--continue-on-collection-errors", "--junitxml", f"{d}/pytest-gpu.xml", "tests"),
             creates=(f"{d}/pytest-gpu.xml",), estimate_s=90, headline=_pytest(f"{d}/pytest-gpu.xml")),
        # (3) the sampler with ~2 s blocks x 12 rounds (median of 12 paired ratios), the noise
        # probe now read on the epoch sync with 3.6 s blocks x 9 rounds
        _perf("telemetry-overhead", "telemetry-overhead", f"{d}/telemetry-overhead-300steps.json", "--device", "cuda",
              "--num-rounds", "12", estimate_s=110, headline=lambda out: _overhead_ratios(out, "<= 1.005 at 10 Hz")),
        _perf("noise-overhead", "noise-overhead", f"{d}/noise-overhead-epoch-read.json", "--device", "cuda",
              "--num-rounds", "9", "--steps-per-round", "200", estimate_s=130,
              headline=lambda out: _overhead_ratios(out, "< 1.01 every 10 steps")),
        # (4) the ResNet-50 probe the last lease cut off, and the throughput tables
        _probe_step("probe-resnet50-224", "probe-resnet50-224", f"{d}/probe-r50.json", 60),
        _perf("throughput-resnet18", "throughput", f"{d}/throughput-r18.json", "--preset", "resnet18-cifar-512",
              "--csv", f"{d}/throughput-r18.csv", extra=(f"{d}/throughput-r18.csv",),
              estimate_s=120, headline=_throughput),
        _perf("throughput-resnet50", "throughput", f"{d}/throughput-r50.json", "--preset", "resnet50-224-256",
              "--csv", f"{d}/throughput-r50.csv", extra=(f"{d}/throughput-r50.csv",),
              estimate_s=150, headline=_throughput),
        # (5) in-run B_simple beside the fitted B_crit: two gloo workers sharing the GPU
        _sweep("shapes-gpu-noise", _SHARED_GPU, cap_s=240),
        # (6) the harness overhead again, 9 pairs, ResNet-18 with 400-step blocks (ResNet-50's 40
        # steps are the synthetic set's size limit); a whole sweep's overhead is every sweep
        # step's "this call" line (wall-clock over the runs' training time, goal <= 1.10)
        _perf("overhead-resnet18", "overhead", f"{d}/overhead-r18-9pairs.json", "--preset", "resnet18-cifar-512",
              "--pairs", "9", "--steps", "400", estimate_s=450, headline=lambda out: _ratio(out, ">= 0.98")),
        _perf("overhead-resnet50", "overhead", f"{d}/overhead-r50-9pairs.json", "--preset", "resnet50-224-256",
              "--pairs", "9", estimate_s=430, headline=lambda out: _ratio(out, ">= 0.98")),
        # (7) NCCL between GPUs (a lease of one GPU cannot), and when built the language-model sweep
        # (the LR search and concurrent runs: NOT_PLANNED)
        Step("allreduce-nccl", ("-m", "bench.perf", "allreduce", "--backend", "nccl", "--num-workers", "2",
                                "--system", tag), creates=(f"{d}/allreduce-nccl-w2.json",), estimate_s=60, min_gpus=2,
             headline=_allreduce(f"{d}/allreduce-nccl-w2.json")),
        _probe_step("probe-lm-gpu", "lm-gpu", None, 60, built=False),
        _sweep("lm-gpu", _ONE_GPU, cap_s=300, needs="probe-lm-gpu", built=False),
    )


def device_tag(name: str) -> str:
    """results/ folder name for a GPU model: 'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3'
    -> 'h100'; 'gpu' when no model is recognised."""
    for token in name.replace(",", " ").replace("-", " ").split():
        t = token.lower()
        if len(t) >= 3 and t[0] in "abhlv" and t[1:].isdigit():  # A100, B200, H100, L4.., V100
            return t
    return "gpu"


# --- command line --------------------------------------------------------------------------------

def list_plan(plan: list[Step], full: tuple[Step, ...], root: Path, num_gpus: int) -> str:
    by_name = {s.name: s for s in full}
    lines = []
    for s in plan:
        state = blocked(s, root, by_name, num_gpus) or ("done" if is_done(s, root) else "to do")
        budget = f"cap {s.cap_s:.0f} s" if s.cap_s else f"~{s.estimate_s} s"
        lines.append(f"{s.name:24} {state:50} {budget:>9}  {' '.join(s.argv)}")
    lines += [f"{'(not planned)':24} {what}: {why}" for what, why in NOT_PLANNED]
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/gpu_session.py", description=__doc__,
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


def main(argv: Optional[list[str]] = None, root: Path = REPO) -> int:
    """Run (or list) the plan in the checkout at `root` (this script's own by default)."""
    args = parse_args(argv)
    names = [s.name for s in build_plan("gpu")]  # the names do not depend on the tag
    unknown = [n for n in args.only or [] if n not in names]
    if unknown:
        print(f"error: unknown step(s) {', '.join(unknown)}; the plan: {', '.join(names)}", file=sys.stderr)
        return 2
    if args.budget_s <= 0:
        print("error: --budget-s must be positive", file=sys.stderr)
        return 2
    gpus = gpu_names()
    tag = args.tag or device_tag(device_name(gpus))
    full = build_plan(tag)
    plan = [s for s in full if not args.only or s.name in args.only]
    log_rel = LOG_TEMPLATE.format(tag=tag)
    if args.list:
        print(list_plan(plan, full, root, len(gpus)))
        return 0
    print(f"gpu session: {len(plan)} steps, {args.budget_s:.0f} s, results/{tag}/ (resumable sweeps need "
          f"{MIN_RESUMABLE_S} s)", flush=True)
    outcomes = run_session(plan, root, budget_s=args.budget_s, force=args.force, log_rel=log_rel, all_steps=full,
                           gpus=gpus)
    if args.archive is not None:
        kept = write_archive(plan, root, args.archive, log_rel)
        print(f"archive {args.archive}: {', '.join(kept) or 'nothing yet'}")
    print(summary_table(outcomes))
    return 1 if unfinished(outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
