"""What does the harness cost? (``python -m bench.perf overhead``)

Runs the same model, per-GPU batch and number of steps two ways and compares steady-state
training throughput (samples/s):

A  plain: a single-process PyTorch loop written here (model from ``bench.models``, one fixed
   random batch already on the device, SGD momentum 0.9, bf16 autocast + channels_last on
   CUDA, ``zero_grad(set_to_none=True)``, no host sync inside the step). ``--steps`` warm-up
   steps, then a block of ``--steps`` steps timed with a device sync before and after.
B  batchscale: a one-run sweep of the ``synthetic`` workload (num_train = batch x steps, so one
   epoch is ``--steps`` steps; 2 epochs, no evaluation in between) through ``bench.runner`` ->
   ``bench.launcher`` (Ray Train TorchTrainer, one worker) -> ``bench.worker``. Throughput is
   the second epoch's ``epoch_stop`` event (epoch_samples / epoch_train_time_s): the worker
   syncs the device before and after the epoch, and epoch 1 is the warm-up, as in A. This is
   the same number as summary.json's ``samples_per_s`` (which also skips epoch 1); the script
   checks that they agree.

So A and B count the same thing: samples/s over ``--steps`` steps after ``--steps`` warm-up
steps, device-synchronised at both ends, excluding start-up, data generation and evaluation.
What B pays on top is the harness: per-step LR write, gathering the batch from the on-device
dataset, the sum-reduced loss, events, the telemetry sampler thread (``--no-telemetry`` turns
it off), and running inside a Ray worker process.

Interleaving: the pairs run A, B, A, B, ... and each side starts a fresh process per pair (A
in a child Python process, B in a new Ray Train worker group), so drift in clocks,
temperature or neighbours hits both alike and neither inherits the other's CUDA memory. The
price is one worker-group start per pair (~10 s on 2 CPU cores, ~15-20 s on the GPU machine,
printed per pair). Running all B runs in one worker group would save that but would put
every B after every A, so we do not. The ratio B/A is reported per pair and as
median/min/max over pairs, because the spread between pairs can be as large as the effect
(docs/performance.md).

Language models (``--preset gpt2-124m-1024``, or ``--model gpt-tiny`` ...): the same pairs with
a GPT on token batches and a one-run ``workload: lm`` sweep (bench.perf.overhead_lm); rates are
tokens/s, and each side's model FLOPs utilisation (6 N x tokens/s over the GPU's dense bf16 peak)
is printed beside them. ``--micro-batch-size`` then counts sequences of ``--context-length``.

Reaches Ray only through ``bench.runner`` / ``bench.launcher``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import bench
from bench.lm.model import SIZES as GPT_SIZES
from bench.models import build_model
from bench.perf import overhead_lm

MODELS = ("resnet18_cifar", "resnet50", "small_cnn", *GPT_SIZES)
NUM_CLASSES = 10
LR = 0.01

# Presets for the H100 targets (median ratio >= 0.98). Steps keep the synthetic set under the
# workload's 8 GiB limit: ResNet-50 at 224 px is 0.6 MB per image, 256 x 40 images ~ 5.9 GiB.
PRESETS: dict[str, dict[str, Any]] = {
    "resnet18-cifar-512": {"model": "resnet18_cifar", "image_size": 32, "micro_batch_size": 512,
                           "steps": 200},
    "resnet50-224-256": {"model": "resnet50", "image_size": 224, "micro_batch_size": 256, "steps": 40},
    # GPT-2 small's shape on 16 x 1,024 = 16,384 tokens per step (bf16, eager, one GPU)
    "gpt2-124m-1024": {"model": "gpt2-124m", "context_length": 1024, "micro_batch_size": 16, "steps": 40},
}
# device -> defaults when neither a preset nor the option gives a value
DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": {"model": "resnet18_cifar", "image_size": 32, "micro_batch_size": 512, "steps": 200},
    "cpu": {"model": "small_cnn", "image_size": 16, "micro_batch_size": 8, "steps": 5},
}


def is_lm(params: dict[str, Any]) -> bool:
    """A GPT (bench.perf.overhead_lm's sides, in tokens) rather than an image model."""
    return params.get("model") in GPT_SIZES


# --- the plain loop (also used by bench.perf.throughput) -------------------------------------

@dataclass
class PlainStep:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    forward_backward: Callable[[], None]  # one forward + backward on the fixed batch
    step: Callable[[], None]  # forward_backward, optimizer step, zero_grad(set_to_none=True)


def plain_step(model_name: str, image_size: int, batch_size: int, device: torch.device,
               num_classes: int = NUM_CLASSES, lr: float = LR) -> PlainStep:
    """A training step as plain PyTorch writes it: fixed random batch on the device, SGD with
    momentum, bf16 autocast and channels_last on CUDA, no host synchronisation."""
    torch.manual_seed(0)
    on_cuda = device.type == "cuda"
    fmt = torch.channels_last if on_cuda else torch.contiguous_format
    model = build_model(model_name, (3, image_size, image_size), num_classes)
    model = model.to(device, memory_format=fmt).train()
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def forward_backward() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()

    def step() -> None:
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return PlainStep(model, optimizer, forward_backward, step)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], num_steps: int, device: torch.device) -> float:
    """Seconds for `num_steps` steps, device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(num_steps):
        step()
    sync(device)
    return time.perf_counter() - t0


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_plain(params: dict[str, Any]) -> dict[str, Any]:
    """Side A in this process: warm-up block, then one timed block of the same length."""
    device = torch.device("cuda", 0) if params["device"] == "cuda" else torch.device("cpu")
    torch.set_num_threads(int(params["threads"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    lm = is_lm(params)
    s = PlainStep(*overhead_lm.plain_lm_step(params, device)) if lm else \
        plain_step(params["model"], params["image_size"], params["micro_batch_size"], device)
    steps = params["steps"]
    warmup_s = time_steps(s.step, steps, device)
    seconds = time_steps(s.step, steps, device)
    samples = steps * (overhead_lm.tokens_per_step(params) if lm else params["micro_batch_size"])
    return {"samples_per_s": samples / seconds, "step_ms": 1000.0 * seconds / steps,
            "seconds": seconds, "samples": samples, "warmup_s": warmup_s, "device_name": device_name(device),
            "torch_threads": torch.get_num_threads()}


def _plain_child() -> None:
    """Entry point of the child process: python -c ... PARAMS_JSON OUT_PATH."""
    params, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    out.write_text(json.dumps(run_plain(params)))


def run_plain_subprocess(params: dict[str, Any], work: Path) -> dict[str, Any]:
    """Side A in a fresh Python process (as side B gets a fresh Ray worker process)."""
    out = work / f"plain-{time.monotonic_ns()}.json"
    env = dict(os.environ)
    root = str(Path(bench.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = str(params["threads"])  # what Ray sets in a worker with that many CPUs
    code = "from bench.perf.overhead import _plain_child; _plain_child()"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(params), str(out)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"plain child process failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


# --- batchscale under Ray Train -----------------------------------------------------------------

def sweep_for(params: dict[str, Any], name: str):
    """A one-run sweep equivalent to side A: 2 epochs of `steps` steps, evaluated only at the
    start and the end, so epoch 2 is steady state."""
    from bench.config import SweepConfig

    if is_lm(params):
        return overhead_lm.lm_sweep_for(params, name)
    on_cuda = params["device"] == "cuda"
    batch, steps = params["micro_batch_size"], params["steps"]
    return SweepConfig.model_validate({
        "name": name, "workload": "synthetic", "model": params["model"],
        "description": "bench.perf.overhead side B",
        "workload_options": {"num_train": batch * steps, "num_test": batch,
                             "image_size": params["image_size"], "num_classes": NUM_CLASSES},
        "lr": {"reference_lr": LR, "reference_batch_size": batch, "scaling": "none"},
        "optimizer": {"name": "sgd", "momentum": 0.9},
        "epochs": 2, "eval_every_epochs": 2, "global_batch_sizes": [batch], "num_workers": [1],
        "target_accuracy": 1.0, "divergence_loss_factor": 1e9,  # random labels: nothing to reach
        "precision": "bf16" if on_cuda else "fp32", "channels_last": on_cuda,
        "telemetry": {"enabled": params["telemetry"]},
    })


def cluster_for(params: dict[str, Any]):
    from bench.config import ClusterConfig

    return ClusterConfig(name="overhead", description="bench.perf.overhead: local Ray, one worker",
                         use_gpu=params["device"] == "cuda",
                         resources_per_worker={"CPU": float(params["threads"])})


def epoch_throughput(events: list[dict[str, Any]], epoch: int) -> tuple[float, float, int]:
    """(samples/s, seconds, samples) of one epoch from its epoch_stop event."""
    from bench import events as ev

    for e in events:
        if e["key"] == ev.EPOCH_STOP and e["metadata"].get("epoch_num") == epoch:
            seconds, samples = e["metadata"]["epoch_train_time_s"], e["metadata"]["epoch_samples"]
            return samples / seconds, seconds, samples
    raise RuntimeError(f"no epoch_stop event for epoch {epoch}")


def run_batchscale(params: dict[str, Any], results_root: Path, name: str) -> dict[str, Any]:
    """Side B: one run through runner -> launcher -> Ray Train -> worker."""
    from bench import events as ev
    from bench.runner import run_sweep
    from bench.store import SweepDir

    sweep, cluster = sweep_for(params, name), cluster_for(params)
    t0 = time.perf_counter()
    outcome = run_sweep(sweep, cluster, results_root, say=lambda _: None, progress=False)
    wall_s = time.perf_counter() - t0
    (run_id, status), = outcome.statuses.items()
    run_dir = outcome.sweep_dir / run_id
    summary = SweepDir(outcome.sweep_dir).run(run_id).read_summary()
    if status != "success":
        raise RuntimeError(f"batchscale run {run_id} ended {status}: {summary.failure if summary else None}")
    samples_per_s, seconds, samples = epoch_throughput(ev.read_events(run_dir / "events.jsonl"), 2)
    per_step = overhead_lm.tokens_per_step(params) if is_lm(params) else params["micro_batch_size"]
    expected = params["steps"] * per_step
    if samples != expected:
        raise RuntimeError(f"epoch 2 trained {samples} samples, expected {expected}")
    if abs(summary.samples_per_s - samples_per_s) > 1e-3 * samples_per_s:  # events round to 1 us
        raise RuntimeError(f"summary samples_per_s {summary.samples_per_s:.1f} disagrees with "
                           f"epoch 2's events {samples_per_s:.1f}")
    group = outcome.groups[0] if outcome.groups else None
    env = json.loads((run_dir / "worker_env.json").read_text())
    return {"samples_per_s": samples_per_s, "step_ms": 1000.0 * seconds / params["steps"],
            "seconds": seconds, "samples": samples, "group_start_s": group.start_s if group else None,
            "wall_s": wall_s, "device_name": env.get("gpu_model") or "cpu",
            "torch_threads": env.get("torch_num_threads")}


# --- driver -------------------------------------------------------------------------------------

def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.perf overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="model, image size, batch and steps of an "
                   "H100 target (explicit options override it)")
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--image-size", type=int, help="pixels per side of the 3-channel input")
    p.add_argument("--micro-batch-size", type=int, help="samples (GPT: sequences) per step on the one device")
    p.add_argument("--context-length", type=int, help="GPT models: tokens per sequence (default 1024 on cuda, 64 on cpu)")
    p.add_argument("--compile", action="store_true", help="GPT models: torch.compile both sides' models")
    p.add_argument("--steps", type=int, help="timed steps per block (the warm-up block is as long)")
    p.add_argument("--pairs", type=int, default=5, help="interleaved A/B pairs (default 5)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda when available, else cpu (tiny defaults)")
    p.add_argument("--threads", type=int, help="CPUs of the Ray worker = torch threads on both sides "
                   "(default: 1 on cpu, min(8, cores) on cuda)")
    p.add_argument("--no-telemetry", dest="telemetry", action="store_false",
                   help="run side B with the telemetry sampler off (default: on, 10 Hz, as a sweep runs)")
    p.add_argument("--results-dir", type=Path, help="keep side B's run folders here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = {**DEFAULTS[args.device], **(PRESETS[args.preset] if args.preset else {})}
    for key, value in chosen.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else min(8, os.cpu_count() or 1)
    args.workload = "lm" if args.model in GPT_SIZES else "image"
    if args.context_length is None:
        args.context_length = 1024 if args.device == "cuda" else 64
    for key in ("image_size", "micro_batch_size", "steps", "pairs", "threads", "context_length"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.image_size < 8:
        p.error(f"--image-size must be >= 8 (the synthetic workload's minimum), got {args.image_size}")
    return args


def format_pairs(pairs: list[dict[str, Any]]) -> str:
    lines = [f"{'pair':>4} {'plain_samples_s':>16} {'batchscale_samples_s':>21} {'ratio_B/A':>10} "
             f"{'plain_step_ms':>14} {'bs_step_ms':>11} {'group_start_s':>14}"]
    for i, pr in enumerate(pairs, 1):
        a, b = pr["plain"], pr["batchscale"]
        start = f"{b['group_start_s']:14.1f}" if b["group_start_s"] is not None else f"{'-':>14}"
        lines.append(f"{i:4d} {a['samples_per_s']:16.1f} {b['samples_per_s']:21.1f} {pr['ratio']:10.4f} "
                     f"{a['step_ms']:14.3f} {b['step_ms']:11.3f} {start}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    from bench import launcher
    from bench.config import ConfigError
    from bench.store import StoreError

    params = {"device": args.device, "model": args.model, "image_size": args.image_size,
              "micro_batch_size": args.micro_batch_size, "steps": args.steps, "threads": args.threads,
              "telemetry": args.telemetry, "workload": args.workload, "context_length": args.context_length,
              "compile": args.compile}
    try:
        sweep_for(params, "overhead-check")  # refuse a too-big synthetic set before starting anything
    except Exception as err:  # pydantic ValidationError: one line
        first = str(err).strip().splitlines()
        print(f"error: side B cannot be configured: {first[-1] if first else err}", file=sys.stderr)
        return 2
    precision = ("bf16 autocast" + (" + channels_last" if args.workload != "lm" else "")
                 if args.device == "cuda" else "fp32")
    rate = "tokens/s" if args.workload == "lm" else "samples/s"
    shape = f"context {args.context_length}" if args.workload == "lm" else f"image {args.image_size}"
    print(f"overhead: {args.model}, {shape}, micro_batch_size {args.micro_batch_size}, "
          f"{args.steps} timed steps after {args.steps} warm-up steps, {precision}, {args.threads} "
          f"thread(s), telemetry {'on' if args.telemetry else 'off'}, {args.pairs} pair(s) A=plain "
          f"B=batchscale (Ray Train, 1 worker), interleaved A B A B", flush=True)
    pairs: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="batchscale-overhead-") as tmp:
            results_root = args.results_dir or Path(tmp) / "results"
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for i in range(1, args.pairs + 1):
                a = run_plain_subprocess(params, Path(tmp))
                b = run_batchscale(params, results_root, f"overhead-{stamp}-pair{i:02d}")
                pairs.append({"plain": a, "batchscale": b, "ratio": b["samples_per_s"] / a["samples_per_s"]})
                start = f"{b['group_start_s']:.1f} s" if b["group_start_s"] is not None else "unknown"
                print(f"pair {i}/{args.pairs}: A {a['samples_per_s']:.1f} {rate}, "
                      f"B {b['samples_per_s']:.1f} {rate}, B/A {pairs[-1]['ratio']:.4f} "
                      f"(worker group start-up {start})", flush=True)
    except (RuntimeError, launcher.LauncherError, ConfigError, StoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        launcher.shutdown()  # only a Ray this process started
    ratio = stats([pr["ratio"] for pr in pairs])
    plain = stats([pr["plain"]["samples_per_s"] for pr in pairs])
    ray_side = stats([pr["batchscale"]["samples_per_s"] for pr in pairs])
    print(f"device: {pairs[0]['plain']['device_name']}")
    print(format_pairs(pairs))
    print(f"plain {rate}: median {plain['median']:.1f} min {plain['min']:.1f} max {plain['max']:.1f}")
    print(f"batchscale {rate}: median {ray_side['median']:.1f} min {ray_side['min']:.1f} "
          f"max {ray_side['max']:.1f}")
    print(f"ratio B/A: median {ratio['median']:.4f} min {ratio['min']:.4f} max {ratio['max']:.4f} "
          f"over {len(pairs)} pair(s)")
    utilisation = None
    if args.workload == "lm":  # the rates above are tokens/s
        name = pairs[0]["plain"]["device_name"]
        utilisation = {side: overhead_lm.utilisation(rates["median"], params, name)
                       for side, rates in (("plain", plain), ("batchscale", ray_side))}
        print(f"model FLOPs per token (6 N): {overhead_lm.flops_per_token(params):.4g}; MFU at the median tokens/s "
              + ", ".join(f"{side} {'unknown (no listed peak for ' + name + ')' if u is None else f'{u:.1%}'}"
                          for side, u in utilisation.items()))
    if args.json is not None:
        import ray

        args.json.write_text(json.dumps({
            "script": "overhead", "preset": args.preset, "device": args.device,
            "device_name": pairs[0]["plain"]["device_name"], "model": args.model,
            "image_size": args.image_size, "micro_batch_size": args.micro_batch_size, "steps": args.steps,
            "warmup_steps": args.steps, "threads": args.threads, "telemetry": args.telemetry,
            "precision": "bf16" if args.device == "cuda" else "fp32", "channels_last": args.device == "cuda",
            "interleaved": True, "torch": torch.__version__, "ray": ray.__version__,
            "pairs": pairs, "ratio": ratio, "plain_samples_per_s": plain,
            "batchscale_samples_per_s": ray_side, "wall_s": time.perf_counter() - t_start,
            "workload": args.workload, "context_length": args.context_length, "compile": args.compile,
            "mfu": utilisation,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
