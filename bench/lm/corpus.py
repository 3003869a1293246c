"""Token corpora that exist offline on every machine, as byte-level tokens.

Owns: byte-level tokenisation (``encode_bytes``: token = UTF-8 byte 0..255, ``EOT`` = 256 ends
a document; vocabulary 257, nothing to download), ``TokenStream`` (one split: a 1-D token array,
resident or memory-mapped, and where its documents start), ``LMData`` (what an LM loader
returns), the deterministic document-level train/validation split, and the two real corpora:

- ``python-docs``: the Python Language Reference and library topics that every CPython ships as
  ``pydoc_data.topics`` (what ``help("if")`` prints): 79 documents of English technical prose
  with code examples, 466,117 bytes in CPython 3.11.7. Licence: the PSF License Agreement
  (Python's documentation), examples under the Zero-Clause BSD licence.
- ``python-stdlib``: the standard library's own ``.py`` sources (test suites and
  site-packages excluded), one document per file in path order: 734 files, 12.1 MB in CPython
  3.11.7. Licence: PSF License Agreement.

Both depend on the Python version that reads them, so ``LMData.sha256`` (of the token streams)
goes into every run's provenance: two runs are comparable when the hashes agree.

A stream's documents: each document's tokens are followed by ``EOT``; ``doc_starts[i]`` is the
offset of document i's first token. The token before a document (the previous ``EOT``, or a
virtual ``EOT`` before the stream's start) is the input that predicts its first token.

Must not import: torch, ray, pandas.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from bench.errors import UserError

EOT = 256          # end-of-text: closes every document of a byte-level corpus
BYTE_VOCAB = 257   # 256 byte values + EOT
SCAN_CHUNK_TOKENS = 1 << 22  # tokens read at a time when a stream is scanned (8 MiB of uint16)


def encode_bytes(text: str | bytes) -> np.ndarray:
    """Byte-level tokens (uint16) of a text: its UTF-8 bytes, one token each."""
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(raw, dtype=np.uint8).astype(np.uint16)


def decode_bytes(tokens: Iterable[int]) -> str:
    """Text of byte-level tokens; EOT becomes a blank line, broken UTF-8 a replacement char."""
    values = np.asarray(list(tokens) if not isinstance(tokens, np.ndarray) else tokens).ravel().tolist()
    return b"".join(b"\n\n" if t == EOT else bytes((t,)) for t in values).decode("utf-8", errors="replace")


def document_starts(tokens: np.ndarray, eot_token: int) -> np.ndarray:
    """Offsets (int64, ascending) of the documents of an EOT-terminated stream, scanned in
    chunks so that a memory-mapped stream is never read whole into memory."""
    n = int(tokens.shape[0])
    found = [np.zeros(1, dtype=np.int64)] if n else []
    for lo in range(0, n, SCAN_CHUNK_TOKENS):
        ends = np.flatnonzero(np.asarray(tokens[lo:lo + SCAN_CHUNK_TOKENS]) == eot_token) + lo + 1
        found.append(ends[ends < n].astype(np.int64))
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


@dataclass
class TokenStream:
    """One split: tokens (uint16/uint32; a ``np.memmap`` when read from disk) and, when the
    corpus marks documents with an end token, where each document starts (computed on first
    use: packing never needs it)."""

    tokens: np.ndarray
    eot_token: int | None = None
    _doc_starts: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def doc_starts(self) -> np.ndarray | None:
        if self._doc_starts is None and self.eot_token is not None:
            self._doc_starts = document_starts(self.tokens, self.eot_token)
        return self._doc_starts

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for lo in range(0, self.num_tokens, SCAN_CHUNK_TOKENS):
            digest.update(np.ascontiguousarray(self.tokens[lo:lo + SCAN_CHUNK_TOKENS]).astype("<u4").tobytes())
        return digest.hexdigest()


@dataclass
class LMData:
    """What an LM workload loader returns: both splits as token streams, and what they are."""

    name: str
    train: TokenStream
    val: TokenStream
    vocab_size: int
    eot_token: int | None
    description: str
    licence: str
    entropy_floor_nats: float | None = None  # the best achievable loss, where known (generated corpora)
    sha256: str = ""  # identity of the token streams, for provenance

    @property
    def num_train_tokens(self) -> int:
        return self.train.num_tokens

    @property
    def num_val_tokens(self) -> int:
        return self.val.num_tokens


def join_documents(documents: Sequence[bytes]) -> TokenStream:
    """A byte-level stream: each document's bytes followed by EOT."""
    parts = []
    for doc in documents:
        parts += [encode_bytes(doc), np.array([EOT], dtype=np.uint16)]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
    return TokenStream(tokens, EOT)


def validation_documents(names: Sequence[str], sizes: Sequence[int], val_fraction: float) -> list[bool]:
    """Which documents form the validation split: documents taken in the order of the SHA-256 of
    their names, each one that still fits within ``val_fraction`` of all tokens (so the split is
    the same on every machine and for every seed, never cuts a document, and holds at most the
    fraction asked for; small documents fill the gaps a large one leaves)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    budget = val_fraction * sum(sizes)
    order = sorted(range(len(names)), key=lambda i: hashlib.sha256(names[i].encode()).hexdigest())
    chosen, used = [False] * len(names), 0
    for i in order:
        if used + sizes[i] <= budget:
            chosen[i], used = True, used + sizes[i]
    return chosen


def split_corpus(name: str, documents: Sequence[tuple[str, bytes]], val_fraction: float,
                 description: str, licence: str) -> LMData:
    """Byte-level ``LMData`` of named documents, split by ``validation_documents``."""
    names = [n for n, _ in documents]
    is_val = validation_documents(names, [len(d) + 1 for _, d in documents], val_fraction)
    train = join_documents([d for (_, d), v in zip(documents, is_val) if not v])
    val = join_documents([d for (_, d), v in zip(documents, is_val) if v])
    digest = hashlib.sha256((train.sha256() + val.sha256()).encode()).hexdigest()
    return LMData(name=name, train=train, val=val, vocab_size=BYTE_VOCAB, eot_token=EOT,
                  description=description, licence=licence, sha256=digest)


# --- the real corpora -------------------------------------------------------------------------

PYTHON_LICENCE = "PSF License Agreement (Python documentation and sources); doc examples 0BSD"


def python_docs_documents() -> list[tuple[str, bytes]]:
    """(topic, text) of every topic of ``pydoc_data.topics``, sorted by topic name."""
    try:
        import pydoc_data.topics
    except ImportError:  # a "minimal" Python package without the full standard library
        raise UserError("corpus python-docs: this Python has no pydoc_data module (install its full "
                        "standard library, or use another corpus)") from None
    topics = pydoc_data.topics.topics
    return [(key, topics[key].encode("utf-8")) for key in sorted(topics)]


STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})


def python_stdlib_documents(stdlib: Path | None = None) -> list[tuple[str, bytes]]:
    """(relative path, source) of the standard library's .py files, in path order; test suites,
    installed packages and symbolic links left out."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if STDLIB_EXCLUDED_DIRS.intersection(rel.parts[:-1]) or path.is_symlink() or not path.is_file():
            continue
        docs.append((rel.as_posix(), path.read_bytes()))
    return docs


def load_python_docs(val_fraction: float = 0.1) -> LMData:
    docs = python_docs_documents()
    return split_corpus("python-docs", docs, val_fraction,
                        f"Python's reference topics (pydoc_data.topics): {len(docs)} documents, "
                        f"{sum(len(d) for _, d in docs):,} bytes", PYTHON_LICENCE)


def load_python_stdlib(val_fraction: float = 0.05) -> LMData:
    docs = python_stdlib_documents()
    return split_corpus("python-stdlib", docs, val_fraction,
                        f"Python's standard library sources: {len(docs)} files, "
                        f"{sum(len(d) for _, d in docs):,} bytes", PYTHON_LICENCE)
