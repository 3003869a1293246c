"""The files of a submission folder: its layout, and reading one back without trusting it.

Owns: the layout constants (shared by the writer, bench.submission, and the checker,
bench.compliance, so that neither imports the other), the inventory of a package (every entry,
links and special files refused, never followed), the kind of each file (its size limit in
``safeio.LIMITS``), and ``load_submission``: ``system.json``, one ``RunRecord`` per result log
with its run's stored files validated by the models that wrote them (``records.validate_parts``),
and one problem line per thing that could not be read. Every read goes through bench.safeio
with the submission as root: streamed, bounded per kind of file, no link followed, nothing
outside the folder opened, no file content in a problem line.

Must not import: torch, ray, pandas; bench.submission, bench.compliance (they import this).

Layout of a submission::

    NAME/
        system.json                       MLPerf system description; unknown fields null
        system/cluster.yaml               the batchscale cluster file, verbatim
        results/<sweep>/<run_id>.log      the run's :::MLLOG log (bench.mllog_export)
        runs/<sweep>/<run_id>/            run.json summary.json config.yaml cluster.yaml env.json worker_env.json
        summary.csv                       bench.analysis.runs_frame, one row per run
        checksums.sha256                  "<sha256>  <path>" for every other file
"""

from __future__ import annotations

import json
import numbers
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from bench import safeio
from bench import store
from bench import records
from bench.errors import UserError

SYSTEM_JSON, CLUSTER_COPY = "system.json", "system/cluster.yaml"
SUMMARY_CSV, CHECKSUMS = "summary.csv", "checksums.sha256"
RESULTS, RUNS = "results", "runs"
REQUIRED_FILES = (SYSTEM_JSON, CLUSTER_COPY, SUMMARY_CSV, CHECKSUMS)
RUN_FILES = (store.RUN_PLAN, store.SUMMARY, store.CONFIG, store.CLUSTER, store.ENV, store.WORKER_ENV)
REQUIRED_RUN_FILES = (store.RUN_PLAN, store.SUMMARY, store.CONFIG)
MLLOG_PREFIX = ":::MLLOG "
MAX_ENTRIES = 100_000  # files and folders in one package; a legitimate one has ~10 per run

DIVISIONS = ("open", "closed")
# --status: (system.json "status" as MLPerf's system-description checker requires it for training
# rulesets >= 4.0, the log's submission_status in the vocabulary of the rulesets that check it, <= 4.0.0)
STATUSES = {
    "onprem": ("Available on-premise", "onprem"),
    "cloud": ("Available cloud", "cloud"),
    "preview": ("Preview", "preview"),
    "rdi": ("Research, Development, or Internal (RDI)", "research"),
}
SYSTEM_FIELDS = (
    "submitter", "division", "status", "system_name", "number_of_nodes", "host_processors_per_node",
    "host_processor_model_name", "host_processor_core_count", "host_processor_vcpu_count",
    "host_processor_frequency", "host_processor_caches", "host_processor_interconnect",
    "host_memory_capacity", "host_storage_type", "host_storage_capacity", "host_networking",
    "host_networking_topology", "host_memory_configuration", "accelerators_per_node",
    "accelerator_model_name", "accelerator_host_interconnect", "accelerator_frequency",
    "accelerator_on-chip_memories", "accelerator_memory_configuration", "accelerator_memory_capacity",
    "accelerator_interconnect", "accelerator_interconnect_topology", "cooling", "hw_notes",
    "framework", "other_software_stack", "operating_system", "sw_notes")
REQUIRED_SYSTEM_VALUES = ("submitter", "division", "status", "system_name", "number_of_nodes", "framework")


def log_rel(sweep: str, run_id: str) -> str:
    return f"{RESULTS}/{sweep}/{run_id}.log"


def run_rel(sweep: str, run_id: str) -> str:
    return f"{RUNS}/{sweep}/{run_id}"


def kind_of(rel: str) -> str:
    """The safeio.LIMITS kind of a file in a package, from its path."""
    if rel == CHECKSUMS:
        return "checksums"
    if rel.startswith(f"{RESULTS}/") and rel.endswith(".log"):
        return "mllog"
    if rel.endswith(".csv"):
        return "csv"
    if rel.endswith((".yaml", ".yml")):
        return "yaml"
    if rel.endswith(".json"):
        return "json"
    return "any"


def relative_message(err: Exception, root: Path) -> str:
    """An error's message with the package root taken off the paths, on one line."""
    text = " ".join(str(err).replace(f"{root}{os.sep}", "").replace(str(root), ".").split())
    return re.sub(r"^(\S+): \1 ", r"\1: ", text)[:400]  # "a/b: a/b is a link" -> "a/b: is a link"


def distinct(values: Iterable[Any]) -> Any:
    """The one known value; several different ones joined with ' | '; None when none is known."""
    found = {v for v in values if v not in (None, "") and not isinstance(v, (dict, list))}
    seen = [str(v) for v in sorted(found, key=lambda v: (0, float(v), "") if isinstance(v, numbers.Real)
                                   else (1, 0.0, str(v)))]  # numbers in numeric order: 2 before 16
    return None if not seen else seen[0] if len(seen) == 1 else " | ".join(seen)


def require_package_folder(path: Path | str, what: str = "submission") -> Path:
    """The folder a command was given, or UserError (exit 2): it must be a real folder, not a
    symbolic link (links are not followed, the top one included)."""
    root = Path(path)
    if root.is_symlink():
        raise UserError(f"{root}: the {what} folder is a symbolic link; give the folder itself")
    if not root.is_dir():
        raise UserError(f"no {what} folder at {root}")
    return root


# --- what is in the folder ------------------------------------------------------------------

@dataclass
class Inventory:
    files: list[str] = field(default_factory=list)  # regular files, relative POSIX paths, sorted
    folders: list[str] = field(default_factory=list)  # real folders (never a link), sorted
    refused: list[str] = field(default_factory=list)  # one problem per link / special file
    refused_paths: set[str] = field(default_factory=set)  # their relative paths


def inventory(root: Path) -> Inventory:
    """Every entry under root, read with lstat: a symbolic link (to a file or a folder, broken or
    not) or a special file is refused and never followed or opened."""
    inv, pending, count = Inventory(), [""], 0
    while pending:
        rel_dir = pending.pop()
        try:
            entries = sorted(os.scandir(root / rel_dir), key=lambda e: e.name)
        except OSError as err:
            inv.refused.append(f"{rel_dir or '.'}: cannot list ({err.strerror or type(err).__name__})")
            continue
        for entry in entries:
            count += 1
            if count > MAX_ENTRIES:
                inv.refused.append(f"more than {MAX_ENTRIES:,} files and folders; the rest is not checked")
                return _sorted(inv)
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                inv.refused_paths.add(rel)
                inv.refused.append(f"{rel}: is a symbolic link; links are not followed")
            elif stat.S_ISDIR(mode):
                inv.folders.append(rel)
                pending.append(rel)
            elif stat.S_ISREG(mode):
                inv.files.append(rel)
            else:
                inv.refused_paths.add(rel)
                inv.refused.append(f"{rel}: is not a regular file")
    return _sorted(inv)


def _sorted(inv: Inventory) -> Inventory:
    inv.files.sort()
    inv.folders.sort()
    return inv


# --- result logs ------------------------------------------------------------------------------

def iter_mllog(path: Path, *, root: Path) -> Iterator[dict[str, Any]]:
    """Events of a :::MLLOG log (other lines skipped), streamed through safeio. Raises ValueError
    naming the line (never quoting it) for a line that is not an MLLOG event object."""
    for number, line in safeio.iter_lines(path, "mllog", root=root):
        if not line.startswith(MLLOG_PREFIX):
            continue
        try:
            event = json.loads(line[len(MLLOG_PREFIX):])
        except (ValueError, RecursionError) as err:
            raise ValueError(f"{path}: line {number} is not valid JSON ({type(err).__name__})") from None
        if not (isinstance(event, dict) and isinstance(event.get("key"), str)
                and isinstance(event.get("metadata", {}), dict)):
            raise ValueError(f"{path}: line {number} is not an MLLOG event (an object with a key and "
                             "metadata object)")
        event.pop("namespace", None)
        event.setdefault("metadata", {})
        yield event


# --- a package read back ------------------------------------------------------------------------

@dataclass
class Package:
    root: Path
    inventory: Inventory
    system: dict | None  # None: missing or unusable (that is in problems)
    records: list[records.RunRecord]
    problems: list[str]  # in the order found: links/special files, missing files, unreadable parts
    logs: dict[tuple[str, str], str]  # (sweep, run_id) of each record -> its log, relative


def _result_logs(inv: Inventory) -> list[tuple[str, str]]:
    out = []
    for rel in inv.files:
        parts = rel.split("/")
        if len(parts) == 3 and parts[0] == RESULTS and parts[2].endswith(".log"):
            out.append((parts[1], parts[2][:-len(".log")]))
    return out


def _read_part(path: Path, root: Path) -> Any:
    if path.name.endswith(".json"):
        return safeio.read_json(path, "json", root=root)
    return safeio.read_yaml(path, "yaml", root=root)


def _typed_plan(plan: Any) -> Any:
    """run.json with every field of the type RunPlan declares (records.validate_parts checks the
    field names only), as RunPlan.to_dict writes it; a non-mapping is left to validate_parts."""
    from pydantic import TypeAdapter, ValidationError

    from bench.plan import RunPlan

    if not isinstance(plan, dict):
        return plan
    try:
        return TypeAdapter(RunPlan).validate_python(plan).to_dict()
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "(top level)"
        raise ValueError(f"{store.RUN_PLAN}: {where}: {first['msg']}") from None


def _load_run(root: Path, sweep: str, run_id: str) -> records.RunRecord:
    """One run's stored files, validated; raises ValueError naming the file."""
    run = root / run_rel(sweep, run_id)
    missing = [n for n in REQUIRED_RUN_FILES if not os.path.lexists(run / n)]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    parts = {n: _read_part(run / n, root) if os.path.lexists(run / n) else None for n in RUN_FILES}
    plan, config, cluster, env, worker_env, summary = records.validate_parts(
        plan=_typed_plan(parts[store.RUN_PLAN]), config=parts[store.CONFIG], cluster=parts[store.CLUSTER] or {},
        env=parts[store.ENV] if parts[store.ENV] is not None else {},
        worker_env=parts[store.WORKER_ENV] if parts[store.WORKER_ENV] is not None else {},
        summary=parts[store.SUMMARY], folder=run)
    events = list(iter_mllog(root / log_rel(sweep, run_id), root=root))
    return records.RunRecord(sweep=sweep, run_id=run_id, path=run, plan=plan, config=config, cluster=cluster,
                           env=env, worker_env=worker_env, summary=summary, events=events)


def load_submission(path: Path | str) -> Package:
    """The package at path read back: system.json (None when unusable), one RunRecord per result
    log whose run could be read, and one problem line per entry or part that could not."""
    root = Path(path)
    inv = inventory(root)
    problems = list(inv.refused)
    problems += [f"{name}: required file missing" for name in REQUIRED_FILES
                 if name not in inv.files and not os.path.lexists(root / name)]
    system: Any = None
    if os.path.lexists(root / SYSTEM_JSON):
        try:
            system = safeio.read_json(root / SYSTEM_JSON, "json", root=root)
        except ValueError as err:
            problems.append(relative_message(err, root))
        else:
            if not isinstance(system, dict):
                problems.append(f"{SYSTEM_JSON}: expected a JSON object, got {type(system).__name__}")
                system = None
    records, logs = [], {}
    for sweep, run_id in _result_logs(inv):
        try:
            records.append(_load_run(root, sweep, run_id))
            logs[(sweep, run_id)] = log_rel(sweep, run_id)
        except ValueError as err:  # safeio.UnsafeFile, broken log lines, validate_parts
            problems.append(f"run {sweep}/{run_id}: {relative_message(err, root)}")
    logged = set(_result_logs(inv))
    problems += [f"run {rel.split('/')[1]}/{rel.split('/')[2]}: folder without a result log"
                 for rel in inv.folders if rel.count("/") == 2 and rel.startswith(f"{RUNS}/")
                 and tuple(rel.split("/")[1:]) not in logged]
    return Package(root=root, inventory=inv, system=system, records=records, problems=problems, logs=logs)
