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
        checkpoint.pt      while a run is in progress with checkpoints on: rank 0's last state
                           (bench.launcher writes it atomically and deletes it when the run completes)
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import yaml
from pydantic import ValidationError

from bench import safeio
from bench.errors import StoreError
from bench.events import CorruptEventLog, read_events
from bench.names import check_name
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
        return _validated(RunSummary, _read_json(self.summary_path), self.summary_path)

    def read_plan(self) -> dict:
        return _read_json(self.path / RUN_PLAN)


@dataclass
class RunRecord:
    """Everything stored for one run, read back and validated. ``damage`` is set (and ``status``
    is "damaged") when a file the run's state requires is missing, unreadable or of the wrong
    shape; such a record keeps whatever could be read, and every analysis leaves it out."""

    sweep: str
    run_id: str
    path: Path
    plan: dict
    config: dict
    cluster: dict
    env: dict
    worker_env: dict
    summary: RunSummary | None  # None: incomplete (or damaged before the summary could be read)
    events: list[dict] = field(default_factory=list)
    damage: str | None = None

    @property
    def complete(self) -> bool:
        return self.summary is not None and self.damage is None

    @property
    def status(self) -> str:
        """success | diverged | oom (from the summary); incomplete; damaged."""
        if self.damage is not None:
            return "damaged"
        return self.summary.status if self.summary is not None else "incomplete"

    def read_telemetry(self) -> tuple[list[dict[str, str]], list[str]]:
        """(sampler rows of every rank as strings, as in the CSVs; one problem line per telemetry
        file that could not be read, which is left out while the others are kept)."""
        rows: list[dict[str, str]] = []
        problems: list[str] = []
        for path in RunDir(self.path).telemetry_paths():
            try:
                rows.extend(_telemetry_file(path, self.path))
            except (ValueError, csv.Error) as err:
                problems.append(f"{path}: {_reason(err, path)}")
        return rows, problems


def _telemetry_file(path: Path, root: Path) -> list[dict[str, str]]:
    lines = (text for _, text in safeio.iter_lines(path, "telemetry", root=root))
    reader = csv.reader(lines)
    header = next(reader, None)
    if not header or "time_ms" not in header or "run_id" not in header:
        raise ValueError("not a telemetry CSV (no time_ms/run_id header)")
    rows = []
    for number, values in enumerate(reader, start=2):
        if len(values) != len(header):
            raise ValueError(f"line {number} has {len(values)} fields, the header {len(header)}")
        rows.append(dict(zip(header, values)))
    return rows


def _reason(err: Exception, path: Path) -> str:
    """An error's message without repeating the path and without raw content."""
    text = str(err).replace(f"{path}: ", "").replace(str(path), path.name)
    return " ".join(text.split())[:300]


def _validated(model: Any, data: Any, path: Path) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        raise ValueError(f"{path.name}: {loc}: {e['msg']}") from None


def _mapping(data: Any, path: Path) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: expected a mapping, got {type(data).__name__}")
    return data


def validate_parts(*, plan: Any, config: Any, cluster: Any, env: Any, worker_env: Any,
                   summary: Any, folder: Path) -> tuple[dict, dict, dict, dict, dict, RunSummary | None]:
    """Check each stored part against the model that wrote it (RunPlan, SweepConfig, ClusterConfig,
    RunSummary); raise ValueError naming the file and field. Returns the parts, the summary typed.
    Also used by bench.submission for the copies a submission carries."""
    from bench.config import ClusterConfig, SweepConfig  # config -> workloads; kept off import time
    from bench.plan import RunPlan

    _mapping(plan, folder / RUN_PLAN)
    try:
        RunPlan.from_dict(plan)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{RUN_PLAN}: not a run plan ({_reason(err, folder)})") from None
    _validated(SweepConfig, _mapping(config, folder / CONFIG), folder / CONFIG)
    if cluster:
        _validated(ClusterConfig, _mapping(cluster, folder / CLUSTER), folder / CLUSTER)
    _mapping(env, folder / ENV)
    _mapping(worker_env, folder / WORKER_ENV)
    typed = None if summary is None else _validated(RunSummary, summary, folder / SUMMARY)
    return plan, config, cluster, env, worker_env, typed


def _missing_for(summary: RunSummary | None, config: dict, folder: Path) -> list[str]:
    """Files a run in this state must have: every run its inputs; a complete run also its event
    log, rank 0's environment and, with telemetry on, rank 0's telemetry."""
    need = [RUN_PLAN, CONFIG, ENV]
    if summary is not None:
        need += [EVENTS, WORKER_ENV]
        if summary.telemetry is not None and (config.get("telemetry") or {}).get("enabled", True):
            need.append("telemetry-rank0.csv")
    return [n for n in need if not (folder / n).is_file()]


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


def load_run(run_dir: RunDir, sweep: str | None = None, *, with_events: bool = True) -> RunRecord:
    """Read one run folder through safeio (bounded, no links), validating every part. Never
    raises for a bad folder: a folder that is corrupt or misses a required file comes back
    with ``damage`` saying what is wrong."""
    p = run_dir.path
    record = RunRecord(sweep=sweep or p.parent.name, run_id=p.name, path=p, plan={}, config={}, cluster={},
                       env={}, worker_env={}, summary=None)

    def opt(name: str, reader: Any) -> Any:
        f = p / name
        return reader(f, root=p) if f.exists() or f.is_symlink() else {}

    try:
        summary_raw = _read_json_in(p / SUMMARY, root=p) if (p / SUMMARY).exists() or (p / SUMMARY).is_symlink() else None
        parts = validate_parts(
            plan=opt(RUN_PLAN, _read_json_in), config=opt(CONFIG, _read_yaml_in) or {},
            cluster=opt(CLUSTER, _read_yaml_in) or {}, env=opt(ENV, _read_json_in),
            worker_env=opt(WORKER_ENV, _read_json_in), summary=summary_raw, folder=p)
        record.plan, record.config, record.cluster, record.env, record.worker_env, record.summary = parts
        missing = _missing_for(record.summary, record.config, p)
        if missing:
            record.damage = f"missing {', '.join(missing)}"
        if with_events and (p / EVENTS).is_file():
            record.events = read_events(p / EVENTS, root=p)
    except (ValueError, OSError, CorruptEventLog, yaml.YAMLError) as err:
        record.damage = _reason(err, p)
    return record


def _read_json_in(path: Path, *, root: Path) -> Any:
    return safeio.read_json(path, "json", root=root)


def _read_yaml_in(path: Path, *, root: Path) -> Any:
    return safeio.read_yaml(path, "yaml", root=root)


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
    """All runs under the given result folders, each validated. A damaged folder is returned
    marked (``record.damage``) and also warned about (RunSkipped, naming the folder and what is
    wrong), so that no run disappears without a trace."""
    records: list[RunRecord] = []
    for path in paths:
        for sweep in find_sweep_dirs(path):
            for run_dir in sweep.run_dirs():
                record = load_run(run_dir, sweep.name, with_events=with_events)
                if record.damage is not None:
                    warnings.warn(f"damaged run folder {run_dir.path}: {record.damage}", RunSkipped, stacklevel=2)
                if record.complete or include_incomplete or record.damage is not None:
                    records.append(record)
    return records
