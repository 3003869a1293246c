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
- ``bench.lm.options``: ``LMOptions`` (the sweep's ``workload_options``; numpy-free, as config
  validation imports it) and the vocabulary without loading;
- ``bench.lm.workload``: the loader, sizes in tokens, and the batch shape and steps per epoch
  ``bench.plan`` asks for.

Outside the package: the registry entry (``bench.workloads.lm_catalog``), the GPT names in
``bench.models``, results (``bench.analysis_lm``), the report (``bench.report_lm``) and the
overhead preset (``bench.perf.overhead_lm``).

docs/language-models.md describes the workload for users.

Must not import (anywhere in the package): ray, pandas.
"""
