"""The ``lm`` workload's options and loader: which corpus, what context, how to batch.

Owns: ``LMOptions`` (the ``workload_options`` of a ``workload: lm`` sweep, validated with the
sweep file: a token folder that does not exist or has a bad meta.json is refused there), the
loader ``load_lm(options, seed)``, the split sizes in tokens (``lm_sizes``), the vocabulary
without loading (``lm_vocab_size``), the ``BatchSpec`` of one run (``batch_spec``), its steps
per epoch (``lm_steps_per_epoch``) and the batch shape ``bench.plan`` asks of a global batch in
tokens (``lm_run_shape``: what the plan needs before any worker starts).

Must not import: torch, ray, pandas (config validation runs without them).

The corpus never depends on the run seed (the Markov chain has its own ``chain_seed``), so
every seed and batch size of a sweep trains on the same tokens; the seed orders the batches.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bench.errors import PlanError, UserError
from bench.lm.batching import BatchSpec, Pieces, packed_pieces, steps_in_epoch, stream_pieces
from bench.lm.corpus import BYTE_VOCAB, LMData, load_python_docs, load_python_stdlib
from bench.lm.markov import load_markov
from bench.lm.tokenplan import check_bucket_lengths, split_global_tokens

Corpus = Literal["python-docs", "python-stdlib", "markov", "tokens"]


class MarkovOptions(BaseModel):
    """The generated corpus (bench.lm.markov.load_markov)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    num_states: int = Field(32, ge=2, le=65_535, description="tokens besides EOT")
    concentration: float = Field(0.2, gt=0.0, le=100.0, description="Dirichlet parameter of each row")
    mean_doc_tokens: int = Field(64, ge=2, le=1_000_000)
    num_train_tokens: int = Field(1_000_000, ge=1_000, le=1_000_000_000)
    num_val_tokens: int = Field(100_000, ge=100, le=100_000_000)
    chain_seed: int = Field(0, ge=0, le=2**31 - 1)


class LMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    corpus: Corpus = Field("python-docs", description="python-docs | python-stdlib | markov | tokens")
    token_dir: Optional[str] = Field(None, description="corpus tokens: the token folder (absolute path)")
    markov: MarkovOptions = MarkovOptions()
    val_fraction: float = Field(0.1, gt=0.0, le=0.5, description="python-docs / python-stdlib: held-out share")
    context_length: int = Field(128, ge=8, le=65_536, description="T: tokens per sequence")
    batching: Literal["pack", "bucket"] = Field("pack", description="fixed-context packing or length buckets")
    bucket_lengths: Optional[tuple[int, ...]] = Field(None, description="bucket: padded lengths, ending at T")
    val_eval_tokens: Optional[int] = Field(None, ge=1, description="validation targets evaluated (None: all)")

    @model_validator(mode="after")
    def _consistent(self) -> "LMOptions":
        given = self.model_fields_set
        if (self.corpus == "tokens") != (self.token_dir is not None):
            raise ValueError("token_dir: give it exactly when corpus is 'tokens'")
        if "markov" in given and self.corpus != "markov":
            raise ValueError("markov: only for corpus 'markov'")
        if "val_fraction" in given and self.corpus not in ("python-docs", "python-stdlib"):
            raise ValueError("val_fraction: only for the python-docs and python-stdlib corpora (a token "
                             "folder and the Markov corpus carry their own validation split)")
        if self.bucket_lengths is not None:
            if self.batching != "bucket":
                raise ValueError("bucket_lengths: only with batching 'bucket'")
            try:
                check_bucket_lengths(self.bucket_lengths, self.context_length)
            except PlanError as err:
                raise ValueError(str(err)) from None
        if self.token_dir is not None:
            from bench.lm.tokenfile import read_meta  # the meta check only: no token is read here

            try:
                read_meta(Path(self.token_dir).expanduser())
            except UserError as err:
                raise ValueError(f"token_dir: {err}") from None
        return self


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


def lm_vocab_size(options: LMOptions) -> int:
    """The corpus's vocabulary, without reading its tokens (the memory probe's classes)."""
    if options.corpus == "markov":
        return options.markov.num_states + 1  # + EOT
    if options.corpus == "tokens":
        from bench.lm.tokenfile import read_meta

        return read_meta(Path(options.token_dir).expanduser()).vocab_size
    return BYTE_VOCAB


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
