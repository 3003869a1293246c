"""Throughput across per-GPU batch sizes (``python -m bench.perf throughput``)

For one model and image size, times the plain training step of ``bench.perf.overhead`` (fixed
random batch on the device, SGD momentum 0.9, bf16 autocast + channels_last on CUDA) at
per-device batch sizes min, 2 x min, 4 x min, ... up to ``--max-batch-size``, stopping at the
first batch size that runs out of device memory (reported as the OOM row). Per batch size:

- samples/s and step time: ``--steps`` steps after ``--warmup-steps`` untimed ones, the
  device synchronised before and after the timed block;
- achieved TFLOP/s: FLOPs of one forward + backward counted once per batch size with
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, 2 FLOPs per
  multiply-add; element-wise ops, norms and the optimizer step are not counted), times
  steps / seconds. A lower bound on the work done, comparable across batch sizes;
- peak memory: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over that batch
  size's steps (CUDA only).

Like the worker loop, cuDNN autotuning is off unless ``--cudnn-benchmark``. Imports torch; must
not import ray.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.perf.overhead import MODELS, PRESETS, device_name, plain_step, sync, time_steps

DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": {"model": "resnet18_cifar", "image_size": 32, "min_batch_size": 32, "max_batch_size": 65536,
             "steps": 50, "warmup_steps": 10},
    "cpu": {"model": "small_cnn", "image_size": 16, "min_batch_size": 32, "max_batch_size": 256,
            "steps": 3, "warmup_steps": 1},
}
COLUMNS = ("batch_size", "status", "samples_per_s", "step_ms", "gflop_per_step", "tflops",
           "peak_allocated_gib", "peak_reserved_gib", "error")


def count_flops(forward_backward) -> int:
    """FLOPs of one forward + backward, as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        forward_backward()
    return int(counter.get_total_flops())


def measure(model: str, image_size: int, batch_size: int, device: torch.device, steps: int,
            warmup_steps: int) -> dict[str, Any]:
    """One row of the table. status 'oom' when the batch does not fit; 'error' when CUDA fails
    otherwise at that size (cuDNN workspace allocation, 32-bit index limits of a kernel):
    either way the row has no numbers and the sweep stops there."""
    row: dict[str, Any] = {k: None for k in COLUMNS}
    row.update(batch_size=batch_size, status="ok")
    on_cuda = device.type == "cuda"
    step = None
    try:
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        step = plain_step(model, image_size, batch_size, device)
        flops = count_flops(step.forward_backward)
        step.optimizer.zero_grad(set_to_none=True)
        for _ in range(warmup_steps):
            step.step()
        sync(device)
        seconds = time_steps(step.step, steps, device)
    except torch.cuda.OutOfMemoryError as err:
        row.update(status="oom", error=str(err).strip().splitlines()[0][:200])
        return row
    except RuntimeError as err:
        if not on_cuda:
            raise
        row.update(status="error", error=str(err).strip().splitlines()[0][:200])
        return row
    finally:
        del step
        if on_cuda:
            torch.cuda.empty_cache()
    row.update(samples_per_s=batch_size * steps / seconds, step_ms=1000.0 * seconds / steps,
               gflop_per_step=flops / 1e9, tflops=flops * steps / seconds / 1e12)
    if on_cuda:
        row.update(peak_allocated_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30)
    return row


def batch_sizes(smallest: int, largest: int) -> list[int]:
    sizes, b = [], smallest
    while b <= largest:
        sizes.append(b)
        b *= 2
    return sizes


def sweep(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for b in batch_sizes(args.min_batch_size, args.max_batch_size):
        row = measure(args.model, args.image_size, b, device, args.steps, args.warmup_steps)
        rows.append(row)
        print(format_row(row), flush=True)
        if row["status"] != "ok":
            break
    return rows


def _fmt(value: Any, width: int, spec: str) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}{spec}}"


HEADER = (f"{'batch':>7} {'status':>6} {'samples_s':>11} {'step_ms':>9} {'GFLOP/step':>11} "
          f"{'TFLOP/s':>8} {'peak_alloc_GiB':>15} {'peak_resv_GiB':>14}")


def format_row(r: dict[str, Any]) -> str:
    return (f"{r['batch_size']:7d} {r['status']:>6} {_fmt(r['samples_per_s'], 11, '.1f')} "
            f"{_fmt(r['step_ms'], 9, '.3f')} {_fmt(r['gflop_per_step'], 11, '.2f')} "
            f"{_fmt(r['tflops'], 8, '.3f')} {_fmt(r['peak_allocated_gib'], 15, '.2f')} "
            f"{_fmt(r['peak_reserved_gib'], 14, '.2f')}")


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r[k] is None else r[k] for k in COLUMNS})
    return buf.getvalue()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.perf throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="model and image size of an H100 target "
                   "(batch and steps are this script's own)")
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--image-size", type=int, help="pixels per side of the 3-channel input")
    p.add_argument("--min-batch-size", type=int, help="first per-device batch size (default 32)")
    p.add_argument("--max-batch-size", type=int,
                   help="stop after this batch size (default 65536 on cuda, where the first OOM stops "
                        "earlier; 256 on cpu)")
    p.add_argument("--steps", type=int, help="timed steps per batch size")
    p.add_argument("--warmup-steps", type=int, help="untimed steps per batch size")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN autotune (the worker does not)")
    p.add_argument("--json", type=Path, help="also write the table and settings to this JSON file")
    p.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = {k: v for k, v in PRESETS[args.preset].items() if k in ("model", "image_size")} if args.preset else {}
    for key, value in {**DEFAULTS[args.device], **preset}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("image_size", "min_batch_size", "max_batch_size", "steps"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.warmup_steps < 0:
        p.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.max_batch_size < args.min_batch_size:
        p.error(f"--max-batch-size {args.max_batch_size} is below --min-batch-size {args.min_batch_size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    precision = "bf16 autocast + channels_last" if device.type == "cuda" else "fp32"
    name = device_name(device)
    print(f"throughput: {args.model}, image {args.image_size}, on {name}, {precision}, "
          f"{args.steps} timed steps after {args.warmup_steps} warm-up steps per batch size, "
          f"{torch.get_num_threads()} torch thread(s)")
    print(HEADER, flush=True)
    rows = sweep(args, device)
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        best = max(ok, key=lambda r: r["samples_per_s"])
        print(f"best: batch {best['batch_size']} at {best['samples_per_s']:.1f} samples/s, "
              f"{best['tflops']:.3f} TFLOP/s; largest that fits: {ok[-1]['batch_size']}"
              + (f" (batch {rows[-1]['batch_size']}: {rows[-1]['status']}: {rows[-1]['error']})"
                 if rows[-1]["status"] != "ok" else ""))
    if args.csv is not None:
        args.csv.write_text(to_csv(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "script": "throughput", "preset": args.preset, "device": args.device, "device_name": name,
            "model": args.model, "image_size": args.image_size, "steps": args.steps,
            "warmup_steps": args.warmup_steps, "precision": "bf16" if device.type == "cuda" else "fp32",
            "channels_last": device.type == "cuda", "cudnn_benchmark": args.cudnn_benchmark,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "flop_counter": "torch.utils.flop_counter.FlopCounterMode, one forward+backward",
            "rows": rows}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
