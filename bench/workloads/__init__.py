"""Workload registry: the one place to add a dataset.

Owns: the registered workloads (the tabular ones here, the image ones from
``vision_catalog.ENTRIES``): names, option models (validated with the sweep file),
sizes (so the config can refuse a global batch larger than the training set before
Ray starts), default model, where the loader lives; and ``load()``, which imports a
loader lazily and keeps the last set a process loaded. The types and the table are in
``bench.workloads.registry``, which the catalogs import instead of this package.

Must not import at module level: torch, torchvision, ray, pandas (config validation
runs without them).

A loader is ``load(options: <OptionsModel>, seed: int) -> Data | StreamingData`` (docs/workloads.md).
"""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bench.workloads import lm_catalog, vision_catalog
from bench.workloads.registry import REGISTRY, NoOptions, WorkloadInfo, get, register

__all__ = ["REGISTRY", "NoOptions", "WorkloadInfo", "DigitsOptions", "get", "register", "load"]


class DigitsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="stratified held-out share")


_LAST: tuple[tuple, Any] | None = None  # (key, data) of the last load in this process


def load(name: str, options: BaseModel, seed: int = 0):
    """The workload's data. A worker group runs many runs of one sweep in the same processes, so
    the last load is kept and handed out again for the same workload and options (and seed, for
    a seeded loader): 21 runs of a shapes sweep generate the set once, not 21 times (2.3 s each
    on a 2-core VM), and ImageNet's 1.28M-file folder is scanned once per process. Loaders
    return fresh objects that no consumer modifies in place, so sharing them is safe."""
    global _LAST
    info = REGISTRY[name]
    key = (name, options.model_dump_json(), seed if info.seeded else None)
    if _LAST is not None and _LAST[0] == key:
        return _LAST[1]
    module_name, func = info.loader.split(":")
    _LAST = None  # release the previous set before building the next one
    data = getattr(importlib.import_module(module_name), func)(options, seed)
    _LAST = (key, data)
    return data


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

for _info in vision_catalog.ENTRIES:  # cifar10, cifar100, imagenet, shapes, synthetic
    register(_info)

register(lm_catalog.ENTRY)  # language models: batches in tokens
