"""Language models: a GPT-style decoder, token corpora, token-counted batching and its feed.

Owns nothing itself; the parts are
- ``bench.lm.model``: the decoder and its sizes (``gpt-tiny`` ... ``gpt2-124m``), parameter and
  FLOP counts;
- ``bench.lm.corpus``: byte-level tokens, the offline real corpora (Python's own documentation
  and standard library), ``LMData`` (what a loader returns);
- ``bench.lm.markov``: the generated corpus with a known entropy floor;
- ``bench.lm.tokenfile``: the on-disk token format for a user's own corpus (read streamed);
- ``bench.lm.tokenplan``: pure token arithmetic (batch split, windows, buckets, Kaplan's B_crit);
- ``bench.lm.batching``: packing, length buckets, per-epoch global batches, rank shares;
- ``bench.lm.feed``: ``LMFeed``, which the worker drives like ``bench.feed.MemoryFeed``;
- ``bench.lm.workload``: ``LMOptions`` (the sweep's ``workload_options``), the loader, sizes in
  tokens and the plan's steps per epoch.

docs/language-models.md describes the workload for users.

Must not import (anywhere in the package): ray, pandas.
"""
