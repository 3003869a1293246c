"""Shared fixtures. Ray starts once per session, and only for tests that ask for it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# Ray Train gives a worker group 60 s to start; two cold workers on 2 busy CI cores can need
# more. Set for the whole session, so the driver subprocesses the tests start inherit it too.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models on a shared 2-core machine: extra intra-op threads only spin (measured: a
    2->50->3 MLP step took 30 ms with the default threads under load, 1 ms with one)."""
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session. 4 logical CPUs on a 2-core machine: the trainer
    controller takes none under Train V2, and two 1-CPU workers must fit alongside."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY_SWEEP = """\
name: tiny
workload: blobs
lr: {reference_lr: 0.01, reference_batch_size: 32, scaling: none}
epochs: 3
global_batch_sizes: [32, 64]
num_workers: [1]
seeds: [0]
target_accuracy: 0.5
"""


@pytest.fixture
def tiny_sweep(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "tiny.yaml", TINY_SWEEP)
