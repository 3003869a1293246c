"""How much does the telemetry sampler slow training? (``python -m bench.perf telemetry-overhead``)

Owns: a synthetic training step (a ResNet-ish conv net or a large MLP built here, random data
already on the device, SGD; bf16 autocast and channels_last on CUDA) timed with the sampler
off, at 10 Hz and at 50 Hz. Blocks are interleaved (off, 10, 50, off, 10, 50, …) so drift in
clocks or temperature hits every setting alike; the device is synchronised before and after
each timed block, and the sampler starts (NVML init) and stops outside the timed region.
The ratio per rate is the median of per-round ratios on/off (with min/max), because the
spread between rounds can be as large as the effect (DESIGN.md, performance notes).

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
from torch import nn

from bench.perf.common import format_table, run_rounds_on_device
from bench.telemetry import Sampler, gpu_ids_from_torch_uuid

NUM_CLASSES = 10
# device -> defaults that keep a CPU run a few seconds and make a GPU step worth measuring
DEFAULTS = {
    # 300 steps (~2 s on an H200) per block: at 50 (0.35 s) the blocks' own spread was 0.92-1.21
    # on an H200 (results/h200/telemetry-overhead.json), far above the 0.5 % being measured.
    "cuda": {"micro_batch_size": 256, "width": 64, "image_size": 32, "steps_per_round": 300,
             "warmup_steps": 20},
    "cpu": {"micro_batch_size": 4, "width": 4, "image_size": 8, "steps_per_round": 3,
            "warmup_steps": 1},
}


class _Block(nn.Module):
    """Basic residual block (two 3x3 convs); a strided 1x1 conv on the skip when shapes change."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.skip = nn.Identity() if stride == 1 and in_ch == out_ch else nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def build_model(name: str, width: int, image_size: int) -> nn.Module:
    """``convnet``: ResNet-18-like in CIFAR form (widths w, 2w, 4w, 8w; two blocks each);
    ``mlp``: 3 hidden layers of 16w units on the flattened image."""
    if name == "convnet":
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_ch = width
        for stage, out_ch in enumerate([width, 2 * width, 4 * width, 8 * width]):
            layers += [_Block(in_ch, out_ch, 1 if stage == 0 else 2), _Block(out_ch, out_ch, 1)]
            in_ch = out_ch
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, NUM_CLASSES)]
        return nn.Sequential(*layers)
    if name == "mlp":
        hidden, in_features = 16 * width, 3 * image_size * image_size
        return nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
            nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))
    raise ValueError(f"unknown model {name!r}: use convnet or mlp")


def make_train_step(model: nn.Module, device: torch.device, micro_batch_size: int,
                    image_size: int) -> Callable[[], None]:
    """One optimizer step on a fixed random batch (data loading is not what we measure)."""
    on_cuda = device.type == "cuda"
    model = model.to(device)
    x = torch.randn(micro_batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (micro_batch_size,), device=device)
    if on_cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on_cuda):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

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
    step = make_train_step(build_model(args.model, args.width, args.image_size), device,
                           args.micro_batch_size, args.image_size)
    for _ in range(args.warmup_steps):  # cudnn autotune, allocator, first-call costs
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
    p.add_argument("--model", choices=["convnet", "mlp"], default="convnet")
    p.add_argument("--micro-batch-size", type=int, help="samples per step on the one device")
    p.add_argument("--width", type=int, help="channels of the first stage (mlp: hidden/16)")
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
    for key in ("micro_batch_size", "width", "image_size", "num_rounds", "steps_per_round"):
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
            "width": args.width, "image_size": args.image_size, "num_rounds": args.num_rounds,
            "steps_per_round": args.steps_per_round, "warmup_steps": args.warmup_steps,
            "torch": torch.__version__, "step_ms": result["step_ms"], "stats": stats,
            "overhead_ratio": {k: v["ratio_median"] for k, v in stats.items() if k != "off"},
            "telemetry_num_samples": num_samples, "telemetry_kind": kinds,
            "telemetry_errors": errors}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
