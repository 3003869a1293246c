"""Submissions: package stored runs MLPerf-style (``batchscale submit``) and the CLI commands
``submit``, ``check`` and ``compare``.

Owns: ``system.json`` (MLPerf system-description fields from the cluster file and the runs'
environments), building a package in a temporary folder and renaming it into place, copying
the runs' files (read through bench.safeio), writing the checksums, and the three commands'
parsers (``register``). The layout and reading a package back live in bench.submission_files,
the logs in bench.mllog_export, what ``check`` checks in bench.compliance, the comparison in
bench.compare; this module imports them, none of them imports it.

Must not import: torch, ray. pandas/numpy/scipy (via bench.analysis) and mlperf_logging (via
bench.mllog_export / bench.compliance; it loads numpy) only inside functions, because the CLI
imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

from bench import compare, safeio, store
from bench import records as stored
from bench import events as ev
from bench.errors import ConfigError, UserError
from bench.submission_files import (CHECKSUMS, CLUSTER_COPY, DIVISIONS, RUN_FILES, STATUSES, SUMMARY_CSV,
                                    SYSTEM_FIELDS, SYSTEM_JSON, distinct, inventory, kind_of, log_rel,
                                    require_package_folder, run_rel)

DEFAULT_STATUS = "rdi"  # research, development or internal: what a benchmark run is unless said otherwise


# --- system description -------------------------------------------------------------------

def system_description(cluster, records: Sequence[stored.RunRecord], *, submitter: str,
                       division: str, status: str = DEFAULT_STATUS) -> dict[str, Any]:
    """MLPerf system JSON from the cluster file's hardware and the runs' env/worker_env; ``status``
    (a key of STATUSES) in the words MLPerf's system-description checker accepts."""
    hw, envs, wenvs = cluster.hardware, [r.env for r in records], [r.worker_env for r in records]
    memory = distinct(f"{w['gpu_memory_gib']:.1f} GiB" for w in wenvs if w.get("gpu_memory_gib"))
    torch = distinct(w.get("torch") or e.get("torch") for e, w in zip(envs, wenvs))
    ray = distinct(e.get("ray") for e in envs)
    framework = ", ".join(f"{n} {v}" for n, v in (("PyTorch", torch), ("Ray", ray)) if v) or None
    stack = {"CUDA": distinct(w.get("cuda") for w in wenvs), "cuDNN": distinct(w.get("cudnn") for w in wenvs),
             "NVIDIA driver": distinct(w.get("driver") for w in wenvs),
             "Python": distinct(e.get("python") for e in envs), "numpy": distinct(e.get("numpy") for e in envs),
             "batchscale": distinct(e.get("batchscale") for e in envs)}
    shas = distinct(f"{e['git_sha']}{' (dirty)' if e.get('git_dirty') else ''}" for e in envs if e.get("git_sha"))
    system = dict.fromkeys(SYSTEM_FIELDS)
    system.update(
        submitter=submitter, division=division, status=STATUSES[status][0], system_name=cluster.name,
        number_of_nodes=hw.nodes,
        host_processor_model_name=hw.cpu_model or distinct(e.get("cpu_model") for e in envs),
        host_processor_vcpu_count=distinct(e.get("cpu_count") for e in envs), accelerators_per_node=hw.gpus_per_node,
        accelerator_model_name=hw.gpu_model or distinct(w.get("gpu_model") for w in wenvs),
        accelerator_memory_capacity=memory, accelerator_interconnect=hw.interconnect,
        hw_notes=cluster.description or None, framework=framework,
        other_software_stack=", ".join(f"{k} {v}" for k, v in stack.items() if v) or None,
        operating_system=distinct(e.get("platform") for e in envs),
        sw_notes=f"batchscale git {shas}" if shas else None)
    return system


# --- packaging ----------------------------------------------------------------------------

def _load_records(results_paths: Sequence[Path | str]) -> list[stored.RunRecord]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", store.RunSkipped)
        try:
            records = stored.load_results([Path(p) for p in results_paths])
        except store.StoreError as err:
            raise UserError(str(err)) from None
    corrupt = [str(w.message) for w in caught if issubclass(w.category, store.RunSkipped)]
    if corrupt:
        raise UserError("corrupt run folders, refusing to submit: " + "; ".join(corrupt), 1)
    if not records:
        raise UserError(f"no runs found under {', '.join(map(str, results_paths))}", 1)
    trials = [r.run_id for r in records if (r.plan or {}).get("lr_factor", 1.0) != 1.0]
    if trials:  # a submission holds one LR per batch; an LR search's trials are not a result set
        raise UserError(f"{len(trials)} run(s) at another LR than the rule's (an lr_search sweep, e.g. "
                        f"{trials[0]}): a submission holds one LR per batch; submit a sweep without lr_search")
    return records


def _copy_safely(src: Path, dst: Path, kind: str, root: Path | None = None) -> None:
    """Copy a file we did not write in this process through safeio (no link, bounded)."""
    try:
        dst.write_bytes(safeio.read_bytes(src, kind, root=root))
    except safeio.UnsafeFile as err:
        raise UserError(f"cannot copy into the submission: {err}") from None


def make_submission(results_paths: Sequence[Path | str], system_file: Path | str, out_dir: Path | str, *,
                    submitter: str, division: str = "open", status: str = DEFAULT_STATUS) -> Path:
    """Package complete runs into out_dir (built in a temp folder, renamed at the end)."""
    from bench import analysis
    from bench.config import load_cluster

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; choose a new submission folder")
    if division not in DIVISIONS:
        raise UserError(f"division {division!r} is not one of {', '.join(DIVISIONS)}")
    if status not in STATUSES:
        raise UserError(f"status {status!r} is not one of {', '.join(STATUSES)}")
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
        _copy_safely(Path(cluster_path), tmp / CLUSTER_COPY, "config")
        for r in records:
            _package_run(tmp, r, submitter=submitter, platform=cluster.name, division=division, status=status)
        analysis.runs_frame(records)[analysis.RUN_COLUMNS].to_csv(tmp / SUMMARY_CSV, index=False)
        _write_checksums(tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _package_run(tmp: Path, r: stored.RunRecord, **header: str) -> None:
    """The run's MLLOG log (bench.mllog_export) and copies of its stored files."""
    from bench.mllog_export import submission_events, write_mllog  # mlperf_logging loads numpy

    run_out = tmp / run_rel(r.sweep, r.run_id)
    events = submission_events(r, config_filename=f"{run_rel(r.sweep, r.run_id)}/{store.CONFIG}", **header)
    log = tmp / log_rel(r.sweep, r.run_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_mllog(log, events)
    except ValueError as err:
        raise UserError(f"run {r.sweep}/{r.run_id}: cannot write its MLLOG log ({err})", 1) from None
    run_out.mkdir(parents=True)
    for name in RUN_FILES:
        if (r.path / name).is_file():
            _copy_safely(r.path / name, run_out / name, kind_of(name), r.path)


def _write_checksums(root: Path) -> None:
    lines = [f"{safeio.sha256(root / rel, root=root)}  {rel}" for rel in inventory(root).files if rel != CHECKSUMS]
    (root / CHECKSUMS).write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- CLI ------------------------------------------------------------------------------------

def cmd_submit(args: argparse.Namespace) -> int:
    out = make_submission(args.results, args.system, args.output, submitter=args.submitter,
                          division=args.division, status=args.status)
    print(f"submission: {out}   next: batchscale check {out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from bench import compliance  # imports mlperf_logging, which loads numpy: not at parser time

    root = require_package_folder(args.submission)
    reference = None if args.reference is None else require_package_folder(args.reference, "reference")
    problems = compliance.check_submission(root, reference=reference)
    for p in problems:
        print(f"VIOLATION: {compliance.printable(p)}")
    print(f"{compliance.printable(str(root))}: {len(problems)} violation(s)" if problems
          else f"{compliance.printable(str(root))}: clean")
    return 1 if problems else 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `submit`, `check` and `compare` to the batchscale parser."""
    p = sub.add_parser("submit", help="package complete runs as an MLPerf-style submission folder")
    p.add_argument("results", nargs="+", help="results folders (a sweep's, or a folder of them)")
    p.add_argument("--system", required=True, help="cluster YAML describing the system, e.g. clusters/aws-h100.yaml")
    p.add_argument("-o", "--output", required=True, help="new folder, e.g. results/submissions/NAME/")
    p.add_argument("--submitter", default="unknown", help="organisation (MLPerf submission_org)")
    p.add_argument("--division", choices=DIVISIONS, default="open")
    p.add_argument("--status", choices=tuple(STATUSES), default=DEFAULT_STATUS,
                   help="MLPerf system status: onprem / cloud (available on premises / in a cloud), preview, "
                        "rdi (research, development or internal; the default)")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("check", help="check a submission (MLPerf's compliance rules included); "
                                     "exit 1 listing every violation")
    p.add_argument("submission")
    p.add_argument("--reference", help="reference submission for the convergence (RCP) check")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("compare", help="side-by-side table of submissions (time/epochs-to-target, throughput)")
    p.add_argument("submissions", nargs="+")
    p.add_argument("-o", "--output", help="also write an HTML page, e.g. reports/compare.html")
    p.set_defaults(func=compare.cmd_compare)
