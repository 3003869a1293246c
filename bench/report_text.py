"""The report's header: what a set of runs ran, on what, and what the cluster files claimed.

Owns: the "What was run" and "On what" key-value tables (from each run's config, plan,
environment fingerprints and, through bench.provenance, what the workers saw), the list of
provenance warnings, and ``esc``: the one HTML escape every report module uses for text that
comes from a config or a result.

Must not import: torch, ray, pyplot, pandas.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Iterable

from bench import events as ev
from bench.provenance import describe_seen, hardware_mismatches, hardware_seen
from bench.records import RunRecord

MAX_VALUES = 4  # distinct environment values shown per field before "and N more"


def esc(value: Any) -> str:
    """Escape anything for HTML text or attribute context; unknown (None/NaN) becomes 'unknown'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "unknown"
    return html.escape(str(value), quote=True)


def _get(d: dict | None, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        flat.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return flat


def _distinct(values: Iterable[Any]) -> str:
    seen = list(dict.fromkeys(str(v) for v in values if v not in (None, "", [])))
    if not seen:
        return "unknown"
    more = f" and {len(seen) - MAX_VALUES} more" if len(seen) > MAX_VALUES else ""
    return ", ".join(seen[:MAX_VALUES]) + more


def _setting(record: RunRecord, config_key: str, plan_key: str | None = None) -> Any:
    value = _get(record.config, config_key)
    return record.plan.get(plan_key) if value is None and plan_key else value


def _warmup(record: RunRecord) -> str | None:
    steps, epochs = _get(record.config, "lr.warmup_steps"), _get(record.config, "lr.warmup_epochs")
    if steps is not None:
        return f"{steps} steps"
    epochs = record.plan.get("warmup_epochs") if epochs is None else epochs
    return None if epochs is None else f"{epochs:g} epochs"


def run_setup(records: list[RunRecord]) -> dict[str, str]:
    """What a sweep ran, from its config (the plan where the config lacks a key)."""
    def one(config_key: str, plan_key: str | None = None) -> str:
        return _distinct(_setting(r, config_key, plan_key) for r in records)

    def planned(key: str) -> str:
        return _distinct(sorted({r.plan.get(key) for r in records if r.plan.get(key) is not None}))

    setup = {
        "description": one("description"), "workload": one("workload", "workload"), "model": one("model", "model"),
        "optimizer": one("optimizer.name"), "LR scaling rule": one("lr.scaling", "scaling"),
        "reference LR at reference batch":
            f"{one('lr.reference_lr', 'reference_lr')} at {one('lr.reference_batch_size', 'reference_batch_size')}",
        "warmup": _distinct(_warmup(r) for r in records), "schedule": one("lr.schedule", "schedule"),
        "epochs": one("epochs", "epochs"), "target accuracy": one("target_accuracy"), "seeds": seeds_text(records),
        "global batch sizes": planned("global_batch_size"), "num_workers": planned("num_workers"),
        "train metrics on": _distinct(train_eval(r) for r in records), "runs": str(len(records)),
    }
    short = runs_short_of_plan(records)
    if short:
        setup["runs per batch (completed of planned)"] = short
    if any(r.plan.get("batch_unit") == "tokens" for r in records):  # a language model: tokens and a loss
        setup.update({"target loss (nats per token)": one("target_loss"), "context length": planned("context_length"),
                      "global batch sizes": planned("global_batch_size") + " tokens"})
        if one("max_tokens") != "unknown":
            setup["token budget per run"] = one("max_tokens")
        if setup["target accuracy"] == "unknown":
            del setup["target accuracy"]
    return setup


def seeds_text(records: list[RunRecord]) -> str:
    """'seed 0 (1 seed)' / 'seeds 0, 1, 2 (3)', and the config's list when some of it was not run."""
    ran = sorted({r.plan.get("seed") for r in records if isinstance(r.plan.get("seed"), int)})
    listed = sorted({s for r in records for s in (_get(r.config, "seeds") or []) if isinstance(s, int)})
    if not ran:
        return "unknown"
    text = f"seed {ran[0]} (1 seed)" if len(ran) == 1 else f"seeds {', '.join(map(str, ran))} ({len(ran)})"
    if set(listed) - set(ran):
        text += f"; the config lists {len(listed)}: {', '.join(map(str, listed))}"
    return text


def runs_short_of_plan(records: list[RunRecord]) -> str | None:
    """'128–512: 2 of 3 each; 1024–8192: 1 of 3 each' (completed runs of those the config's seeds x
    num_workers plan per batch), or None when every batch completed its plan (or the sweep is an
    LR search, which plans its own trials)."""
    if any(r.plan.get("stage") for r in records):
        return None
    counts: dict[int, tuple[int, int]] = {}
    for r in records:
        b = r.plan.get("global_batch_size")
        planned = len(_get(r.config, "seeds") or []) * len(_get(r.config, "num_workers") or [1])
        done, _ = counts.get(b, (0, 0))
        counts[b] = (done + (r.summary is not None), max(planned, counts.get(b, (0, 0))[1]))
    if not counts or all(done >= planned for done, planned in counts.values()):
        return None
    groups: list[list] = []  # [first batch, last batch, done, planned]
    for b in sorted(counts):
        if groups and tuple(groups[-1][2:]) == counts[b]:
            groups[-1][1] = b
        else:
            groups.append([b, b, *counts[b]])
    return "; ".join(f"{lo}{f'–{hi}' if hi != lo else ''}: {d} of {p}{' each' if hi != lo else ''}"
                     for lo, hi, d, p in groups)


def train_eval(record: RunRecord) -> str:
    """How many training samples the train accuracy/loss (hence the gap) were measured on. Runs
    logged before the train_eval_samples event existed always scored the whole set."""
    total = record.plan.get("num_train")
    scored = next((e.get("value") for e in record.events if e.get("key") == ev.TRAIN_EVAL_SAMPLES), total)
    return "the whole training set" if scored == total else f"{scored} of {total} training samples"


ENV_FIELDS = {  # label -> key names looked up (last path component, any case) in worker_env, env, cluster
    "cluster": ("name",), "GPU model": ("gpu_model", "gpu_name", "accelerator_model_name"),
    "driver": ("driver", "driver_version", "nvidia_driver"), "CUDA": ("cuda", "cuda_version"),
    "torch": ("torch", "torch_version"), "ray": ("ray", "ray_version"), "python": ("python", "python_version"),
    "git sha": ("git_sha", "git_commit", "sha"), "git dirty": ("git_dirty",), "host": ("hostname", "host"),
    "CPU": ("cpu_model",), "device": ("device",), "created (UTC)": ("created_utc", "created"),
}


def _env_lookup(record: RunRecord, names: tuple[str, ...], label: str) -> Any:
    sources = [record.cluster] if label == "cluster" else [record.worker_env, record.env, record.cluster]
    for source in sources:
        for key, value in _flatten(source).items():
            if key.split(".")[-1].lower() in names and value not in (None, ""):
                return value
    return None


def _claimed(record: RunRecord) -> str:
    cluster = record.cluster or {}
    hw = cluster.get("hardware") or {}
    per_node = hw.get("gpus_per_node") or 0
    gpus = f"{per_node} GPU(s) per node x {hw.get('nodes') or 1} node(s)" if per_node else "no GPU count"
    return f"use_gpu {str(bool(cluster.get('use_gpu'))).lower()}; {gpus}; GPU model {hw.get('gpu_model') or 'not given'}"


def environment(records: list[RunRecord]) -> dict[str, str]:
    env = {label: _distinct(_env_lookup(r, names, label) for r in records) for label, names in ENV_FIELDS.items()}
    shas = (_env_lookup(r, ENV_FIELDS["git sha"], "git sha") for r in records)
    env["git sha"] = _distinct(str(sha)[:12] for sha in shas if sha is not None)  # full: All environment keys
    if env["git sha"] != "unknown":
        env["git sha"] += " (first 12 characters; in full under All environment keys)"
    env["workers saw"] = _distinct(describe_seen(*hardware_seen(r)) for r in records)
    env["cluster file claims"] = _distinct(_claimed(r) for r in records)
    starts = [e["time_ms"] for r in records for e in r.events[:1] if isinstance(e.get("time_ms"), (int, float))]
    if starts:
        fmt_t = lambda ms: datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")  # noqa: E731
        env["runs started (UTC)"] = f"{fmt_t(min(starts))} to {fmt_t(max(starts))}"
    return env


def kv_table(columns: dict[str, dict[str, str]]) -> str:
    """Rows = field names, one column per sweep."""
    fields = list(dict.fromkeys(f for d in columns.values() for f in d))
    head = "".join(f"<th>{esc(s)}</th>" for s in columns)
    rows = "".join(f"<tr><th>{esc(f)}</th>" + "".join(f"<td>{esc(d.get(f, 'unknown'))}</td>" for d in columns.values())
                   + "</tr>" for f in fields)
    return f'<table class="kv"><thead><tr><th></th>{head}</tr></thead><tbody>{rows}</tbody></table>'


def all_env_keys(records: list[RunRecord]) -> str:
    keys: dict[str, list] = {}
    for r in records:
        for name, source in (("env", r.env), ("worker_env", r.worker_env)):
            for k, v in _flatten(source).items():
                keys.setdefault(f"{name}.{k}", []).append(v)
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_distinct(v)[:300])}</td></tr>" for k, v in sorted(keys.items()))
    return f'<details><summary>All environment keys</summary><table class="kv">{rows}</table></details>'


def provenance_warnings(records: list[RunRecord]) -> list[str]:
    """Each different hardware mismatch once, with the number of runs it concerns."""
    counts = Counter(m for r in records for m in hardware_mismatches(r))
    return [f"{m} ({n} run{'s' * (n != 1)})" for m, n in counts.items()]
