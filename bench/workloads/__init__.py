"""Workload registry: the one place to add a dataset.

Owns: workload names, their option models (validated with the sweep file), their
sizes (so the config can refuse a global batch larger than the training set
before Ray starts), default model, and where the loader lives.

Must not import at module level: torch, ray, pandas (config validation runs
without them). Loaders are imported lazily by ``load()``.

A loader is ``load(options: <OptionsModel>, seed: int) -> bench.workloads.data.Data``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DigitsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="stratified held-out share")


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


REGISTRY: dict[str, WorkloadInfo] = {}


def register(info: WorkloadInfo) -> WorkloadInfo:
    REGISTRY[info.name] = info
    return info


def get(name: str) -> WorkloadInfo:
    return REGISTRY[name]


def load(name: str, options: BaseModel, seed: int = 0):
    module_name, func = REGISTRY[name].loader.split(":")
    return getattr(importlib.import_module(module_name), func)(options, seed)


def _digits_sizes(opts: DigitsOptions) -> tuple[int, int]:
    # sklearn's train_test_split rounds the test share up: ceil(0.2 * 1797) = 360.
    import math

    num_test = math.ceil(1797 * opts.test_fraction)
    return 1797 - num_test, num_test


register(WorkloadInfo(
    name="blobs",
    description="3-class Gaussian blobs (sklearn make_blobs, random_state=2), 500 train / 500 test",
    options=NoOptions, default_model="mlp", models=("mlp",), num_classes=3,
    sizes=lambda _o: (500, 500), loader="bench.workloads.tabular:load_blobs"))

register(WorkloadInfo(
    name="digits",
    description="scikit-learn's shipped 8x8 handwritten digits (1797 images), stratified fixed split",
    options=DigitsOptions, default_model="mlp", models=("mlp", "small_cnn"), num_classes=10,
    sizes=_digits_sizes, loader="bench.workloads.tabular:load_digits"))


from bench.workloads import vision_catalog  # noqa: E402,F401  (registers cifar, imagenet, shapes, synthetic)
