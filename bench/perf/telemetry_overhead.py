"""How much does the telemetry sampler slow training? (``python -m bench.perf telemetry-overhead``)

Owns: timing the worker's training step (``bench.step.TrainStep`` over a model from
``bench.models``, one fixed random batch already on the device, SGD with momentum; bf16
autocast and channels_last on CUDA) with the sampler off, at 10 Hz and at 50 Hz. Blocks are
interleaved (off, 10, 50, off, 10, 50, …) so drift in clocks or temperature hits every setting
alike; the device is synchronised before and after each timed block, and the sampler starts
(NVML init) and stops outside the timed region. The ratio per rate is the median of per-round
ratios on/off (with min/max), because the spread between rounds can be as large as the effect
(docs/performance.md).

Imports torch and bench.telemetry; must not import ray.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench.models import build_model
from bench.perf.common import format_table, run_rounds_on_device
from bench.step import TrainStep
from bench.telemetry import Sampler, gpu_ids_from_torch_uuid

NUM_CLASSES = 10
LR = 0.01
MODELS = ("mlp", "small_cnn", "resnet18_cifar", "resnet18", "resnet50")  # image classifiers of bench.models
# device -> defaults that keep a CPU run a few seconds and make a GPU step worth measuring
DEFAULTS = {
    # 300 steps (~2 s on an H200) per block: at 50 (0.35 s) the blocks' own spread was 0.92-1.21
    # on an H200 (results/h200/telemetry-overhead.json), far above the 0.5 % being measured.
    "cuda": {"model": "resnet18_cifar", "micro_batch_size": 256, "image_size": 32, "steps_per_round": 300,
             "warmup_steps": 20},
    "cpu": {"model": "small_cnn", "micro_batch_size": 4, "image_size": 8, "steps_per_round": 3,
            "warmup_steps": 1},
}


def make_train_step(model_name: str, device: torch.device, micro_batch_size: int,
                    image_size: int) -> Callable[[], None]:
    """The worker's step (one micro-batch, one worker) on a fixed random batch: data loading
    is not what we measure."""
    on_cuda = device.type == "cuda"
    fmt = torch.channels_last if on_cuda else torch.contiguous_format
    torch.manual_seed(0)
    model = build_model(model_name, (3, image_size, image_size), NUM_CLASSES).to(device, memory_format=fmt)
    x = torch.randn(micro_batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, NUM_CLASSES, (micro_batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    train_step = TrainStep(model, optimizer, autocast=lambda: torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=on_cuda))

    def step() -> None:
        train_step([(x, y)], micro_batch_size, LR)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(step: Callable[[], None], num_steps: int, device: torch.device,
               sampler: Sampler | None) -> tuple[float, dict[str, Any] | None]:
    """(mean step time in ms over the block, sampler summary or None)."""
    if sampler is not None:  # timed from its first sample on: the steady state a run sees
        sampler.start()
        sampler.wait_first_sample()
    _sync(device)
    start_s = time.perf_counter()
    for _ in range(num_steps):
        step()
    _sync(device)
    elapsed_s = time.perf_counter() - start_s
    summary = sampler.stop() if sampler is not None else None
    return 1000.0 * elapsed_s / num_steps, summary


def _label(rate_hz: float | None) -> str:
    return "off" if rate_hz is None else f"{rate_hz:g}Hz"


def run_rounds(args: argparse.Namespace, device: torch.device, out_dir: Path) -> dict[str, Any]:
    """Interleaved rounds: every round times one block per setting, off first."""
    step = make_train_step(args.model, device, args.micro_batch_size, args.image_size)
    for _ in range(args.warmup_steps):  # allocator, first-call costs
        step()
    gpu_ids: list[str] = []
    if device.type == "cuda":
        uuid = torch.cuda.get_device_properties(device).uuid  # NVML ignores CUDA_VISIBLE_DEVICES
        gpu_ids = gpu_ids_from_torch_uuid("GPU-" + str(uuid))
    settings = [None, *args.rates_hz]
    step_ms: dict[str, list[float]] = {_label(r): [] for r in settings}
    telemetry: dict[str, list[dict[str, Any]]] = {_label(r): [] for r in settings[1:]}
    for round_index in range(args.num_rounds):
        for rate_hz in settings:
            label = _label(rate_hz)
            sampler = None if rate_hz is None else Sampler(
                out_dir / f"telemetry-{label}-round{round_index}.csv", run_id="telemetry-overhead",
                rank=0, hz=rate_hz, gpu_ids=gpu_ids)
            ms, summary = time_block(step, args.steps_per_round, device, sampler)
            step_ms[label].append(ms)
            if summary is not None:
                telemetry[label].append(summary)
    return {"step_ms": step_ms, "telemetry": telemetry}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="batchscale-perf telemetry-overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available, else cpu (tiny defaults)")
    p.add_argument("--model", choices=MODELS, help="default: resnet18_cifar on cuda, small_cnn on cpu")
    p.add_argument("--micro-batch-size", type=int, help="samples per step on the one device")
    p.add_argument("--image-size", type=int, help="pixels per side of the 3-channel input")
    p.add_argument("--num-rounds", type=int, default=10, help="interleaved rounds (default 10)")
    p.add_argument("--steps-per-round", type=int, help="timed steps per block")
    p.add_argument("--warmup-steps", type=int, help="untimed steps before the first round")
    p.add_argument("--rates-hz", type=float, nargs="+", default=[10.0, 50.0],
                   help="sampler rates to compare with off (default 10 50)")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("micro_batch_size", "image_size", "num_rounds", "steps_per_round"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup_steps < 0 or any(r <= 0 for r in args.rates_hz):
        p.error("--warmup-steps must be >= 0 and every --rates-hz > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    done = run_rounds_on_device(args, "telemetry-overhead", run_rounds)
    if done is None:
        return 2
    name, result, stats = done
    num_samples = {k: sum(s["num_samples"] for s in v) for k, v in result["telemetry"].items()}
    errors = sorted({s["error"] for v in result["telemetry"].values() for s in v if s["error"]})
    kinds = sorted({s["kind"] for v in result["telemetry"].values() for s in v})
    precision = "bf16 autocast" if args.device == "cuda" else "fp32"
    print(f"telemetry overhead: {args.model} on {name}, micro_batch_size {args.micro_batch_size}, "
          f"{args.num_rounds} rounds x {args.steps_per_round} steps, {precision}, "
          f"telemetry kind {'+'.join(kinds) or 'none'}")
    for error in errors:
        print(f"warning: sampler reported: {error}")
    print(format_table(stats, num_samples, label="sampler", count="samples"))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "device": name, "model": args.model, "micro_batch_size": args.micro_batch_size,
            "image_size": args.image_size, "num_rounds": args.num_rounds,
            "steps_per_round": args.steps_per_round, "warmup_steps": args.warmup_steps,
            "torch": torch.__version__, "step_ms": result["step_ms"], "stats": stats,
            "overhead_ratio": {k: v["ratio_median"] for k, v in stats.items() if k != "off"},
            "telemetry_num_samples": num_samples, "telemetry_kind": kinds,
            "telemetry_errors": errors}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
