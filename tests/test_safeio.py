"""bench.safeio, the one reader of files we did not write: each refusal on its own, with the file
named and its content never echoed. Every case here is a file a results folder, a submission or
a user could hold; none needs root (a swapped or unreadable file is simulated at the os call)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import safeio
from bench.safeio import UnsafeFile

SECRET = "TOP-SECRET-CONTENT"


def refused(match: str, fn, *args, **kw) -> UnsafeFile:
    with pytest.raises(UnsafeFile, match=match) as info:
        fn(*args, **kw)
    assert SECRET not in str(info.value)
    return info.value


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    (r / "ok.json").write_text('{"a": 1}')
    (tmp_path / "outside.json").write_text(f'{{"secret": "{SECRET}"}}')
    return r


def test_reads_a_regular_file_inside_the_root(root: Path):
    assert safeio.read_json(root / "ok.json", root=root) == {"a": 1}
    err = refused("no such file", safeio.read_json, root / "nope.json", root=root)
    assert err.path == str(root / "nope.json") and err.reason == "no such file"


def test_links_are_refused_even_inside_the_root(root: Path, tmp_path: Path):
    (root / "inside-link.json").symlink_to(root / "ok.json")
    refused(r"inside-link.json is a symbolic link", safeio.read_json, root / "inside-link.json", root=root)
    (root / "out-link.json").symlink_to(tmp_path / "outside.json")
    refused(r"symbolic link", safeio.read_json, root / "out-link.json", root=root)
    (root / "sub").mkdir()
    (root / "sub" / "f.json").write_text("{}")
    (root / "dirlink").symlink_to(root / "sub", target_is_directory=True)
    refused(r"dirlink is a symbolic link", safeio.read_json, root / "dirlink" / "f.json", root=root)
    # Without a root, only the file itself is checked.
    refused(r"is a symbolic link", safeio.read_json, root / "inside-link.json")


def test_parent_references_and_paths_outside_the_root(root: Path, tmp_path: Path):
    (root / "sub").mkdir()
    refused(r"'\.\.' is not allowed", safeio.read_json, root / "sub" / ".." / "ok.json", root=root)
    refused(r"outside", safeio.read_json, tmp_path / "outside.json", root=root)
    link_root = tmp_path / "link-root"
    link_root.symlink_to(root, target_is_directory=True)
    refused(r"link-root is a symbolic link", safeio.read_json, link_root / "ok.json", root=link_root)


def test_directories_fifos_and_devices_are_not_regular_files(root: Path):
    (root / "dir.json").mkdir()
    refused(r"dir.json: is a directory", safeio.read_json, root / "dir.json", root=root)
    os.mkfifo(root / "fifo.json")  # opening a FIFO for reading would block: refused before opening
    refused(r"fifo.json: is not a regular file", safeio.read_json, root / "fifo.json", root=root)
    for device in ("/dev/zero", "/dev/null"):
        refused(r"is not a regular file", safeio.read_bytes, device)


def test_size_limits_per_kind_before_reading(root: Path):
    big = root / "summary.json"
    with open(big, "wb") as fh:
        fh.truncate(safeio.LIMITS["json"] + 1)  # sparse: no disk, and never read
    refused(r"summary.json: is 16,777,217 bytes, above the 16,777,216-byte limit for a json file",
            safeio.read_json, big, root=root)
    events = root / "events.jsonl"
    with open(events, "wb") as fh:
        fh.truncate(safeio.LIMITS["events"] + 1)
    refused(r"above the .*limit for a events file", lambda: list(safeio.iter_lines(events, root=root)))


def test_long_lines_are_refused_without_reading_them_whole(root: Path):
    path = root / "events.jsonl"
    path.write_bytes(b'{"key": "a"}\n' + b"x" * 5000 + b"\n")
    lines = safeio.iter_lines(path, root=root, max_line_bytes=100)
    assert next(lines) == (1, '{"key": "a"}')
    refused(r"line 2 is longer than 100 bytes", next, lines)
    exact = root / "exact.jsonl"
    exact.write_bytes(b"y" * 100 + b"\n")  # a line of exactly the limit is fine
    assert list(safeio.iter_lines(exact, root=root, max_line_bytes=100)) == [(1, "y" * 100)]


def test_not_utf8_and_not_json_name_no_content(root: Path):
    (root / "bin.json").write_bytes(b"\xff\xfe" + SECRET.encode())
    refused(r"is not UTF-8 text", safeio.read_json, root / "bin.json", root=root)
    (root / "bad.json").write_text(f'{{"a": {SECRET}}}')
    refused(r"bad.json: is not valid JSON \(JSONDecodeError: line 1 column 7\)", safeio.read_json,
            root / "bad.json", root=root)


def before_open(monkeypatch, target: Path, action) -> None:
    """Run ``action()`` when ``target`` is about to be opened: after safeio checked the path, as
    another process could (the time-of-check / time-of-use window)."""
    real_open = os.open

    def wrapped(path, flags, *a):
        if Path(path) == target:
            action()
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", wrapped)


def test_a_file_swapped_for_a_link_after_the_check_is_refused(root: Path, tmp_path: Path, monkeypatch):
    """TOCTOU: the path is checked, then opened with O_NOFOLLOW and the opened file checked again."""
    target = root / "ok.json"
    before_open(monkeypatch, target, lambda: (target.unlink(), target.symlink_to(tmp_path / "outside.json")))
    refused(r"ok.json: cannot read", safeio.read_json, target, root=root)


def test_a_file_replaced_after_the_check_is_refused(root: Path, monkeypatch):
    target, other = root / "ok.json", root / "other.json"
    other.write_text(f'"{SECRET}"')
    before_open(monkeypatch, target, lambda: os.replace(other, target))  # another inode, same name
    refused(r"ok.json: changed while being opened", safeio.read_json, target, root=root)


def test_a_fifo_swapped_in_after_the_check_does_not_block(root: Path, monkeypatch):
    target = root / "ok.json"
    before_open(monkeypatch, target, lambda: (target.unlink(), os.mkfifo(target)))  # O_NONBLOCK: no wait
    refused(r"ok.json: changed while being opened", safeio.read_json, target, root=root)


def test_a_file_that_grows_after_the_size_check_is_refused(root: Path, monkeypatch):
    target = root / "ok.json"
    monkeypatch.setitem(safeio.LIMITS, "json", 64)
    before_open(monkeypatch, target, lambda: target.write_text(" " * 100))
    refused(r"ok.json: is above the 64-byte limit", safeio.read_json, target, root=root)


def test_an_unreadable_file_is_named(root: Path, monkeypatch):
    """chmod 000 means nothing to root, so the refusal is simulated where the OS would give it."""
    target = root / "ok.json"

    def denied():
        raise PermissionError(13, "Permission denied", str(target))

    before_open(monkeypatch, target, denied)
    refused(r"ok.json: cannot read \(Permission denied\)", safeio.read_json, target, root=root)


# --- YAML ----------------------------------------------------------------------------------------

def test_yaml_duplicate_keys_are_refused_with_their_line(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(f"{SECRET}: 3\n{SECRET}: 4\n")
    # A stored or submitted file: the line only, never a key (it is content).
    refused(r"c.yaml: line 2: a key is given twice \(first on line 1\)", safeio.read_yaml, path)
    path.write_text("name: a\nepochs: 3\nlr:\n  reference_lr: 0.1\n  reference_lr: 0.2\n")
    # A config file the user names: a plain-word key is named, anything else is not.
    text = path.read_text()
    refused(r"c.yaml: line 5: key 'reference_lr' is given twice \(first on line 4\)", safeio.parse_yaml, text,
            path=path, name_keys=True)
    path.write_text(f"a: 1\n'{SECRET} with spaces': 1\n'{SECRET} with spaces': 2\n")
    refused(r"line 3: a key is given twice", safeio.parse_yaml, path.read_text(), path=path, name_keys=True)
    path.write_text("1: a\ntrue: b\n")  # equal once loaded (Python: True == 1): also twice
    refused(r"given twice", safeio.read_yaml, path)


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path):
    path = tmp_path / "m.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nrun:\n  <<: *b\n  x: 3\n")
    assert safeio.read_yaml(path) == {"base": {"x": 1, "y": 2}, "run": {"x": 3, "y": 2}}


def test_yaml_size_is_bounded_while_parsing(tmp_path: Path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("a: [" + ", ".join(["1"] * 20_000) + "]\n")
    refused(r"flat.yaml: has more than 1,000 YAML values; refused", safeio.read_yaml, flat, max_nodes=1000)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 60 + "]" * 60 + "\n")
    refused(r"deep.yaml: is nested more than 50 levels deep", safeio.read_yaml, deep)
    bomb = tmp_path / "bomb.yaml"
    text = "b0: &b0 [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 7):
        text += f"b{i}: &b{i} [" + ", ".join([f"*b{i - 1}"] * 10) + "]\n"
    bomb.write_text(text)  # 80 values in the file, 10**6 once the aliases are expanded
    refused(r"bomb.yaml: too large or too deeply nested", safeio.read_yaml, bomb)


def test_yaml_never_builds_python_objects(tmp_path: Path):
    path = tmp_path / "p.yaml"
    path.write_text(f"x: !!python/object/apply:os.system ['touch {tmp_path / 'pwned'}']\n")
    refused(r"p.yaml: is not valid YAML", safeio.read_yaml, path)
    assert not (tmp_path / "pwned").exists()


def test_sha256_streams_in_chunks(root: Path):
    import hashlib

    data = os.urandom(300_000)
    (root / "blob").write_bytes(data)
    assert safeio.sha256(root / "blob", root=root, chunk_bytes=4096) == hashlib.sha256(data).hexdigest()
