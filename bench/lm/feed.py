"""The feed a worker drives for a language model: this rank's token micro-batches on the device.

Owns: ``LMFeed``, the LM counterpart of ``bench.feed.MemoryFeed`` with the same interface:

- ``steps(epoch, count)`` yields ``(micro_batches, num_global)`` for the first ``count``
  steps of ``epoch``: ``micro_batches`` iterates over this rank's ``grad_accum_steps`` pairs
  ``(x, y)`` on the device (x int64 token ids (n, L), y the next-token ids, IGNORE_INDEX = -100
  at padding), and ``num_global`` is the number of targets (loss terms) of the whole global
  batch over all ranks: the step's loss is the sum over targets times num_workers / num_global,
  so the gradient is the mean over every target of the global batch.
- ``eval_batches(split)`` yields this rank's share of "val" ("test" is the same; all of it, or
  an evenly spaced subset of about ``val_eval_tokens`` targets) or "train" (a fixed, evenly
  spaced subset of about ``train_eval_tokens`` targets, by default as many as "val" has;
  ``train_eval_samples`` says how many).
- ``input_shape`` = (T,), ``num_classes`` = the vocabulary, ``channels_last`` = False,
  ``steps_per_epoch``, ``close()``.

Also ``run_facts``: the event lines a token run logs at its start (FLOPs per token, the corpus's
entropy floor). ``bench.feed.make_feed`` builds an LMFeed for ``LMData``.

"Samples" are tokens (targets) for an LM: ``train_eval_samples`` and every ``num_global``
count targets, so the worker's samples_count is tokens seen.

Tokens stay where the corpus keeps them (in memory, or memory-mapped from a token file) and
each micro-batch is gathered on the host just before it is needed, then copied to the device
(pinned, asynchronous, on CUDA): a step moves 16 bytes per token (x and y as int64), 16 MiB
at 2^20 tokens.

Must not import: ray, pandas.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from bench import events as ev
from bench.lm.batching import (BatchSpec, Pieces, epoch_batches, eval_plan, evenly_spaced, gather,
                               rank_micro_batches, steps_in_epoch, stream_pieces)
from bench.lm.corpus import LMData, TokenStream

Batch = tuple[torch.Tensor, torch.Tensor]


class LMFeed:
    def __init__(self, data: LMData, spec: BatchSpec, rank: int, world_size: int, device: torch.device,
                 eval_batch_tokens: int | None = None, train_eval_tokens: int | None = None,
                 val_eval_tokens: int | None = None) -> None:
        if world_size != spec.num_workers or not 0 <= rank < world_size:
            raise ValueError(f"LMFeed: rank {rank} of world {world_size} for a spec of {spec.num_workers} workers")
        self.data, self.spec, self.rank, self.world_size, self.device = data, spec, rank, world_size, device
        self.train_pieces = self._pieces(data.train)
        self.val_pieces = self._pieces(data.val)
        if len(self.train_pieces) == 0 or len(self.val_pieces) == 0:
            raise ValueError(f"LMFeed: corpus {data.name!r} has no training or validation sequence of "
                             f"context {spec.context_length}")
        self.steps_per_epoch = steps_in_epoch(self.train_pieces, spec)
        if self.steps_per_epoch == 0:
            raise ValueError(f"LMFeed: corpus {data.name!r} has {len(self.train_pieces)} training sequences, "
                             f"not one global batch of {spec.global_batch_tokens} tokens")
        # Evaluation batches as large as a training micro-batch (what fits), unless told otherwise.
        self.eval_batch_tokens = eval_batch_tokens or spec.global_batch_tokens // spec.min_sequences
        # Fixed, evenly spaced subsets: "val" all of it unless capped, "train" about as large.
        self.val_eval_idx = (np.arange(len(self.val_pieces)) if val_eval_tokens is None
                             else evenly_spaced(self.val_pieces, val_eval_tokens))
        val_targets = int(self.val_pieces.lengths[self.val_eval_idx].sum())
        self.train_eval_idx = evenly_spaced(self.train_pieces, train_eval_tokens or val_targets)
        self.input_shape = (spec.context_length,)
        self.num_classes = data.vocab_size
        self.channels_last = False
        self.train_eval_samples = int(self.train_pieces.lengths[self.train_eval_idx].sum())

    def _pieces(self, stream: TokenStream) -> Pieces:
        return stream_pieces(stream.num_tokens, None if self.spec.packing else stream.doc_starts, self.spec)

    def _to_device(self, x: np.ndarray, y: np.ndarray) -> Batch:
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        if self.device.type == "cuda":
            xt, yt = xt.pin_memory(), yt.pin_memory()
        return xt.to(self.device, non_blocking=True), yt.to(self.device, non_blocking=True)

    def _batch(self, stream: TokenStream, pieces: Pieces, idx: np.ndarray, length: int) -> Batch:
        return self._to_device(*gather(stream.tokens, pieces, idx, length, self.data.eot_token))

    def steps(self, epoch: int, count: int) -> Iterator[tuple[Iterator[Batch], int]]:
        """The first ``count`` steps of ``epoch``: (this rank's micro-batches, global target count)."""
        batches = epoch_batches(self.train_pieces, self.spec, epoch)
        if count > len(batches):
            raise ValueError(f"LMFeed: {count} steps asked of epoch {epoch}, which has {len(batches)}")
        for length, idx in batches[:count]:
            num_global = int(self.train_pieces.lengths[idx].sum())
            yield self._micro_batches(idx, length), num_global

    def _micro_batches(self, idx: np.ndarray, length: int) -> Iterator[Batch]:
        # Gathered one micro-batch at a time: only a micro-batch of tokens is ever materialised.
        for part in rank_micro_batches(idx, self.rank, self.world_size, self.spec.grad_accum_steps):
            yield self._batch(self.data.train, self.train_pieces, part, length)

    def eval_batches(self, split: str) -> Iterator[Batch]:
        """This rank's share of a split: "val" (or "test") and "train", each its fixed subset."""
        if split == "train":
            stream, pieces, idx = self.data.train, self.train_pieces, self.train_eval_idx
        elif split in ("val", "test"):
            stream, pieces, idx = self.data.val, self.val_pieces, self.val_eval_idx
        else:
            raise ValueError(f"LMFeed: unknown split {split!r} (train, val)")
        for length, part in eval_plan(pieces, idx, self.spec, self.rank, self.world_size, self.eval_batch_tokens):
            yield self._batch(stream, pieces, part, length)

    def close(self) -> None:
        self.data = None


def run_facts(feed: LMFeed, model: torch.nn.Module) -> list[tuple[str, float]]:
    """Event lines a language-model run logs at its start beside the hyperparameters: the model's
    training FLOPs per token (6 N, the basis of model FLOPs utilisation) and, for a generated
    corpus, the best achievable loss."""
    from bench.lm.model import train_flops_per_token

    out = []
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        out.append((ev.MODEL_FLOPS_PER_TOKEN, train_flops_per_token(cfg)))
    if feed.data is not None and feed.data.entropy_floor_nats is not None:
        out.append((ev.ENTROPY_FLOOR_NATS, feed.data.entropy_floor_nats))
    return out
