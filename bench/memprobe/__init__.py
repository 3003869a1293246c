"""The memory probe: ``batchscale probe-memory SWEEP`` finds the largest per-GPU micro-batch a
sweep's training step fits in, and ``max_micro_batch_size: auto`` reads what it found
(``micro_batch_for_auto``).

Owns: ``register`` (the ``probe-memory`` parser) and ``cmd_probe_memory``: the arguments and
their checks (device, CPU / GPU memory cap, start and max batch, safety margin, repeats), one
progress line per try, the summary it prints (largest fit, the fit and its prediction, a
warning when an evaluation chunk does not fit, each per-worker batch's choice for ``auto``) and
where the probe file goes (``RESULTS_DIR/<sweep>/memory-probe.json`` unless ``-o``). A CPU probe
fixes glibc's mmap threshold in this process before torch is imported (docs/memory-probe.md).

Its parts: ``fit`` (pure: search, fit, choice, the file), ``device`` (``probe()``: the worker's
step tried on a device), ``meter`` (how a try's peak is read).

Must not import: ray, pandas; torch and bench.memprobe.device only inside ``cmd_probe_memory``
(bench.cli imports this package to build its parser, for every ``batchscale`` command).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.errors import EXIT_FAILED, ConfigError, PlanError, UserError
from bench.memprobe.fit import (DEFAULT_RESOLUTION, DEFAULT_SAFETY_MARGIN, ProbeMismatch, Try, default_output,
                                format_mib as _mib, micro_batch_for_auto, micro_batch_per_worker_batch, nothing_fits,
                                write_probe)
from bench.memprobe.meter import fix_mmap_threshold

__all__ = ["ProbeMismatch", "cmd_probe_memory", "micro_batch_for_auto", "register"]

GIB = 2**30



def resolve_micro_batch(sweep, *, results_dir: str | Path = "results",
                        use_gpu: bool | None = None) -> int | dict[int, int] | None:
    """The one resolver of the sweep's ``max_micro_batch_size``, for every caller that plans a
    sweep (``batchscale run``, ``--dry-run``, the tests' oracle): None (no cap) and an integer cap
    are themselves; ``auto`` is the memory probe's micro-batch per per-worker batch, read from
    RESULTS_DIR/<sweep>/memory-probe.json by ``bench.memprobe.micro_batch_for_auto`` (measured on
    GPUs or CPUs as ``use_gpu`` says). No usable probe raises PlanError saying what to run.
    Lives with the probe (not in the pure bench.plan) because it reads the probe's file."""
    cap = sweep.micro_batch_cap  # max_micro_batch_size, or a language model's max_micro_batch_tokens
    if cap != "auto":
        return cap
    try:
        return micro_batch_for_auto(sweep, results_dir, use_gpu=use_gpu)[0]
    except ProbeMismatch as err:
        raise PlanError(str(err)) from None


def cmd_probe_memory(args: argparse.Namespace) -> int:
    if args.device != "cuda":  # a CPU probe may follow: before torch and the data come and go
        fix_mmap_threshold()
    import torch

    from bench.config import load_sweep
    from bench.memprobe.device import probe

    try:
        sweep, sweep_path = load_sweep(args.sweep)
    except ConfigError as err:
        raise UserError(str(err)) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cap_gib = args.cpu_memory_cap_gib if device == "cpu" else args.gpu_memory_cap_gib
    if device == "cpu" and cap_gib is None:
        raise UserError("--device cpu needs --cpu-memory-cap-gib (the memory a try may use)")
    if device == "cpu" and args.gpu_memory_cap_gib is not None:
        raise UserError("--gpu-memory-cap-gib applies to --device cuda; use --cpu-memory-cap-gib")
    if device == "cuda" and args.cpu_memory_cap_gib is not None:
        raise UserError("--cpu-memory-cap-gib applies to --device cpu; use --gpu-memory-cap-gib")
    if cap_gib is not None and not 0 < cap_gib < 1e6:
        raise UserError(f"memory cap must be a positive number of GiB, got {cap_gib}")
    if not 0 <= args.resolution < 100:
        raise UserError(f"--resolution must be a percentage in [0, 100), got {args.resolution:g}")
    if not 1 <= args.start <= args.max_batch:
        raise UserError(f"need 1 <= --start <= --max-batch, got {args.start} and {args.max_batch}")
    if not 0 <= args.safety_margin < 1:
        raise UserError(f"--safety-margin must be in [0, 1), got {args.safety_margin}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available here (torch "
                        f"{torch.__version__}); use --device cpu --cpu-memory-cap-gib X", EXIT_FAILED)
    out = Path(args.output) if args.output else default_output(sweep, args.results_dir)
    cap = int(cap_gib * GIB) if cap_gib is not None else None

    def show(t: Try, info: dict) -> None:
        what = "fits" if t.ok else "out of memory"
        print(f"  micro-batch {t.micro_batch:>7}: {what:<13} peak {_mib(t.peak_bytes):>14}  "
              f"({info['seconds']:.2f} s)", flush=True)

    print(f"probing {sweep.name} ({sweep.model_name} on {sweep.workload}, {sweep.precision}"
          f"{', channels_last' if sweep.channels_last else ''}) on {device}"
          + (f", cap {cap_gib:g} GiB" if cap else ""), flush=True)
    try:
        result = probe(sweep, device=device, memory_cap_bytes=cap, start=args.start, max_batch=args.max_batch,
                       resolution=args.resolution / 100, safety_margin=args.safety_margin,
                       repeats=args.repeats, on_try=show)
    except OSError as err:
        raise UserError(f"{sweep_path}: cannot load workload {sweep.workload!r}: {err}", EXIT_FAILED) from None
    try:
        write_probe(result, out)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}", EXIT_FAILED) from None
    print(f"device {result.device}: {_mib(result.total_bytes)}; largest micro-batch that fits: "
          f"{result.largest_fit}" + (f" (first failure {result.first_fail})" if result.first_fail
                                     else " (nothing tried)" if result.largest_fit < 1
                                     else f" (max tried: {args.max_batch})"))
    if result.per_sample_bytes is not None:
        print(f"fit: {_mib(result.fixed_bytes)} + {result.per_sample_bytes / 2**10:,.1f} KiB x micro-batch; "
              f"predicted largest within {_mib(result.budget_bytes)} ({result.safety_margin:.0%} margin): "
              f"{result.predicted_largest if result.predicted_largest is not None else 'unbounded'}")
    check = result.limit_check
    if check:
        print(f"limit from the doubling tries alone ({', '.join(map(str, check['from_tries']))}), no margin: "
              f"{check['predicted']} vs measured {check['measured']} ({check['difference']:+d}; "
              f"{'within' if check['within'] else 'NOT within'} the first bisection step of "
              f"{check['first_bisection_step']})")
    if result.eval_check and not result.eval_check["ok"]:
        print(f"batchscale: warning: an evaluation chunk of {result.eval_check['chunk']} samples does not fit "
              f"({result.eval_check['error']})", file=sys.stderr)
    print(f"probe: {out}")
    if result.largest_fit < 1:
        raise UserError(f"no micro-batch fits: {nothing_fits(result)} (see {out})", EXIT_FAILED)
    chosen = micro_batch_per_worker_batch(result)
    unit = f" (sequences of {sweep.options.context_length} tokens)" if sweep.batch_unit == "tokens" else ""
    print(f"{'max_micro_batch_tokens' if unit else 'max_micro_batch_size'}: auto runs per-worker batch{unit} " + ", ".join(
        f"{p} as {p // m} x {m}" if m < p else f"{p} whole" for p, m in chosen.items()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `probe-memory` to the batchscale parser."""
    p = sub.add_parser("probe-memory", help="largest per-GPU micro-batch the sweep's training step fits")
    p.add_argument("sweep", help="sweep YAML, or a packaged name")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    p.add_argument("--cpu-memory-cap-gib", type=float, help="with --device cpu (required): memory a try may use")
    p.add_argument("--gpu-memory-cap-gib", type=float, help="with --device cuda: probe as if the GPU had this much")
    p.add_argument("--start", type=int, default=1, help="first micro-batch tried (default 1; doubles from there)")
    p.add_argument("--max-batch", type=int, default=65536, help="largest micro-batch tried (default 65536)")
    p.add_argument("--resolution", type=float, default=DEFAULT_RESOLUTION * 100, metavar="PERCENT",
                   help="stop bisecting within this share of the limit (default %(default).2g %%; 0: to the "
                        "last sample)")
    p.add_argument("--safety-margin", type=float, default=DEFAULT_SAFETY_MARGIN,
                   help="share of memory kept free in the prediction (default 0.1)")
    p.add_argument("--repeats", type=int, default=2, choices=range(1, 11), metavar="N",
                   help="optimizer steps per try (default 2)")
    p.add_argument("--results-dir", default="results", help="results root (default: ./results)")
    p.add_argument("-o", "--output", help="probe JSON (default: RESULTS_DIR/<sweep>/memory-probe.json)")
    p.set_defaults(func=cmd_probe_memory)
