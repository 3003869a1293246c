"""The value a workload loader returns: tensors that fit in memory, on the CPU.

Owns: the ``Data`` container and deterministic per-rank sharding of an epoch.
The worker moves the tensors to its device once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Data:
    x_train: torch.Tensor  # float32, (N, ...) already normalised
    y_train: torch.Tensor  # int64, (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: str = "none"  # "none" | "crop_flip" (images, done on the device by the worker)

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.y_test.shape[0])

    def to(self, device: torch.device) -> "Data":
        return Data(self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                    self.y_test.to(device), self.num_classes, self.augment)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The same order on every rank (DistributedSampler-style): seeded by (seed, epoch)."""
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=g)
