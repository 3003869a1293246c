"""Submissions: package stored runs MLPerf-style, read a package back, compare packages.

Owns: the layout of a submission folder, ``system.json`` (MLPerf system-description fields), the
``:::MLLOG`` rendering of event logs with ``submission_*`` keys, writing the checksums, reading a
package back (``load_submission``) and the side-by-side comparison; CLI commands ``submit``,
``check``, ``compare`` (``register``). What ``check`` checks lives in bench.compliance.

Must not import: torch, ray; bench.compliance at module level (it imports this module;
``cmd_check`` imports it late). pandas/numpy/scipy (via bench.analysis) are imported inside
functions, because the CLI imports this module to build its parser.

Layout of a submission::

    NAME/
        system.json                       MLPerf system description; unknown fields null
        system/cluster.yaml               the batchscale cluster file, verbatim
        results/<sweep>/<run_id>.log      the event log as :::MLLOG lines, submission_* first
        runs/<sweep>/<run_id>/            run.json summary.json config.yaml cluster.yaml env.json worker_env.json
        summary.csv                       bench.analysis.runs_frame, one row per run
        checksums.sha256                  "<sha256>  <path>" for every other file
"""

from __future__ import annotations

import argparse
import hashlib
import json
import numbers
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from bench import events as ev
from bench import store
from bench.errors import ConfigError, UserError

# MLPerf keys that events.py does not define yet (header of every result log).
SUBMISSION_ORG, SUBMISSION_PLATFORM = "submission_org", "submission_platform"
SUBMISSION_DIVISION, SUBMISSION_BENCHMARK = "submission_division", "submission_benchmark"
SUBMISSION_STATUS = "submission_status"
HEADER_KEYS = (SUBMISSION_ORG, SUBMISSION_PLATFORM, SUBMISSION_DIVISION, SUBMISSION_BENCHMARK)
MLLOG_PREFIX = ":::MLLOG "
DIVISIONS = ("open", "closed")
STATUSES = ("available", "preview", "rdi")  # MLPerf: on sale / coming / research, development, internal
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
REQUIRED_SYSTEM_VALUES = ("submitter", "division", "system_name", "number_of_nodes", "framework")
RUN_FILES = (store.RUN_PLAN, store.SUMMARY, store.CONFIG, store.CLUSTER, store.ENV, store.WORKER_ENV)
REQUIRED_RUN_FILES = (store.RUN_PLAN, store.SUMMARY, store.CONFIG)
SYSTEM_JSON, CLUSTER_COPY = "system.json", "system/cluster.yaml"
SUMMARY_CSV, CHECKSUMS = "summary.csv", "checksums.sha256"


# --- system description -------------------------------------------------------------------

def _distinct(values: Iterable[Any]) -> Any:
    """The one known value; several different ones joined with ' | '; None when none is known."""
    distinct = {v for v in values if v not in (None, "") and not isinstance(v, (dict, list))}
    seen = [str(v) for v in sorted(distinct, key=lambda v: (0, float(v), "") if isinstance(v, numbers.Real)
                                   else (1, 0.0, str(v)))]  # numbers in numeric order: 2 before 16
    return None if not seen else seen[0] if len(seen) == 1 else " | ".join(seen)


def system_description(cluster, records: Sequence[store.RunRecord], *, submitter: str,
                       division: str, status: str | None = None) -> dict[str, Any]:
    """MLPerf system JSON from the cluster file's hardware and the runs' env/worker_env."""
    hw, envs, wenvs = cluster.hardware, [r.env for r in records], [r.worker_env for r in records]
    memory = _distinct(f"{w['gpu_memory_gib']:.1f} GiB" for w in wenvs if w.get("gpu_memory_gib"))
    torch = _distinct(w.get("torch") or e.get("torch") for e, w in zip(envs, wenvs))
    ray = _distinct(e.get("ray") for e in envs)
    framework = ", ".join(f"{n} {v}" for n, v in (("PyTorch", torch), ("Ray", ray)) if v) or None
    stack = {"CUDA": _distinct(w.get("cuda") for w in wenvs), "cuDNN": _distinct(w.get("cudnn") for w in wenvs),
             "NVIDIA driver": _distinct(w.get("driver") for w in wenvs),
             "Python": _distinct(e.get("python") for e in envs), "numpy": _distinct(e.get("numpy") for e in envs),
             "batchscale": _distinct(e.get("batchscale") for e in envs)}
    shas = _distinct(f"{e['git_sha']}{' (dirty)' if e.get('git_dirty') else ''}" for e in envs if e.get("git_sha"))
    system = dict.fromkeys(SYSTEM_FIELDS)
    system.update(
        submitter=submitter, division=division, status=status, system_name=cluster.name,
        number_of_nodes=hw.nodes,
        host_processor_model_name=hw.cpu_model or _distinct(e.get("cpu_model") for e in envs),
        host_processor_vcpu_count=_distinct(e.get("cpu_count") for e in envs), accelerators_per_node=hw.gpus_per_node,
        accelerator_model_name=hw.gpu_model or _distinct(w.get("gpu_model") for w in wenvs),
        accelerator_memory_capacity=memory, accelerator_interconnect=hw.interconnect,
        hw_notes=cluster.description or None, framework=framework,
        other_software_stack=", ".join(f"{k} {v}" for k, v in stack.items() if v) or None,
        operating_system=_distinct(e.get("platform") for e in envs),
        sw_notes=f"batchscale git {shas}" if shas else None)
    return system


# --- packaging ----------------------------------------------------------------------------

def mllog_lines(record: store.RunRecord, header: dict[str, Any]) -> list[str]:
    """The run's events as :::MLLOG lines, the submission_* header first (at run_start's time)."""
    t0 = record.events[0]["time_ms"] if record.events else 0.0
    head = [ev.make_event(k, v, time_ms=t0) for k, v in header.items() if v is not None]
    return [ev.to_mllog_line(e) for e in head + record.events]


def _load_records(results_paths: Sequence[Path | str]) -> list[store.RunRecord]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", store.RunSkipped)
        try:
            records = store.load_results([Path(p) for p in results_paths])
        except store.StoreError as err:
            raise UserError(str(err)) from None
    corrupt = [str(w.message) for w in caught if issubclass(w.category, store.RunSkipped)]
    if corrupt:
        raise UserError("corrupt run folders, refusing to submit: " + "; ".join(corrupt), 1)
    if not records:
        raise UserError(f"no runs found under {', '.join(map(str, results_paths))}", 1)
    return records


def make_submission(results_paths: Sequence[Path | str], system_file: Path | str, out_dir: Path | str, *,
                    submitter: str, division: str = "open", status: str | None = None) -> Path:
    """Package complete runs into out_dir (built in a temp folder, renamed at the end)."""
    from bench import analysis
    from bench.config import load_cluster

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; choose a new submission folder")
    if division not in DIVISIONS:
        raise UserError(f"division {division!r} is not one of {', '.join(DIVISIONS)}")
    try:
        cluster, cluster_path = load_cluster(system_file)
    except ConfigError as err:
        raise UserError(str(err)) from None
    records = _load_records(results_paths)
    incomplete = [f"{r.sweep}/{r.run_id}" for r in records
                  if not r.complete or not any(e.get("key") == ev.RUN_STOP for e in r.events)]
    if incomplete:
        raise UserError(f"{len(incomplete)} incomplete run(s), finish or remove them first: "
                          + ", ".join(incomplete), 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        system = system_description(cluster, records, submitter=submitter, division=division, status=status)
        (tmp / SYSTEM_JSON).write_text(json.dumps(system, indent=2) + "\n", encoding="utf-8")
        (tmp / CLUSTER_COPY).parent.mkdir()
        shutil.copyfile(cluster_path, tmp / CLUSTER_COPY)
        for r in records:
            header = {SUBMISSION_ORG: submitter, SUBMISSION_PLATFORM: cluster.name, SUBMISSION_DIVISION: division,
                      SUBMISSION_BENCHMARK: r.plan.get("workload"), SUBMISSION_STATUS: status}
            log = tmp / "results" / r.sweep / f"{r.run_id}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("\n".join(mllog_lines(r, header)) + "\n", encoding="utf-8")
            run_out = tmp / "runs" / r.sweep / r.run_id
            run_out.mkdir(parents=True)
            for name in RUN_FILES:
                if (r.path / name).is_file():
                    shutil.copyfile(r.path / name, run_out / name)
        analysis.runs_frame(records)[analysis.RUN_COLUMNS].to_csv(tmp / SUMMARY_CSV, index=False)
        _write_checksums(tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksummed_files(root: Path) -> list[str]:
    """Every file under root (relative POSIX paths, sorted) that checksums.sha256 lists."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def _write_checksums(root: Path) -> None:
    lines = [f"{sha256_file(root / rel)}  {rel}" for rel in checksummed_files(root)]
    (root / CHECKSUMS).write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- reading a submission back ------------------------------------------------------------

def read_mllog(path: Path) -> list[dict[str, Any]]:
    """Events of a :::MLLOG file (other lines ignored); raises ValueError naming a broken line."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith(MLLOG_PREFIX):
            try:
                event = json.loads(line[len(MLLOG_PREFIX):])
            except ValueError as err:
                raise ValueError(f"{path}:{number}: broken MLLOG line ({err})") from None
            event.pop("namespace", None)
            out.append(event)
    return out


def load_submission(path: Path | str) -> tuple[dict, list[store.RunRecord], list[str]]:
    """(system.json, one RunRecord per result log, problems found while reading)."""
    root, problems, records = Path(path), [], []
    try:
        system = json.loads((root / SYSTEM_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        system, problems = {}, [f"{SYSTEM_JSON}: cannot read ({type(err).__name__})"]
    for log in sorted((root / "results").glob("*/*.log")):
        sweep, run_id = log.parent.name, log.stem
        run = root / "runs" / sweep / run_id
        missing = [n for n in REQUIRED_RUN_FILES if not (run / n).is_file()]
        if missing:
            problems.append(f"run {sweep}/{run_id}: missing {', '.join(missing)}")
            continue
        try:
            text = lambda n: (run / n).read_text(encoding="utf-8")  # noqa: E731 (written as UTF-8)
            opt = lambda n: json.loads(text(n)) if (run / n).is_file() else {}  # noqa: E731
            plan, config, cluster, env, worker_env, summary = store.validate_parts(
                plan=opt(store.RUN_PLAN), config=yaml.safe_load(text(store.CONFIG)) or {},
                cluster=yaml.safe_load(text(store.CLUSTER)) if (run / store.CLUSTER).is_file() else {},
                env=opt(store.ENV), worker_env=opt(store.WORKER_ENV), summary=opt(store.SUMMARY), folder=run)
            records.append(store.RunRecord(
                sweep=sweep, run_id=run_id, path=run, plan=plan, config=config, cluster=cluster, env=env,
                worker_env=worker_env, summary=summary, events=read_mllog(log)))
        except (OSError, ValueError, yaml.YAMLError) as err:
            problems.append(f"run {sweep}/{run_id}: unreadable ({err})")
    logged = {(p.parent.name, p.stem) for p in (root / "results").glob("*/*.log")}
    problems += [f"run {p.parent.name}/{p.name}: folder without a result log"
                 for p in sorted((root / "runs").glob("*/*")) if (p.parent.name, p.name) not in logged]
    return system, records, problems


# --- comparison ---------------------------------------------------------------------------

COMPARE_METRICS = ("time_to_target_s", "epochs_to_target", "samples_per_s")


def compare_submissions(paths: Sequence[Path | str], out_html: Path | str | None = None):
    """Per global batch size and submission: olympic means of time- and epochs-to-target (a
    non-converged run counts as slowest: NaN if it survives the trimming), mean throughput.
    Prints the side-by-side table; writes a self-contained HTML page when out_html is given.
    Returns the long table (one row per submission and batch)."""
    import pandas as pd

    from bench.analysis import olympic_mean, runs_frame

    rows, names = [], []
    for path in map(Path, paths):
        name = path.resolve().name
        names.append(name if name not in names else f"{name} ({len(names) + 1})")
        system, records, problems = load_submission(path)
        if not records:
            raise UserError(f"{path}: no runs in this submission ({'; '.join(problems) or 'no results/ logs'})", 1)
        for b, g in runs_frame(records).groupby("global_batch_size"):
            rows.append({"submission": names[-1], "system": system.get("system_name"), "global_batch_size": b,
                         "num_workers": _distinct(g["num_workers"]), "n_runs": len(g),
                         "n_reached": int(g["epochs_to_target"].notna().sum()),
                         "time_to_target_s": olympic_mean(g["time_to_target_s"], missing_as_worst=True),
                         "epochs_to_target": olympic_mean(g["epochs_to_target"], missing_as_worst=True),
                         "samples_per_s": g["samples_per_s"].mean()})
    long = pd.DataFrame(rows)
    wide = long.pivot(index="global_batch_size", columns="submission", values=list(COMPARE_METRICS))
    wide = wide.reorder_levels([1, 0], axis=1)[[(n, m) for n in names for m in COMPARE_METRICS]]
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(wide.to_string(float_format=lambda v: f"{v:.4g}", na_rep="-"))
    if out_html is not None:
        _write_html(Path(out_html), names, long, wide)
    return long


def _write_html(path: Path, names: list[str], long, wide) -> None:
    import html

    title = "batchscale: " + " vs ".join(names)
    body = wide.to_html(float_format=lambda v: f"{v:.4g}", na_rep="-", border=0, escape=True)
    detail = long.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-", border=0, escape=True)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>Per global batch size: olympic mean of time-to-target (s, training "
            "time) and epochs-to-target (a run that never reached the target counts as slowest; '-' = unknown), "
            f"mean throughput (samples/s).</p>{body}<h2>Details</h2>{detail}</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    store.atomic_write_text(path, page)


# --- CLI ------------------------------------------------------------------------------------

def cmd_submit(args: argparse.Namespace) -> int:
    out = make_submission(args.results, args.system, args.output, submitter=args.submitter,
                          division=args.division, status=args.status)
    print(f"submission: {out}   next: batchscale check {out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from bench.compliance import check_submission  # late: bench.compliance imports this module

    if args.reference is not None and not Path(args.reference).is_dir():
        raise UserError(f"no reference submission at {args.reference}")
    problems = check_submission(args.submission, reference=args.reference)
    for p in problems:
        print(f"VIOLATION: {p}")
    print(f"{args.submission}: {len(problems)} violation(s)" if problems else f"{args.submission}: clean")
    return 1 if problems else 0


def cmd_compare(args: argparse.Namespace) -> int:
    missing = [p for p in args.submissions if not Path(p).is_dir()]
    if missing:
        raise UserError(f"no submission folder at {', '.join(missing)}")
    compare_submissions(args.submissions, args.output)
    if args.output:
        print(f"comparison: {args.output}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `submit`, `check` and `compare` to the batchscale parser."""
    p = sub.add_parser("submit", help="package complete runs as an MLPerf-style submission folder")
    p.add_argument("results", nargs="+", help="results folders (a sweep's, or a folder of them)")
    p.add_argument("--system", required=True, help="cluster YAML describing the system, e.g. clusters/aws-h100.yaml")
    p.add_argument("-o", "--output", required=True, help="new folder, e.g. results/submissions/NAME/")
    p.add_argument("--submitter", default="unknown", help="organisation (MLPerf submission_org)")
    p.add_argument("--division", choices=DIVISIONS, default="open")
    p.add_argument("--status", choices=STATUSES, help="MLPerf system status (system.json and each log's "
                                                      "submission_status); default: not stated")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("check", help="check a submission; exit 1 listing every violation")
    p.add_argument("submission")
    p.add_argument("--reference", help="reference submission for the convergence (RCP) check")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("compare", help="side-by-side table of submissions (time/epochs-to-target, throughput)")
    p.add_argument("submissions", nargs="+")
    p.add_argument("-o", "--output", help="also write an HTML page, e.g. reports/compare.html")
    p.set_defaults(func=cmd_compare)
