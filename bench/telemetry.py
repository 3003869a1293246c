"""GPU (NVML) and process telemetry: one background sampler thread per worker process.

Owns: which GPUs a worker samples (``CUDA_VISIBLE_DEVICES`` or a torch UUID -> NVML handles),
the sampler thread, the ``telemetry-rank<R>.csv`` rows (docs/contracts.md), the per-run
telemetry summary and its merge across ranks. Must not import: torch, ray, pandas. NVML
(``pynvml``, from nvidia-ml-py) is imported lazily in :meth:`Sampler.start` or injected
(``nvml=``) so tests use a fake; process numbers come from psutil.

CSV, not Parquet, on purpose: CSV is appendable, so rows go out in chunks (every ``chunk_rows``
rows and at stop), flushed and fsynced; a worker that crashes keeps every chunk written so far,
whereas a Parquet file is unreadable until its footer is written at close.

A field the device does not report (NotSupported, MIG slices, no power sensor) is an empty
cell, never 0. Without NVML or without a GPU of its own, the sampler records process RSS and
CPU % only (``kind=cpu``). Nothing raises into training: an exception in the thread is kept
in the summary's ``error`` and the thread ends. ``mem_used_gib`` is the whole GPU (every
process on it); torch's per-process ``max_memory_reserved`` lives in the run summary.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psutil

COLUMNS = (
    "time_ms", "run_id", "rank", "node", "kind", "gpu_index", "gpu_uuid", "mem_used_gib",
    "mem_total_gib", "gpu_util_pct", "mem_util_pct", "power_w", "power_limit_w",
    "temperature_c", "sm_clock_mhz", "rss_gib", "cpu_pct",
)
SUMMARY_KEYS = ("kind", "num_samples", "peak_memory_gib", "baseline_memory_gib", "peak_memory_above_baseline_gib",
                "mean_util_pct", "p95_util_pct", "mean_power_w", "energy_j", "error")
GIB = 1024 ** 3


# --- which GPUs does this worker own -------------------------------------------------------
def parse_cuda_visible_devices(value: str | None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as a list of ids: ``None`` when unset (all GPUs), ``[]`` when
    empty. Entries are indices ("0") or UUIDs ("GPU-…", "MIG-…"); like CUDA, the list ends at
    the first entry that is neither (e.g. "-1", "NoDevFiles")."""
    if value is None:
        return None
    ids: list[str] = []
    for item in (part.strip() for part in value.split(",")):
        if item.isdigit():
            ids.append(str(int(item)))
        elif item.startswith(("GPU-", "MIG-")):
            ids.append(item)
        else:
            break
    return ids


def gpu_ids_from_torch_uuid(uuid_str: str) -> list[str]:
    """``gpu_ids`` for one torch device, from ``"GPU-" + str(props.uuid)`` (a bare UUID gets
    the prefix). NVML ignores CUDA_VISIBLE_DEVICES; the UUID is unambiguous."""
    uuid_str = str(uuid_str).strip()
    prefixed = uuid_str if uuid_str.startswith(("GPU-", "MIG-")) else "GPU-" + uuid_str
    return [prefixed] if uuid_str else []


def _handle_for(nvml: Any, gpu_id: str) -> Any:
    """NVML handle for an index (NVML counts in PCI order, as CUDA does with
    CUDA_DEVICE_ORDER=PCI_BUS_ID) or a full UUID ("GPU-…", "MIG-…")."""
    if gpu_id.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(gpu_id))
    return nvml.nvmlDeviceGetHandleByUUID(gpu_id)


def _load_nvml(nvml: Any) -> tuple[Any, str | None]:
    """(initialised NVML or None, why not). The default is ``import pynvml``."""
    try:
        if nvml is None:
            import pynvml as nvml  # noqa: PLC0415 - lazy: CPU-only runs never load it
        nvml.nvmlInit()
        return nvml, None
    except Exception as err:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None, f"NVML unavailable: {type(err).__name__}: {err}"


# --- one sample ----------------------------------------------------------------------------
class _ProcessProbe:
    """RSS (GiB) and CPU % of this process (100 = one core busy) since the previous read;
    the first read has no CPU % (unknown, not 0)."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self._last: tuple[float, float] | None = None  # (monotonic s, cpu s)

    def read(self) -> tuple[float, float | None]:
        now_s, times = time.monotonic(), self._proc.cpu_times()
        cpu_s, cpu_pct = times.user + times.system, None
        if self._last is not None and now_s > self._last[0]:
            cpu_pct = 100.0 * (cpu_s - self._last[1]) / (now_s - self._last[0])
        self._last = (now_s, cpu_s)
        return self._proc.memory_info().rss / GIB, cpu_pct


def _query(nvml: Any, fn: Any, *args: Any) -> Any:
    """One NVML query; an NVMLError (NotSupported, MIG, no permission) means missing (None).
    Any other exception propagates and ends the sampler thread."""
    try:
        return fn(*args)
    except nvml.NVMLError:
        return None


def _scaled(value: Any, factor: float, ndigits: int) -> float | None:
    return None if value is None else round(value * factor, ndigits)


class _Gpu:
    """One sampled GPU: its handle and what stays fixed during a run (index, UUID, limit)."""

    def __init__(self, nvml: Any, handle: Any) -> None:
        self.nvml, self.handle = nvml, handle
        self.index = _query(nvml, nvml.nvmlDeviceGetIndex, handle)  # None on a MIG slice
        uuid = _query(nvml, nvml.nvmlDeviceGetUUID, handle)
        self.uuid = uuid.decode() if isinstance(uuid, bytes) else uuid  # old pynvml: bytes
        self.power_limit_w = _scaled(
            _query(nvml, nvml.nvmlDeviceGetEnforcedPowerLimit, handle), 1e-3, 3)  # mW -> W

    def read(self) -> tuple[dict[str, Any], float | None]:
        """(row fields, energy counter in mJ or None)."""
        nv, h = self.nvml, self.handle
        mem = _query(nv, nv.nvmlDeviceGetMemoryInfo, h)  # bytes
        util = _query(nv, nv.nvmlDeviceGetUtilizationRates, h)  # % of time busy
        row = {
            "kind": "gpu", "gpu_index": self.index, "gpu_uuid": self.uuid,
            "mem_used_gib": None if mem is None else round(mem.used / GIB, 4),
            "mem_total_gib": None if mem is None else round(mem.total / GIB, 4),
            "gpu_util_pct": None if util is None else util.gpu,
            "mem_util_pct": None if util is None else util.memory,
            "power_w": _scaled(_query(nv, nv.nvmlDeviceGetPowerUsage, h), 1e-3, 3),
            "power_limit_w": self.power_limit_w,
            "temperature_c": _query(nv, nv.nvmlDeviceGetTemperature, h,
                                    getattr(nv, "NVML_TEMPERATURE_GPU", 0)),
            "sm_clock_mhz": _query(nv, nv.nvmlDeviceGetClockInfo, h,
                                   getattr(nv, "NVML_CLOCK_SM", 1)),
        }
        return row, _query(nv, nv.nvmlDeviceGetTotalEnergyConsumption, h)


# --- summary -------------------------------------------------------------------------------
def energy_from_power_j(samples: list[tuple[float, float]]) -> float | None:
    """Trapezoidal integral of (time s, power W) samples, in J; None with fewer than two."""
    if len(samples) < 2:
        return None
    return sum((t1 - t0) * (w0 + w1) / 2.0 for (t0, w0), (t1, w1) in zip(samples, samples[1:]))


def _p95(values: list[float]) -> float | None:
    """95th percentile, linear interpolation between order statistics (numpy's default)."""
    if len(values) < 2:
        return float(values[0]) if values else None
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


class _Stats:
    """What the summary needs, accumulated by the sampler thread sample by sample."""

    def __init__(self, num_gpus: int) -> None:
        self.num_samples = 0  # sampling ticks (one tick = one row per GPU)
        self.memory_gib: list[float] = []  # GPU mem_used, or process RSS in CPU mode
        self.util_pct: list[float] = []  # GPU util, or process CPU % in CPU mode
        self.power: list[list[tuple[float, float]]] = [[] for _ in range(num_gpus)]  # (s, W)
        self.energy_mj: list[list[float]] = [[] for _ in range(num_gpus)]  # [first, latest]

    def add(self, memory_gib: float | None, util_pct: float | None) -> None:
        for values, value in ((self.memory_gib, memory_gib), (self.util_pct, util_pct)):
            if value is not None:
                values.append(value)

    def add_gpu(self, slot: int, time_s: float, row: dict[str, Any], energy_mj: Any) -> None:
        self.add(row["mem_used_gib"], row["gpu_util_pct"])
        if row["power_w"] is not None:
            self.power[slot].append((time_s, row["power_w"]))
        if energy_mj is not None:
            readings = self.energy_mj[slot]
            readings[1:] = [energy_mj]  # keep the first reading and the latest one

    def energy_j(self) -> float | None:
        """Sum over GPUs: counter difference where a GPU has one, else the power integral;
        None when any GPU has neither (unknown is None, not a guess)."""
        parts = []
        for readings, power in zip(self.energy_mj, self.power):
            if len(readings) == 2 and readings[1] >= readings[0]:  # a counter reset falls through
                parts.append((readings[1] - readings[0]) / 1000.0)
            else:
                parts.append(energy_from_power_j(power))
        return None if not parts or None in parts else sum(parts)

    def summary(self, kind: str, error: str | None) -> dict[str, Any]:
        peak = max(self.memory_gib, default=None)
        baseline = self.memory_gib[0] if self.memory_gib else None  # the run's first sample
        return {
            "kind": kind, "num_samples": self.num_samples,
            "peak_memory_gib": peak, "baseline_memory_gib": baseline,
            "peak_memory_above_baseline_gib": None if peak is None else round(peak - baseline, 4),
            "mean_util_pct": _mean(self.util_pct), "p95_util_pct": _p95(self.util_pct),
            "mean_power_w": _mean([w for power in self.power for _, w in power]),  # per GPU
            "energy_j": self.energy_j(),  # all GPUs of this worker
            "error": error,
        }


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine per-rank summaries: max of peaks, mean of means (over ranks that know them),
    sum of samples and of energy (None if any rank's energy is unknown). If ranks disagree on
    kind, the GPU ranks are merged and ``error`` names the ranks left out."""
    if not summaries:
        raise ValueError("merge_summaries needs at least one summary")
    kind = "gpu" if any(s.get("kind") == "gpu" for s in summaries) else "cpu"
    errors = [f"rank {i}: {s['error']}" for i, s in enumerate(summaries) if s.get("error")]
    others = [i for i, s in enumerate(summaries) if s.get("kind") != kind]
    if others:
        errors.append(f"ranks {others} had no {kind} telemetry and are not merged")
    same = [s for s in summaries if s.get("kind") == kind]
    known = {key: [s[key] for s in same if s.get(key) is not None] for key in SUMMARY_KEYS}
    energies = [s.get("energy_j") for s in same]
    return {
        "kind": kind, "num_samples": sum(known["num_samples"]),
        "peak_memory_gib": max(known["peak_memory_gib"], default=None),
        "baseline_memory_gib": max(known["baseline_memory_gib"], default=None),
        "peak_memory_above_baseline_gib": max(known["peak_memory_above_baseline_gib"], default=None),
        "mean_util_pct": _mean(known["mean_util_pct"]),
        "p95_util_pct": _mean(known["p95_util_pct"]),  # mean of per-rank p95s
        "mean_power_w": _mean(known["mean_power_w"]),
        "energy_j": None if None in energies else sum(energies),
        "error": "; ".join(errors) or None,
    }


# --- the sampler ---------------------------------------------------------------------------
class Sampler:
    """Samples this worker's GPUs (or, without any, the process) at ``hz`` in a daemon thread.
    ``gpu_ids``: NVML indices or UUIDs; default ``CUDA_VISIBLE_DEVICES`` (unset: all GPUs,
    empty: none). ``nvml``: an object with pynvml's functions; default ``import pynvml``.
    ``with Sampler(...)`` or ``start()``/``stop()``; ``stop()`` returns the summary (again and
    again: it is idempotent)."""

    def __init__(self, path: Path, *, run_id: str, rank: int, hz: float = 10.0,
                 node: str | None = None, gpu_ids: list[str] | None = None, nvml: Any = None,
                 chunk_rows: int = 50) -> None:
        if not (isinstance(hz, (int, float)) and math.isfinite(hz) and hz > 0):
            raise ValueError(f"telemetry hz must be a positive number, got {hz!r}")
        if int(chunk_rows) < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows!r}")
        self.path, self.run_id, self.rank = Path(path), run_id, int(rank)
        self.period_s, self.chunk_rows = 1.0 / float(hz), int(chunk_rows)
        self.node = node or socket.gethostname()
        self.kind = "cpu"
        self.error: str | None = None
        self._gpu_ids, self._nvml_arg, self._nvml = gpu_ids, nvml, None
        self._gpus: list[_Gpu] = []
        self._process, self._stats = _ProcessProbe(), _Stats(0)
        self._pending: list[list[Any]] = []
        self._stop_event = threading.Event()
        self._sampled = threading.Event()  # set after the first tick
        self._thread: threading.Thread | None = None
        self._summary: dict[str, Any] | None = None

    def __enter__(self) -> "Sampler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "Sampler":
        """Initialise NVML in this process, pick the GPUs, start the thread. A missing or
        broken NVML never raises: it means CPU mode (and ``error`` if GPUs were asked for)."""
        if self._thread is not None or self._summary is not None:
            raise RuntimeError("a Sampler can be started once")
        self._open_gpus()
        self._stats = _Stats(len(self._gpus))
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"batchscale-telemetry-rank{self.rank}")
        self._thread.start()
        return self

    def _open_gpus(self) -> None:
        wanted = self._gpu_ids
        if wanted is None:
            wanted = parse_cuda_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))
        if wanted == []:
            return  # this worker owns no GPU: CPU mode, NVML not even loaded
        self._nvml, why_not = _load_nvml(self._nvml_arg)
        if self._nvml is None:
            self.error = why_not if wanted else None  # GPUs were asked for and cannot be seen
            return
        try:
            self._gpus, missing = self._resolve(self._nvml, wanted)
        except Exception as err:  # a broken driver must not stop training
            self._gpus, missing = [], [f"{type(err).__name__}: {err}"]
        if missing:
            self.error = "GPUs not found by NVML: " + ", ".join(missing)
        if self._gpus:
            self.kind = "gpu"
        else:
            self._shutdown_nvml()

    @staticmethod
    def _resolve(nvml: Any, wanted: list[str] | None) -> tuple[list[_Gpu], list[str]]:
        if wanted is None:  # CUDA_VISIBLE_DEVICES unset: every GPU of the node
            wanted = [str(i) for i in range(nvml.nvmlDeviceGetCount())]
        gpus, missing = [], []
        for gpu_id in wanted:
            try:
                gpus.append(_Gpu(nvml, _handle_for(nvml, gpu_id)))
            except nvml.NVMLError as err:
                missing.append(f"{gpu_id} ({err})")
        return gpus, missing

    def _shutdown_nvml(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            with contextlib.suppress(Exception):  # shutting down is best effort
                nvml.nvmlShutdown()

    def wait_first_sample(self, timeout_s: float = 5.0) -> bool:
        """Block until the thread has taken its first sample (its start-up done); False on
        timeout or when it stopped before one. For measurements of the steady state."""
        return self._sampled.wait(timeout_s)

    def stop(self) -> dict[str, Any]:
        """Stop the thread (it ends within one period), write the last rows, shut NVML down
        and return the summary. Idempotent."""
        if self._summary is not None:
            return dict(self._summary)
        if self._thread is None:
            self._note("sampler was never started")
        else:
            self._stop_event.set()
            self._thread.join(timeout=self.period_s + 5.0)  # + a slow last write (NFS)
            if self._thread.is_alive():  # stuck in a driver call or a write: leave it be
                self._note("telemetry thread did not stop in time")
            else:
                self._shutdown_nvml()
        self._summary = self._stats.summary(self.kind, self.error)
        return dict(self._summary)

    # --- inside the thread ------------------------------------------------------------------
    def _run(self) -> None:
        next_s = time.monotonic()
        try:
            while True:
                self._sample()
                next_s += self.period_s
                now_s = time.monotonic()
                next_s = max(next_s, now_s)  # fell behind: skip ticks rather than burst
                if self._stop_event.wait(next_s - now_s):
                    break
            self._sample()  # a last sample at stop: energy covers the whole run
        except Exception as err:  # kept, never raised into training
            self._note(f"telemetry stopped after {self._stats.num_samples} samples: "
                       f"{type(err).__name__}: {err}")
        finally:
            try:
                self._flush()
            except Exception as err:
                self._note(f"telemetry write failed: {type(err).__name__}: {err}")

    def _note(self, message: str) -> None:
        self.error = f"{self.error}; {message}" if self.error else message

    def _sample(self) -> None:
        time_s, mono_s = time.time(), time.monotonic()  # rows: epoch ms; energy: monotonic
        rss_gib, cpu_pct = (_scaled(v, 1.0, n) for v, n in zip(self._process.read(), (4, 1)))
        base = {"time_ms": int(round(time_s * 1000)), "run_id": self.run_id, "rank": self.rank,
                "node": self.node, "rss_gib": rss_gib, "cpu_pct": cpu_pct}
        rows = []
        for slot, gpu in enumerate(self._gpus):
            fields, energy_mj = gpu.read()
            self._stats.add_gpu(slot, mono_s, fields, energy_mj)
            rows.append({**base, **fields})
        if not self._gpus:
            self._stats.add(rss_gib, cpu_pct)
            rows.append({**base, "kind": "cpu"})
        self._stats.num_samples += 1
        self._sampled.set()
        self._pending.extend([row.get(col) for col in COLUMNS] for row in rows)
        if len(self._pending) >= self.chunk_rows:
            self._flush()

    def _flush(self) -> None:
        """Append pending rows (header once, for a new or empty file), flush and fsync."""
        if not self._pending:
            return
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            if new_file:
                writer.writerow(COLUMNS)
            writer.writerows(self._pending)
            fh.flush()
            os.fsync(fh.fileno())
        self._pending = []
