"""The results store: the only module that knows where result files live.

Owns: the layout of ``results/<sweep>/<run-id>/``, atomic writes, the
"complete" marker (``summary.json``, written last), the per-sweep lock, and
finding run folders. Reading them back and validating every part is
``bench.records`` (``load_results``, ``load_run``, ``validate_parts``,
``RunRecord``), which builds on this module (never the other way round).

Must not import: torch, ray, pandas.

Layout of one run folder::

    results/<sweep>/<run-id>/
        config.yaml        validated sweep config, verbatim (what made this run)
        cluster.yaml       validated cluster config
        run.json           the planned run (bench.plan.RunPlan as a dict)
        env.json           environment fingerprint (driver side)
        worker_env.json    environment fingerprint (rank 0: torch, device, GPU, driver)
        events.jsonl       event log (bench.events), rank 0
        telemetry-rank<R>.csv  sampler rows per worker (bench.telemetry), written in chunks
        summary.json       written last, atomically: its presence marks the run complete
        checkpoint.pt      while a run is in progress with checkpoints on: rank 0's last state
                           (bench.launcher writes it atomically and deletes it when the run completes)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import yaml

from pydantic import ValidationError

from bench import safeio
from bench.errors import StoreError
from bench.names import check_name, parse_run_id
from bench.summary import RunSummary

SUMMARY = "summary.json"
EVENTS = "events.jsonl"
RUN_PLAN = "run.json"
CONFIG = "config.yaml"
CLUSTER = "cluster.yaml"
ENV = "env.json"
WORKER_ENV = "worker_env.json"
CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"
SWEEP_MARK = "sweep.json"  # name + config hash of the sweep that owns this folder


class RunSkipped(UserWarning):
    """A run folder that could not be read or is damaged; the warning names it and what is wrong
    (the run is still returned, marked damaged, so that reports can list it)."""


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder + fsync + rename: readers see old or new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the mode every other file gets (0666 & ~umask), so
        # that other users and pods can read results on shared storage.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def validated(model: Any, data: Any, path: Path) -> Any:
    """``model.model_validate(data)``, or ValueError naming the file and the first wrong field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        raise ValueError(f"{Path(path).name}: {loc}: {e['msg']}") from None


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _read_json(path: Path) -> Any:
    return safeio.read_json(path, "json")


@dataclass
class RunDir:
    """One run folder. Workers write through this object; nothing else builds these paths."""

    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def events_path(self) -> Path:
        return self.path / EVENTS

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    def telemetry_path(self, rank: int) -> Path:
        return self.path / f"telemetry-rank{int(rank)}.csv"

    def telemetry_paths(self) -> list[Path]:
        return sorted(self.path.glob("telemetry-rank*.csv"))

    def is_complete(self) -> bool:
        return self.summary_path.is_file()

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    def write_checkpoint(self, write: Callable[[BinaryIO], None]) -> None:
        """Replace checkpoint.pt with what ``write(fh)`` writes, atomically (temp file in the run
        folder + fsync + rename): a restarted worker group finds the previous checkpoint or this
        one, never part of one. The file stays 0600: only the run's own workers read it back."""
        fd, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT}.", suffix=".tmp", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.checkpoint_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def prepare(self, *, config: dict, cluster: dict, run_plan: dict, env: dict) -> None:
        """Start (or restart) this run from scratch: clear what an interrupted attempt left,
        then write the inputs. Never called on a complete run."""
        if self.is_complete():
            raise StoreError(f"{self.path} is complete; refusing to overwrite it")
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        atomic_write_text(self.path / CONFIG, yaml.safe_dump(config, sort_keys=False))
        atomic_write_text(self.path / CLUSTER, yaml.safe_dump(cluster, sort_keys=False))
        atomic_write_json(self.path / RUN_PLAN, run_plan)
        atomic_write_json(self.path / ENV, env)

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / check_name(name, "file name"), obj)

    def write_summary(self, summary: RunSummary) -> None:
        atomic_write_json(self.summary_path, summary.model_dump(mode="json"))

    def read_summary(self) -> RunSummary | None:
        """The run's summary, or None while it is incomplete. Raises ValueError (naming the file
        and the field) for a file that is not a valid summary."""
        if not self.is_complete():
            return None
        return validated(RunSummary, _read_json(self.summary_path), self.summary_path)

    def read_plan(self) -> dict:
        return _read_json(self.path / RUN_PLAN)


def _unremovable(folder: Path) -> Path | None:
    """The first folder under (and including) ``folder`` whose entries cannot be deleted, or None.
    Deleting an entry needs write and search permission on the folder that holds it."""
    if not folder.is_dir() or folder.is_symlink():
        return None
    for dirpath, dirnames, _files in os.walk(folder):
        if not os.access(dirpath, os.W_OK | os.X_OK):
            return Path(dirpath)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return None


def present(path: Path) -> bool:
    """Whether anything (a file, a folder, a link, even an unreadable one) is at ``path``."""
    try:
        os.lstat(path)
        return True
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True  # there, but not even its metadata can be read: reading it will say why


class SweepDir:
    """``results/<sweep>/``: owns its run folders and the lock that keeps two drivers apart."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def run(self, run_id: str) -> RunDir:
        return RunDir(self.path / check_name(run_id, "run id"))

    def run_dirs(self) -> list[RunDir]:
        """Every run folder: a folder holding run.json, or any entry named like a run id (even
        one that lost its run.json, is a link, or cannot be read: it comes back damaged)."""
        return [RunDir(c) for c in _entries(self.path) if _is_run_entry(c)]

    # --- ownership and locking ------------------------------------------------------------
    def verify(self, config_hash: str, pending: Iterable[str] = ()) -> None:
        """Read-only checks before anything starts: the folder (or its nearest existing parent)
        is writable, it is not owned by a different configuration, and what an interrupted
        attempt left of the ``pending`` runs can be removed (the driver clears it before rerunning)."""
        existing = self.path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise StoreError(f"results folder {self.path} is not writable ({existing} is not a writable folder)")
        self._check_owner(config_hash)
        for run_id in pending:
            blocked = _unremovable(self.run(run_id).path)
            if blocked is not None:
                raise StoreError(f"{self.run(run_id).path} is left from an interrupted attempt and cannot be "
                                 f"removed ({blocked} is not writable); fix its permissions or delete it")

    def _check_owner(self, config_hash: str) -> None:
        mark = self.path / SWEEP_MARK
        if not mark.exists():
            return
        try:
            owner = _read_json(mark)
        except ValueError:
            owner = {}
        if owner.get("config_hash") != config_hash:
            raise StoreError(
                f"{self.path} holds results of a different configuration of sweep "
                f"{owner.get('sweep', '?')!r}; use another --results-dir (or delete that folder) "
                "so that complete runs are not mixed with new ones")

    def claim(self, sweep_name: str, config_hash: str) -> None:
        """Create the folder (or accept it) for this sweep config. A folder made by a different
        config is refused: its complete runs would otherwise be silently reused."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise StoreError(f"results folder {self.path} is not writable: {err.strerror or err}") from None
        self._check_owner(config_hash)
        if not (self.path / SWEEP_MARK).exists():
            atomic_write_json(self.path / SWEEP_MARK, {"sweep": sweep_name, "config_hash": config_hash})

    def lock(self) -> None:
        """Exclusive, non-blocking lock for the lifetime of this process (released on exit)."""
        import fcntl

        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(f"{self.path} is in use by another batchscale run "
                             "(lock held); wait for it or use another --results-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _entries(folder: Path) -> list[Path]:
    """The entries of a folder, sorted; none if it cannot be listed (warned about, naming it)."""
    try:
        return sorted(folder.iterdir()) if is_dir(folder) else []
    except OSError as err:
        warnings.warn(f"cannot list {folder}: {err.strerror or type(err).__name__}; its runs are not shown",
                      RunSkipped, stacklevel=3)
        return []


def is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _is_run_entry(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    if parse_run_id(path.name) is not None:
        return True
    return is_dir(path) and present(path / RUN_PLAN)


def find_sweep_dirs(path: Path | str) -> list[SweepDir]:
    """A sweep folder itself, or a folder of sweep folders (e.g. ``results/``)."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"no results folder at {path}")
    try:
        children = sorted(path.iterdir())
    except OSError as err:
        raise StoreError(f"cannot list {path}: {err.strerror or type(err).__name__}") from None
    if any(_is_run_entry(c) for c in children):
        return [SweepDir(path)]
    return [SweepDir(c) for c in children if is_dir(c) and any(_is_run_entry(g) for g in _entries(c))]
