"""What does the in-run noise-scale probe cost? (``python -m bench.perf noise-overhead``)

Owns: timing the real worker step (``bench.worker.Trainer.one_step``, fed by
``bench.feed``) with ``noise_scale_every_steps`` off (A) and at the chosen cadences (B),
one worker with gradient accumulation (the small batches are the micro-batches), on the
``synthetic`` workload resident on the device. Each setting is its own Trainer with the same
seed, model and plan; blocks of ``--steps-per-round`` steps (a multiple of every cadence, so
each B block holds the same number of probe steps) run interleaved A, B1, B2, A, B1, B2, ...
with the device synchronised before and after each block. The cost per cadence is the
median of per-round ratios B/A (with min/max), because the spread between rounds can be as
large as the effect (docs/performance.md).

What B pays on top of A: on a probe step, one gradient norm per micro-batch (of the gradient
accumulated so far minus a copy of the previous one) and the final norm; at the end of each
block (an epoch in a run) one host read of all its probes for the EMA (``bench.noise``
docstring). With several workers the probe instead rides in DDP's communication hook (a norm
per gradient bucket before and after its all-reduce, which keeps overlapping backward); that
path is not timed here.

Imports torch and bench; must not import ray.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.perf.common import format_table, run_rounds_on_device

DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": {"model": "resnet18_cifar", "image_size": 32, "micro_batch_size": 512, "accum": 2,
             "steps_per_round": 100},
    "cpu": {"model": "small_cnn", "image_size": 16, "micro_batch_size": 32, "accum": 2,
            "steps_per_round": 20},
}
MODELS = ("small_cnn", "resnet18_cifar", "resnet18", "resnet50")


def _sweep(args: argparse.Namespace, every: int, device: torch.device):
    from bench.config import SweepConfig

    batch = args.micro_batch_size * args.accum
    on_cuda = device.type == "cuda"
    return SweepConfig.model_validate({
        "name": "noise-overhead", "workload": "synthetic", "model": args.model,
        "workload_options": {"num_train": batch * args.steps_per_round, "num_test": 1,
                             "image_size": args.image_size},
        "lr": {"reference_lr": 0.01, "reference_batch_size": batch, "scaling": "none"}, "epochs": 1,
        "global_batch_sizes": [batch], "max_micro_batch_size": args.micro_batch_size, "seeds": [0],
        "target_accuracy": 1.0, "precision": "bf16" if on_cuda else "fp32", "channels_last": on_cuda,
        "noise_scale_every_steps": every, "telemetry": {"enabled": False}})


def _trainer(args: argparse.Namespace, every: int, device: torch.device, root: Path):
    from bench.plan import plan_sweep
    from bench.store import SweepDir
    from bench.worker import Trainer, WorkerContext

    sweep = _sweep(args, every, device)
    plan = plan_sweep(sweep)[0]
    run_dir = SweepDir(root / f"every-{every}").run(plan.run_id)
    run_dir.path.mkdir(parents=True)
    return Trainer(plan, sweep, run_dir, WorkerContext(device=device))


def _block(trainer, epoch: int, steps: int, device: torch.device) -> float:
    """Seconds for one block of steps (device synchronised at both ends)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for s, (micro_batches, num_global) in enumerate(trainer.feed.steps(epoch, steps)):
        trainer.one_step(micro_batches, num_global, s)
    trainer.read_pending()  # the block's probes and losses read and logged, as at the end of an epoch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def run_rounds(args: argparse.Namespace, device: torch.device, root: Path) -> dict[str, list[float]]:
    labels = ["off"] + [f"every {k}" for k in args.every]
    trainers = {"off": _trainer(args, 0, device, root)}
    trainers.update({f"every {k}": _trainer(args, k, device, root) for k in args.every})
    step_ms: dict[str, list[float]] = {label: [] for label in labels}
    try:
        for label in labels:  # warm-up: kernels chosen, allocator grown, first probe's buffers made
            _block(trainers[label], 0, args.steps_per_round, device)
        for r in range(args.num_rounds):
            for label in labels:
                seconds = _block(trainers[label], r + 1, args.steps_per_round, device)
                step_ms[label].append(1e3 * seconds / args.steps_per_round)
        probes = {label: sum(1 for _ in _noise_events(t)) for label, t in trainers.items()}
    finally:
        for t in trainers.values():
            t.close()
    return {"step_ms": step_ms, "probe_events": probes}


def _noise_events(trainer):
    from bench import events as ev  # every event line is flushed as written

    return (e for e in ev.read_events(trainer.run_dir.events_path) if e["key"] == ev.GRADIENT_NOISE_SCALE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.perf noise-overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--image-size", type=int)
    p.add_argument("--micro-batch-size", type=int, help="samples per micro-batch (the small batch b)")
    p.add_argument("--accum", type=int, help="micro-batches per step (>= 2: B = accum x b)")
    p.add_argument("--every", type=int, nargs="+", default=[10, 100],
                   help="probe cadences to compare with off (default 10 100)")
    p.add_argument("--num-rounds", type=int, default=7)
    p.add_argument("--steps-per-round", type=int, help="timed steps per block (rounded up to a multiple "
                                                        "of every cadence)")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.accum < 2:
        p.error("--accum must be >= 2: with one worker the micro-batches are the small batches")
    if min(args.every) < 1 or args.micro_batch_size < 1 or args.num_rounds < 1 or args.image_size < 8:
        p.error("--every, --micro-batch-size and --num-rounds must be >= 1, --image-size >= 8")
    lcm = math.lcm(*args.every)
    args.steps_per_round = -(-max(args.steps_per_round, 1) // lcm) * lcm
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    done = run_rounds_on_device(args, "noise-overhead", run_rounds)
    if done is None:
        return 2
    name, result, stats = done
    print(f"noise-scale probe overhead: {args.model} {args.image_size}px on {name}, one worker, "
          f"{args.accum} x {args.micro_batch_size} per step, {args.num_rounds} rounds x "
          f"{args.steps_per_round} steps")
    print(format_table(stats, result["probe_events"], label="probe", count="probes"))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "device": name, "model": args.model, "image_size": args.image_size,
            "micro_batch_size": args.micro_batch_size, "accum": args.accum, "every": args.every,
            "num_rounds": args.num_rounds, "steps_per_round": args.steps_per_round,
            "torch": torch.__version__, "step_ms": result["step_ms"], "stats": stats,
            "probe_events": result["probe_events"],
            "overhead_ratio": {k: v["ratio_median"] for k, v in stats.items() if k != "off"}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
