"""Synthetic results folders for the analysis and report tests, written through bench.store and
bench.events exactly as a real run would leave them (run.json, config.yaml, env.json,
worker_env.json, events.jsonl, telemetry-rank0.csv, summary.json last).

Two levels: ``write_run`` writes one run from explicit per-evaluation numbers (hand-checkable
answers); ``write_sweep`` makes a whole sweep whose steps-to-target follow
steps(B) = S_min * (1 + B_crit / B), so the fit has a known answer.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench import events as ev
from bench.plan import RunPlan, geometric_steps, run_id, steps_per_epoch
from bench.store import RunDir, SweepDir
from bench.summary import RunSummary

NUM_TRAIN, NUM_TEST = 500, 500
T0_MS = 1_764_000_000_000.0  # an arbitrary start time (ms since the epoch)
TELEMETRY_COLUMNS = ("time_ms", "run_id", "rank", "node", "kind", "gpu_index", "gpu_uuid", "mem_used_gib",
                     "mem_total_gib", "gpu_util_pct", "mem_util_pct", "power_w", "power_limit_w",
                     "temperature_c", "sm_clock_mhz", "rss_gib", "cpu_pct")


def make_plan(sweep: str, global_batch_size: int, *, num_workers: int = 1, seed: int = 0, epochs: int = 10,
              reference_lr: float = 0.01, reference_batch_size: int = 4, warmup_epochs: float = 1.0) -> RunPlan:
    spe = steps_per_epoch(NUM_TRAIN, global_batch_size, num_workers)
    warmup = round(warmup_epochs * spe)
    per_worker = global_batch_size // num_workers
    return RunPlan(
        sweep=sweep, run_id=run_id(global_batch_size, num_workers, seed), seed=seed, workload="blobs",
        model="mlp", global_batch_size=global_batch_size, num_workers=num_workers,
        per_worker_batch_size=per_worker, micro_batch_size=per_worker, grad_accum_steps=1,
        num_train=NUM_TRAIN, num_test=NUM_TEST, steps_per_epoch=spe, epochs=epochs, total_steps=spe * epochs,
        scaling="linear", reference_lr=reference_lr, reference_batch_size=reference_batch_size,
        peak_lr=reference_lr * global_batch_size / reference_batch_size, warmup_steps=warmup,
        warmup_epochs=warmup / spe, schedule="constant", milestones_epochs=(), gamma=0.1)


@dataclass
class Eval:
    """One evaluation: after `epoch` epochs (0 = before training), or, with `step`, after that many
    optimizer steps (mid-epoch; `epoch` is then the epoch in progress, as the worker logs it)."""

    epoch: int
    train_acc: float
    test_acc: float
    train_loss: float = 0.5
    test_loss: float = 0.6
    step: int | None = None


@dataclass
class RunSpec:
    plan: RunPlan
    evals: list[Eval]
    epoch_time_s: float = 0.5  # training seconds per epoch
    status: str = "success"  # success | aborted | diverged | oom | incomplete (no summary.json)
    reason: str | None = None
    telemetry_kind: str | None = "cpu"  # None: no telemetry file
    noise_scale: float | None = None
    extra: dict = field(default_factory=dict)


def sweep_config(name: str, *, description: str = "synthetic sweep", target: float = 0.8,
                 batches=(4,), workers=(1,), seeds=(0,), epochs: int = 10) -> dict:
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", name).strip("-.") or "sweep"  # the folder name may be anything
    return {"name": safe, "description": description, "workload": "blobs", "model": "mlp",
            "lr": {"reference_lr": 0.01, "reference_batch_size": 4, "scaling": "linear", "warmup_epochs": 1.0},
            "epochs": epochs, "global_batch_sizes": list(batches), "num_workers": list(workers),
            "seeds": list(seeds), "target_accuracy": target, "optimizer": {"name": "sgd", "momentum": 0.9}}


def epoch_samples(plan: RunPlan) -> int:
    """Samples one epoch consumes: the training set, less a final partial batch the plan drops."""
    return min(plan.num_train, plan.steps_per_epoch * plan.global_batch_size)


def _position(plan: RunPlan, e: Eval, epoch_time_s: float) -> dict:
    step = e.epoch * plan.steps_per_epoch if e.step is None else e.step
    full, within = divmod(step, plan.steps_per_epoch)
    return {"epoch_num": e.epoch, "step": step,
            "samples_count": full * epoch_samples(plan) + within * plan.global_batch_size,
            "train_time_s": round(step / plan.steps_per_epoch * epoch_time_s, 6),
            "elapsed_s": round(step / plan.steps_per_epoch * epoch_time_s * 1.2, 6)}


def _epochs_run(spec: RunSpec) -> int:
    return max(math.ceil(_position(spec.plan, e, 1.0)["step"] / spec.plan.steps_per_epoch) for e in spec.evals)


def _write_events(run: RunDir, spec: RunSpec) -> None:
    plan = spec.plan
    ms = lambda s: T0_MS + 1000.0 * s  # noqa: E731
    with ev.EventLog(run.events_path, mode="w") as log:
        log.log(ev.RUN_START, event_type=ev.INTERVAL_START, time_ms=ms(0))
        for key, value in ((ev.SEED, plan.seed), (ev.GLOBAL_BATCH_SIZE, plan.global_batch_size),
                           (ev.NUM_WORKERS, plan.num_workers), (ev.MICRO_BATCH_SIZE, plan.micro_batch_size),
                           (ev.GRADIENT_ACCUMULATION_STEPS, plan.grad_accum_steps),
                           (ev.OPT_BASE_LEARNING_RATE, plan.peak_lr), (ev.TRAIN_SAMPLES, plan.num_train),
                           (ev.EVAL_SAMPLES, plan.num_test), (ev.STEPS_PER_EPOCH, plan.steps_per_epoch)):
            log.log(key, value, time_ms=ms(0))
        last_epoch = _epochs_run(spec)
        for epoch in range(1, last_epoch + 1):
            t = (epoch - 1) * spec.epoch_time_s
            first = (epoch - 1) * plan.steps_per_epoch
            every_step = epoch == 1 or first < plan.warmup_steps  # as the worker logs them
            lr_steps = range(first, first + plan.steps_per_epoch) if every_step else [first]
            log.log(ev.EPOCH_START, event_type=ev.INTERVAL_START, metadata={"epoch_num": epoch}, time_ms=ms(t))
            for step in lr_steps:
                log.log(ev.OPT_LEARNING_RATE, plan.lr(step), metadata={"step": step}, time_ms=ms(t))
            log.log(ev.EPOCH_STOP, event_type=ev.INTERVAL_END, time_ms=ms(t + spec.epoch_time_s),
                    metadata={**_position(plan, Eval(epoch, 0, 0), spec.epoch_time_s),
                              "epoch_train_time_s": spec.epoch_time_s})
        for e in spec.evals:
            pos = _position(plan, e, spec.epoch_time_s)
            log.log(ev.EVAL_START, event_type=ev.INTERVAL_START, metadata={"epoch_num": e.epoch},
                    time_ms=ms(pos["elapsed_s"]))
            for key, value in ((ev.TRAIN_ACCURACY, e.train_acc), (ev.TRAIN_LOSS, e.train_loss),
                               (ev.EVAL_ACCURACY, e.test_acc), (ev.EVAL_LOSS, e.test_loss)):
                log.log(key, value, metadata=pos, time_ms=ms(pos["elapsed_s"]))
            log.log(ev.EVAL_STOP, event_type=ev.INTERVAL_END, metadata={"epoch_num": e.epoch},
                    time_ms=ms(pos["elapsed_s"]))
        if spec.noise_scale is not None:
            for step in (10, 20, 30, 40):
                log.log(ev.GRADIENT_NOISE_SCALE, spec.noise_scale, metadata={"step": step}, time_ms=ms(1))
        if spec.status != "incomplete":
            log.log(ev.RUN_STOP, event_type=ev.INTERVAL_END, time_ms=ms(last_epoch * spec.epoch_time_s),
                    metadata={"status": spec.status, "epoch_num": last_epoch,
                              **({"reason": spec.reason} if spec.reason else {})})


def _write_telemetry(run: RunDir, spec: RunSpec, num_samples: int = 40) -> None:
    kind = spec.telemetry_kind
    duration_s = _epochs_run(spec) * spec.epoch_time_s
    with open(run.telemetry_path(0), "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=TELEMETRY_COLUMNS)
        writer.writeheader()
        for i in range(num_samples):
            gpu = kind == "gpu"
            writer.writerow({
                "time_ms": T0_MS + 1000.0 * duration_s * i / num_samples, "run_id": spec.plan.run_id,
                "rank": 0, "node": "node-a", "kind": kind, "gpu_index": 0 if gpu else "",
                "gpu_uuid": "GPU-fake" if gpu else "",
                "mem_used_gib": 1.0 + spec.plan.per_worker_batch_size / 100 if gpu else "",
                "mem_total_gib": 80.0 if gpu else "", "gpu_util_pct": 50 + 40 * math.sin(i) ** 2 if gpu else "",
                "mem_util_pct": 20 if gpu else "", "power_w": 300 + 10 * i if gpu else "",
                "power_limit_w": 700 if gpu else "",
                "temperature_c": 50 if gpu else "", "sm_clock_mhz": 1980 if gpu else "",
                "rss_gib": 0.5 + spec.plan.per_worker_batch_size / 1000, "cpu_pct": 90 + (i % 5)})


def _summary(spec: RunSpec) -> dict:
    plan, final = spec.plan, spec.evals[-1]
    epochs = _epochs_run(spec)
    best = max(e.test_acc for e in spec.evals)
    tele = None
    if spec.telemetry_kind:
        gpu = spec.telemetry_kind == "gpu"
        tele = {"kind": spec.telemetry_kind, "num_samples": 40,
                "peak_memory_gib": (1.0 + plan.per_worker_batch_size / 100 if gpu
                                    else 0.5 + plan.per_worker_batch_size / 1000),
                "mean_util_pct": 70.0 if gpu else None, "p95_util_pct": 90.0 if gpu else None,
                "mean_power_w": 400.0 if gpu else None, "energy_j": 400.0 * epochs * spec.epoch_time_s if gpu else None}
    return {
        "run_id": plan.run_id, "sweep": plan.sweep, "status": spec.status,
        "failure": {"reason": spec.reason, "step": epochs * plan.steps_per_epoch, "epoch_num": epochs}
        if spec.status != "success" else None,
        "global_batch_size": plan.global_batch_size, "num_workers": plan.num_workers,
        "per_worker_batch_size": plan.per_worker_batch_size, "micro_batch_size": plan.micro_batch_size,
        "grad_accum_steps": plan.grad_accum_steps, "seed": plan.seed, "peak_lr": plan.peak_lr,
        "epochs_completed": epochs, "steps_completed": epochs * plan.steps_per_epoch,
        "samples_seen": epochs * epoch_samples(plan),
        "final_train_acc": final.train_acc, "final_test_acc": final.test_acc,
        "final_train_loss": final.train_loss, "final_test_loss": final.test_loss, "best_test_acc": best,
        "train_time_s": epochs * spec.epoch_time_s, "eval_time_s": 0.1 * epochs,
        "wall_time_s": 1.2 * epochs * spec.epoch_time_s,
        "samples_per_s": NUM_TRAIN / spec.epoch_time_s, "target_accuracy": None,
        "torch_peak_reserved_gib": None, "torch_peak_allocated_gib": None, "telemetry": tele, **spec.extra}


def write_run(sweep_path: Path, spec: RunSpec, *, config: dict | None = None, cluster: dict | None = None,
              env: dict | None = None, worker_env: dict | None = None) -> RunDir:
    plan = spec.plan
    run = SweepDir(sweep_path).run(plan.run_id)
    run.prepare(config=config or sweep_config(plan.sweep), cluster=cluster or {"name": "test-cluster"},
                run_plan=plan.to_dict(), env=env or {"git_sha": "abc1234", "torch": "2.3.0", "ray": "2.60.0",
                                                     "created_utc": "2026-01-01T00:00:00+00:00"})
    run.write_json("worker_env.json", worker_env or {"torch": "2.3.0", "device": "cpu"})
    _write_events(run, spec)
    if spec.telemetry_kind:
        _write_telemetry(run, spec)
    if spec.status != "incomplete":
        summary = _summary(spec)
        summary["target_accuracy"] = (config or {}).get("target_accuracy", 0.8)
        run.write_summary(RunSummary.model_validate(summary))
    return run


# --- a whole sweep with a known steps(B) curve ------------------------------------------------

def _accuracy(epoch: float, tau: float, ceiling: float, start: float) -> float:
    return start + (ceiling - start) * (1 - math.exp(-epoch / tau))


def curve(epochs: int, epochs_to_target: float, *, target: float = 0.8, ceiling: float = 0.95,
          train_bonus: float = 0.02, start: float = 0.33, plan: RunPlan | None = None) -> list[Eval]:
    """Test accuracy rising as start + (ceiling - start)(1 - exp(-epoch / tau)), with tau set so it
    crosses `target` exactly at `epochs_to_target` (never, if target >= ceiling); train accuracy
    climbs to `train_bonus` above test by the last epoch. With `plan`, evaluations come where
    ``eval_every_steps: auto`` puts them (bench.plan.geometric_steps and every epoch end)."""
    fraction = min((target - start) / (ceiling - start), 0.99)  # target above the ceiling: never reached
    tau = epochs_to_target / -math.log(1 - fraction)
    if plan is None:
        points = [(float(e), e, None) for e in range(epochs + 1)]
    else:
        spe = plan.steps_per_epoch
        steps = sorted(geometric_steps(spe * epochs) | set(range(spe, spe * epochs + 1, spe)))
        points = [(0.0, 0, None)] + [(s / spe, math.ceil(s / spe), s) for s in steps]
    out = []
    for position, epoch, step in points:
        acc = _accuracy(position, tau, ceiling, start)
        loss = 1.1 * (1 - acc) + 0.05
        out.append(Eval(epoch, min(1.0, acc + train_bonus * position / epochs), acc, loss * 0.9, loss, step=step))
    return out


def v2_extra(plan: RunPlan, status: str, *, kind: str = "gpu", failure_step: int = 0) -> dict:
    """What a schema-v2 summary adds: per-run memory growing with the per-worker batch, NVML
    baseline, the hardware seen and, for a divergence, the LR at the failing step."""
    b = plan.per_worker_batch_size
    extra: dict = {"schema_version": 2,
                   "memory": {"baseline_allocated_gib": 0.05, "baseline_reserved_gib": 0.1,
                              "train_peak_allocated_gib": 0.2 + b / 200, "train_peak_reserved_gib": 0.3 + b / 150}}
    if kind == "gpu":
        extra["hardware"] = {"num_workers": plan.num_workers, "nodes": ["node-a"], "hostnames": ["host-a"],
                             "device_type": "cuda", "gpus": [{"model": "NVIDIA H100 80GB HBM3", "memory_gib": 79.6,
                                                              "uuid": f"GPU-{i}"} for i in range(plan.num_workers)]}
    if status == "diverged":
        extra["failure"] = {"reason": "smoothed loss above the limit", "step": failure_step, "epoch_num": 1,
                            "criterion": "smoothed_loss", "lr": plan.lr(failure_step), "peak_lr": plan.peak_lr,
                            "in_warmup": failure_step < plan.warmup_steps, "loss": 30.0, "limit": 23.0}
    return extra


def write_sweep(root: Path, name: str = "demo", *, batches=(4, 16, 64, 256), seeds=(0, 1), workers=(1,),
                epochs: int = 40, s_min: float = 100.0, b_crit: float = 64.0, target: float = 0.8,
                description: str = "synthetic sweep", cluster: dict | None = None,
                worker_env: dict | None = None, telemetry_kind: str = "cpu",
                failures: dict[int, str] | None = None, v2: bool = False) -> Path:
    """Write results/<name>/ with one run per (workers, batch, seed). Steps-to-target follow
    S_min (1 + B_crit / B); seed s shifts them by +s %. `failures` maps a batch to a status
    ('diverged', 'incomplete', ...) given to its last seed. v2: schema-v2 summaries (bench.summary)
    and evaluations where ``eval_every_steps: auto`` puts them. Returns the sweep folder."""
    sweep_path = Path(root) / name
    config = sweep_config(name, description=description, target=target, batches=batches,
                          workers=workers, seeds=seeds, epochs=epochs)
    if v2:
        config["eval_every_steps"] = "auto"
    for w in workers:
        for b in batches:
            for seed in seeds:
                plan = make_plan(name, b, num_workers=w, seed=seed, epochs=epochs)
                if v2:
                    plan = replace(plan, eval_every_steps=None, eval_auto=True)
                steps = s_min * (1 + b_crit / b) * (1 + 0.01 * seed)
                evals = curve(epochs, steps / plan.steps_per_epoch, target=target,
                              ceiling=0.95 - 0.03 * math.log2(b / batches[0]) / 4, train_bonus=0.02,
                              plan=plan if v2 else None)
                status = (failures or {}).get(b, "success") if seed == seeds[-1] else "success"
                cut = max(2, len(evals) // 3)
                spec = RunSpec(plan, evals, epoch_time_s=0.02 * (1 + 16 / b) / w ** 0.5, status=status,
                               reason=None if status == "success" else f"{status} in a synthetic run",
                               telemetry_kind=telemetry_kind, noise_scale=b_crit * 0.8)
                if status in ("diverged", "incomplete"):
                    spec = replace(spec, evals=evals[:cut])
                if v2:
                    last = spec.evals[-1]
                    step = last.step if last.step is not None else last.epoch * plan.steps_per_epoch
                    spec = replace(spec, extra=v2_extra(plan, status, kind=telemetry_kind, failure_step=step))
                write_run(sweep_path, spec, config=config, cluster=cluster or {"name": "test-cluster"},
                          worker_env=worker_env)
    return sweep_path
