"""Memory probe, the run: ``probe()`` finds the largest micro-batch of a sweep's training step
that fits on a device.

Owns: ``probe()`` (device, memory cap and budget; the reserve; the tries, searched with
``bench.memfit.search``; the linear fit and prediction over them; the evaluation-chunk check),
out-of-memory handling (``_is_oom``, ``_run_try``: the error is caught, recorded as a message,
its frames dropped and the try's memory freed before the next try). It returns a
``bench.memfit.ProbeResult``; the step a try runs and its measurement are bench.memstep's.

Must not import: ray, pandas. torch is imported here (bench.memprobe's command imports this
module inside the command, so ``batchscale`` does not pay for torch otherwise).

Out of memory:
- CUDA: a try fails on ``torch.cuda.OutOfMemoryError``; with a memory cap the allocator is also
  limited to the cap (``set_per_process_memory_fraction``) and a peak above the cap fails.
  The reserve (see bench.memstep) is one placeholder allocated before the first try; when it
  alone does not fit, no micro-batch is tried.
- CPU: a try "runs out of memory" when its peak is above ``memory_cap_bytes`` (the step
  completes; it is never killed midway) or torch fails to allocate.

The prediction's budget is (total - memory used outside this process's allocator when the
probe starts: the CUDA context, other processes) x (1 - safety margin); with a cap on CUDA,
cap x (1 - margin) when the cap leaves room for that outside use; on CPU, cap x (1 - margin).

After the search, one evaluation chunk (``bench.feed.EVAL_CHUNK`` samples, forward only,
no grad) is run once and reported as ``eval_check``: the worker evaluates in chunks of that
size whatever the micro-batch, so a large model can fit its micro-batch and still fail there.

Measured on a 2-core CPU: probing the blobs MLP under an 8 MiB cap takes 28 tries (0.8 s of
steps, ~3 s with the workload load, warm-up and eval check).
"""

from __future__ import annotations

import gc
import time
from typing import Callable, Optional

import torch

from bench.memfit import (DEFAULT_RESOLUTION, DEFAULT_SAFETY_MARGIN, ProbeResult, Try, fit_linear, format_mib as _mib,
                          limit_check, memory_key, per_worker_batches, predict_largest, search)
from bench.memstep import (ACCUM_MICRO_BATCHES, HEAP_FREE_NOTE_BYTES, RssMeter, _CpuStep, _CudaStep, _Training,
                           fix_mmap_threshold, heap_free_bytes, input_spec)


# --- one try, out of memory caught --------------------------------------------------------------

def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                              or "not enough memory" in msg)


def _run_try(step: Callable[[int], int], b: int, cap: Optional[int]) -> tuple[Try, dict]:
    """One try; an out-of-memory error is caught, recorded as a message (the exception and its
    frames, which hold the activations, are dropped) and the memory freed before returning."""
    t0 = time.perf_counter()
    peak: Optional[int] = None
    error: Optional[str] = None
    try:
        peak = step(b)
    except Exception as err:  # noqa: BLE001 - only out-of-memory is a result; the rest re-raises
        if not _is_oom(err):
            raise
        error = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        del err
    seconds = time.perf_counter() - t0
    if error is not None:
        peak_fn = getattr(step, "peak_after_failure", None)
        peak = peak_fn() if peak_fn else None
        reset = getattr(step, "reset", None)
        if reset:
            reset()
    ok = error is None and (cap is None or (peak is not None and peak <= cap))
    if error is None and not ok:
        error = f"peak {peak} bytes above the cap {cap}"
    free = getattr(step, "free", None)
    if free:
        free()
    else:
        gc.collect()
    return Try(b, ok, peak), {"peak_allocated_bytes": getattr(step, "last_allocated", None),
                              "seconds": round(seconds, 4), "error": error}


# --- the probe -------------------------------------------------------------------------------

def probe(sweep, *, device: str | torch.device = "cuda", memory_cap_bytes: Optional[int] = None,
          start: int = 1, max_batch: int = 65536, resolution: float = DEFAULT_RESOLUTION,
          safety_margin: float = DEFAULT_SAFETY_MARGIN,
          repeats: int = 2, step: Optional[Callable[[int], int]] = None,
          on_try: Optional[Callable[[Try, dict], None]] = None, check_eval: bool = True) -> ProbeResult:
    """Find the largest micro-batch of `sweep`'s training step that fits on `device`.

    `memory_cap_bytes` is required on CPU (the memory a try may use; above it counts as out
    of memory) and optional on CUDA (limits the allocator to less than the whole GPU).
    `step`, for tests: a callable micro_batch -> peak bytes that replaces the training step
    and its measurement (it may raise an out-of-memory error; optional ``reset()`` /
    ``free()`` / ``peak_after_failure()`` methods are called as on the real ones).
    `on_try(try, details)` is called after each try (progress output).
    """
    dev = torch.device(device)
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {dev}")
    if memory_cap_bytes is not None and memory_cap_bytes <= 0:
        raise ValueError(f"memory cap must be positive, got {memory_cap_bytes}")
    if not 0.0 <= safety_margin < 1.0:
        raise ValueError(f"safety margin must be in [0, 1), got {safety_margin}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not 1 <= start <= max_batch:
        raise ValueError(f"need 1 <= start <= max_batch, got start={start}, max_batch={max_batch}")
    seed = sweep.seeds[0]
    notes: list[str] = []
    reserved: dict[str, int] = {}
    outside = 0
    placeholder = None
    restore_fraction = frozen = reserve_fails = False
    eval_check: Optional[dict] = None
    heap_free: Optional[int] = None  # CPU: free malloc chunks at the baseline (see bench.memstep)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available on this machine (use --device cpu with a memory cap)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(dev)
        device_name, total = props.name, int(props.total_memory)
        device_total = total
    else:
        if memory_cap_bytes is None:
            raise ValueError("a CPU probe needs a memory cap (memory_cap_bytes / --cpu-memory-cap-gib)")
        device_name, total = "cpu (memory cap)", int(memory_cap_bytes)
        device_total = total
        fix_mmap_threshold()  # before the data load frees its temporaries (see bench.memstep)
    if memory_cap_bytes is not None:
        total = min(total, int(memory_cap_bytes))
    try:
        if step is not None:
            measurement = "injected step"
            the_step: Callable[[int], int] = step
        else:
            spec = input_spec(sweep, seed)
            if spec.resident_bytes:
                reserved["resident_data"] = spec.resident_bytes
            if sweep.compile:
                notes.append("compile: true in the sweep, but the probe runs the model eager")
            if dev.type == "cuda":
                torch.cuda.init()
                free_b, total_b = torch.cuda.mem_get_info(dev)
                outside = max(0, total_b - free_b - torch.cuda.memory_reserved(dev))
                if memory_cap_bytes is not None:
                    torch.cuda.set_per_process_memory_fraction(min(1.0, memory_cap_bytes / total_b), dev)
                    restore_fraction = True
                training = _Training(sweep, spec, dev, seed)
                if max(sweep.num_workers) > 1:
                    reserved["ddp_buckets"] = training.param_bytes()
                if sum(reserved.values()):
                    try:
                        placeholder = torch.empty(sum(reserved.values()), dtype=torch.uint8, device=dev)
                    except torch.cuda.OutOfMemoryError:
                        reserve_fails = True
                        notes.append(f"the reserved {_mib(sum(reserved.values()))} ({', '.join(reserved)}) "
                                     "alone do not fit: no micro-batch was tried")
                the_step = _CudaStep(training, repeats)
                measurement = "torch.cuda.max_memory_reserved per try (max_memory_allocated alongside)"
            else:
                # Warm up once with a throwaway copy so that lazy imports and initialisation
                # (torch._dynamo through torch.optim, oneDNN, the autograd engine) land before
                # the baseline instead of in the first try.
                warm = _Training(sweep, spec, dev, seed)
                warm.step(1)
                warm.eval_chunk(1)
                del warm
                meter = RssMeter()
                meter.mark_baseline()
                heap_free = heap_free_bytes()
                if heap_free is not None and heap_free > HEAP_FREE_NOTE_BYTES:
                    notes.append(f"this process's heap held {_mib(heap_free)} of free chunks before the first try "
                                 "(memory freed before the probe fixed the mmap threshold): tries that reuse "
                                 "them count those pages again, so the CPU peaks may be high; probe in a fresh "
                                 "process (batchscale probe-memory)")
                training = _Training(sweep, spec, dev, seed)
                if max(sweep.num_workers) > 1:
                    reserved["ddp_buckets"] = training.param_bytes()
                the_step = _CpuStep(training, repeats, meter, sum(reserved.values()))
                measurement = meter.method + ", minus the resident set before the model was built and library pages"
        tries: list[Try] = []
        details: list[dict] = []
        # Everything alive now outlives the probe: freezing it keeps the per-try gc.collect()
        # to the objects the tries create (a full collection over torch's modules takes ~0.2 s).
        gc.collect()
        gc.freeze()
        frozen = True

        def fits(b: int) -> bool:
            t, info = _run_try(the_step, b, memory_cap_bytes)
            tries.append(t)
            details.append(info)
            if on_try:
                on_try(t, info)
            return t.ok

        largest, first_fail = (0, None) if reserve_fails else search(fits, start, max_batch, resolution)
        if check_eval and step is None and not reserve_fails:
            eval_check = _check_eval(the_step, sweep, spec.streaming, memory_cap_bytes)
    finally:
        if frozen:
            gc.unfreeze()
        del placeholder
        if restore_fraction:
            torch.cuda.set_per_process_memory_fraction(1.0, dev)
        if dev.type == "cuda" and torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()

    points = [(t.micro_batch, float(t.peak_bytes)) for t in tries if t.ok and t.peak_bytes is not None]
    if len({b for b, _ in points}) < 2:  # CPU tries above the cap still measured their step
        points += [(t.micro_batch, float(t.peak_bytes)) for t, d in zip(tries, details)
                   if not t.ok and t.peak_bytes is not None and d["error"] and d["error"].startswith("peak ")]
    fitted = fit_linear(points)
    # With a cap on CUDA the allocator may take the cap (the context lies outside it), else
    # what the device has left beside the context and other processes.
    usable = total if memory_cap_bytes is not None and dev.type == "cuda" and total + outside <= device_total \
        else total - outside
    budget = int(usable * (1.0 - safety_margin))
    fixed = per_sample = predicted = None
    if fitted is not None:
        fixed, per_sample = fitted
        predicted = predict_largest(fixed, per_sample, budget)
    return ProbeResult(
        tries=tries, largest_fit=largest, first_fail=first_fail, fixed_bytes=fixed,
        per_sample_bytes=per_sample, predicted_largest=predicted, device=device_name, total_bytes=total,
        budget_bytes=budget, safety_margin=safety_margin, memory_cap_bytes=memory_cap_bytes,
        device_type=dev.type, measurement=measurement, reserved_bytes=reserved, try_details=details,
        eval_check=eval_check, per_worker_batches=per_worker_batches(sweep), sweep=sweep.name,
        config_hash=sweep.config_hash(), memory_key=memory_key(sweep),
        limit_check=limit_check(tries, largest, usable),
        setup={"workload": sweep.workload, "model": sweep.model_name, "precision": sweep.precision,
               "channels_last": sweep.channels_last, "optimizer": sweep.optimizer.name,
               "accum_micro_batches_per_step": ACCUM_MICRO_BATCHES, "repeats": repeats, "start": start,
               "max_batch": max_batch, "resolution": resolution, "outside_bytes": outside,
               "heap_free_at_baseline_bytes": heap_free, "torch": torch.__version__},
        notes=notes)


def _check_eval(the_step, sweep, streaming: bool, cap: Optional[int]) -> Optional[dict]:
    """Does one evaluation chunk's forward (no grad) fit? The worker evaluates in chunks of
    bench.feed.EVAL_CHUNK samples (streamed data: STREAM_EVAL_BATCH) whatever the micro-batch."""
    run_eval = getattr(the_step, "run_eval", None)
    if run_eval is None:
        return None
    from bench.feed import EVAL_CHUNK, STREAM_EVAL_BATCH

    num_train, num_test = sweep.dataset_sizes()
    n = max(1, min(STREAM_EVAL_BATCH if streaming else EVAL_CHUNK, max(num_train, num_test)))
    t, info = _run_try(run_eval, n, cap)
    return {"chunk": n, "ok": t.ok, "peak_bytes": t.peak_bytes, "error": info["error"]}
