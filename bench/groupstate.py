"""What a worker group keeps on the results storage, outside Ray: checkpoints, whether its driver
is alive, and when each attempt of the group started.

Owns: rank 0's checkpoint writer (``WorkerContext.save_checkpoint``) and the loader a restarted
group resumes from; ``DriverLock`` (``WorkerContext.driver_alive``); the attempt records (one JSON
line per loop entry, written by rank 0, and per failure, written by Ray Train's controller) and
the start-up / restart times the driver reports from them. File names inside a run folder come
from bench.store (``RunDir.checkpoint_path``, ``RunDir.write_checkpoint``, ``store.LOCK``).

Must not import: ray, pandas; torch only inside the checkpoint functions (they run in workers).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bench import safeio
from bench.errors import LauncherError
from bench.store import LOCK, RunDir, SweepDir


@dataclass
class CheckpointWriter:
    """``WorkerContext.save_checkpoint``: every rank calls it, rank 0 with the state, which it
    writes straight into the run folder (atomically; no barrier, no ray.train.report)."""

    sweep_path: str
    seconds: float = 0.0  # rank 0's time in torch.save + fsync + rename, this process
    count: int = 0

    def __call__(self, run_id: str, state: dict | None) -> None:
        if state is None:
            return
        import torch

        t0 = time.perf_counter()
        SweepDir(self.sweep_path).run(run_id).write_checkpoint(lambda fh: torch.save(state, fh))
        self.seconds += time.perf_counter() - t0
        self.count += 1


def load_checkpoint(run_dir: RunDir) -> dict | None:
    """The state a restarted group resumes ``run_dir`` from, or None (no checkpoint: from the
    start). The driver clears a run folder before a new attempt, so a checkpoint found here was
    written by an earlier attempt of this same worker group."""
    if not run_dir.checkpoint_path.exists():
        return None
    import torch

    with safeio.open_regular(run_dir.checkpoint_path, "any", root=run_dir.path) as fh:
        # weights_only: a checkpoint on shared storage must not be able to run code in the workers.
        state = torch.load(fh, weights_only=True, map_location="cpu")
    if not isinstance(state, dict) or state.get("run_id") != run_dir.run_id:
        raise LauncherError(f"{run_dir.checkpoint_path} is not a checkpoint of run {run_dir.run_id}")
    return state


@dataclass(frozen=True)
class DriverLock:
    """``WorkerContext.driver_alive``: True while the driver that started this worker group still
    holds its sweep's lock. A probe lock that succeeds means no process holds it (a killed driver's
    flock goes with its process); a lock held with other content is a newer driver's. Either way
    this group's driver is gone. Any error reads as gone: a run is never completed unsupervised.
    The lock lives on the results storage, so this works on every node (flock over NFS v4 too)."""

    path: str
    token: bytes  # the lock file's content as the driver wrote it (its pid)

    def __call__(self) -> bool:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR)  # read-write: NFS emulates flock with fcntl locks
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: by our driver if it still says what it said
            return os.pread(fd, 4096, 0) == self.token
        except OSError:
            return False
        finally:
            os.close(fd)  # also drops the probe lock, at once, when it was taken
        return False


def driver_lock(sweep_dir: SweepDir) -> DriverLock:
    """The probe for the lock this driver holds on ``sweep_dir`` (call after SweepDir.lock())."""
    root = sweep_dir.path.resolve()
    return DriverLock(str(root / LOCK), safeio.read_bytes(root / LOCK, "json", root=root))


# --- attempt records ------------------------------------------------------------------------

@dataclass
class Restart:
    cause: str  # the exception Ray Train reported for the failed worker, e.g. ActorDiedError
    resume_s: float | None  # failure noticed -> the new group's loop entered; None: not recorded


def append_record(path: str, record: dict) -> None:
    """One JSON line (one writer per file: rank 0's loop entries, the controller's failures)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def read_records(path: Path, root: Path) -> list[tuple[float, str]]:
    """(unix_s, cause) of each record in an attempts file; a missing file or bad line is skipped."""
    out = []
    if path.exists():
        for _, line in safeio.iter_lines(path, "events", root=root):
            try:
                record = json.loads(line)
                out.append((float(record["unix_s"]), str(record.get("cause", ""))))
            except (ValueError, KeyError, TypeError):
                continue
    return out


def attempts(entered: list[tuple[float, str]], failed: list[tuple[float, str]], fit_unix_s: float
             ) -> tuple[float | None, list[Restart]]:
    """(start-up, restarts) of one fit(): start-up is fit() -> the first attempt's loop; each later
    attempt is a restart, resumed that long after the first failure noticed since the one before."""
    starts = sorted(t for t, _ in entered)
    restarts = []
    for before, after in zip(starts, starts[1:]):
        first = min(((t, c) for t, c in failed if before <= t <= after), default=None)
        restarts.append(Restart(cause=first[1] if first else "", resume_s=after - first[0] if first else None))
    return (starts[0] - fit_unix_s if starts else None), restarts
