"""Telemetry: a fake NVML (injected, nothing patched), CPU mode with psutil, overhead script."""

from __future__ import annotations

import csv
import json
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench.telemetry import (
    COLUMNS, GIB, SUMMARY_KEYS, Sampler, _Stats, energy_from_power_j, gpu_ids_from_torch_uuid,
    merge_summaries, parse_cuda_visible_devices)

NOT_SUPPORTED, INVALID_ARGUMENT, NOT_FOUND = 3, 2, 6  # NVML return codes
SLOW_HZ = 0.2  # period 5 s: start() + stop() at once gives exactly two samples (first, last)


# --- a fake NVML: the pynvml names the sampler uses, values from FakeGpu ------------------
class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        names = {NOT_SUPPORTED: "Not Supported", NOT_FOUND: "Not Found"}
        super().__init__(names.get(value, f"NVML error {value}"))
        self.value = value


@dataclass
class FakeGpu:
    index: int
    uuid: str
    mem_used_gib: list[float] = field(default_factory=lambda: [1.0])  # call n: item n % len
    mem_total_gib: float = 80.0
    util_pct: list[int] = field(default_factory=lambda: [50])
    mem_util_pct: int = 20
    power_w: list[float] = field(default_factory=lambda: [200.0])
    power_limit_w: float = 700.0
    temperature_c: int = 40
    sm_clock_mhz: int = 1980
    energy_start_mj: int = 5_000_000
    energy_step_mj: int = 1000  # added per reading
    unsupported: set[str] = field(default_factory=set)
    fail: tuple[str, int, Exception] | None = None  # (query, from call n, exception)
    calls: Counter = field(default_factory=Counter)

    def read(self, query: str, value: Any) -> Any:
        n = self.calls[query]
        self.calls[query] += 1
        if query in self.unsupported:
            raise FakeNVMLError(NOT_SUPPORTED)
        if self.fail and self.fail[0] == query and n >= self.fail[1]:
            raise self.fail[2]
        return value(n) if callable(value) else value


def _nth(seq: list, n: int) -> Any:
    return seq[n % len(seq)]


class FakeNvml:
    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def __init__(self, gpus: list[FakeGpu], init_error: Exception | None = None) -> None:
        self.gpus, self.init_error = gpus, init_error
        self.num_init = self.num_shutdown = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.num_init += 1

    def nvmlShutdown(self) -> None:
        self.num_shutdown += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        if not 0 <= i < len(self.gpus):
            raise FakeNVMLError(INVALID_ARGUMENT)
        return self.gpus[i]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeGpu:
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        raise FakeNVMLError(NOT_FOUND)

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str:
        return h.read("uuid", h.uuid)

    def nvmlDeviceGetIndex(self, h: FakeGpu) -> int:
        return h.read("index", h.index)

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> SimpleNamespace:
        return h.read("memory", lambda n: SimpleNamespace(
            used=int(_nth(h.mem_used_gib, n) * GIB), total=int(h.mem_total_gib * GIB)))

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> SimpleNamespace:
        return h.read("utilization", lambda n: SimpleNamespace(
            gpu=_nth(h.util_pct, n), memory=h.mem_util_pct))

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:
        return h.read("power", lambda n: int(_nth(h.power_w, n) * 1000))  # mW

    def nvmlDeviceGetEnforcedPowerLimit(self, h: FakeGpu) -> int:
        return h.read("power_limit", int(h.power_limit_w * 1000))  # mW

    def nvmlDeviceGetTemperature(self, h: FakeGpu, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return h.read("temperature", h.temperature_c)

    def nvmlDeviceGetClockInfo(self, h: FakeGpu, clock: int) -> int:
        assert clock == self.NVML_CLOCK_SM
        return h.read("clock", h.sm_clock_mhz)

    def nvmlDeviceGetTotalEnergyConsumption(self, h: FakeGpu) -> int:
        return h.read("energy", lambda n: h.energy_start_mj + n * h.energy_step_mj)  # mJ


def four_gpus() -> FakeNvml:
    return FakeNvml([FakeGpu(i, f"GPU-{i}{i}{i}{i}-aaaa") for i in range(4)])


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def sample_briefly(tmp_path: Path, nvml: Any, **kw: Any) -> tuple[dict, list[dict[str, str]]]:
    """Start and stop at once at SLOW_HZ: exactly two samples per GPU (in a fresh file)."""
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "telemetry-rank0.csv"
    with Sampler(path, run_id="r1", rank=0, hz=SLOW_HZ, node="n1", nvml=nvml, **kw) as sampler:
        pass
    return sampler.stop(), (read_rows(path) if path.exists() else [])


def wait_until(predicate: Any, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


# --- which GPUs --------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    (None, None),  # unset: every GPU
    ("", []),  # empty: no GPU
    ("0,2", ["0", "2"]),
    (" 3 , 1 ", ["3", "1"]),
    ("GPU-1111-aaaa,MIG-abcd", ["GPU-1111-aaaa", "MIG-abcd"]),
    ("1,-1,2", ["1"]),  # CUDA stops at the first invalid entry
    ("NoDevFiles", []),
])
def test_parse_cuda_visible_devices(value, expected):
    assert parse_cuda_visible_devices(value) == expected


def test_gpu_ids_from_torch_uuid():
    for uuid_str in ("GPU-2222-aaaa", "2222-aaaa"):  # with the prefix, or str(props.uuid) alone
        assert gpu_ids_from_torch_uuid(uuid_str) == ["GPU-2222-aaaa"]
    assert gpu_ids_from_torch_uuid("") == []


@pytest.mark.parametrize("env, indices", [
    ("1,2", ["1", "2"]),  # indices as NVML (PCI) indices
    ("GPU-3333-aaaa,GPU-0000-aaaa", ["3", "0"]),  # UUIDs, in the given order
    (None, ["0", "1", "2", "3"]),  # unset: all GPUs
])
def test_gpus_come_from_cuda_visible_devices(tmp_path, monkeypatch, env, indices):
    if env is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    summary, rows = sample_briefly(tmp_path, four_gpus())
    assert summary["kind"] == "gpu" and summary["error"] is None
    assert [r["gpu_index"] for r in rows] == indices * 2  # two samples
    assert all(r["gpu_uuid"] == f"GPU-{r['gpu_index'] * 4}-aaaa" for r in rows)


def test_empty_cuda_visible_devices_is_cpu_mode_without_nvml(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    nvml = four_gpus()
    summary, rows = sample_briefly(tmp_path, nvml)
    assert summary["kind"] == "cpu" and summary["error"] is None
    assert nvml.num_init == 0 and {r["kind"] for r in rows} == {"cpu"}


def test_explicit_gpu_ids_win_and_unknown_ones_are_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    summary, rows = sample_briefly(tmp_path, four_gpus(), gpu_ids=["GPU-2222-aaaa", "GPU-9999"])
    assert {r["gpu_index"] for r in rows} == {"2"}
    assert "GPU-9999" in summary["error"] and summary["kind"] == "gpu"


def test_no_nvml_is_cpu_mode(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    broken = FakeNvml([], init_error=FakeNVMLError(12))  # e.g. library not found
    summary, rows = sample_briefly(tmp_path, broken)
    assert summary["kind"] == "cpu" and summary["error"] is None and len(rows) == 2  # no ask
    summary, _ = sample_briefly(tmp_path, broken, gpu_ids=["0"])
    assert summary["kind"] == "cpu" and "NVML unavailable" in summary["error"]
    nvml = FakeNvml([])  # NVML works, the node has no GPU
    summary, _ = sample_briefly(tmp_path, nvml)
    assert summary["kind"] == "cpu" and nvml.num_init == nvml.num_shutdown == 1


# --- rows and summaries --------------------------------------------------------------------
def test_unsupported_fields_are_empty_not_zero(tmp_path):
    mig = FakeGpu(0, "MIG-abcd", unsupported={"index", "utilization", "power", "power_limit",
                                              "temperature", "clock", "energy"})
    summary, rows = sample_briefly(tmp_path, FakeNvml([mig]), gpu_ids=["MIG-abcd"])
    assert list(rows[0]) == list(COLUMNS)
    for row in rows:
        assert row["kind"] == "gpu" and row["gpu_uuid"] == "MIG-abcd"
        assert float(row["mem_used_gib"]) == 1.0 and float(row["mem_total_gib"]) == 80.0
        for col in ("gpu_index", "gpu_util_pct", "mem_util_pct", "power_w", "power_limit_w",
                    "temperature_c", "sm_clock_mhz"):
            assert row[col] == "", col
    assert summary == {"kind": "gpu", "num_samples": 2, "peak_memory_gib": 1.0,
                       "baseline_memory_gib": 1.0, "peak_memory_above_baseline_gib": 0.0,
                       "mean_util_pct": None, "p95_util_pct": None, "mean_power_w": None,
                       "energy_j": None, "error": None}


def test_summary_on_known_numbers_energy_from_counter(tmp_path):
    gpus = [FakeGpu(i, f"GPU-{i}", mem_used_gib=[2.0, 6.0 + i], util_pct=[[10, 50], [30, 90]][i],
                    power_w=[100.0, 300.0], energy_step_mj=250_000) for i in range(2)]
    nvml = FakeNvml(gpus)
    summary, rows = sample_briefly(tmp_path, nvml, gpu_ids=["0", "1"])
    assert len(rows) == 4 and rows[0]["power_w"] == "100.0" and rows[0]["temperature_c"] == "40"
    assert summary["num_samples"] == 2
    assert summary["peak_memory_gib"] == 7.0  # GPU 1's second reading
    assert summary["mean_util_pct"] == 45.0  # (10 + 50 + 30 + 90) / 4
    assert summary["p95_util_pct"] == pytest.approx(84.0)  # sorted 10 30 50 90: 50 + .85 * 40
    assert summary["mean_power_w"] == 200.0  # per GPU
    assert summary["energy_j"] == pytest.approx(500.0)  # 2 GPUs x one step of 250,000 mJ
    assert nvml.num_init == nvml.num_shutdown == 1
    assert set(summary) == set(SUMMARY_KEYS)


def test_energy_from_power_integral_without_counter(tmp_path):
    gpu = FakeGpu(0, "GPU-0", power_w=[100.0, 300.0], unsupported={"energy"})
    path = tmp_path / "t.csv"
    with Sampler(path, run_id="r", rank=0, hz=SLOW_HZ, nvml=FakeNvml([gpu]), gpu_ids=["0"]) as s:
        time.sleep(0.3)
    summary, rows = s.stop(), read_rows(path)
    elapsed_s = (int(rows[1]["time_ms"]) - int(rows[0]["time_ms"])) / 1000
    assert summary["energy_j"] == pytest.approx(200.0 * elapsed_s, abs=0.5)  # mean W x s
    assert summary["energy_j"] > 0.25 * 200.0


def test_stats_on_hand_numbers():
    assert energy_from_power_j([(0.0, 100.0), (1.0, 200.0), (2.0, 100.0)]) == 300.0
    assert energy_from_power_j([(0.0, 100.0)]) is None
    stats = _Stats(num_gpus=1)
    for t_s, watts in [(0.0, 100.0), (10.0, 300.0)]:
        stats.add_gpu(0, t_s, {"mem_used_gib": 1.0, "gpu_util_pct": 10, "power_w": watts}, None)
    stats.num_samples = 2
    assert stats.summary("gpu", None)["energy_j"] == 2000.0  # 10 s x 200 W mean
    stats.energy_mj[0] = [9000.0, 1000.0]  # counter went backwards (reset): use the integral
    assert stats.energy_j() == 2000.0
    stats.energy_mj[0] = [1000.0, 6000.0]
    assert stats.energy_j() == 5.0


def test_merge_summaries():
    a = {"kind": "gpu", "num_samples": 10, "peak_memory_gib": 30.0, "mean_util_pct": 80.0,
         "p95_util_pct": 99.0, "mean_power_w": 500.0, "energy_j": 1000.0, "error": None}
    b = {**a, "peak_memory_gib": 40.0, "mean_util_pct": 60.0, "p95_util_pct": 97.0,
         "mean_power_w": None, "energy_j": 3000.0}
    merged = merge_summaries([a, b])
    assert merged == {"kind": "gpu", "num_samples": 20, "peak_memory_gib": 40.0,
                      "baseline_memory_gib": None, "peak_memory_above_baseline_gib": None,  # v1 ranks: unknown
                      "mean_util_pct": 70.0, "p95_util_pct": 98.0, "mean_power_w": 500.0,
                      "energy_j": 4000.0, "error": None}
    assert merge_summaries([a, {**b, "energy_j": None}])["energy_j"] is None  # unknown stays so
    cpu = {**a, "kind": "cpu", "error": "boom"}
    mixed = merge_summaries([a, cpu])
    assert mixed["num_samples"] == 10 and "rank 1: boom" in mixed["error"]
    assert "[1]" in mixed["error"]
    with pytest.raises(ValueError):
        merge_summaries([])


# --- the thread ----------------------------------------------------------------------------
def test_error_inside_a_query_stops_the_thread_not_the_run(tmp_path):
    gpu = FakeGpu(0, "GPU-0", fail=("memory", 2, RuntimeError("driver fell over")))
    path = tmp_path / "t.csv"
    sampler = Sampler(path, run_id="r", rank=0, hz=100, nvml=FakeNvml([gpu]), gpu_ids=["0"]).start()
    assert wait_until(lambda: not sampler._thread.is_alive())  # ended by itself
    training_went_on = sum(range(1000))  # the caller is untouched
    summary = sampler.stop()
    assert training_went_on == 499500
    assert summary["num_samples"] == 2 and "RuntimeError: driver fell over" in summary["error"]
    assert len(read_rows(path)) == 2  # what was sampled is written


def test_thread_stops_within_one_period(tmp_path):
    sampler = Sampler(tmp_path / "t.csv", run_id="r", rank=0, hz=0.1, nvml=four_gpus(),
                      gpu_ids=["0"]).start()
    time.sleep(0.05)
    start_s = time.monotonic()
    summary = sampler.stop()
    # half of the 10 s period: no waiting for a tick (and room for a slow fsync on a busy CI VM)
    assert time.monotonic() - start_s < 5.0
    assert not sampler._thread.is_alive() and summary["num_samples"] == 2
    assert sampler.stop() == summary  # idempotent


def test_wait_first_sample_returns_once_the_thread_has_sampled(tmp_path):
    sampler = Sampler(tmp_path / "t.csv", run_id="r", rank=0, hz=0.5, nvml=four_gpus(), gpu_ids=["0"])
    assert not sampler.wait_first_sample(timeout_s=0.05)  # not started: nothing to wait for
    sampler.start()
    try:
        assert sampler.wait_first_sample(timeout_s=5.0)
        assert sampler._stats.num_samples >= 1
    finally:
        sampler.stop()


def test_rows_are_written_in_chunks_and_readable_mid_run(tmp_path):
    path = tmp_path / "t.csv"
    sampler = Sampler(path, run_id="r", rank=3, hz=200, nvml=four_gpus(), gpu_ids=["1"],
                      chunk_rows=3).start()
    try:
        assert wait_until(lambda: path.exists() and len(read_rows(path)) >= 6)
        mid_run = read_rows(path)
        assert len(mid_run) % 3 == 0 and sampler._thread.is_alive()
        assert {r["rank"] for r in mid_run} == {"3"} and {r["run_id"] for r in mid_run} == {"r"}
    finally:
        summary = sampler.stop()
    assert path.read_text().count("time_ms") == 1  # header once
    assert len(read_rows(path)) == summary["num_samples"]  # every sample, chunk or not
    times = [int(r["time_ms"]) for r in read_rows(path)]
    assert times == sorted(times)


def test_start_twice_and_bad_rates_are_refused(tmp_path):
    with pytest.raises(ValueError):
        Sampler(tmp_path / "t.csv", run_id="r", rank=0, hz=0)
    with pytest.raises(ValueError):
        Sampler(tmp_path / "t.csv", run_id="r", rank=0, chunk_rows=0)
    sampler = Sampler(tmp_path / "t.csv", run_id="r", rank=0, hz=SLOW_HZ, gpu_ids=[])
    with sampler:
        with pytest.raises(RuntimeError):
            sampler.start()
    assert Sampler(tmp_path / "u.csv", run_id="r", rank=0).stop()["error"] == \
        "sampler was never started"


# --- CPU mode on this machine (real psutil; real pynvml when no GPU owned) ---------------
def test_cpu_mode_records_process_rss_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU mode on any machine
    path = tmp_path / "telemetry-rank0.csv"
    with Sampler(path, run_id="cpu-run", rank=0, hz=50) as sampler:
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            sum(i * i for i in range(1000))  # keep a core busy
    summary, rows = sampler.stop(), read_rows(path)
    assert summary["kind"] == "cpu" and summary["error"] is None and len(rows) >= 3
    assert {r["kind"] for r in rows} == {"cpu"}
    assert all(float(r["rss_gib"]) > 0 for r in rows)
    assert rows[0]["cpu_pct"] == "" and all(r["cpu_pct"] != "" for r in rows[1:])
    assert all(r["gpu_index"] == r["mem_used_gib"] == r["power_w"] == "" for r in rows)
    assert summary["peak_memory_gib"] == max(float(r["rss_gib"]) for r in rows)
    assert summary["mean_util_pct"] > 0 and summary["energy_j"] is None


def test_default_nvml_without_a_driver_is_cpu_mode(tmp_path, monkeypatch):
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("NVML works here: this test is for machines without a GPU driver")
    except pynvml.NVMLError:
        pass
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    summary, rows = sample_briefly(tmp_path, None)
    assert summary["kind"] == "cpu" and summary["error"] is None and len(rows) == 2


# --- the overhead benchmark ----------------------------------------------------------------
def test_telemetry_overhead_runs_on_cpu(tmp_path, capsys):
    pytest.importorskip("torch")
    from bench.perf.telemetry_overhead import main

    out = tmp_path / "overhead.json"
    rc = main(["--device", "cpu", "--model", "mlp", "--image-size", "4",
               "--micro-batch-size", "2", "--num-rounds", "2", "--steps-per-round", "2",
               "--warmup-steps", "1", "--json", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert re.fullmatch(r"overhead ratio 10Hz=\d+\.\d+ 50Hz=\d+\.\d+", lines[-1])
    assert lines[-5].split() == ["sampler", "median_ms", "min_ms", "max_ms", "ratio_median",
                                 "ratio_min", "ratio_max", "samples"]
    assert [line.split()[0] for line in lines[-4:-1]] == ["off", "10Hz", "50Hz"]
    result = json.loads(out.read_text())
    assert set(result["overhead_ratio"]) == {"10Hz", "50Hz"}
    assert len(result["step_ms"]["off"]) == 2 and result["telemetry_kind"] == ["cpu"]
    assert result["telemetry_num_samples"]["10Hz"] >= 4  # first and last sample per block


def test_memory_above_the_runs_own_baseline():
    """A run's first sample is its baseline (taken after the run emptied the allocator's cache):
    the peak is reported absolute and above it, and ranks merge by their maxima."""
    from bench.telemetry import _Stats, merge_summaries

    stats = _Stats(num_gpus=0)
    for gib in (2.0, 5.5, 3.0):
        stats.add(gib, None)
    one = stats.summary("cpu", None)
    assert (one["baseline_memory_gib"], one["peak_memory_gib"], one["peak_memory_above_baseline_gib"]) == (2.0, 5.5, 3.5)
    other = {**one, "baseline_memory_gib": 1.0, "peak_memory_gib": 4.0, "peak_memory_above_baseline_gib": 3.0}
    merged = merge_summaries([one, other])
    assert (merged["baseline_memory_gib"], merged["peak_memory_gib"], merged["peak_memory_above_baseline_gib"]) == \
        (2.0, 5.5, 3.5)
