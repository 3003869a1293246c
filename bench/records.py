"""Reading run folders back: every stored part validated with the model that wrote it.

Owns: ``RunRecord`` (what a run folder holds, typed, with ``damage`` and ``status``),
``load_run`` / ``load_results`` (never raise for a bad folder: it comes back marked damaged,
naming each bad file and what is wrong, never its content), ``validate_parts`` (also used for
a submission's copies) and reading telemetry CSVs. Every file is read through bench.safeio
(bounded, streamed, no links). Paths and layout come from bench.store.

Must not import: torch, ray, pandas.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from bench import safeio
from bench.events import iter_events
from bench.schema import kind
from bench.store import (validated, CLUSTER, CONFIG, ENV, EVENTS, RUN_PLAN, SUMMARY, WORKER_ENV, RunDir, RunSkipped,
                         find_sweep_dirs, is_dir, present)
from bench.summary import RunSummary


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
    text = str(err).replace(f"{path}{os.sep}", "").replace(f"{path}: ", "").replace(str(path), path.name)
    return " ".join(text.split())[:300]


def _mapping(data: Any, path: Path) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: expected a mapping, got {kind(data)}")
    return data


@functools.lru_cache(maxsize=1)
def _plan_adapter() -> Any:
    from pydantic import TypeAdapter

    from bench.plan import RunPlan

    return TypeAdapter(RunPlan)


def _check_plan(plan: Any, folder: Path) -> dict:
    """run.json: every RunPlan field present (or defaulted) with its type; no unknown key."""
    from bench.plan import RunPlan

    _mapping(plan, folder / RUN_PLAN)
    unknown = sorted(str(k) for k in plan if k not in RunPlan.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{RUN_PLAN}: not a run plan ({len(unknown)} unknown key(s))")
    try:
        # As JSON, strictly: a list is a tuple there, but "64" is not an int nor true a number.
        _plan_adapter().validate_json(json.dumps(plan), strict=True)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        raise ValueError(f"{RUN_PLAN}: not a run plan ({loc}: {e['msg']})") from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{RUN_PLAN}: not a run plan ({type(err).__name__})") from None
    return plan


def _check_config(config: Any, folder: Path) -> dict:
    from bench.config import SweepConfig  # config -> workloads; kept off import time

    validated(SweepConfig, _mapping(config, folder / CONFIG), folder / CONFIG)
    return config


def _check_cluster(cluster: Any, folder: Path) -> dict:
    from bench.config import ClusterConfig

    if cluster:  # runs written before cluster.yaml existed have none
        validated(ClusterConfig, _mapping(cluster, folder / CLUSTER), folder / CLUSTER)
    return cluster or {}


def check_summary(summary: Any, folder: Path) -> RunSummary:
    return validated(RunSummary, summary, folder / SUMMARY)


def validate_parts(*, plan: Any, config: Any, cluster: Any, env: Any, worker_env: Any,
                   summary: Any, folder: Path) -> tuple[dict, dict, dict, dict, dict, RunSummary | None]:
    """Check each stored part against the model that wrote it (RunPlan, SweepConfig, ClusterConfig,
    RunSummary); raise ValueError naming the file and field. Returns the parts, the summary typed.
    Also used by bench.submission for the copies a submission carries."""
    _check_plan(plan, folder)
    _check_config(config, folder)
    cluster = _check_cluster(cluster, folder)
    _mapping(env, folder / ENV)
    _mapping(worker_env, folder / WORKER_ENV)
    typed = None if summary is None else check_summary(summary, folder)
    return plan, config, cluster, env, worker_env, typed


def _event_problem(event: dict) -> str | None:
    """What is wrong with the shape of one event (bench.events' line shape), or None."""
    if not isinstance(event.get("key"), str):
        return "its key is not a string"
    if not isinstance(event.get("metadata", {}), (dict, type(None))):
        return "its metadata is not a mapping"
    t = event.get("time_ms")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))):
        return "its time_ms is not a number"
    return None


def _read_events(path: Path, root: Path, into: list[dict]) -> None:
    """Append the run's events to ``into``; raise ValueError at the first malformed one (the
    events before it are kept)."""
    for number, event in enumerate(iter_events(path, root=root), start=1):
        problem = _event_problem(event)
        if problem is not None:
            raise ValueError(f"{EVENTS}: event {number}: {problem}")
        into.append(event)


def _missing_for(summary: RunSummary | None, config: dict, folder: Path) -> list[str]:
    """Files a run in this state must have: every run its inputs; a complete run also its event
    log, rank 0's environment and, with telemetry on, rank 0's telemetry."""
    need = [RUN_PLAN, CONFIG, ENV]
    if summary is not None:
        need += [EVENTS, WORKER_ENV]
        if summary.telemetry is not None and (config.get("telemetry") or {}).get("enabled", True):
            need.append("telemetry-rank0.csv")
    return [n for n in need if not (folder / n).is_file()]


def _read_json_in(path: Path, *, root: Path) -> Any:
    return safeio.read_json(path, "json", root=root)


def _read_yaml_in(path: Path, *, root: Path) -> Any:
    return safeio.read_yaml(path, "yaml", root=root)


def load_run(run_dir: RunDir, sweep: str | None = None, *, with_events: bool = True) -> RunRecord:
    """Read one run folder through safeio (bounded, no links), validating every part on its own.
    Never raises for a bad folder: a folder with a part that is corrupt, of the wrong shape, a
    link, too large or unreadable, or that misses a file its state requires, comes back with
    ``damage`` naming each such file and what is wrong (never its content); the parts that could
    be read are kept."""
    p = run_dir.path
    record = RunRecord(sweep=sweep or p.parent.name, run_id=p.name, path=p, plan={}, config={}, cluster={},
                       env={}, worker_env={}, summary=None)
    if p.is_symlink() or not is_dir(p):
        record.damage = ("the run folder is a symbolic link; links are not followed" if p.is_symlink()
                         else "the run folder is not a folder, or cannot be entered")
        return record
    problems: list[str] = []

    def part(name: str, reader: Any, check: Any, absent: Any) -> Any:
        f = p / name
        if not present(f):
            return absent
        try:
            return check(reader(f, root=p), p)
        except (ValueError, OSError, UnicodeError, RecursionError, yaml.YAMLError) as err:
            problems.append(_reason(err, p))
            return absent

    record.plan = part(RUN_PLAN, _read_json_in, _check_plan, {})
    record.config = part(CONFIG, _read_yaml_in, _check_config, {})
    record.cluster = part(CLUSTER, _read_yaml_in, _check_cluster, {})
    record.env = part(ENV, _read_json_in, lambda d, _p: _mapping(d, p / ENV), {})
    record.worker_env = part(WORKER_ENV, _read_json_in, lambda d, _p: _mapping(d, p / WORKER_ENV), {})
    record.summary = part(SUMMARY, _read_json_in, check_summary, None)
    missing = [n for n in _missing_for(record.summary, record.config, p) if not present(p / n)]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if with_events and present(p / EVENTS):
        try:
            _read_events(p / EVENTS, p, record.events)
        except (ValueError, OSError, UnicodeError, RecursionError) as err:
            problems.append(_reason(err, p))
    if problems:
        record.damage = "; ".join(dict.fromkeys(problems))
    return record


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
