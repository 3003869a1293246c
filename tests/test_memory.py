"""bench.memory: per-run device memory bookkeeping, with a fake allocator on the CPU (and one
GPU-marked check on a real device)."""

from __future__ import annotations

import pytest

from bench.memory import GIB, RunMemory


class FakeAllocator:
    """A caching allocator in miniature: tensors come and go; the cache keeps what was reserved
    until empty_cache(); peaks since the last reset."""

    def __init__(self) -> None:
        self.live = 0
        self.cache = 0
        self.peak_live = 0
        self.peak_cache = 0

    def alloc(self, n: int) -> None:
        self.live += n
        self.cache = max(self.cache, self.live)
        self.peak_live, self.peak_cache = max(self.peak_live, self.live), max(self.peak_cache, self.cache)

    def free(self, n: int) -> None:
        self.live -= n

    # the MemoryBackend protocol
    def empty_cache(self) -> None:
        self.cache = self.live

    def reset_peak(self) -> None:
        self.peak_live, self.peak_cache = self.live, self.cache

    def allocated(self) -> int:
        return self.live

    def reserved(self) -> int:
        return self.cache

    def peak_allocated(self) -> int:
        return self.peak_live

    def peak_reserved(self) -> int:
        return self.peak_cache


def a_run(mem: RunMemory, fake: FakeAllocator, train_gib: float, eval_gib: float, epochs: int = 2) -> None:
    """Training needs train_gib at its peak, evaluation eval_gib; nothing leaks."""
    mem.start_run()
    for _ in range(epochs):
        mem.begin("train")
        fake.alloc(int(train_gib * GIB))
        fake.free(int(train_gib * GIB))
        mem.begin("eval")
        fake.alloc(int(eval_gib * GIB))
        fake.free(int(eval_gib * GIB))
        mem.end_epoch()


def test_a_small_run_after_a_large_one_reports_its_own_peaks():
    fake = FakeAllocator()
    fake.alloc(GIB // 4)  # the resident data set: 0.25 GiB, alive throughout
    mem = RunMemory(fake)
    a_run(mem, fake, train_gib=8.0, eval_gib=1.0)
    big = mem.summary()
    a_run(mem, fake, train_gib=0.5, eval_gib=0.1)
    small = mem.summary()
    alone = RunMemory(fresh := FakeAllocator())
    fresh.alloc(GIB // 4)
    a_run(alone, fresh, train_gib=0.5, eval_gib=0.1)
    assert big.train_peak_allocated_gib == pytest.approx(8.25) and big.eval_peak_allocated_gib == pytest.approx(1.25)
    # without empty_cache + reset at the run's start the small run would report 8.25 reserved
    assert small == alone.summary()
    assert small.train_peak_reserved_gib == pytest.approx(0.75) and small.baseline_reserved_gib == pytest.approx(0.25)
    assert small.train_peak_allocated_gib == pytest.approx(0.75)


def test_training_and_evaluation_peaks_are_kept_apart_and_per_epoch():
    fake = FakeAllocator()
    mem = RunMemory(fake)
    mem.start_run()
    mem.begin("train")
    fake.alloc(3 * GIB)
    fake.free(3 * GIB)
    mem.begin("eval")
    fake.alloc(5 * GIB)  # a larger evaluation chunk must not count as training memory
    fake.free(5 * GIB)
    assert mem.end_epoch()[0] == pytest.approx(3.0)
    mem.begin("train")
    fake.alloc(2 * GIB)
    fake.free(2 * GIB)
    assert mem.end_epoch()[0] == pytest.approx(2.0)  # this epoch's own training peak
    s = mem.summary()
    assert (s.train_peak_allocated_gib, s.eval_peak_allocated_gib) == (pytest.approx(3.0), pytest.approx(5.0))
    restored = RunMemory(FakeAllocator())
    restored.load_state(mem.state())
    assert restored.summary().train_peak_allocated_gib == pytest.approx(3.0)


def test_no_bookkeeping_on_the_cpu():
    import torch

    assert RunMemory.for_device(torch.device("cpu")) is None
    with pytest.raises(ValueError):
        RunMemory(FakeAllocator()).begin("warmup")


@pytest.mark.gpu
def test_small_batch_after_large_batch_in_one_process_matches_alone_on_gpu(tmp_path):
    """On a real GPU: the same worker process runs batch 4096 and then 128; the 128 run reports
    what it reports in a process of its own (within 10 %)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import subprocess
    import sys

    code = """
import sys, torch
from bench.config import SweepConfig
from bench.plan import plan_sweep
from bench.store import SweepDir
from bench.worker import WorkerContext, execute_run
for b in [int(b) for b in sys.argv[2].split(",")]:  # in this order, in this one process
    sweep = SweepConfig.model_validate(dict(name="m", workload="shapes", model="small_cnn",
        workload_options={"num_train": 8192, "num_test": 1024}, lr=dict(reference_lr=0.05, reference_batch_size=128),
        epochs=1, global_batch_sizes=[b], seeds=[0], target_accuracy=0.5, telemetry={"enabled": False}))
    plan = plan_sweep(sweep)[0]
    run = SweepDir(sys.argv[1]).run(plan.run_id); run.path.mkdir(parents=True, exist_ok=True)
    s = execute_run(plan, sweep, run, WorkerContext(device=torch.device("cuda")))
    print(b, s.memory.train_peak_allocated_gib, s.memory.train_peak_reserved_gib)
"""
    def peaks(folder, batches):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / folder), batches], check=True,
                             capture_output=True, text=True).stdout.split("\n")
        return {int(b): (float(a), float(r)) for b, a, r in (line.split() for line in out if line.strip())}
    together, alone = peaks("together", "4096,128"), peaks("alone", "128")
    assert together[4096][0] > together[128][0]  # training peaks grow with the batch
    for got, want in zip(together[128], alone[128]):
        assert got == pytest.approx(want, rel=0.10)
