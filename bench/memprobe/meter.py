"""How a try's peak memory is read: PyTorch's caching allocator on CUDA, this process's
resident set on CPU, and the glibc malloc settings the CPU numbers rely on.

Owns: ``CudaMeter`` (``max_memory_reserved`` over a try), ``CpuMeter`` over ``RssMeter`` (peak
resident-set growth above a baseline: the kernel's high-water mark where /proc allows resetting
it, else a 1 ms psutil sampling thread; library pages paged in meanwhile subtracted), and the C
library's malloc controls, reached through ``glibc()`` alone: ``fix_mmap_threshold`` (mallopt),
``trim_heap`` (malloc_trim), ``heap_free_bytes`` (mallinfo2). Why the CPU numbers need them, and
what they cannot undo: docs/memory-probe.md.

Must not import: ray, pandas; torch only inside ``CudaMeter`` (the probe command calls
``fix_mmap_threshold`` before torch is imported: the earlier, the fewer free chunks are left
in the heap).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import threading
from typing import Callable, Optional

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial threshold, kept from rising
HEAP_FREE_NOTE_BYTES = 8 << 20  # free heap chunks at the baseline above this get a note

_GLIBC: list = []  # [libc or None], looked up once
_THRESHOLD_FIXED: list[bool] = [False]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def glibc() -> Optional[ctypes.CDLL]:
    """The C library when it is glibc (it has mallopt and malloc_trim), else None. The one
    place this package reaches the C library."""
    if not _GLIBC:
        libc = None
        with contextlib.suppress(OSError, TypeError):
            name = ctypes.util.find_library("c")
            candidate = ctypes.CDLL(name) if name else None
            if candidate is not None and hasattr(candidate, "malloc_trim") and hasattr(candidate, "mallopt"):
                libc = candidate
        _GLIBC.append(libc)
    return _GLIBC[0]


def fix_mmap_threshold() -> bool:
    """Put every allocation above 128 KiB in its own mapping, returned to the kernel on free,
    for the rest of this process (glibc's default threshold rises after each large free, up
    to 32 MiB). Memory freed before this call stays in the heap as free chunks
    (``heap_free_bytes``). False where the C library is not glibc."""
    libc = glibc()
    if libc is None:
        return False
    _THRESHOLD_FIXED[0] = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    return _THRESHOLD_FIXED[0]


def mmap_threshold_fixed() -> bool:
    """Whether ``fix_mmap_threshold`` succeeded in this process."""
    return _THRESHOLD_FIXED[0]


def trim_heap() -> bool:
    """Collect garbage and hand free heap pages back to the kernel (``malloc_trim(0)``).
    False where the C library is not glibc (the garbage is collected anyway)."""
    gc.collect()
    libc = glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def mallinfo2() -> Optional[_MallInfo2]:
    """glibc's allocator statistics (all arenas); None where unknown (not glibc, or older than 2.33)."""
    libc = glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()


def heap_free_bytes() -> Optional[int]:
    """Bytes in free chunks of the malloc heaps (``mallinfo2().fordblks``); None where unknown.
    A try whose small allocations land in such chunks touches their pages again, so a CPU
    peak counts pages the step's live memory does not need."""
    info = mallinfo2()
    return None if info is None else int(info.fordblks)


def _proc_status_bytes(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


class RssMeter:
    """Peak resident-set growth of this process over an interval, above a baseline."""

    def __init__(self) -> None:
        self.kernel_hwm = self._can_reset_hwm()
        self._samples: list[int] = []
        self._base_rss = self._base_file = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def method(self) -> str:
        how = ("peak RSS from the kernel high-water mark (/proc/self/clear_refs 5, VmHWM)" if self.kernel_hwm
               else "peak RSS sampled by a thread every 1 ms (psutil); shorter spikes are missed")
        if glibc() is not None:
            how += (", glibc mmap threshold fixed at 128 KiB" if mmap_threshold_fixed()
                    else ", glibc mmap threshold NOT fixed (dynamic)") + " and malloc_trim between tries"
        return how

    @staticmethod
    def _can_reset_hwm() -> bool:
        if _proc_status_bytes("VmHWM") is None:
            return False
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def current() -> int:
        rss = _proc_status_bytes("VmRSS")
        if rss is not None:
            return rss
        import psutil

        return int(psutil.Process().memory_info().rss)

    @staticmethod
    def file_pages() -> int:
        """Resident file-backed and shared pages (shared-library code paged in); 0 when unknown."""
        return (_proc_status_bytes("RssFile") or 0) + (_proc_status_bytes("RssShmem") or 0)

    def mark_baseline(self) -> None:
        """Everything resident now (interpreter, libraries, data) is not the step's."""
        trim_heap()
        self._base_rss, self._base_file = self.current(), self.file_pages()

    def start(self) -> None:
        if self.kernel_hwm:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            return
        import psutil

        proc = psutil.Process()
        self._samples = [int(proc.memory_info().rss)]
        self._stop.clear()

        def sample() -> None:
            while not self._stop.wait(0.001):
                self._samples.append(int(proc.memory_info().rss))

        self._thread = threading.Thread(target=sample, name="memprobe-rss", daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Peak resident growth since mark_baseline(), over the interval since start(), less the
        library pages paged in meanwhile (they are not the step's memory)."""
        if self.kernel_hwm:
            peak = max(_proc_status_bytes("VmHWM") or 0, self.current())
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            peak = max(self._samples + [self.current()])
        file_growth = max(0, self.file_pages() - self._base_file)
        return max(0, peak - self._base_rss - file_growth)


# --- how a try's peak is read -------------------------------------------------------------------

class CudaMeter:
    """Peak of PyTorch's caching allocator over a try: ``max_memory_reserved`` (what runs
    out), with ``max_memory_allocated`` kept beside it."""

    method = "torch.cuda.max_memory_reserved per try (max_memory_allocated alongside)"

    def __init__(self, device) -> None:
        import torch

        self.cuda, self.device = torch.cuda, device
        self.last_allocated: Optional[int] = None

    def measure(self, work: Callable[[], None]) -> int:
        self.last_allocated = None
        self.cuda.synchronize(self.device)
        self.cuda.reset_peak_memory_stats(self.device)
        work()
        self.cuda.synchronize(self.device)
        self.last_allocated = int(self.cuda.max_memory_allocated(self.device))
        return int(self.cuda.max_memory_reserved(self.device))

    def peak_after_failure(self) -> Optional[int]:
        with contextlib.suppress(Exception):
            return int(self.cuda.max_memory_reserved(self.device))
        return None

    def free(self) -> None:
        gc.collect()
        self.cuda.empty_cache()


class CpuMeter:
    """Peak resident-set growth over the baseline, plus the bytes reserved for what the try
    does not build."""

    last_allocated = None

    def __init__(self, meter: RssMeter, reserved_bytes: int) -> None:
        self.rss, self.reserved_bytes = meter, reserved_bytes
        self.method = meter.method + ", minus the resident set before the model was built and library pages"

    def measure(self, work: Callable[[], None]) -> int:
        self.rss.start()
        try:
            work()
        finally:
            peak = self.rss.stop()
        return peak + self.reserved_bytes

    def peak_after_failure(self) -> Optional[int]:
        return None

    def free(self) -> None:
        trim_heap()
