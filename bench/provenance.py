"""Provenance: what the workers of a run actually ran on, against what its cluster file claims.

Owns: ``hardware_seen`` (the summary's ``hardware`` for v2 runs; for v1 runs rebuilt from rank 0's
``worker_env.json``: device, GPU model and UUID, host name) and ``hardware_mismatches`` (one
sentence per difference between that and the cluster file's ``use_gpu`` and ``hardware``
claims: ``gpu_model``, ``gpus_per_node``, ``nodes``). The report shows both and warns; the
driver (``batchscale run``) can warn at the end of a sweep with the same sentences.

A run sees only the GPUs its own workers use, so a claimed count larger than what was seen is
reported as unconfirmed by this run, not as false (results/shapes-gpu: cluster
single-node-multi-gpu claims 8 GPUs per node; every run saw the one H200 of host "vm").

Must not import: torch, ray, pandas.
"""

from __future__ import annotations

import math
from typing import Any

from bench.summary import GpuSeen, HardwareSeen


def hardware_seen(record: Any) -> tuple[HardwareSeen | None, bool]:
    """(what the workers ran on, partial). partial: rebuilt from rank 0's worker_env.json (v1
    runs), so the other ranks' GPUs and hosts are unknown when the run had more than one worker."""
    summary = record.summary
    if summary is not None and summary.hardware is not None:
        return summary.hardware, False
    env = record.worker_env or {}
    device = str(env.get("device") or "")
    if not device:
        return None, True
    host = env.get("hostname")
    workers = env.get("world_size") or (record.plan or {}).get("num_workers") or 1
    gpus = []
    if device.startswith("cuda") and env.get("gpu_model"):
        memory = env.get("gpu_memory_gib")
        gpus = [GpuSeen(model=str(env["gpu_model"]), memory_gib=float(memory) if memory is not None else math.nan,
                        uuid=env.get("gpu_uuid"))]
    seen = HardwareSeen(num_workers=int(workers), nodes=[str(host)] if host else [],
                        hostnames=[str(host)] if host else [],
                        device_type="cuda" if device.startswith("cuda") else "cpu", gpus=gpus,
                        driver=env.get("driver"), cpu_model=(record.env or {}).get("cpu_model"))
    return seen, int(workers) > 1


def describe_seen(seen: HardwareSeen | None, partial: bool = False) -> str:
    """'1 GPU (NVIDIA H200) on 1 host (vm)' / 'CPU on 1 host (vm)'; 'unknown' without a record."""
    if seen is None:
        return "unknown"
    hosts = seen.hostnames or seen.nodes
    where = f"{len(hosts)} host{'s' * (len(hosts) != 1)} ({', '.join(hosts)})" if hosts else "an unknown host"
    rank0 = " (rank 0 only)" if partial else ""
    if seen.device_type == "cpu":
        return f"CPU on {where}{rank0}"
    models = ", ".join(sorted({g.model for g in seen.gpus})) or "model unknown"
    n = len(seen.gpus)
    return f"{n} GPU{'s' * (n != 1)} ({models}) on {where}{rank0}"


def _claims(record: Any) -> tuple[str, bool | None, dict]:
    cluster = record.cluster or {}
    return str(cluster.get("name") or "?"), cluster.get("use_gpu"), cluster.get("hardware") or {}


def _model_matches(claim: str, seen: list[GpuSeen]) -> bool:
    c = claim.lower()
    return any(c in g.model.lower() or g.model.lower() in c for g in seen)


def hardware_mismatches(record: Any) -> list[str]:
    """One sentence per way the cluster file's claims differ from what the run's workers saw
    (empty when they agree or nothing was recorded to compare with)."""
    seen, partial = hardware_seen(record)
    name, use_gpu, hw = _claims(record)
    if seen is None:
        return []
    out = []
    where = f"cluster file {name!r}"
    said = describe_seen(seen, partial)
    if use_gpu is True and seen.device_type == "cpu":
        out.append(f"{where} has use_gpu: true, but the workers ran on the CPU ({said})")
    elif use_gpu is False and seen.device_type == "cuda":
        out.append(f"{where} has use_gpu: false, but the workers used {said}")
    if seen.device_type != "cuda":
        return out
    claimed_model = hw.get("gpu_model")
    if claimed_model and seen.gpus and not _model_matches(str(claimed_model), seen.gpus):
        out.append(f"{where} claims GPU model {claimed_model}; the workers saw {said}")
    per_node, nodes = int(hw.get("gpus_per_node") or 0), int(hw.get("nodes") or 1)
    workers = int((record.plan or {}).get("num_workers") or seen.num_workers)
    if per_node > 0:
        total = per_node * nodes
        claim = f"{total} GPUs ({per_node} per node x {nodes} node{'s' * (nodes != 1)})"
        if workers > total:
            out.append(f"the run used {workers} workers, more than the {claim} that {where} claims")
        elif not partial and len(seen.gpus) != total:
            out.append(f"{where} claims {claim}; this run's {workers} worker{'s' * (workers != 1)} saw {said}"
                       + (" (more GPUs than claimed)" if len(seen.gpus) > total else
                          ", so the claimed count is unconfirmed"))
    seen_nodes = len(set(seen.nodes)) if seen.nodes else 0
    if seen_nodes > nodes:
        out.append(f"{where} claims {nodes} node{'s' * (nodes != 1)}; the workers ran on {seen_nodes}")
    return out
