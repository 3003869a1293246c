"""The lm workload's options (validated with the sweep file), loader and sizes."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from bench.lm.tokenfile import write_token_dir
from bench.lm.workload import LMOptions, batch_spec, lm_sizes, load_lm


def test_defaults_are_the_python_docs_packed():
    opts = LMOptions()
    assert (opts.corpus, opts.context_length, opts.batching) == ("python-docs", 128, "pack")
    data = load_lm(opts, seed=123)
    assert lm_sizes(opts) == (data.train.num_tokens, data.val.num_tokens)
    assert load_lm(opts, seed=5).sha256 == data.sha256  # the corpus never depends on the run seed


def test_markov_sizes_come_from_the_options():
    opts = LMOptions(corpus="markov", markov={"num_states": 8, "num_train_tokens": 5_000, "num_val_tokens": 500})
    assert lm_sizes(opts) == (5_000, 500)
    data = load_lm(opts)
    assert (data.train.num_tokens, data.val.num_tokens, data.vocab_size) == (5_000, 500, 9)
    assert data.entropy_floor_nats is not None


def test_token_folder_is_checked_at_validation(tmp_path):
    write_token_dir(tmp_path / "c", {"train": [np.arange(50)], "val": [np.arange(20)]}, vocab_size=60, eot_token=59)
    opts = LMOptions(corpus="tokens", token_dir=str(tmp_path / "c"))
    assert lm_sizes(opts) == (50, 20)
    assert load_lm(opts).train.tokens.tolist() == list(range(50))
    with pytest.raises(ValidationError, match="token_dir: .*meta.json: no such file"):
        LMOptions(corpus="tokens", token_dir=str(tmp_path))


@pytest.mark.parametrize("options, message", [
    ({"corpus": "tokens"}, "token_dir: give it exactly when corpus is 'tokens'"),
    ({"token_dir": "/x"}, "token_dir: give it exactly when corpus is 'tokens'"),
    ({"markov": {"num_states": 4}}, "markov: only for corpus 'markov'"),
    ({"corpus": "markov", "val_fraction": 0.2}, "val_fraction: only for the python-docs"),
    ({"bucket_lengths": [64, 128]}, "bucket_lengths: only with batching 'bucket'"),
    ({"batching": "bucket", "bucket_lengths": [64, 100]}, "must be ascending, unique, >= 1 and end at context_length 128"),
    ({"corpus": "wiki"}, "corpus"),
    ({"context": 64}, "context"),
])
def test_bad_options_name_the_key(options, message):
    with pytest.raises(ValidationError, match=message):
        LMOptions(**options)


def test_batch_spec_of_a_run():
    opts = LMOptions(batching="bucket", context_length=64, bucket_lengths=(16, 32, 64))
    spec = batch_spec(opts, global_batch_tokens=1024, num_workers=2, grad_accum_steps=2, seed=3)
    assert (spec.packing, spec.lengths, spec.capacities, spec.min_sequences) == (False, (16, 32, 64), (64, 32, 16), 4)
    assert batch_spec(LMOptions(), 4096, 1, 1, 0).lengths == (128,)


@pytest.mark.parametrize("batching", ["pack", "bucket"])
def test_plan_steps_per_epoch_match_the_feed(batching):
    import torch

    from bench.lm.feed import LMFeed
    from bench.lm.workload import lm_steps_per_epoch

    opts = LMOptions(corpus="markov", context_length=32, batching=batching,
                     markov={"num_states": 8, "mean_doc_tokens": 20, "num_train_tokens": 20_000, "num_val_tokens": 500})
    spec = batch_spec(opts, global_batch_tokens=32 * 24, num_workers=2, grad_accum_steps=3, seed=9)
    feed = LMFeed(load_lm(opts), spec, 0, 2, torch.device("cpu"))
    assert lm_steps_per_epoch(opts, spec) == feed.steps_per_epoch == len(list(feed.steps(1, feed.steps_per_epoch)))
