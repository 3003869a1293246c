"""The ``lm`` workload's options and loader: which corpus, what context, how to batch.

Owns: the loader ``load_lm(options, seed)``, the split sizes in tokens (``lm_sizes``), the
``BatchSpec`` of one run (``batch_spec``), its steps per epoch (``lm_steps_per_epoch``) and the
batch shape ``bench.plan`` asks of a global batch in tokens (``lm_run_shape``: what the plan needs
before any worker starts). The options (``LMOptions``) are bench.lm.options', re-exported here.

Must not import: torch, ray, pandas.

The corpus never depends on the run seed (the Markov chain has its own ``chain_seed``), so
every seed and batch size of a sweep trains on the same tokens; the seed orders the batches.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from bench.errors import PlanError
from bench.lm.batching import BatchSpec, Pieces, packed_pieces, steps_in_epoch, stream_pieces
from bench.lm.corpus import LMData, load_python_docs, load_python_stdlib
from bench.lm.markov import load_markov
from bench.lm.options import LMOptions, MarkovOptions  # noqa: F401 (the workload's options, re-exported)
from bench.lm.tokenplan import split_global_tokens

def load_lm(options: LMOptions, seed: int = 0) -> LMData:
    """The corpus of a sweep (the same for every seed)."""
    if options.corpus == "python-docs":
        return load_python_docs(options.val_fraction)
    if options.corpus == "python-stdlib":
        return load_python_stdlib(options.val_fraction)
    if options.corpus == "markov":
        return load_markov(**options.markov.model_dump())
    from bench.lm.tokenfile import open_token_dir

    return open_token_dir(Path(options.token_dir).expanduser())


@lru_cache(maxsize=16)
def lm_sizes(options: LMOptions) -> tuple[int, int]:
    """(training tokens, validation tokens). Token folders and the Markov corpus say so without
    reading tokens; the Python corpora are read (10 ms for the docs, ~2 s for the stdlib)."""
    if options.corpus == "markov":
        return options.markov.num_train_tokens, options.markov.num_val_tokens
    if options.corpus == "tokens":
        from bench.lm.tokenfile import read_meta

        meta = read_meta(Path(options.token_dir).expanduser())
        return meta.num_tokens["train"], meta.num_tokens["val"]
    data = load_lm(options)
    return data.train.num_tokens, data.val.num_tokens


def batch_spec(options: LMOptions, global_batch_tokens: int, num_workers: int, grad_accum_steps: int,
               seed: int) -> BatchSpec:
    """How one run of the sweep batches its tokens."""
    return BatchSpec(context_length=options.context_length, global_batch_tokens=global_batch_tokens,
                     num_workers=num_workers, grad_accum_steps=grad_accum_steps, seed=seed,
                     packing=options.batching == "pack", bucket_lengths=tuple(options.bucket_lengths or ()))


@lru_cache(maxsize=4)
def _train_pieces(options: LMOptions) -> Pieces:
    data = load_lm(options)
    spec = batch_spec(options, options.context_length, 1, 1, 0)  # the pieces depend on T and mode only
    return stream_pieces(data.train.num_tokens, data.train.doc_starts, spec)


def lm_steps_per_epoch(options: LMOptions, spec: BatchSpec) -> int:
    """Optimizer steps in one epoch of a run, as ``LMFeed.steps_per_epoch`` will count them:
    from the token count alone when packing, from the corpus's document lengths with buckets
    (the corpus is read once per options in this process)."""
    if spec.packing:
        num_train, _ = lm_sizes(options)
        return steps_in_epoch(packed_pieces(num_train, spec.context_length), spec)
    return steps_in_epoch(_train_pieces(options), spec)


def lm_run_shape(options: LMOptions, global_batch_tokens: int, num_workers: int,
                 max_micro_batch_tokens: int | None) -> tuple[int, int, int, int]:
    """(per_worker_tokens, micro_batch_tokens, grad_accum_steps, steps_per_epoch) of a global
    batch in tokens: whole sequences of context_length per worker and micro-batch
    (``split_global_tokens``), and the optimizer steps of one epoch as the feed will count them.
    Raises PlanError with the numbers when they do not divide or no step fits in the corpus."""
    split = split_global_tokens(global_batch_tokens, options.context_length, num_workers, max_micro_batch_tokens)
    spec = batch_spec(options, global_batch_tokens, num_workers, split.grad_accum_steps, seed=0)
    spe = lm_steps_per_epoch(options, spec)  # the same for every seed: it orders batches, never counts them
    if spe < 1:
        raise PlanError(f"global_batch_tokens: {global_batch_tokens} tokens do not make one full step of the "
                        f"{options.corpus} corpus with {options.batching} batching")
    return split.per_worker_tokens, split.micro_batch_tokens, split.grad_accum_steps, spe
