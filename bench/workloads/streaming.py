"""A workload too big for memory: Datasets read by DataLoader processes, sharded per step.

Owns: ``StreamingData`` (the streamed counterpart of ``bench.workloads.data.Data``: the
Dataset triple, the loaders that read it, and the move to the device), and the samplers
that give each rank exactly the samples the resident path would (``StepBatchSampler``) or
every sample once (``ShardSampler``). What an item is (decoded pixels, or the encoded file
for a batch decoder on the device) is the Dataset's business (``bench.workloads.imagenet``).

Must not import: ray, pandas, torchvision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bench.workloads.data import epoch_permutation


class BatchDecoder(Protocol):
    """Collates encoded items in the loader processes (into a few tensors, whatever the batch
    size), and turns such a batch into uint8 (N, C, H, W) on ``device``."""

    def collate(self, items: list[tuple[torch.Tensor, int]]) -> tuple[Any, torch.Tensor]: ...

    def __call__(self, batch: Any, device: torch.device, train: bool, rng: torch.Generator) -> torch.Tensor: ...


class StepBatchSampler(Sampler[list[int]]):
    """One index list per optimizer step: this rank's share of the global batch in the order
    of ``epoch_permutation(seed, epoch)``, positions rank, rank + R, rank + 2R, ... (exactly the
    resident-data path's sharding, ``bench.feed.step_indices``). Yields ``steps_per_epoch``
    lists (the plan's count; in a short final batch ranks differ by at most one sample)."""

    def __init__(self, num_samples: int, global_batch_size: int, steps_per_epoch: int,
                 rank: int, num_replicas: int, seed: int) -> None:
        self.num_samples, self.global_batch_size = num_samples, global_batch_size
        self.steps_per_epoch, self.rank, self.num_replicas = steps_per_epoch, rank, num_replicas
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_permutation(self.num_samples, self.seed, self.epoch)
        for step in range(self.steps_per_epoch):
            batch = order[step * self.global_batch_size:(step + 1) * self.global_batch_size]
            yield batch[self.rank::self.num_replicas].tolist()


class ShardSampler(Sampler[int]):
    """Evaluation: rank r reads r, r + R, r + 2R, ... — every sample exactly once, no padding,
    so summing (correct, count) over ranks gives the exact accuracy."""

    def __init__(self, num_samples: int, rank: int, num_replicas: int) -> None:
        self.indices = range(rank, num_samples, num_replicas)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


@dataclass
class StreamingData:
    """Datasets read by DataLoader processes — ``train`` (augmented), ``test``, and
    ``train_eval`` (training images with the evaluation transform, on which train accuracy is
    measured). How ``bench.feed.StreamFeed`` uses it::

        loader = data.train_loader(global_batch_size=..., steps_per_epoch=plan.steps_per_epoch,
                                   rank=rank, num_replicas=world_size, seed=plan.seed)
        for epoch in range(plan.epochs):
            loader.batch_sampler.set_epoch(epoch)
            for images, labels in loader:   # this rank's share of one global batch
                x = data.to_device(images, device, train=True, rng=...)  # float, normalised
                y = labels.to(device, non_blocking=True)

    Without a ``batch_decoder`` the items are uint8 CHW images, decoded and cropped by the loader
    processes; batches arrive in pinned memory (with CUDA) as uint8, a quarter of float32's
    bytes over PCIe, and are normalised on the device. With one, the items are encoded files and
    ``to_device`` decodes and crops the whole batch on the device (nvjpeg on CUDA).
    ``num_loader_workers`` processes per rank each keep ``prefetch_factor`` batches ready, and
    the training loader's persist across epochs. Split a per-rank batch into micro-batches on
    the device for accumulation.
    """

    train: Dataset
    test: Dataset
    train_eval: Dataset
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_shape: tuple[int, ...] = (3, 224, 224)  # one sample as the model sees it, for build_model
    num_loader_workers: int = 8
    prefetch_factor: int = 4
    augment: str = "none"  # augmentation happens in the train Dataset's transform (or the decoder)
    batch_decoder: Optional[BatchDecoder] = None

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_test(self) -> int:
        return len(self.test)

    def _loader_settings(self, seed: int, rank: int, persistent: bool = True) -> dict[str, Any]:
        busy = self.num_loader_workers > 0
        generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)  # seeds the loader processes
        collate: Optional[Callable] = self.batch_decoder.collate if self.batch_decoder is not None else None
        return dict(num_workers=self.num_loader_workers, pin_memory=torch.cuda.is_available(),
                    persistent_workers=busy and persistent, collate_fn=collate,
                    prefetch_factor=self.prefetch_factor if busy else None, generator=generator)

    def train_loader(self, *, global_batch_size: int, steps_per_epoch: int, rank: int,
                     num_replicas: int, seed: int) -> DataLoader:
        sampler = StepBatchSampler(self.num_train, global_batch_size, steps_per_epoch, rank, num_replicas, seed)
        return DataLoader(self.train, batch_sampler=sampler, **self._loader_settings(seed, rank))

    def eval_loader(self, split: str, *, batch_size: int, rank: int, num_replicas: int) -> DataLoader:
        """This rank's share of ``split`` ("train" = the ``train_eval`` view, or "test"), each image
        once. Its processes live for one pass only: an evaluation is rare, and persistent ones
        would hold two more sets of decoders per rank for the whole run."""
        dataset = self.train_eval if split == "train" else self.test
        return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, num_replicas),
                          **self._loader_settings(0, rank, persistent=False))

    def to_device(self, images: Any, device: torch.device | str,
                  channels_last: bool = False, *, train: bool = False,
                  rng: Optional[torch.Generator] = None) -> torch.Tensor:
        """A loader batch as float32 (N, C, H, W) on ``device``, normalised. Encoded batches are
        decoded there first, with the training or the evaluation transform; ``rng`` (a CPU
        generator) seeds the training crops, so the same generator state gives the same batch."""
        device = torch.device(device)
        if self.batch_decoder is not None:
            rng = rng if rng is not None else torch.Generator().manual_seed(0)
            pixels = self.batch_decoder(images, device, train, rng)
        else:
            pixels = images.to(device, non_blocking=True)
        x = pixels.float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        x = x.sub_(mean).div_(torch.tensor(self.std, device=x.device).view(1, -1, 1, 1))
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x
