"""Where a step's samples come from: tensors resident on the device, or a streamed dataset.

Owns: turning one optimizer step of a ``RunPlan`` into this rank's micro-batches on the
device (sharding, augmentation, memory format), and the batches an evaluation pass reads.

- ``MemoryFeed`` serves ``Data`` (digits, CIFAR, shapes, synthetic): both splits are moved to
  the device once; a step gathers its indices there and augments on the device.
- ``bench.lm.feed.LMFeed`` serves ``bench.lm.corpus.LMData`` (workload lm): token micro-batches
  of whole sequences, counted in tokens (``make_feed`` builds it from the sweep's options).
- ``StreamFeed`` serves ``StreamingData`` (ImageNet): DataLoader processes decode this rank's
  share of each step into pinned uint8 batches, which cross PCIe as uint8 and are normalised
  on the device; or they only read the files, and the batch is decoded and cropped on the
  device (nvjpeg on CUDA).

Both shard alike: step s of epoch e takes the s-th global batch of ``epoch_permutation(seed,
e)``, and rank r takes its positions r, r + W, r + 2W, ... So the same samples reach the same
steps whichever feed reads them (a test trains once through each and compares the weights).

Must not import: ray, pandas.
"""

from __future__ import annotations

from typing import Iterator, Union

import torch

from bench.augment import random_crop_flip
from bench.lm.corpus import LMData
from bench.plan import RunPlan
from bench.workloads.data import Data, epoch_permutation

EVAL_CHUNK = 2048  # samples per forward pass when evaluating resident data
STREAM_EVAL_BATCH = 256  # images per evaluation batch read from disk (one DataLoader item)

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels) on the device


def step_indices(perm: torch.Tensor, step: int, plan: RunPlan, rank: int) -> tuple[torch.Tensor, int]:
    """This rank's sample indices for one optimizer step, and the step's global sample count.
    The step takes the next global batch of the epoch's permutation (the last one may be
    partial); rank r takes every world_size-th index, so ranks differ by at most one sample."""
    start = step * plan.global_batch_size
    batch = perm[start:start + plan.global_batch_size]
    return batch[rank::plan.num_workers], int(batch.numel())


def global_count(plan: RunPlan, step: int) -> int:
    """Samples in the global batch of step ``step`` of an epoch (the last may be partial)."""
    return max(0, min(plan.global_batch_size, plan.num_train - step * plan.global_batch_size))


class MemoryFeed:
    """Both splits resident on the device; a step is an index gather (+ crop/flip there)."""

    def __init__(self, data: Data, plan: RunPlan, rank: int, world_size: int, device: torch.device,
                 channels_last: bool = False, train_eval_samples: int | None = None) -> None:
        self.plan, self.rank, self.world_size, self.device = plan, rank, world_size, device
        self.data = data.to(device)
        self.channels_last = channels_last and self.data.x_train.dim() == 4
        if self.channels_last:
            self.data.x_train = self.data.x_train.contiguous(memory_format=torch.channels_last)
            self.data.x_test = self.data.x_test.contiguous(memory_format=torch.channels_last)
        self.input_shape = tuple(self.data.x_train.shape[1:])
        self.num_classes = self.data.num_classes
        # The train metrics' samples: the whole set, or a fixed evenly spaced subset (bounds what
        # frequent evaluation costs; the count is logged as train_eval_samples).
        num = self.data.num_train if train_eval_samples is None else min(train_eval_samples, self.data.num_train)
        self._train_eval_index = None if num == self.data.num_train else torch.linspace(
            0, self.data.num_train - 1, num, device=self.data.y_train.device).round().long()
        self.train_eval_samples = num

    def steps(self, epoch: int, count: int) -> Iterator[tuple[Iterator[Batch], int]]:
        """The first ``count`` steps of ``epoch``: (this rank's micro-batches, global sample count)."""
        perm = epoch_permutation(self.plan.num_train, self.plan.seed, epoch).to(self.device, non_blocking=True)
        for s in range(count):
            local, num_global = step_indices(perm, s, self.plan, self.rank)
            yield self._micro_batches(local), num_global

    def _micro_batches(self, local: torch.Tensor) -> Iterator[Batch]:
        # Gathered one micro-batch at a time: only a micro-batch of inputs is ever materialised.
        for idx in local.tensor_split(self.plan.grad_accum_steps):
            x = self.data.x_train[idx]
            if self.data.augment == "crop_flip":
                x = random_crop_flip(x)
            yield x, self.data.y_train[idx]

    def eval_batches(self, split: str) -> Iterator[Batch]:
        """This rank's strided share of the split (the training subset, if one is set), in chunks."""
        x, y = (self.data.x_train, self.data.y_train) if split == "train" else (self.data.x_test, self.data.y_test)
        idx = torch.arange(self.rank, y.shape[0], self.world_size, device=y.device)
        if split == "train" and self._train_eval_index is not None:
            idx = self._train_eval_index[self.rank::self.world_size]
        for chunk in idx.split(EVAL_CHUNK):
            yield x[chunk], y[chunk]

    def close(self) -> None:
        self.data = None


class StreamFeed:
    """Batches read by DataLoader processes (bench.workloads.streaming.StreamingData): decoded
    there, or decoded on the device by the data's batch decoder (crops seeded per rank)."""

    def __init__(self, data, plan: RunPlan, rank: int, world_size: int, device: torch.device,
                 channels_last: bool = False) -> None:
        self.plan, self.rank, self.world_size, self.device = plan, rank, world_size, device
        self.data, self.channels_last = data, channels_last and len(data.input_shape) == 3
        self.input_shape, self.num_classes = tuple(data.input_shape), data.num_classes
        self.train_eval_samples = len(data.train_eval)
        self.crop_rng = torch.Generator().manual_seed(plan.seed * 1_000_003 + rank)  # crops decoded on the device
        self.loader = data.train_loader(global_batch_size=plan.global_batch_size,
                                        steps_per_epoch=plan.steps_per_epoch, rank=rank,
                                        num_replicas=world_size, seed=plan.seed)

    def _to_device(self, images, labels: torch.Tensor, train: bool) -> Batch:
        x = self.data.to_device(images, self.device, channels_last=self.channels_last, train=train,
                                rng=self.crop_rng)
        return x, labels.to(self.device, non_blocking=True)

    def steps(self, epoch: int, count: int) -> Iterator[tuple[Iterator[Batch], int]]:
        self.loader.batch_sampler.set_epoch(epoch)
        batches = iter(self.loader)
        for s in range(count):
            images, labels = next(batches)
            x, y = self._to_device(images, labels, train=True)
            accum = self.plan.grad_accum_steps
            yield zip(x.tensor_split(accum), y.tensor_split(accum)), global_count(self.plan, s)

    def eval_batches(self, split: str) -> Iterator[Batch]:
        loader = self.data.eval_loader(split, batch_size=STREAM_EVAL_BATCH, rank=self.rank,
                                       num_replicas=self.world_size)
        for images, labels in loader:
            yield self._to_device(images, labels, train=False)

    def close(self) -> None:
        """Stop the training loader's persistent processes now rather than at garbage collection:
        a worker group runs many runs, and each would otherwise leave its decoders behind."""
        iterator = getattr(self.loader, "_iterator", None)  # where DataLoader keeps persistent workers
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader = None


Feed = Union[MemoryFeed, StreamFeed]


def make_feed(data, plan: RunPlan, rank: int, world_size: int, device: torch.device,
              channels_last: bool = False, *, train_eval_samples: int | None = None, options=None) -> Feed:
    """The feed for a workload's data. ``train_eval_samples`` applies to resident data and to a
    language model's tokens (streamed ImageNet has its own workload option for it); ``options``
    (the sweep's workload options) say how a language model batches its tokens."""
    if isinstance(data, LMData):
        from bench.lm.feed import LMFeed
        from bench.lm.workload import batch_spec

        spec = batch_spec(options, plan.global_batch_size, plan.num_workers, plan.grad_accum_steps, plan.seed)
        return LMFeed(data, spec, rank, world_size, device, train_eval_tokens=train_eval_samples,
                      val_eval_tokens=options.val_eval_tokens)
    if isinstance(data, Data):
        return MemoryFeed(data, plan, rank, world_size, device, channels_last, train_eval_samples)
    return StreamFeed(data, plan, rank, world_size, device, channels_last)
