"""Compliance: check a packaged submission and list every violation (``batchscale check``).

Owns: what a submission must satisfy and the wording of each violation: no link or special file
anywhere in it, required files, checksums (every file listed, none outside, each within its
kind's size limit), ``system.json`` fields, MLPerf's own common training rules on every log
(bench.mlperf_rules), the log's header agreeing with system.json and run.json, the precision and
``config_filename`` lines agreeing with the run's config, ``run_stop`` in MLPerf's sense
(success iff the target was reached) with our own status matching summary.json, the LR rule
(peak LR and warmup recomputed with bench.plan from each run's config, compared with run.json and
every logged ``opt_learning_rate``), every declared seed present, and convergence against a
reference submission in the spirit of MLPerf's reference convergence points (RCP).
docs/submissions.md says what each check means and what it cannot say. Every read goes
through bench.submission_files / bench.safeio; a violation names a file, never quotes one.

Must not import: torch, ray, bench.cli, bench.submission (it imports this). pandas/numpy/scipy
(via bench.analysis) are imported inside functions.
"""

from __future__ import annotations

import typing

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

from mlperf_logging.mllog import constants as mlc

from bench.summary import RunStatus
from bench import events as ev
from bench import mlperf_rules, safeio, store
from bench import records
from bench import plan as plan_mod
from bench.mllog_export import (HEADER_KEYS, MLPERF_ABORTED, MLPERF_SUCCESS, precision_values,
                                run_stop_status)
from bench.submission_files import (CHECKSUMS, DIVISIONS, REQUIRED_SYSTEM_VALUES, STATUSES, SYSTEM_FIELDS,
                                    SYSTEM_JSON, Package, kind_of, load_submission, relative_message,
                                    require_package_folder, run_rel)

LR_REL_TOL = 1e-6
RCP_ALPHA = 0.05


def printable(text: str) -> str:
    """One line: whitespace runs collapsed, other control characters escaped (names in a
    package may hold anything)."""
    flat = " ".join(str(text).split())
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in flat)


# --- files, system, runs, LR, seeds -------------------------------------------------------

def check_submission(path: Path | str, *, reference: Path | str | None = None) -> list[str]:
    """Every violation found (empty: the submission passes). Raises UserError for a path that
    is not a submission folder (or is a symbolic link)."""
    package = load_submission(require_package_folder(path))
    problems = package.problems + _checksum_problems(package) + _system_problems(package.system)
    if not package.records:
        return problems + ["results/: no result logs"]
    usable = []
    for r in package.records:
        try:
            _check_positions(r.events)
            problems += _run_problems(r, package.system or {}) + _lr_problems(r) + _mlperf_problems(package, r)
            usable.append(r)
        except ODD_VALUES as err:
            problems.append(f"run {r.sweep}/{r.run_id}: {_odd(err)}")
    problems += _seed_problems(package.records)
    if reference is not None:
        ref = load_submission(require_package_folder(reference, "reference"))
        problems += [f"reference: {p}" for p in ref.problems]
        try:
            problems += convergence_problems(usable, ref.records)
        except ODD_VALUES as err:
            problems.append(f"convergence: not checked, {_odd(err)}")
    return problems


# What a well-formed log with values of the wrong type (an epoch_num that is a list, an accuracy
# of 10**400) raises in the arithmetic: a violation of its run, never a traceback.
ODD_VALUES = (TypeError, ValueError, ArithmeticError)


def _check_positions(events) -> None:
    """Raise TypeError when an event's position (epoch_num, step, samples_count) is not a number,
    OverflowError when a value is an integer beyond floating point: the arithmetic downstream
    would otherwise read either as unknown and say nothing."""
    for e in events:
        if isinstance(e.get("value"), int) and not isinstance(e.get("value"), bool):
            float(e["value"])
        for key in ("epoch_num", "step", "samples_count"):
            value = (e.get("metadata") or {}).get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"{key} is {type(value).__name__}")


def _odd(err: Exception) -> str:
    return f"the log holds values that are not usable as numbers ({type(err).__name__})"


def _digest(root: Path, rel: str) -> str:
    """sha256 of a package file, refused above its kind's size limit before a byte is read."""
    path = root / rel
    with safeio.open_regular(path, kind_of(rel), root=root):
        pass
    return safeio.sha256(path, root=root)


def _checksum_problems(package: Package) -> list[str]:
    root, inv = package.root, package.inventory
    if CHECKSUMS not in inv.files:
        return []  # missing or refused: already a problem of the package
    listed: dict[str, str] = {}
    malformed: list[str] = []
    try:
        for number, line in safeio.iter_lines(root / CHECKSUMS, "checksums", root=root):
            digest, sep, rel = line.partition("  ")
            if not line.strip():
                continue
            if not sep or not rel:
                malformed.append(f"checksums: line {number} is not '<sha256>  <path>'")
            elif Path(rel).is_absolute() or ".." in Path(rel).parts:  # never read beyond the submission
                malformed.append(f"checksums: {rel} points outside the submission folder")
            elif rel in listed:
                malformed.append(f"checksums: {rel} is listed twice")
            else:
                listed[rel] = digest
    except ValueError as err:
        return [f"checksums: {relative_message(err, root)}"]
    files = set(inv.files)
    problems = malformed + [f"checksums: {rel} is listed but missing" for rel in listed
                            if rel not in files and rel not in inv.refused_paths]
    problems += [f"checksums: {rel} is not listed in {CHECKSUMS}" for rel in inv.files
                 if rel != CHECKSUMS and rel not in listed]
    for rel, digest in listed.items():
        if rel not in files:
            continue
        try:
            if _digest(root, rel) != digest:
                problems.append(f"checksums: {rel} was modified (sha256 differs)")
        except (ValueError, OSError) as err:  # safeio.UnsafeFile: too large, swapped for a link, ...
            problems.append(f"checksums: {relative_message(err, root)}")
    return problems


def _system_problems(system: dict | None) -> list[str]:
    if system is None:
        return []  # missing or unusable: already a problem of the package
    problems = [f"{SYSTEM_JSON}: field {k!r} missing" for k in SYSTEM_FIELDS if k not in system]
    problems += [f"{SYSTEM_JSON}: field {k!r} is empty" for k in REQUIRED_SYSTEM_VALUES
                 if k in system and system[k] in (None, "")]
    if system.get("division") not in (None, "", *DIVISIONS):
        problems.append(f"{SYSTEM_JSON}: division is not one of {', '.join(DIVISIONS)}")
    allowed = [words for words, _ in STATUSES.values()]
    if system.get("status") not in (None, "", *allowed):
        problems.append(f"{SYSTEM_JSON}: status is not one of MLPerf's " + ", ".join(map(repr, allowed)))
    return problems


def _header_problems(r: records.RunRecord, system: dict, first: dict[str, Any]) -> list[str]:
    """The log's header agrees with system.json and run.json (MLPerf's rules check it is there)."""
    name = f"run {r.sweep}/{r.run_id}"
    log_status = {words: word for words, word in STATUSES.values()}.get(system.get("status"))
    want = dict(zip(HEADER_KEYS, (system.get("submitter"), system.get("system_name"), system.get("division"),
                                  r.plan.get("workload"), log_status)))
    where = ("system.json submitter", "system.json system_name", "system.json division", "run.json workload",
             "system.json status")
    problems = [f"{name}: {key} in the log differs from {src}" for (key, value), src in zip(want.items(), where)
                if value is not None and key in first and first[key].get("value") != value]
    precision = r.config.get("precision", "fp32")
    problems += [f"{name}: {key} in the log does not match the config's precision {precision}"
                 for key, value in precision_values(r.config).items()
                 if key in first and first[key].get("value") != value]
    config_file = f"{run_rel(r.sweep, r.run_id)}/{store.CONFIG}"
    if mlc.CONFIG_FILENAME in first and first[mlc.CONFIG_FILENAME].get("value") != config_file:
        problems.append(f"{name}: {mlc.CONFIG_FILENAME} in the log is not {config_file}")
    return problems


def _run_problems(r: records.RunRecord, system: dict) -> list[str]:
    name, first = f"run {r.sweep}/{r.run_id}", {}
    for e in r.events:
        first.setdefault(e["key"], e)
    problems = _header_problems(r, system, first)
    stops = [e for e in r.events if e["key"] == ev.RUN_STOP]
    if not stops:
        return problems + [f"{name}: not complete (no run_stop line)"]
    md = stops[-1]["metadata"]
    want, extra = run_stop_status(r)
    if md.get("status") not in (MLPERF_SUCCESS, MLPERF_ABORTED):
        problems.append(f"{name}: run_stop status is not MLPerf's {MLPERF_SUCCESS} or {MLPERF_ABORTED}")
    elif md["status"] != want:
        reached = "an evaluation reached" if want == MLPERF_SUCCESS else "no evaluation reached"
        problems.append(f"{name}: run_stop status {md['status']}, but {reached} the target accuracy "
                        f"{extra['target_accuracy']}")
    ours, logged = extra["batchscale_status"], md.get("batchscale_status")
    if logged != ours:
        said = logged if logged in typing.get_args(RunStatus) else "something else"
        problems.append(f"{name}: summary.json status {ours!r}, log says {said}")
    return problems


def _mlperf_problems(package: Package, r: records.RunRecord) -> list[str]:
    """MLPerf's common training rules on the run's log, streamed a second time through safeio."""
    name, root, failed = f"run {r.sweep}/{r.run_id}", package.root, []

    def lines():
        try:
            for _, text in safeio.iter_lines(root / package.logs[(r.sweep, r.run_id)], "mllog", root=root):
                yield text
        except ValueError as err:  # changed since it was read: report that, not the rules
            failed.append(err)

    found = mlperf_rules.common_rule_failures(lines())
    if failed:
        return [f"{name}: {relative_message(failed[0], root)}"]
    return [f"{name}: MLPerf training {mlperf_rules.newest_ruleset()} common rules: {m}" for m in found]


def expected_plan(r: records.RunRecord) -> plan_mod.RunPlan:
    """The run's plan recomputed with bench.plan from its config (rule, base LR/batch, warmup,
    schedule) and the batch arithmetic in run.json; nothing declared is trusted."""
    p, cfg = plan_mod.RunPlan.from_dict(r.plan), r.config
    lr = cfg.get("lr") or {}
    ref_lr = lr.get("reference_lr", lr.get("base_lr"))  # base_*: the names before 2026-12
    ref_batch = lr.get("reference_batch_size", lr.get("base_batch_size"))
    spe, total, warmup, peak = plan_mod.run_schedule(
        p.num_train, p.global_batch_size, p.num_workers, p.grad_accum_steps,
        epochs=int(cfg.get("epochs", p.epochs)), max_steps=cfg.get("max_steps") or None,
        reference_lr=ref_lr, reference_batch_size=ref_batch, scaling=lr.get("scaling", "linear"),
        warmup_epochs=lr.get("warmup_epochs", 0.0), warmup_steps=lr.get("warmup_steps"))
    return dataclasses.replace(
        p, steps_per_epoch=spe, total_steps=total, scaling=lr.get("scaling", "linear"), reference_lr=ref_lr,
        reference_batch_size=ref_batch, peak_lr=peak, warmup_steps=warmup,
        schedule=lr.get("schedule", "constant"), milestones_epochs=tuple(lr.get("step_milestones_epochs", ())),
        gamma=lr.get("step_gamma", 0.1))


def _close(a: Any, b: float) -> bool:
    try:
        return math.isclose(float(a), b, rel_tol=LR_REL_TOL, abs_tol=1e-12)
    except (TypeError, ValueError, OverflowError):
        return False


def _step_of(event: dict) -> int:
    """The optimizer step an opt_learning_rate line names; -1 when absent or not a whole number."""
    step = (event.get("metadata") or {}).get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else -1


def _lr_problems(r: records.RunRecord) -> list[str]:
    name = f"run {r.sweep}/{r.run_id}"
    try:
        want = expected_plan(r)
    except (KeyError, TypeError, ValueError, ArithmeticError) as err:
        return [f"{name}: cannot recompute the LR rule from run.json/config.yaml ({type(err).__name__}: {err})"]
    rule = f"the {want.scaling} rule with {want.warmup_steps} warmup steps"
    problems = [f"{name}: run.json declares {k} {getattr(plan_mod.RunPlan.from_dict(r.plan), k)}, {rule} gives "
                f"{getattr(want, k)}" for k in ("peak_lr", "warmup_steps")
                if not _close(r.plan.get(k), getattr(want, k))]
    base = [e for e in r.events if e.get("key") == ev.OPT_BASE_LEARNING_RATE]
    if base and not _close(base[0].get("value"), want.peak_lr):
        problems.append(f"{name}: logged opt_base_learning_rate {_shown(base[0].get('value'))} but {rule} gives "
                        f"{want.peak_lr:.8g}")
    applied = [(_step_of(e), e.get("value")) for e in r.events if e.get("key") == ev.OPT_LEARNING_RATE]
    if not applied:
        return problems + [f"{name}: no opt_learning_rate lines: the applied LR cannot be checked"]
    stepless = sum(1 for s, _ in applied if s < 0)
    if stepless:
        problems.append(f"{name}: {stepless} opt_learning_rate line(s) without a whole-number step")
    try:
        wrong = [(s, v, want.lr(s)) for s, v in applied if s >= 0 and not _close(v, want.lr(s))]
    except (ArithmeticError, ValueError, TypeError) as err:  # a step no schedule reaches, e.g. 10**400
        return problems + [f"{name}: the LR rule cannot be evaluated at a logged step ({type(err).__name__})"]
    if wrong:
        s, v, w = wrong[0]
        problems.append(f"{name}: LR applied at step {s} was {_shown(v)}, {rule} gives {w:.8g} "
                        f"({len(wrong)} of {len(applied)} logged steps differ)")
    return problems


def _shown(value: Any) -> str:
    """A logged number as it was; anything else is not quoted (a violation never quotes a file)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.12g}" if isinstance(value, float) else str(value)[:40]
    return f"a {type(value).__name__}, not a number"


def _seed_problems(records: Sequence[records.RunRecord]) -> list[str]:
    """Every (global batch, workers) the sweep config declares has a run for every declared seed."""
    problems, by_sweep = [], {}
    for r in records:
        by_sweep.setdefault(r.sweep, []).append(r)
    for sweep, runs in sorted(by_sweep.items()):
        cfg = runs[0].config
        have = {(r.plan.get("global_batch_size"), r.plan.get("num_workers"), r.plan.get("seed")) for r in runs}
        seeds = list(cfg.get("seeds", [0]))
        for b in cfg.get("global_batch_sizes") or cfg.get("global_batch_tokens") or []:  # lm: tokens
            for w in cfg.get("num_workers", [1]):
                missing = [s for s in seeds if (b, w, s) not in have]
                if missing:
                    problems.append(f"sweep {sweep}: global batch {b} x {w} worker(s): {len(seeds) - len(missing)} "
                                    f"of {len(seeds)} declared seeds present (missing seeds {missing})")
    return problems


# --- convergence against a reference (RCP) ------------------------------------------------

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


def convergence_problems(records: Sequence[records.RunRecord], ref_records: Sequence[records.RunRecord]) -> list[str]:
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
