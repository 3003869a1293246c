"""The results store: the only module that knows where result files live.

Owns: the layout of ``results/<sweep>/<run-id>/``, atomic writes, the
"complete" marker (``summary.json``, written last), the per-sweep lock, and
reading run folders back (skipping corrupt ones with a warning).

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
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from bench.errors import StoreError
from bench.events import CorruptEventLog, read_events

SUMMARY = "summary.json"
EVENTS = "events.jsonl"
RUN_PLAN = "run.json"
CONFIG = "config.yaml"
CLUSTER = "cluster.yaml"
ENV = "env.json"
WORKER_ENV = "worker_env.json"
LOCK = ".lock"
SWEEP_MARK = "sweep.json"  # name + config hash of the sweep that owns this folder

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RunSkipped(UserWarning):
    """A run folder that could not be read; it is skipped, and the warning names it."""


def check_name(name: str, what: str = "name") -> str:
    """Sweep and run names become folder names: letters, digits, '.', '_', '-' only,
    not starting with '.', so no name can escape the results folder."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")
    return name


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder + fsync + rename: readers see old or new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


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

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.summary_path, summary)

    def read_summary(self) -> dict | None:
        return _read_json(self.summary_path) if self.is_complete() else None

    def read_plan(self) -> dict:
        return _read_json(self.path / RUN_PLAN)


@dataclass
class RunRecord:
    """Everything stored for one run, read back as plain Python values."""

    sweep: str
    run_id: str
    path: Path
    plan: dict
    config: dict
    cluster: dict
    env: dict
    worker_env: dict
    summary: dict | None  # None: incomplete
    events: list[dict] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.summary is not None

    @property
    def status(self) -> str:
        return (self.summary or {}).get("status", "incomplete")

    def telemetry_rows(self) -> list[dict[str, str]]:
        """Sampler rows of every rank (strings, as in the CSV; analysis converts)."""
        rows: list[dict[str, str]] = []
        for path in RunDir(self.path).telemetry_paths():
            with open(path, newline="", encoding="utf-8") as fh:
                rows.extend(csv.DictReader(fh))
        return rows


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
        if not self.path.is_dir():
            return []
        return [RunDir(p) for p in sorted(self.path.iterdir())
                if p.is_dir() and not p.name.startswith(".") and (p / RUN_PLAN).exists()]

    # --- ownership and locking ------------------------------------------------------------
    def verify(self, config_hash: str) -> None:
        """Read-only checks before anything starts: the folder (or its nearest existing parent)
        is writable, and it is not owned by a different configuration."""
        existing = self.path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise StoreError(f"results folder {self.path} is not writable ({existing} is not a writable folder)")
        self._check_owner(config_hash)

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


def load_run(run_dir: RunDir, sweep: str | None = None, *, with_events: bool = True) -> RunRecord:
    """Read one run folder. Raises (ValueError/OSError/CorruptEventLog) when it is corrupt."""
    p = run_dir.path

    def opt_json(name: str) -> dict:
        f = p / name
        return _read_json(f) if f.exists() else {}

    def opt_yaml(name: str) -> dict:
        f = p / name
        return (yaml.safe_load(f.read_text(encoding="utf-8")) or {}) if f.exists() else {}

    return RunRecord(
        sweep=sweep or p.parent.name,
        run_id=p.name,
        path=p,
        plan=run_dir.read_plan(),
        config=opt_yaml(CONFIG),
        cluster=opt_yaml(CLUSTER),
        env=opt_json(ENV),
        worker_env=opt_json(WORKER_ENV),
        summary=run_dir.read_summary(),
        events=read_events(run_dir.events_path) if with_events and run_dir.events_path.exists() else [],
    )


def find_sweep_dirs(path: Path | str) -> list[SweepDir]:
    """A sweep folder itself, or a folder of sweep folders (e.g. ``results/``)."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"no results folder at {path}")
    if any((c / RUN_PLAN).exists() for c in path.iterdir() if c.is_dir()):
        return [SweepDir(path)]
    return [SweepDir(c) for c in sorted(path.iterdir())
            if c.is_dir() and any((g / RUN_PLAN).exists() for g in c.iterdir() if g.is_dir())]


def load_results(paths: Iterable[Path | str], *, with_events: bool = True,
                 include_incomplete: bool = True) -> list[RunRecord]:
    """All runs under the given result folders. Corrupt folders are skipped with a
    RunSkipped warning naming the folder and what is wrong; nothing else is dropped."""
    records: list[RunRecord] = []
    for path in paths:
        for sweep in find_sweep_dirs(path):
            for run_dir in sweep.run_dirs():
                try:
                    record = load_run(run_dir, sweep.name, with_events=with_events)
                except (ValueError, OSError, CorruptEventLog, yaml.YAMLError) as err:
                    warnings.warn(f"skipping corrupt run folder {run_dir.path}: {err}", RunSkipped,
                                  stacklevel=2)
                    continue
                if record.complete or include_incomplete:
                    records.append(record)
    return records
