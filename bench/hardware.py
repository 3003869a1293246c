"""What the workers actually ran on: provenance from the hardware, not from the cluster file.

Owns: one rank's view of its device and node (``rank_view``: GPU model, memory and UUID from
torch, the driver from NVML, host name, Ray node id, CPU model), the merge of all ranks' views
into ``bench.summary.HardwareSeen``, and ``worker_env.json`` (rank 0's software environment).
A cluster file may claim 8 GPUs per node on a one-GPU machine; a run records what it saw, and
the report and ``batchscale run`` warn where the two differ.

Must not import: ray, pandas. torch is imported here (the worker side); NVML lazily.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

import torch

from bench.fingerprint import cpu_model
from bench.summary import GpuSeen, HardwareSeen


def nvml_driver() -> Optional[str]:
    """The NVIDIA driver version from NVML, or None without one."""
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
            return version.decode() if isinstance(version, bytes) else str(version)
        finally:
            pynvml.nvmlShutdown()
    return None


def rank_view(device: torch.device, hostname: str, node_id: Optional[str] = None) -> dict[str, Any]:
    """This rank's device and node, as plain values (gathered to rank 0)."""
    view: dict[str, Any] = {"hostname": hostname, "node_id": node_id, "device_type": device.type,
                            "cpu_model": cpu_model(), "gpu": None, "driver": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        view["gpu"] = {"model": props.name, "memory_gib": props.total_memory / 2**30,
                       "uuid": "GPU-" + str(props.uuid)}
        view["driver"] = nvml_driver()
    return view


def merge_views(views: list[dict[str, Any]]) -> HardwareSeen:
    """All ranks' views -> what the run ran on: distinct nodes and GPUs (by UUID)."""
    nodes = sorted({v.get("node_id") or v["hostname"] for v in views})
    gpus: dict[str, GpuSeen] = {}
    for v in views:
        g = v.get("gpu")
        if g:
            gpus.setdefault(g.get("uuid") or f"rank-{len(gpus)}", GpuSeen(**g))
    drivers = sorted({v["driver"] for v in views if v.get("driver")})
    return HardwareSeen(num_workers=len(views), nodes=nodes, hostnames=sorted({v["hostname"] for v in views}),
                        device_type="cuda" if any(v["device_type"] == "cuda" for v in views) else "cpu",
                        gpus=list(gpus.values()), driver=", ".join(drivers) or None,
                        cpu_model=views[0].get("cpu_model") if views else None)


def worker_environment(device: torch.device, hostname: str, world_size: int) -> dict[str, Any]:
    """What rank 0 ran with: written as worker_env.json."""
    import torch.distributed as dist

    env: dict[str, Any] = {
        "hostname": hostname, "torch": torch.__version__, "device": str(device), "world_size": world_size,
        "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        "torch_num_threads": torch.get_num_threads(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_model=props.name, gpu_memory_gib=props.total_memory / 2**30,
                   gpu_uuid="GPU-" + str(props.uuid), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), driver=nvml_driver())
    return env
