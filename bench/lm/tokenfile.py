"""A user's own corpus on disk: one flat token file per split, read memory-mapped (streamed).

Owns: the token-folder format (its reader ``open_token_dir`` and its writer
``write_token_dir``) and ``encode_text_files``, which turns plain text files into such a
folder with byte-level tokens.

Must not import: torch, ray, pandas.

The format (version 1)::

    DIR/meta.json   {"format": "batchscale-tokens", "version": 1, "dtype": "uint16",
                     "vocab_size": 257, "eot_token": 256,
                     "num_tokens": {"train": 1234567, "val": 65432},
                     "description": "...", "licence": "..."}        (the last two optional)
    DIR/train.bin   the training tokens: dtype values, little-endian, no header
    DIR/val.bin     the validation tokens, likewise

``dtype`` is ``uint16`` (vocabularies up to 65,536) or ``uint32``. Every token is below
``vocab_size``. With an ``eot_token`` each document's tokens are followed by it (length-
bucketed batching needs those boundaries; packing does not); ``null`` means the splits are
plain streams. ``num_tokens`` catches a truncated copy. Any tokenizer will do: write each
split with ``numpy.ndarray.tofile`` and the JSON beside it (docs/language-models.md).

Reading: the files are opened through ``bench.safeio`` (no symbolic links, regular files
inside DIR) and mapped with ``numpy.memmap``: only the windows a step gathers are read, so a
corpus larger than memory trains; opening scans each split once in chunks to check the tokens
are below ``vocab_size``. Mistakes are ``UserError`` naming the file and the key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Literal, Mapping, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bench import safeio
from bench.errors import UserError
from bench.lm.corpus import BYTE_VOCAB, EOT, SCAN_CHUNK_TOKENS, LMData, TokenStream, encode_bytes, validation_documents

FORMAT = "batchscale-tokens"
VERSION = 1
SPLITS = ("train", "val")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


class TokenMeta(BaseModel):
    """meta.json of a token folder."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["batchscale-tokens"]
    version: Literal[1]
    dtype: Literal["uint16", "uint32"]
    vocab_size: int = Field(ge=2, le=2**32)
    eot_token: Optional[int] = Field(None, ge=0)
    num_tokens: dict[Literal["train", "val"], int]
    description: str = ""
    licence: str = ""


def _meta_error(path: Path, err: ValidationError) -> UserError:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
    return UserError(f"{path}: {loc}: {e['msg']}")


def read_meta(directory: Path) -> TokenMeta:
    path = directory / "meta.json"
    try:
        meta = TokenMeta.model_validate(safeio.read_json(path, "json", root=directory))
    except safeio.UnsafeFile as err:
        raise UserError(str(err)) from None
    except ValidationError as err:
        raise _meta_error(path, err) from None
    if meta.dtype == "uint16" and meta.vocab_size > 2**16:
        raise UserError(f"{path}: vocab_size {meta.vocab_size} needs dtype uint32 (uint16 holds 65536 values)")
    if meta.eot_token is not None and meta.eot_token >= meta.vocab_size:
        raise UserError(f"{path}: eot_token {meta.eot_token} must be below vocab_size {meta.vocab_size}")
    missing = [s for s in SPLITS if s not in meta.num_tokens]
    if missing:
        raise UserError(f"{path}: num_tokens: needs an entry for {' and '.join(missing)}")
    return meta


def _map_split(directory: Path, split: str, meta: TokenMeta) -> np.ndarray:
    path = directory / f"{split}.bin"
    dtype = DTYPES[meta.dtype]
    try:
        # "tokens" (1 TiB): mapped, so no more is read than the steps gather and the check scans.
        with safeio.open_regular(path, "tokens", root=directory) as fh:
            size = os.fstat(fh.fileno()).st_size
            if size % dtype.itemsize:
                raise UserError(f"{path}: {size:,} bytes is not a whole number of {meta.dtype} tokens")
            if size // dtype.itemsize != meta.num_tokens[split]:
                raise UserError(f"{path}: holds {size // dtype.itemsize:,} tokens but meta.json "
                                f"num_tokens.{split} says {meta.num_tokens[split]:,} (truncated copy?)")
            if size == 0:
                raise UserError(f"{path}: the {split} split is empty")
            tokens = np.memmap(fh, dtype=dtype, mode="r")  # the map keeps its own descriptor
    except safeio.UnsafeFile as err:
        raise UserError(str(err)) from None
    for lo in range(0, len(tokens), SCAN_CHUNK_TOKENS):
        chunk = tokens[lo:lo + SCAN_CHUNK_TOKENS]
        if int(chunk.max()) >= meta.vocab_size:
            where = lo + int(np.argmax(chunk >= meta.vocab_size))
            raise UserError(f"{path}: token at offset {where:,} is not below vocab_size {meta.vocab_size}")
    return tokens


def open_token_dir(directory: str | Path) -> LMData:
    """The corpus in a token folder, memory-mapped."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such token folder (expected meta.json, train.bin, val.bin)")
    meta = read_meta(directory)
    train, val = (TokenStream(_map_split(directory, s, meta), meta.eot_token) for s in SPLITS)
    meta_bytes = safeio.read_bytes(directory / "meta.json", "json", root=directory)
    return LMData(name=directory.name, train=train, val=val, vocab_size=meta.vocab_size,
                  eot_token=meta.eot_token, description=meta.description or f"token folder {directory}",
                  licence=meta.licence, sha256=hashlib.sha256(meta_bytes).hexdigest())


# --- writing -------------------------------------------------------------------------------------

def write_token_dir(directory: str | Path, splits: Mapping[str, Iterable[np.ndarray]], *, vocab_size: int,
                    eot_token: int | None, description: str = "", licence: str = "") -> Path:
    """Write a token folder from chunks of tokens per split (streamed: no split is held whole).
    Each split goes to a temporary file renamed into place; meta.json is written last, so a
    folder with a meta.json is complete."""
    directory = Path(directory)
    if set(splits) != set(SPLITS):
        raise ValueError(f"splits must be exactly {SPLITS}, got {sorted(splits)}")
    dtype_name = "uint16" if vocab_size <= 2**16 else "uint32"
    dtype = DTYPES[dtype_name]
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        final, tmp = directory / f"{split}.bin", directory / f".{split}.bin.tmp"
        n = 0
        with open(tmp, "wb") as out:
            for chunk in splits[split]:
                chunk = np.asarray(chunk)
                if chunk.size and (int(chunk.min()) < 0 or int(chunk.max()) >= vocab_size):
                    out.close()
                    tmp.unlink()
                    raise ValueError(f"split {split}: tokens must be in 0..{vocab_size - 1}")
                chunk.astype(dtype).tofile(out)
                n += chunk.size
        os.replace(tmp, final)
        counts[split] = n
    meta = {"format": FORMAT, "version": VERSION, "dtype": dtype_name, "vocab_size": vocab_size,
            "eot_token": eot_token, "num_tokens": counts, "description": description, "licence": licence}
    tmp = directory / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, directory / "meta.json")
    return directory


def encode_text_files(paths: Iterable[str | Path], directory: str | Path, val_fraction: float = 0.1,
                      description: str = "", licence: str = "") -> Path:
    """A byte-level token folder (vocabulary 257, EOT 256) from text files, one document each,
    split by document as the built-in corpora are (``bench.lm.corpus.validation_documents``).
    Each file is read twice (once for its size, once to write it), never all at once."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no text files given")
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p}: no such file")
    is_val = validation_documents([str(p) for p in paths], [p.stat().st_size + 1 for p in paths], val_fraction)
    if not any(is_val):
        raise UserError(f"val_fraction {val_fraction} of {len(paths)} file(s) selects no file for validation: the split "
                        f"is by whole files, so give more (smaller) files")

    def chunks(want_val: bool) -> Iterable[np.ndarray]:
        for p, v in zip(paths, is_val):
            if v == want_val:
                yield encode_bytes(p.read_bytes())
                yield np.array([EOT], dtype=np.uint16)

    return write_token_dir(directory, {"train": chunks(False), "val": chunks(True)}, vocab_size=BYTE_VOCAB,
                           eot_token=EOT, description=description, licence=licence)
