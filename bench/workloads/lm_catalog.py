"""Registry entry for the language-model workload ``lm``.

Owns: ``ENTRY``, the ``WorkloadInfo`` that ``bench.workloads`` registers: its options
(``bench.lm.workload.LMOptions``, validated with the sweep file), its models (the GPT sizes of
``bench.lm.model.SIZES``, named here so that config validation needs no torch), its sizes in
tokens and where its loader lives. A sweep of this workload counts its batches in tokens
(``bench.config.TOKEN_WORKLOADS``; docs/language-models.md).

Must not import: torch, ray, pandas (config validation runs without them), nor
``bench.workloads`` itself (only its ``registry``).
"""

from __future__ import annotations

from bench.lm.corpus import BYTE_VOCAB
from bench.lm.workload import LMOptions, lm_sizes
from bench.workloads.registry import WorkloadInfo

# bench.lm.model.SIZES' names (a test holds the two equal; that module imports torch)
GPT_MODELS = ("gpt-tiny", "gpt-mini", "gpt-10m", "gpt2-124m")

ENTRY = WorkloadInfo(
    name="lm",
    description="GPT-style decoder on byte-level text (Python's docs or standard library), a generated "
                "Markov corpus with a known entropy floor, or your own token folder; batches in tokens",
    options=LMOptions, default_model="gpt-tiny", models=GPT_MODELS,
    num_classes=BYTE_VOCAB,  # the byte corpora's vocabulary; the loaded corpus says its own
    sizes=lm_sizes, loader="bench.lm.workload:load_lm")
