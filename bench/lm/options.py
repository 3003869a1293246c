"""The ``lm`` workload's options: which corpus, what context, how to batch, validated with the sweep file.

Owns: ``LMOptions`` (the ``workload_options`` of a ``workload: lm`` sweep: a token folder that
does not exist or has a bad meta.json is refused there), ``MarkovOptions`` and the corpus's
vocabulary without reading its tokens (``lm_vocab_size``, what the memory probe needs).

Must not import: torch, ray, pandas, numpy, nor any bench.lm module that imports numpy, except
inside a function (config validation, and so building the CLI's parser, imports this module).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bench.errors import PlanError, UserError
from bench.lm.tokenplan import check_bucket_lengths

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


def lm_vocab_size(options: LMOptions) -> int:
    """The corpus's vocabulary, without reading its tokens (the memory probe's classes)."""
    if options.corpus == "markov":
        return options.markov.num_states + 1  # + EOT
    if options.corpus == "tokens":
        from bench.lm.tokenfile import read_meta

        return read_meta(Path(options.token_dir).expanduser()).vocab_size
    from bench.lm.corpus import BYTE_VOCAB

    return BYTE_VOCAB
