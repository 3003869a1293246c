"""Memory probe: search, fit, OOM handling, micro-batch choice, CPU measurement, CLI."""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from bench import cli, memprobe
from bench.config import load_sweep
from bench.memprobe import device, fit, meter
from bench.memprobe.device import probe
from bench.memprobe.fit import ProbeResult, Try, micro_batch_per_worker_batch
from bench.plan import split_batch
from conftest import TINY_SWEEP, write_yaml

REPO = Path(__file__).resolve().parent.parent

MIB = 2**20


@pytest.fixture
def sweep(tiny_sweep: Path):
    return load_sweep(tiny_sweep)[0]


def fake_memory(fixed: int = 100, per_sample: int = 10):
    """A step whose memory is exactly fixed + per_sample x batch."""
    return lambda b: fixed + per_sample * b


# --- search and fit ---------------------------------------------------------------------------

def test_doubling_then_bisection_finds_the_exact_boundary(sweep) -> None:
    r = probe(sweep, device="cpu", memory_cap_bytes=1000, step=fake_memory(), safety_margin=0.0)
    assert (r.largest_fit, r.first_fail) == (90, 91)
    batches = [t.micro_batch for t in r.tries]
    assert batches[:8] == [1, 2, 4, 8, 16, 32, 64, 128]  # doubling until the first failure
    assert batches[8:] == [96, 80, 88, 92, 90, 91]  # then bisection between 64 and 128
    assert [t.ok for t in r.tries] == [b <= 90 for b in batches]
    assert all(t.peak_bytes == 100 + 10 * t.micro_batch for t in r.tries)
    assert r.fixed_bytes == pytest.approx(100) and r.per_sample_bytes == pytest.approx(10)
    assert r.predicted_largest == 90  # budget 1000, no margin: agrees with the measurement


def test_prediction_keeps_the_safety_margin(sweep) -> None:
    r = probe(sweep, device="cpu", memory_cap_bytes=1000, step=fake_memory(), safety_margin=0.1)
    assert r.largest_fit == 90 and r.budget_bytes == 900
    assert r.predicted_largest == 80  # (900 - 100) / 10
    assert r.total_bytes == 1000 and r.device_type == "cpu"


def test_start_at_8_and_a_failing_start_bisects_down(sweep) -> None:
    r = probe(sweep, device="cpu", memory_cap_bytes=1000, step=fake_memory(), start=8)
    assert [t.micro_batch for t in r.tries][:5] == [8, 16, 32, 64, 128] and r.largest_fit == 90
    r = probe(sweep, device="cpu", memory_cap_bytes=150, step=fake_memory(), start=8)
    assert (r.largest_fit, r.first_fail) == (5, 6)
    assert [t.micro_batch for t in r.tries] == [8, 4, 6, 5]


def test_max_batch_bounds_the_search(sweep) -> None:
    r = probe(sweep, device="cpu", memory_cap_bytes=10**9, step=fake_memory(), max_batch=100)
    assert (r.largest_fit, r.first_fail) == (100, None)
    assert [t.micro_batch for t in r.tries] == [1, 2, 4, 8, 16, 32, 64, 100]


def test_nothing_fits(sweep) -> None:
    r = probe(sweep, device="cpu", memory_cap_bytes=50, step=fake_memory())
    assert (r.largest_fit, r.first_fail) == (0, 1) and len(r.tries) == 1
    assert micro_batch_per_worker_batch(r) == {}


@pytest.mark.parametrize("start", [1, 3, 8])
def test_search_matches_every_threshold(start: int) -> None:
    for threshold in range(0, 140):
        calls: list[int] = []

        def fits(b: int) -> bool:
            calls.append(b)
            return b <= threshold

        largest, first_fail = fit.search(fits, start, 128)
        assert largest == min(threshold, 128)
        assert first_fail == (threshold + 1 if threshold < 128 else None)
        assert len(calls) <= 2 * math.log2(128) + 2


def test_bisection_stops_within_its_resolution() -> None:
    """The H200 ResNet-18 case: limit 61610, doubling fails at 65536."""
    calls: list[int] = []

    def fits(b: int) -> bool:
        calls.append(b)
        return b <= 61610

    largest, first_fail = fit.search(fits, 1, 262144)  # default: within 1/128 of the fit
    assert largest <= 61610 < first_fail and first_fail - largest <= largest // 128
    assert len(calls) == 17 + 7  # doubling 1..65536, then 7 bisection tries instead of 15
    calls.clear()
    assert fit.search(fits, 1, 262144, resolution=0) == (61610, 61611) and len(calls) == 17 + 15
    with pytest.raises(ValueError, match="resolution"):
        fit.search(fits, 1, 8, resolution=1.0)


def test_fit_and_prediction_helpers() -> None:
    assert fit.fit_linear([(1, 5.0)]) is None
    assert fit.fit_linear([(4, 5.0), (4, 7.0)]) is None
    fixed, slope = fit.fit_linear([(b, 3.0 + 2.0 * b + (0.5 if b % 2 else -0.5)) for b in range(1, 11)])
    assert slope == pytest.approx(2.0, abs=0.05) and fixed == pytest.approx(3.0, abs=0.3)
    assert fit.predict_largest(100, 10, 1000) == 90
    assert fit.predict_largest(100, 0.0, 1000) is None  # memory does not grow with the batch
    assert fit.predict_largest(2000, 10, 1000) == 0


def test_fit_uses_measured_over_cap_tries_when_only_one_batch_fit(sweep) -> None:
    r = probe(sweep, device="cpu", memory_cap_bytes=115, step=fake_memory())
    assert r.largest_fit == 1
    assert r.fixed_bytes == pytest.approx(100) and r.per_sample_bytes == pytest.approx(10)


# --- out-of-memory handling ------------------------------------------------------------------

class OomStep:
    """Allocates like a step, raises CUDA's OOM error above `limit`; checks that whatever the
    previous try held (its frames live in the exception's traceback) was freed before the next."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: list[weakref.ref] = []
        self.resets = self.frees = 0

    def __call__(self, b: int) -> int:
        assert all(ref() is None for ref in self.held), "the previous try's tensors are still alive"
        activations = torch.ones(b * 16)
        self.held.append(weakref.ref(activations))
        if b > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {b * 64} bytes")
        return 1000 + 64 * b

    def reset(self) -> None:
        self.resets += 1

    def free(self) -> None:
        self.frees += 1

    def peak_after_failure(self) -> int:
        return 10**6


def test_oom_is_caught_memory_freed_and_the_search_continues(sweep) -> None:
    step = OomStep(limit=37)
    r = probe(sweep, device="cpu", memory_cap_bytes=10**9, step=step)
    assert (r.largest_fit, r.first_fail) == (37, 38)
    failed = [(t, d) for t, d in zip(r.tries, r.try_details) if not t.ok]
    assert failed and all("out of memory" in d["error"] for _, d in failed)
    assert all(t.peak_bytes == 10**6 for t, _ in failed)  # peak_after_failure is recorded
    assert step.resets == len(failed) and step.frees == len(r.tries)
    assert r.per_sample_bytes == pytest.approx(64) and r.fixed_bytes == pytest.approx(1000)
    step(1)  # and the last failing try's memory is gone too


def test_other_errors_are_not_mistaken_for_oom(sweep) -> None:
    def broken(b: int) -> int:
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        probe(sweep, device="cpu", memory_cap_bytes=1000, step=broken)


def test_cpu_allocator_failure_counts_as_oom() -> None:
    assert device._is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                         "can't allocate memory: you tried to allocate 1000 bytes"))
    assert device._is_oom(MemoryError())
    assert not device._is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_probe_refuses_bad_arguments(sweep) -> None:
    with pytest.raises(ValueError, match="memory cap"):
        probe(sweep, device="cpu", step=fake_memory())
    with pytest.raises(ValueError, match="start"):
        probe(sweep, device="cpu", memory_cap_bytes=1000, step=fake_memory(), start=0)
    with pytest.raises(ValueError, match="safety margin"):
        probe(sweep, device="cpu", memory_cap_bytes=1000, step=fake_memory(), safety_margin=1.0)


# --- micro-batch choice ------------------------------------------------------------------------

def result_with(largest: int, batches: list[int]) -> ProbeResult:
    return ProbeResult(tries=[], largest_fit=largest, first_fail=largest + 1, fixed_bytes=None,
                       per_sample_bytes=None, predicted_largest=None, device="fake", total_bytes=0,
                       per_worker_batches=batches)


@pytest.mark.parametrize("largest, batches, expected", [
    (90, [32, 64], {32: 32, 64: 64}),  # everything fits: no accumulation
    (90, [128, 256, 512], {128: 64, 256: 64, 512: 64}),
    (200, [96, 1000], {96: 96, 1000: 200}),  # 96 fits as it is; 1000 = 5 x 200
    (90, [64, 256, 480], {64: 64, 256: 64, 480: 80}),  # one sweep-wide cap would be 32 and split 64
    (200, [384, 1000], {384: 192, 1000: 200}),  # a sweep-wide cap would have to be gcd 8
    (1, [7, 9], {7: 1, 9: 1}),
    (5000, [], {}),
])
def test_micro_batch_per_worker_batch(largest: int, batches: list[int], expected: dict) -> None:
    assert micro_batch_per_worker_batch(result_with(largest, batches)) == expected


def test_each_choice_is_the_largest_fitting_split_plan_sweep_accepts() -> None:
    for ps in itertools.combinations([12, 16, 24, 48, 64, 96, 97, 100, 128, 250, 256], 3):
        for largest in (1, 7, 16, 20, 50, 64, 100, 300):
            chosen = micro_batch_per_worker_batch(result_with(largest, list(ps)))
            for p, m in chosen.items():
                assert split_batch(p, 1, m) == ((p, p, 1) if p <= largest else (p, m, p // m))
                assert m <= max(largest, 1) and p % m == 0
                assert not any(p % k == 0 for k in range(m + 1, min(largest, p) + 1)), (p, largest, m)


def test_per_batch_choice_and_the_sweep_batches(sweep) -> None:
    assert micro_batch_per_worker_batch(result_with(200, [384, 1000])) == {384: 192, 1000: 200}
    assert micro_batch_per_worker_batch(result_with(90, [32, 64])) == {32: 32, 64: 64}
    two_workers = sweep.model_copy(update={"num_workers": [1, 2], "global_batch_sizes": [32, 64, 96]})
    assert fit.per_worker_batches(two_workers) == [16, 32, 48, 64, 96]


# --- real measurement on CPU --------------------------------------------------------------------

def test_rss_meter_sees_an_allocation_and_its_release() -> None:
    rss = meter.RssMeter()
    rss.mark_baseline()
    rss.start()
    block = torch.ones(64 * MIB // 4)
    grown = rss.stop()
    del block
    meter.trim_heap()
    rss.start()
    after = rss.stop()
    assert 60 * MIB <= grown <= 80 * MIB
    assert after < 16 * MIB


@pytest.mark.slow
def test_tiny_model_probe_on_cpu(tiny_sweep: Path, tmp_path: Path) -> None:
    """A real CPU probe, in a fresh process as `batchscale probe-memory` runs: in this one the
    earlier tests' freed memory (and the session's Ray threads) would be in the measurement."""
    out = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, "-m", "bench", "probe-memory", str(tiny_sweep), "--device", "cpu",
                           "--cpu-memory-cap-gib", str(8 / 1024), "-o", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    r = json.loads(out.read_text())
    assert r["largest_fit"] > 1000  # blobs MLP: ~1 KB/sample
    assert r["largest_fit"] < r["first_fail"] <= r["largest_fit"] + r["largest_fit"] // 128  # default resolution
    assert r["setup"]["resolution"] == fit.DEFAULT_RESOLUTION
    assert r["reserved_bytes"] == {"resident_data": 1000 * (2 * 4 + 8)}  # 1000 samples, 2 floats + label
    assert r["per_sample_bytes"] and 100 < r["per_sample_bytes"] < 10_000
    assert all(t["peak_bytes"] <= 8 * MIB for t in r["tries"] if t["ok"])
    assert all(t["peak_bytes"] > 8 * MIB for t in r["tries"] if not t["ok"])
    assert r["predicted_largest"] and 0.5 < r["predicted_largest"] / r["largest_fit"] < 1.1
    assert r["eval_check"] and r["eval_check"]["ok"] and r["eval_check"]["chunk"] == 500
    assert "VmHWM" in r["measurement"] or "psutil" in r["measurement"]
    assert meter.glibc() is None or "glibc mmap threshold fixed at 128 KiB" in r["measurement"]
    heap_free = r["setup"]["heap_free_at_baseline_bytes"]
    assert heap_free is None or heap_free < meter.HEAP_FREE_NOTE_BYTES
    assert not any("free chunks" in n for n in r["notes"])


def test_mmap_threshold_is_fixed_by_mallopt() -> None:
    """The one call into glibc the CPU numbers rest on, each case in a fresh process: once a
    16 MiB block has come and gone, glibc's dynamic threshold lets an 8 MiB block grow the heap;
    after fix_mmap_threshold it gets a mapping of its own (mallinfo2's hblks counts those),
    which free() hands back to the kernel."""
    code = """
import ctypes, sys
from bench.memprobe import meter
libc = meter.glibc()
if libc is None or meter.mallinfo2() is None:
    sys.exit(print("no glibc 2.33+"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(16 << 20))  # a mapped block freed: the dynamic threshold rises past 16 MiB
fixed = meter.fix_mmap_threshold() if sys.argv[1] == "fix" else meter.mmap_threshold_fixed()
before = meter.mallinfo2().hblks
block = libc.malloc(8 << 20)
print(fixed, meter.mallinfo2().hblks - before)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = {}
    for case in ("dynamic", "fix"):
        done = subprocess.run([sys.executable, "-c", code, case], capture_output=True, text=True, timeout=120,
                              env=env)
        assert done.returncode == 0, done.stderr
        if "no glibc" in done.stdout:
            pytest.skip("needs glibc 2.33+ (mallinfo2)")
        out[case] = done.stdout.split()
    assert out == {"dynamic": ["False", "0"], "fix": ["True", "1"]}


def test_probe_notes_free_heap_chunks_left_from_before(sweep) -> None:
    """Memory freed before the probe and held in the heap inflates CPU peaks: the probe says so."""
    libc = meter.glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc 2.33+ (mallinfo2)")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    # 128 MiB below the 128 KiB mmap threshold: more than the probe's own set-up reuses (about
    # 30 MiB when it runs first in a process), so well over the 8 MiB note threshold remains
    blocks = [libc.malloc(100 * 1024) for _ in range(1281)]
    guard = blocks.pop()  # the last one stays: the heap top cannot shrink back over the freed ones
    try:
        for b in blocks:
            libc.free(b)
        r = probe(sweep, device="cpu", memory_cap_bytes=64 * MIB, max_batch=64)
    finally:
        libc.free(guard)
    assert r.setup["heap_free_at_baseline_bytes"] > meter.HEAP_FREE_NOTE_BYTES
    assert any("free chunks" in n and "fresh process" in n for n in r.notes)


def test_worker_features_run_in_the_probe_step(tmp_path: Path) -> None:
    """bf16 autocast, channels_last, the noise-scale probe and the DDP reserve, on small_cnn."""
    text = TINY_SWEEP.replace("workload: blobs", "workload: digits\nmodel: small_cnn\nprecision: bf16\n"
                              "channels_last: true\nnoise_scale_every_steps: 1") \
        .replace("num_workers: [1]", "num_workers: [1, 2]")
    sweep = load_sweep(write_yaml(tmp_path / "cnn.yaml", text))[0]
    r = probe(sweep, device="cpu", memory_cap_bytes=512 * MIB, max_batch=16)
    assert (r.largest_fit, r.first_fail) == (16, None)
    params = sum(p.numel() for p in device.Training(sweep, device.input_spec(sweep),
                                                      torch.device("cpu")).model.parameters())
    assert r.reserved_bytes["ddp_buckets"] == 4 * params
    assert r.setup["precision"] == "bf16" and r.setup["channels_last"] is True


@pytest.mark.parametrize("augment, streaming", [("crop_flip", False), ("none", True)])
def test_training_step_input_paths(sweep, tmp_path: Path, augment: str, streaming: bool) -> None:
    cnn = load_sweep(write_yaml(tmp_path / "c.yaml", TINY_SWEEP.replace(
        "workload: blobs", "workload: digits\nmodel: small_cnn\nchannels_last: true")))[0]
    spec = device.InputSpec((3, 8, 8), 10, augment, streaming, mean=(0.5,) * 3, std=(0.25,) * 3)
    training = device.Training(cnn, spec, torch.device("cpu"))
    x = training.batch(4)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    # crop+flip returns a fresh (contiguous) tensor in the worker too
    assert x.is_contiguous(memory_format=torch.channels_last) == (augment == "none")
    training.step(4)
    assert all(p.grad is None for p in training.model.parameters())  # zero_grad(set_to_none=True)


def test_a_try_runs_the_workers_own_step_and_evaluation(tmp_path: Path, monkeypatch) -> None:
    """The probe has no training code of its own: a try is bench.step.TrainStep (with the noise
    probe as its observer when the sweep measures it) and the eval check bench.step.evaluate, the
    worker's evaluation pass."""
    import bench.step
    from bench.noise import MicroBatchProbe
    from bench.step import TrainStep

    sweep = load_sweep(write_yaml(tmp_path / "n.yaml", TINY_SWEEP + "noise_scale_every_steps: 5\n"))[0]
    training = device.Training(sweep, device.input_spec(sweep), torch.device("cpu"))
    steps, evals = [], []
    real_step, real_eval = TrainStep.__call__, bench.step.evaluate

    def spy_step(self, micro_batches, num_global, lr, *, observer=None):
        batches = list(micro_batches)
        steps.append(([len(y) for _, y in batches], num_global, lr, type(observer)))
        return real_step(self, batches, num_global, lr, observer=observer)

    def spy_eval(model, batches, distributed, autocast, dev):
        batches = list(batches)
        evals.append((model is training.model, [len(y) for _, y in batches], distributed))
        return real_eval(model, batches, distributed, autocast, dev)

    monkeypatch.setattr(TrainStep, "__call__", spy_step)
    monkeypatch.setattr(bench.step, "evaluate", spy_eval)
    device.ProbeStep(training, meter.CpuMeter(meter.RssMeter(), 0), repeats=2)(6)
    training.eval_chunk(7)
    assert steps == [([6] * device.ACCUM_MICRO_BATCHES, 6 * device.ACCUM_MICRO_BATCHES, sweep.lr.reference_lr,
                      MicroBatchProbe)] * 2
    assert evals == [(True, [7], False)]
    assert training.model.training  # evaluate() hands the model back in training mode


@pytest.mark.gpu
def test_real_probe_on_cuda(tmp_path: Path) -> None:
    """On a GPU: the worker's step probed under a 256 MiB allocator cap (small CNN, bf16,
    channels_last, resident digits); the measured limit is where a try ran out."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    text = TINY_SWEEP.replace("workload: blobs", "workload: digits\nmodel: small_cnn\nprecision: bf16\n"
                              "channels_last: true")
    sweep = load_sweep(write_yaml(tmp_path / "gpu.yaml", text))[0]
    r = probe(sweep, device="cuda", memory_cap_bytes=256 * MIB)
    assert r.device_type == "cuda" and r.total_bytes == 256 * MIB and r.reserved_bytes["resident_data"] > 0
    assert 1 <= r.largest_fit < r.first_fail <= r.largest_fit + max(1, r.largest_fit // 128)
    failed = [d["error"] for t, d in zip(r.tries, r.try_details) if not t.ok]
    assert failed and all("out of memory" in e.lower() or "above the cap" in e for e in failed)
    assert all(t.peak_bytes <= 256 * MIB for t in r.tries if t.ok)
    assert r.per_sample_bytes > 0 and r.limit_check is not None
    assert r.eval_check is not None and r.eval_check["ok"]
    assert "max_memory_reserved" in r.measurement
    assert torch.cuda.memory_reserved() < 256 * MIB  # tries' memory handed back


# --- probe file and CLI -------------------------------------------------------------------------

def test_probe_file_round_trip_and_mismatch(sweep, tmp_path: Path) -> None:
    r = probe(sweep, device="cpu", memory_cap_bytes=1000, step=fake_memory())
    path = fit.write_probe(r, tmp_path / "deep" / "memory-probe.json")
    assert [p.name for p in path.parent.iterdir()] == ["memory-probe.json"]  # no temp file left
    data = json.loads(path.read_text())
    assert data["choice"] == {"by_per_worker_batch": {"32": 32, "64": 64}}
    assert data["tries"][0] == {"micro_batch": 1, "ok": True, "peak_bytes": 110,
                                "peak_allocated_bytes": None, "seconds": data["tries"][0]["seconds"],
                                "error": None}
    back = fit.load_probe(path, sweep)
    assert back.tries == r.tries and back.largest_fit == 90
    assert micro_batch_per_worker_batch(back) == {32: 32, 64: 64}
    other = sweep.model_copy(update={"precision": "bf16"})
    with pytest.raises(fit.ProbeMismatch, match="probe-memory again"):
        fit.load_probe(path, other)
    lr_only = sweep.model_copy(update={"epochs": 7})  # lr, epochs, batches do not change memory
    fit.load_probe(path, lr_only)


@pytest.fixture
def with_probe_command(monkeypatch):
    """The command run in this process: its glibc call is recorded instead of made (it would
    change this test session's allocator; test_mmap_threshold_is_fixed_by_mallopt pins it)."""
    original = cli._extra_commands
    monkeypatch.setattr(cli, "_extra_commands",
                        lambda: [r for r in original() if r is not memprobe.register] + [memprobe.register])
    calls: list[bool] = []
    monkeypatch.setattr(memprobe, "fix_mmap_threshold", lambda: calls.append(True) or True)
    return calls


def test_cli_probe_on_a_tiny_sweep(with_probe_command, tiny_sweep: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code = cli.main(["probe-memory", str(tiny_sweep), "--device", "cpu", "--cpu-memory-cap-gib", "0.0078125",
                     "--max-batch", "4096"])
    out = capsys.readouterr().out
    assert code == 0, out
    path = tmp_path / "results" / "tiny" / "memory-probe.json"
    data = json.loads(path.read_text())
    assert data["largest_fit"] == 4096 and data["first_fail"] is None
    assert data["choice"]["by_per_worker_batch"] == {"32": 32, "64": 64} and data["memory_cap_bytes"] == 8 * MIB
    assert "max_micro_batch_size: auto runs per-worker batch 32 whole, 64 whole" in out
    assert with_probe_command == [True]  # a CPU probe fixes glibc's mmap threshold first


def test_cli_mistakes(with_probe_command, tiny_sweep: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "p.json")
    assert cli.main(["probe-memory", str(tmp_path / "missing.yaml"), "--device", "cpu",
                     "--cpu-memory-cap-gib", "1", "-o", out]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["probe-memory", str(tiny_sweep), "--device", "cpu", "-o", out]) == 2
    assert "--cpu-memory-cap-gib" in capsys.readouterr().err
    assert cli.main(["probe-memory", str(tiny_sweep), "--device", "cpu", "--cpu-memory-cap-gib", "-1",
                     "-o", out]) == 2
    assert cli.main(["probe-memory", str(tiny_sweep), "--device", "cpu", "--cpu-memory-cap-gib", "1",
                     "--start", "0", "-o", out]) == 2
    if not torch.cuda.is_available():
        assert cli.main(["probe-memory", str(tiny_sweep), "--device", "cuda", "-o", out]) == 1
        assert "CUDA is not available" in capsys.readouterr().err
    assert not Path(out).exists()


def test_cli_nothing_fits_exits_1_and_keeps_the_curve(with_probe_command, tiny_sweep: Path, tmp_path: Path,
                                                     capsys) -> None:
    out = tmp_path / "p.json"
    code = cli.main(["probe-memory", str(tiny_sweep), "--device", "cpu", "--cpu-memory-cap-gib", "1e-6",
                     "-o", str(out)])
    assert code == 1 and "no micro-batch fits" in capsys.readouterr().err
    assert json.loads(out.read_text())["largest_fit"] == 0


def test_planning_and_the_parser_do_not_import_torch() -> None:
    """`batchscale run` plans with bench.memprobe.fit and every command builds the parser, which
    registers probe-memory: none of that may pay for importing torch."""
    code = ("import sys, bench.memprobe.fit, bench.memprobe.meter, bench.cli; bench.cli.build_parser(); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_try_is_a_plain_triple() -> None:
    micro_batch, ok, peak = Try(8, True, 123)
    assert (micro_batch, ok, peak) == (8, True, 123)


def test_micro_batch_for_auto(sweep, tmp_path: Path) -> None:
    from bench.plan import plan_sweep

    with pytest.raises(fit.ProbeMismatch, match="run `batchscale probe-memory"):
        fit.micro_batch_for_auto(sweep, tmp_path)
    r = probe(sweep, device="cpu", memory_cap_bytes=1000, step=fake_memory(), safety_margin=0.0)
    path = fit.write_probe(r, fit.default_output(sweep, tmp_path))
    assert path == tmp_path / "tiny" / "memory-probe.json"
    bigger = sweep.model_copy(update={"global_batch_sizes": [32, 64, 256, 480]})  # same memory key
    chosen, _ = fit.micro_batch_for_auto(bigger, tmp_path)
    assert chosen == {32: 32, 64: 64, 256: 64, 480: 80}  # largest fit 90: 64 runs whole
    plans = plan_sweep(bigger, max_micro_batch_size=chosen)
    assert [(p.per_worker_batch_size, p.micro_batch_size, p.grad_accum_steps) for p in plans] == \
        [(32, 32, 1), (64, 64, 1), (256, 64, 4), (480, 80, 6)]
    with pytest.raises(fit.ProbeMismatch, match="different model"):
        fit.micro_batch_for_auto(sweep.model_copy(update={"model": "mlp", "workload": "digits"}), tmp_path)
    path.write_text("{not json")
    with pytest.raises(fit.ProbeMismatch, match="not a readable memory probe"):
        fit.micro_batch_for_auto(sweep, tmp_path)


def test_cuda_path_with_a_simulated_gpu(sweep, monkeypatch) -> None:
    """The CUDA branch's bookkeeping (peak stats, OOM, cap as allocator fraction, restore) with
    torch.cuda replaced by a fake allocator: 1 GiB device, 100 MiB context, 1 MiB/sample."""
    state = {"reserved": 0, "peak": 0, "fractions": [], "empties": 0}
    fake = {
        "is_available": lambda: True, "current_device": lambda: 0, "init": lambda: None,
        "get_device_properties": lambda d: type("P", (), {"name": "FakeGPU", "total_memory": 1024 * MIB})(),
        "mem_get_info": lambda d: (924 * MIB, 1024 * MIB), "memory_reserved": lambda d: 0,
        "synchronize": lambda d: None,
        "reset_peak_memory_stats": lambda d: state.update(peak=state["reserved"]),
        "max_memory_reserved": lambda d: state["peak"], "max_memory_allocated": lambda d: state["peak"] - MIB,
        "set_per_process_memory_fraction": lambda f, d: state["fractions"].append(f),
        "empty_cache": lambda: state.update(empties=state["empties"] + 1),
    }
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn)

    class FakeTraining:
        def __init__(self, sweep, spec, device, seed=0):
            assert device == torch.device("cuda", 0)
            self.device, self.grads = device, False

        def step(self, b: int) -> None:
            need = 50 * MIB + b * MIB
            limit = state["fractions"][-1] * 1024 * MIB if state["fractions"] else 924 * MIB
            if need > limit:
                self.grads = True
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 MiB")
            state["peak"] = max(state["peak"], need)

        def eval_chunk(self, n: int) -> None:
            state["peak"] = max(state["peak"], 50 * MIB + n * MIB // 4)

        def reset(self) -> None:
            self.grads = False

    monkeypatch.setattr(device, "Training", FakeTraining)
    monkeypatch.setattr(device, "input_spec", lambda s, seed=0: device.InputSpec((2,), 3, "none", False))
    r = probe(sweep, device="cuda", memory_cap_bytes=512 * MIB, safety_margin=0.0, resolution=0)
    assert (r.largest_fit, r.first_fail) == (462, 463)  # 50 MiB + 462 MiB = the 512 MiB cap
    assert state["fractions"] == [0.5, 1.0]  # the cap as allocator fraction, then restored
    assert r.device == "FakeGPU" and r.total_bytes == 512 * MIB and r.budget_bytes == 512 * MIB
    assert r.per_sample_bytes == pytest.approx(MIB) and r.fixed_bytes == pytest.approx(50 * MIB)
    assert r.predicted_largest == 462
    assert r.try_details[0]["peak_allocated_bytes"] == 50 * MIB
    assert all(d["peak_allocated_bytes"] is None for t, d in zip(r.tries, r.try_details) if not t.ok)
    assert state["empties"] >= len(r.tries)
    assert r.eval_check == {"chunk": 500, "ok": True, "peak_bytes": 50 * MIB + 125 * MIB, "error": None}
    state["fractions"].clear()
    r = probe(sweep, device="cuda", safety_margin=0.1, check_eval=False, resolution=0)
    assert r.largest_fit == 874 and r.budget_bytes == int(924 * MIB * 0.9)  # less the context
    assert r.predicted_largest == int((924 * 0.9 - 50))


def test_auto_sweep_dry_run_shows_each_batch_split(tiny_sweep: Path, tmp_path: Path, capsys) -> None:
    auto = tiny_sweep.parent / "auto.yaml"
    auto.write_text(tiny_sweep.read_text().replace("global_batch_sizes: [32, 64]",
                                                   "global_batch_sizes: [32, 64, 256, 480]")
                    + "max_micro_batch_size: auto\n")
    results = tmp_path / "results"
    assert cli.main(["run", str(auto), "--results-dir", str(results), "--dry-run"]) == 2
    assert "needs a memory probe" in capsys.readouterr().err
    sweep = load_sweep(auto)[0]
    r = probe(sweep, device="cpu", memory_cap_bytes=1000, step=fake_memory(), safety_margin=0.0)
    fit.write_probe(r, fit.default_output(sweep, results))
    assert cli.main(["run", str(auto), "--results-dir", str(results), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for line in ("per-worker 32 = 1 x 32", "per-worker 64 = 1 x 64", "per-worker 256 = 4 x 64",
                 "per-worker 480 = 6 x 80"):
        assert line in out


def test_auto_refuses_a_probe_from_the_other_kind_of_device(sweep, tmp_path: Path) -> None:
    r = probe(sweep, device="cpu", memory_cap_bytes=1000, step=fake_memory(), safety_margin=0.0)
    fit.write_probe(r, fit.default_output(sweep, tmp_path))
    assert fit.micro_batch_for_auto(sweep, tmp_path, use_gpu=False)[0] == {32: 32, 64: 64}
    with pytest.raises(fit.ProbeMismatch, match=r"measured on cpu \(memory cap\), but the cluster runs "
                                                   r"workers on GPUs; probe again there"):
        fit.micro_batch_for_auto(sweep, tmp_path, use_gpu=True)


def test_nothing_fits_says_why() -> None:
    reserve_only = ProbeResult(tries=[], largest_fit=0, first_fail=None, fixed_bytes=None, per_sample_bytes=None,
                               predicted_largest=None, device="NVIDIA H100 80GB HBM3", total_bytes=0)
    assert fit.nothing_fits(reserve_only) == ("the memory reserved for DDP buffers and resident data alone "
                                                 "does not fit on NVIDIA H100 80GB HBM3")
    one = ProbeResult(tries=[Try(1, False, 10)], largest_fit=0, first_fail=1, fixed_bytes=None,
                      per_sample_bytes=None, predicted_largest=None, device="cpu (memory cap)", total_bytes=0)
    assert fit.nothing_fits(one) == "even 1 sample(s) ran out of memory on cpu (memory cap)"


def test_limit_check_compares_the_doubling_fit_with_the_searched_limit(sweep) -> None:
    r = probe(sweep, device="cpu", memory_cap_bytes=1000, step=fake_memory(100, 10), safety_margin=0.0)
    assert r.limit_check == {"predicted": 90, "measured": 90, "difference": 0, "first_bisection_step": 32,
                             "within": True, "from_tries": [1, 2, 4, 8, 16, 32, 64]}
    # Memory that grows faster than linearly near the limit: the doubling fit overshoots.
    curved = probe(sweep, device="cpu", memory_cap_bytes=10_000, step=lambda b: 100 + b + (b * b if b > 64 else 0))
    check = curved.limit_check
    assert check["measured"] == 99 and check["predicted"] > 99 + check["first_bisection_step"]
    assert check["within"] is False
    assert fit.ProbeResult.from_dict(json.loads(json.dumps(curved.to_dict()))).limit_check == check
    everything = probe(sweep, device="cpu", memory_cap_bytes=10**9, step=fake_memory(), max_batch=64)
    assert everything.limit_check is None  # the search never failed: no limit to predict
