"""Registry entry for the language-model workload ``lm``.

Owns: ``ENTRY``, the ``WorkloadInfo`` that ``bench.workloads`` registers: its options
(``bench.lm.workload.LMOptions``, validated with the sweep file), its models (the GPT sizes of
``bench.lm.model.SIZES``, named here so that config validation needs no torch), its sizes in
tokens and where its loader lives. A sweep of this workload counts its batches in tokens
(``bench.config.TOKEN_WORKLOADS``; docs/language-models.md).

Must not import: torch, ray, pandas, numpy (config validation, and so the CLI's parser, imports
it), nor ``bench.workloads`` itself (only its ``registry``).
"""

from __future__ import annotations

from bench.lm.options import LMOptions
from bench.workloads.registry import WorkloadInfo

# bench.lm.model.SIZES' names (a test holds the two equal; that module imports torch)
GPT_MODELS = ("gpt-tiny", "gpt-mini", "gpt-10m", "gpt2-124m")

def _sizes(options: LMOptions) -> tuple[int, int]:
    """(training tokens, validation tokens): bench.lm.workload.lm_sizes, imported when asked (it
    brings numpy, which building the CLI's parser must not)."""
    from bench.lm.workload import lm_sizes

    return lm_sizes(options)


ENTRY = WorkloadInfo(
    name="lm",
    description="GPT-style decoder on byte-level text (Python's docs or standard library), a generated "
                "Markov corpus with a known entropy floor, or your own token folder; batches in tokens",
    options=LMOptions, default_model="gpt-tiny", models=GPT_MODELS,
    num_classes=257,  # bench.lm.corpus.BYTE_VOCAB (a test holds them equal); the loaded corpus says its own
    sizes=_sizes, loader="bench.lm.workload:load_lm")
