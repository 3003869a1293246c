"""Submissions: package stored runs MLPerf-style, check a package, compare packages.

Owns: the layout of a submission folder, ``system.json`` (MLPerf system-description fields), the
``:::MLLOG`` rendering of event logs with ``submission_*`` keys, the checksums, the compliance
checks (complete runs, LR rule applied, seeds, checksums, convergence against a reference in the
spirit of MLPerf's reference convergence points) and the side-by-side comparison; CLI commands
``submit``, ``check``, ``compare`` (``register``).

Must not import: torch, ray. pandas/numpy/scipy (via bench.analysis) are imported inside
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
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from bench import events as ev
from bench import plan as plan_mod
from bench import store

# MLPerf keys that events.py does not define yet (header of every result log).
SUBMISSION_ORG, SUBMISSION_PLATFORM = "submission_org", "submission_platform"
SUBMISSION_DIVISION, SUBMISSION_BENCHMARK = "submission_division", "submission_benchmark"
SUBMISSION_STATUS = "submission_status"
HEADER_KEYS = (SUBMISSION_ORG, SUBMISSION_PLATFORM, SUBMISSION_DIVISION, SUBMISSION_BENCHMARK)
MLLOG_PREFIX = ":::MLLOG "
DIVISIONS = ("open", "closed")
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
LR_REL_TOL = 1e-6
RCP_ALPHA = 0.05


def _user_error(message: str, code: int = 2) -> Exception:
    from bench.cli import UserError  # late: bench.cli imports this module to register commands

    return UserError(message, code)


# --- system description -------------------------------------------------------------------

def _distinct(values: Iterable[Any]) -> Any:
    """The one known value; several different ones joined with ' | '; None when none is known."""
    seen = sorted({str(v) for v in values if v not in (None, "")})
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
            raise _user_error(str(err)) from None
    corrupt = [str(w.message) for w in caught if issubclass(w.category, store.RunSkipped)]
    if corrupt:
        raise _user_error("corrupt run folders, refusing to submit: " + "; ".join(corrupt), 1)
    if not records:
        raise _user_error(f"no runs found under {', '.join(map(str, results_paths))}", 1)
    return records


def make_submission(results_paths: Sequence[Path | str], system_file: Path | str, out_dir: Path | str, *,
                    submitter: str, division: str = "open", status: str | None = None) -> Path:
    """Package complete runs into out_dir (built in a temp folder, renamed at the end)."""
    from bench import analysis
    from bench.config import ConfigError, load_cluster

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise _user_error(f"{out} exists and is not empty; choose a new submission folder")
    if division not in DIVISIONS:
        raise _user_error(f"division {division!r} is not one of {', '.join(DIVISIONS)}")
    try:
        cluster, cluster_path = load_cluster(system_file)
    except ConfigError as err:
        raise _user_error(str(err)) from None
    records = _load_records(results_paths)
    incomplete = [f"{r.sweep}/{r.run_id}" for r in records
                  if not r.complete or not any(e.get("key") == ev.RUN_STOP for e in r.events)]
    if incomplete:
        raise _user_error(f"{len(incomplete)} incomplete run(s), finish or remove them first: "
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def _write_checksums(root: Path) -> None:
    lines = [f"{_sha256(root / rel)}  {rel}" for rel in _files(root)]
    (root / CHECKSUMS).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _checksum_problems(root: Path) -> list[str]:
    listed: dict[str, str] = {}
    for line in (root / CHECKSUMS).read_text(encoding="utf-8").splitlines():
        digest, _, rel = line.partition("  ")
        if line.strip():
            listed[rel] = digest
    problems = [f"checksums: {rel} is listed but missing" for rel in listed if not (root / rel).is_file()]
    problems += [f"checksums: {rel} is not listed in {CHECKSUMS}" for rel in _files(root) if rel not in listed]
    problems += [f"checksums: {rel} was modified (sha256 differs)" for rel, digest in listed.items()
                 if (root / rel).is_file() and _sha256(root / rel) != digest]
    return problems


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
            opt = lambda n: json.loads((run / n).read_text()) if (run / n).is_file() else {}  # noqa: E731
            records.append(store.RunRecord(
                sweep=sweep, run_id=run_id, path=run, plan=opt(store.RUN_PLAN),
                config=yaml.safe_load((run / store.CONFIG).read_text()) or {},
                cluster=yaml.safe_load((run / store.CLUSTER).read_text()) if (run / store.CLUSTER).is_file() else {},
                env=opt(store.ENV), worker_env=opt(store.WORKER_ENV), summary=opt(store.SUMMARY),
                events=read_mllog(log)))
        except (OSError, ValueError, yaml.YAMLError) as err:
            problems.append(f"run {sweep}/{run_id}: unreadable ({err})")
    logged = {(p.parent.name, p.stem) for p in (root / "results").glob("*/*.log")}
    problems += [f"run {p.parent.name}/{p.name}: folder without a result log"
                 for p in sorted((root / "runs").glob("*/*")) if (p.parent.name, p.name) not in logged]
    return system, records, problems


# --- checks -------------------------------------------------------------------------------

def check_submission(path: Path | str, *, reference: Path | str | None = None) -> list[str]:
    """Every violation found (empty: the submission passes). See docs/clusters.md and the
    docstring of ``convergence_problems`` for exactly what each check means."""
    root = Path(path)
    if not root.is_dir():
        return [f"{root}: no submission folder"]
    problems = [f"{name}: required file missing" for name in (SYSTEM_JSON, CLUSTER_COPY, SUMMARY_CSV, CHECKSUMS)
                if not (root / name).is_file()]
    if (root / CHECKSUMS).is_file():
        problems += _checksum_problems(root)
    system, records, read_problems = load_submission(root)
    problems += read_problems + _system_problems(system)
    if not records:
        return problems + ["results/: no result logs"]
    for r in records:
        problems += _run_problems(r) + _lr_problems(r)
    problems += _seed_problems(records)
    if reference is not None:
        ref_system, ref_records, ref_problems = load_submission(reference)
        problems += [f"reference: {p}" for p in ref_problems]
        problems += convergence_problems(records, ref_records)
    return problems


def _system_problems(system: dict) -> list[str]:
    problems = [f"{SYSTEM_JSON}: field {k!r} missing" for k in SYSTEM_FIELDS if k not in system]
    problems += [f"{SYSTEM_JSON}: field {k!r} is empty" for k in REQUIRED_SYSTEM_VALUES
                 if k in system and system[k] in (None, "")]
    if system.get("division") not in (None, *DIVISIONS):
        problems.append(f"{SYSTEM_JSON}: division {system['division']!r} is not one of {', '.join(DIVISIONS)}")
    return problems


def _run_problems(r: store.RunRecord) -> list[str]:
    name, keys = f"run {r.sweep}/{r.run_id}", [e.get("key") for e in r.events]
    problems = [f"{name}: log has no {k} line" for k in HEADER_KEYS if k not in keys[:len(HEADER_KEYS) + 1]]
    stops = [e for e in r.events if e.get("key") == ev.RUN_STOP]
    status = (stops[-1].get("metadata") or {}).get("status") if stops else None
    if status != "success":
        problems.append(f"{name}: not complete (run_stop status {status or 'missing'})")
    elif (r.summary or {}).get("status") != "success":
        problems.append(f"{name}: summary.json status {(r.summary or {}).get('status')!r}, log says success")
    return problems


def expected_plan(r: store.RunRecord) -> plan_mod.RunPlan:
    """The run's plan recomputed with bench.plan from its config (rule, base LR/batch, warmup,
    schedule) and the batch arithmetic in run.json; nothing declared is trusted."""
    p, cfg = plan_mod.RunPlan.from_dict(r.plan), r.config
    lr = cfg.get("lr") or {}
    spe = plan_mod.steps_per_epoch(p.num_train, p.global_batch_size, p.num_workers, p.grad_accum_steps)
    total = spe * int(cfg.get("epochs", p.epochs))
    total = min(total, cfg["max_steps"]) if cfg.get("max_steps") else total
    warmup = lr["warmup_steps"] if lr.get("warmup_steps") is not None else round(lr.get("warmup_epochs", 0.0) * spe)
    peak = plan_mod.scaled_lr(lr["base_lr"], lr["base_batch_size"], p.global_batch_size, lr.get("scaling", "linear"))
    return dataclasses.replace(
        p, steps_per_epoch=spe, total_steps=total, scaling=lr.get("scaling", "linear"), reference_lr=lr["base_lr"],
        reference_batch_size=lr["base_batch_size"], peak_lr=peak, warmup_steps=warmup,
        schedule=lr.get("schedule", "constant"), milestones_epochs=tuple(lr.get("step_milestones_epochs", ())),
        gamma=lr.get("step_gamma", 0.1))


def _close(a: Any, b: float) -> bool:
    try:
        return math.isclose(float(a), b, rel_tol=LR_REL_TOL, abs_tol=1e-12)
    except (TypeError, ValueError):
        return False


def _lr_problems(r: store.RunRecord) -> list[str]:
    name = f"run {r.sweep}/{r.run_id}"
    try:
        want = expected_plan(r)
    except (KeyError, TypeError, ValueError) as err:
        return [f"{name}: cannot recompute the LR rule from run.json/config.yaml ({type(err).__name__}: {err})"]
    rule = f"the {want.scaling} rule with {want.warmup_steps} warmup steps"
    problems = [f"{name}: run.json declares {k} {getattr(plan_mod.RunPlan.from_dict(r.plan), k)}, {rule} gives "
                f"{getattr(want, k)}" for k in ("peak_lr", "warmup_steps")
                if not _close(r.plan.get(k), getattr(want, k))]
    base = [e for e in r.events if e.get("key") == ev.OPT_BASE_LEARNING_RATE]
    if base and not _close(base[0].get("value"), want.peak_lr):
        problems.append(f"{name}: logged opt_base_learning_rate {base[0]['value']} but {rule} gives "
                        f"{want.peak_lr:.8g}")
    applied = [(int((e.get("metadata") or {}).get("step", -1)), e.get("value"))
               for e in r.events if e.get("key") == ev.OPT_LEARNING_RATE]
    if not applied:
        return problems + [f"{name}: no opt_learning_rate lines: the applied LR cannot be checked"]
    wrong = [(s, v, want.lr(s)) for s, v in applied if s < 0 or not _close(v, want.lr(s))]
    if wrong:
        s, v, w = wrong[0]
        problems.append(f"{name}: LR applied at step {s} was {v}, {rule} gives {w:.8g} "
                        f"({len(wrong)} of {len(applied)} logged steps differ)")
    return problems


def _seed_problems(records: Sequence[store.RunRecord]) -> list[str]:
    """Every (global batch, workers) the sweep config declares has a run for every declared seed."""
    problems, by_sweep = [], {}
    for r in records:
        by_sweep.setdefault(r.sweep, []).append(r)
    for sweep, runs in sorted(by_sweep.items()):
        cfg = runs[0].config
        have = {(r.plan.get("global_batch_size"), r.plan.get("num_workers"), r.plan.get("seed")) for r in runs}
        seeds = list(cfg.get("seeds", [0]))
        for b in cfg.get("global_batch_sizes", []):
            for w in cfg.get("num_workers", [1]):
                missing = [s for s in seeds if (b, w, s) not in have]
                if missing:
                    problems.append(f"sweep {sweep}: global batch {b} x {w} worker(s): {len(seeds) - len(missing)} "
                                    f"of {len(seeds)} declared seeds present (missing seeds {missing})")
    return problems


def reference_points(ref_df) -> Any:
    """RCP table (global_batch_size, mean, std, n) from a reference's runs_frame: mean = olympic
    mean of epochs-to-target (a non-converged run counts as slowest), std (ddof 1) and n over the
    converged runs; batches smaller than the fastest-converging one are pruned, then (repeatedly)
    interior points slower than the linear interpolation of their neighbours."""
    import pandas as pd

    from bench.analysis import olympic_mean

    rows = [{"global_batch_size": b, "mean": olympic_mean(g["epochs_to_target"], missing_as_worst=True),
             "std": g["epochs_to_target"].std(ddof=1), "n": int(g["epochs_to_target"].notna().sum())}
            for b, g in ref_df.groupby("global_batch_size")]
    pts = pd.DataFrame(rows, columns=["global_batch_size", "mean", "std", "n"]).dropna(subset=["mean"])
    if pts.empty:
        return pts
    pts = pts[pts["global_batch_size"] >= pts.loc[pts["mean"].idxmin(), "global_batch_size"]].reset_index(drop=True)
    while len(pts) >= 3:
        b, m = pts["global_batch_size"].to_numpy(float), pts["mean"].to_numpy(float)
        slow = [i for i in range(1, len(pts) - 1)
                if m[i] > m[i - 1] + (m[i + 1] - m[i - 1]) * (b[i] - b[i - 1]) / (b[i + 1] - b[i - 1])]
        if not slow:
            break
        pts = pts.drop(index=slow[0]).reset_index(drop=True)
    return pts


def convergence_problems(records: Sequence[store.RunRecord], ref_records: Sequence[store.RunRecord]) -> list[str]:
    """MLPerf-RCP-style check of epochs-to-target, per workload and global batch size.

    Reference: ``reference_points``; mean and std interpolated with np.interp between reference
    batches (clamped below the smallest), n = the smaller n of the two neighbours; no RCP above
    the largest reference batch (not checked). Submission: olympic mean of epochs-to-target over
    its runs at that batch (any worker count; non-converged = slowest). At or above the
    reference mean it passes. Below, a one-sided equal-variance t-test (scipy
    ``ttest_ind_from_stats``, alternative 'less') of submission vs reference fails it when
    p < 0.05; with one converged submission run its std is 0, so the allowance is
    t(0.95, n_ref - 1) * std_ref * sqrt(1 + 1/n_ref). Without reference spread (n_ref < 2) any
    mean below the reference fails.
    """
    import numpy as np
    from scipy import stats

    from bench.analysis import olympic_mean, runs_frame

    df, ref = runs_frame(records), runs_frame(ref_records)
    problems = []
    for workload, sub in df.groupby("workload"):
        ref_w = ref[ref["workload"] == workload]
        if ref_w.empty:
            problems.append(f"convergence: the reference has no runs of workload {workload!r}")
            continue
        if set(sub["target_accuracy"].dropna()) != set(ref_w["target_accuracy"].dropna()):
            problems.append(f"convergence: {workload}: target accuracy {sorted(set(sub['target_accuracy']))} "
                            f"differs from the reference's {sorted(set(ref_w['target_accuracy']))}")
            continue
        pts = reference_points(ref_w)
        xb = pts["global_batch_size"].to_numpy(float)
        for b, g in sub.groupby("global_batch_size"):
            if pts.empty or b > xb.max():
                continue
            mean = olympic_mean(g["epochs_to_target"], missing_as_worst=True)
            ref_mean = float(np.interp(b, xb, pts["mean"]))
            if math.isnan(mean) or mean >= ref_mean:
                continue
            ref_std = float(np.interp(b, xb, pts["std"].fillna(0.0)))
            lo, hi = max(0, np.searchsorted(xb, b, "right") - 1), min(len(xb) - 1, np.searchsorted(xb, b))
            ref_n = int(min(pts["n"].iloc[lo], pts["n"].iloc[hi]))
            conv = g["epochs_to_target"].dropna()
            std = float(conv.std(ddof=1)) if len(conv) >= 2 else 0.0
            p = 0.0 if ref_n < 2 else float(stats.ttest_ind_from_stats(
                mean, std, len(conv), ref_mean, ref_std, ref_n, equal_var=True, alternative="less").pvalue)
            if ref_n < 2 or p < RCP_ALPHA:
                problems.append(
                    f"convergence: {workload} global batch {b}: epochs-to-target {mean:.4g} (olympic mean, "
                    f"n={len(conv)}) is faster than the reference {ref_mean:.4g} +/- {ref_std:.3g} (n={ref_n}) "
                    f"allows: one-sided t-test p={p:.3g} < {RCP_ALPHA}")
    return problems


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
            raise _user_error(f"{path}: no runs in this submission ({'; '.join(problems) or 'no results/ logs'})", 1)
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
    out = make_submission(args.results, args.system, args.output, submitter=args.submitter, division=args.division)
    print(f"submission: {out}   next: batchscale check {out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    if args.reference is not None and not Path(args.reference).is_dir():
        raise _user_error(f"no reference submission at {args.reference}")
    problems = check_submission(args.submission, reference=args.reference)
    for p in problems:
        print(f"VIOLATION: {p}")
    print(f"{args.submission}: {len(problems)} violation(s)" if problems else f"{args.submission}: clean")
    return 1 if problems else 0


def cmd_compare(args: argparse.Namespace) -> int:
    missing = [p for p in args.submissions if not Path(p).is_dir()]
    if missing:
        raise _user_error(f"no submission folder at {', '.join(missing)}")
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
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("check", help="check a submission; exit 1 listing every violation")
    p.add_argument("submission")
    p.add_argument("--reference", help="reference submission for the convergence (RCP) check")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("compare", help="side-by-side table of submissions (time/epochs-to-target, throughput)")
    p.add_argument("submissions", nargs="+")
    p.add_argument("-o", "--output", help="also write an HTML page, e.g. reports/compare.html")
    p.set_defaults(func=cmd_compare)
