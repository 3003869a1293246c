"""The value a workload loader returns: tensors that fit in memory, on the CPU.

Owns: the ``Data`` container, the per-channel normalisation the image loaders apply, and
the epoch permutation every rank shares. The worker moves the tensors to its device once.
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


def normalise(images_u8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (x / 255 - mean) / std per channel."""
    x = images_u8.float().div_(255.0)
    return x.sub_(torch.tensor(mean).view(1, -1, 1, 1)).div_(torch.tensor(std).view(1, -1, 1, 1))
