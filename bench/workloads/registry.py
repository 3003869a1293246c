"""The workload registry's types and table: what a workload is, and the table of them by name.

Owns: ``WorkloadInfo``, ``NoOptions``, ``REGISTRY`` with ``register``/``get``. The catalogs
(``bench.workloads`` for the tabular sets, ``bench.workloads.vision_catalog`` for the image
sets) import this module and nothing above it, so no catalog imports the package that imports
it (the ``workloads`` <-> ``vision_catalog`` cycle is gone).

Must not import: torch, torchvision, ray, pandas, any other bench module (config validation
imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class WorkloadInfo:
    name: str
    description: str
    options: type[BaseModel]
    default_model: str
    models: tuple[str, ...]
    num_classes: int
    sizes: Callable[[Any], tuple[int, int]]  # options -> (num_train, num_test)
    loader: str  # "module:function", imported lazily
    has_accuracy: bool = True  # False for throughput-only (synthetic) workloads
    seeded: bool = False  # True when the loader's data depend on the run seed (synthetic)


REGISTRY: dict[str, WorkloadInfo] = {}


def register(info: WorkloadInfo) -> WorkloadInfo:
    if info.name in REGISTRY and REGISTRY[info.name] != info:
        raise ValueError(f"workload {info.name!r} is registered twice")
    REGISTRY[info.name] = info
    return info


def get(name: str) -> WorkloadInfo:
    return REGISTRY[name]
