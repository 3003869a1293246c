"""Byte-level tokens, the offline real corpora, and the user token-folder format."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from bench.errors import UserError
from bench.lm.corpus import (BYTE_VOCAB, EOT, TokenStream, decode_bytes, document_starts, encode_bytes,
                             join_documents, load_python_docs, python_stdlib_documents, validation_documents)
from bench.lm.tokenfile import encode_text_files, open_token_dir, write_token_dir

# --- byte-level tokens -------------------------------------------------------------------------------


def test_bytes_round_trip_including_utf8():
    text = "naïve café — 東京"
    tokens = encode_bytes(text)
    assert tokens.dtype == np.uint16 and len(tokens) == len(text.encode("utf-8"))
    assert decode_bytes(tokens) == text
    assert encode_bytes("A").tolist() == [65]


def test_join_documents_and_their_starts():
    stream = join_documents([b"ab", b"", b"xyz"])
    assert stream.tokens.tolist() == [97, 98, EOT, EOT, 120, 121, 122, EOT]
    assert stream.doc_starts.tolist() == [0, 3, 4]


def test_document_starts_scans_in_chunks(monkeypatch):
    import bench.lm.corpus as corpus

    monkeypatch.setattr(corpus, "SCAN_CHUNK_TOKENS", 3)  # boundaries fall across chunk edges
    tokens = np.array([1, 9, 2, 2, 9, 9, 3, 3, 3, 9, 4], dtype=np.uint16)
    assert document_starts(tokens, 9).tolist() == [0, 2, 5, 6, 10]


def test_validation_split_is_by_name_and_bounded():
    names = [f"doc{i}" for i in range(50)]
    sizes = list(range(1, 51))
    chosen = validation_documents(names, sizes, 0.2)
    assert chosen == validation_documents(list(names), list(sizes), 0.2)  # deterministic
    val = sum(s for s, c in zip(sizes, chosen) if c)
    assert 0.15 * sum(sizes) < val <= 0.2 * sum(sizes)


def test_python_docs_corpus():
    data = load_python_docs()
    assert data.vocab_size == BYTE_VOCAB == 257 and data.eot_token == EOT
    total = data.train.num_tokens + data.val.num_tokens
    assert total > 300_000                                    # 466,196 tokens with CPython 3.11.7
    assert 0.08 < data.val.num_tokens / total <= 0.1
    assert data.train.tokens.max() == EOT and data.train.tokens[-1] == EOT
    assert "statement" in decode_bytes(data.train.tokens[:5000])
    assert len(data.sha256) == 64 and data.sha256 == load_python_docs().sha256


@pytest.mark.slow
def test_python_stdlib_documents_leave_out_tests():
    docs = python_stdlib_documents()
    names = [n for n, _ in docs]
    assert "os.py" in names and "json/decoder.py" in names
    assert not any(n.startswith("test/") or "/tests/" in n or "site-packages" in n for n in names)
    assert sum(len(d) for _, d in docs) > 5_000_000


# --- the token-folder format ----------------------------------------------------------------------------


def write_by_hand(directory, train, val, vocab, eot, dtype="uint16", **meta_overrides):
    """The documented format written without our writer: numpy tofile + meta.json."""
    directory.mkdir()
    np.asarray(train, dtype="<u2" if dtype == "uint16" else "<u4").tofile(directory / "train.bin")
    np.asarray(val, dtype="<u2" if dtype == "uint16" else "<u4").tofile(directory / "val.bin")
    meta = {"format": "batchscale-tokens", "version": 1, "dtype": dtype, "vocab_size": vocab,
            "eot_token": eot, "num_tokens": {"train": len(train), "val": len(val)}, **meta_overrides}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def test_token_folder_round_trip_memory_mapped(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 1000, size=10_000)
    train[::97] = 1000  # EOT between documents
    val = np.r_[rng.integers(0, 1000, size=500), 1000]
    data = open_token_dir(write_by_hand(tmp_path / "corpus", train, val, vocab=1001, eot=1000))
    assert isinstance(data.train.tokens, np.memmap)  # streamed from disk, not read into memory
    np.testing.assert_array_equal(data.train.tokens, train)
    np.testing.assert_array_equal(data.val.tokens, val)
    assert (data.vocab_size, data.eot_token, data.name) == (1001, 1000, "corpus")
    assert data.train.doc_starts.tolist() == [0] + [i + 1 for i in range(0, 10_000, 97)]


def test_token_folder_uint32_and_writer(tmp_path):
    chunks = [np.array([70_000, 5]), np.array([69_999])]
    write_token_dir(tmp_path / "big", {"train": iter(chunks), "val": [np.array([1, 2])]},
                    vocab_size=70_001, eot_token=None)
    meta = json.loads((tmp_path / "big" / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["num_tokens"] == {"train": 3, "val": 2}
    data = open_token_dir(tmp_path / "big")
    assert data.train.tokens.tolist() == [70_000, 5, 69_999] and data.train.doc_starts is None
    assert not list((tmp_path / "big").glob(".*tmp"))  # no temporary files left


def test_encode_text_files(tmp_path):
    paths = []
    for i in range(20):
        p = tmp_path / f"t{i}.txt"
        p.write_text(f"document number {i}\n" * (i + 1))
        paths.append(p)
    data = open_token_dir(encode_text_files(paths, tmp_path / "tok", val_fraction=0.2))
    assert data.vocab_size == 257 and data.eot_token == 256
    texts = decode_bytes(np.r_[data.train.tokens, data.val.tokens])
    assert all(f"document number {i}\n" in texts for i in range(20))
    assert data.train.num_tokens + data.val.num_tokens == sum(p.stat().st_size + 1 for p in paths)
    with pytest.raises(UserError, match="selects no file for validation"):
        encode_text_files(paths[:1], tmp_path / "one", val_fraction=0.1)


@pytest.mark.parametrize("change, message", [
    ({"format": "other"}, "format"),
    ({"vocab_size": 70_000}, "needs dtype uint32"),
    ({"eot_token": 5000}, "eot_token 5000 must be below vocab_size 1001"),
    ({"num_tokens": {"train": 9, "val": 3}}, "holds 10 tokens but meta.json num_tokens.train says 9"),
    ({"num_tokens": {"train": 10}}, "num_tokens: needs an entry for val"),
    ({"colour": "blue"}, "colour"),
])
def test_token_folder_mistakes_are_one_line_user_errors(tmp_path, change, message):
    directory = write_by_hand(tmp_path / "c", np.arange(10), np.arange(3), vocab=1001, eot=1000, **change)
    with pytest.raises(UserError, match=message):
        open_token_dir(directory)


def test_token_folder_refuses_bad_tokens_and_files(tmp_path):
    with pytest.raises(UserError, match="token at offset 2 is not below vocab_size 5"):
        open_token_dir(write_by_hand(tmp_path / "a", [1, 2, 7, 3], [1], vocab=5, eot=None))
    odd = write_by_hand(tmp_path / "b", [1, 2], [1], vocab=5, eot=None)
    with open(odd / "train.bin", "ab") as fh:
        fh.write(b"\x01")
    with pytest.raises(UserError, match="not a whole number of uint16 tokens"):
        open_token_dir(odd)
    linked = write_by_hand(tmp_path / "c", [1, 2], [1], vocab=5, eot=None)
    os.replace(linked / "val.bin", tmp_path / "elsewhere.bin")
    os.symlink(tmp_path / "elsewhere.bin", linked / "val.bin")
    with pytest.raises(UserError, match="symbolic link"):
        open_token_dir(linked)
    with pytest.raises(UserError, match="no such token folder"):
        open_token_dir(tmp_path / "missing")


def test_token_stream_hash_depends_on_content():
    a = TokenStream(np.array([1, 2, 3], dtype=np.uint16))
    assert a.sha256() == TokenStream(np.array([1, 2, 3], dtype=np.uint32)).sha256()
    assert a.sha256() != TokenStream(np.array([1, 2, 4], dtype=np.uint16)).sha256()


def test_python_docs_missing_is_a_user_error(monkeypatch):
    import sys

    from bench.lm.corpus import python_docs_documents

    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # import fails, as without the module
    with pytest.raises(UserError, match="no pydoc_data module"):
        python_docs_documents()
