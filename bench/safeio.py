"""Reading files we did not write ourselves in this process: bounded, streamed, never through a link.

Owns: the one safe way to open a stored or submitted file. Every reader of results folders and
submissions (``bench.store``, ``bench.submission``, ``bench.compliance``, the report) opens files
through here, so that:

- a file is read only if it is a regular file (not a directory, FIFO or device) and no part of
  its path below ``root`` is a symbolic link; with ``root`` given, the path must also resolve
  inside it. The check happens before the file is opened, and the opened descriptor is checked
  again (``O_NOFOLLOW`` + ``fstat``), so a link swapped in between is refused too;
- a file larger than the limit for its kind is refused before any byte is read, and text is
  streamed line by line with a bound per line, so a huge or sparse file costs no memory;
- an error names the file and what is wrong with it, never its content.

Must not import: anything from bench but bench.errors; torch, ray, pandas.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import yaml

KIB, MIB, GIB = 2**10, 2**20, 2**30

# Largest file of each kind we read (bytes). A run's event log grows with its steps (LR lines
# during warm-up, a noise-scale line every k steps): 90 ImageNet epochs are a few MB.
LIMITS = {
    "config": 1_000_000,        # sweep / cluster YAML written by a person
    "json": 16 * MIB,           # summary.json, run.json, env.json, system.json, probe files
    "yaml": 16 * MIB,           # a run's stored config.yaml / cluster.yaml
    "events": 512 * MIB,        # events.jsonl
    "mllog": 512 * MIB,         # a submission's :::MLLOG log
    "telemetry": 512 * MIB,     # telemetry-rank<R>.csv
    "csv": 64 * MIB,            # a submission's summary.csv
    "checksums": 16 * MIB,      # checksums.sha256
    "any": 4 * GIB,             # hashed in chunks, never held in memory
    "tokens": 1024 * GIB,       # a token file (bench.lm.tokenfile): memory-mapped, never read whole
}
MAX_LINE_BYTES = 1 * MIB  # one event / log / CSV line


class UnsafeFile(ValueError):
    """A file that is refused (a link, not a regular file, outside the root, too large,
    unreadable, or not valid for its kind). ``str(err)`` is ``"<path>: <reason>"``; ``err.path``
    and ``err.reason`` hold the two parts, so that a caller can name the file its own way. The
    reason never quotes the file's content (a YAML key is named only when it is a plain word)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _refuse(path: Path | str, why: str) -> UnsafeFile:
    return UnsafeFile(path, why)


def check_path(path: Path | str, root: Path | str | None = None) -> Path:
    """The path, if no component of it below ``root`` is a symbolic link and it stays inside
    ``root``; without a root only the last component is checked (a results folder may itself sit
    behind a link to shared storage). Raises UnsafeFile otherwise."""
    path = Path(path)
    if root is None:
        if path.is_symlink():
            raise _refuse(path, "is a symbolic link; links are not followed")
        return path
    root = Path(root)
    if root.is_symlink():
        raise _refuse(path, f"{root} is a symbolic link; links are not followed")
    try:  # lexically first: the root itself may be given as ../results
        rel = path.relative_to(root)
    except ValueError:
        try:
            rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
        except ValueError:
            raise _refuse(path, f"outside {root}") from None
    if ".." in rel.parts:  # checked before any normalisation: "link/.." is the link target's parent
        raise _refuse(path, "'..' is not allowed below the root")
    current = root
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            raise _refuse(path, f"{current.relative_to(root)} is a symbolic link; links are not followed")
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise _refuse(path, f"resolves outside {root}")
    return path


def open_regular(path: Path | str, kind: str = "json", *, root: Path | str | None = None) -> BinaryIO:
    """Open a regular file for reading in binary mode after ``check_path``, refusing it above
    ``LIMITS[kind]``. The caller closes it."""
    path = check_path(path, root)
    limit = LIMITS[kind]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise _refuse(path, "no such file") from None
    except OSError as err:
        raise _refuse(path, f"cannot read ({err.strerror or type(err).__name__})") from None
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, "is a symbolic link; links are not followed")
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise _refuse(path, f"is {what}")
    if st.st_size > limit:
        raise _refuse(path, f"is {st.st_size:,} bytes, above the {limit:,}-byte limit for a {kind} file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise _refuse(path, f"cannot read ({err.strerror or type(err).__name__})") from None
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise _refuse(path, "changed while being opened")
    return os.fdopen(fd, "rb")


def read_bytes(path: Path | str, kind: str = "json", *, root: Path | str | None = None) -> bytes:
    limit = LIMITS[kind]
    with open_regular(path, kind, root=root) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:  # grew after the size check
        raise _refuse(Path(path), f"is above the {limit:,}-byte limit for a {kind} file")
    return data


def read_text(path: Path | str, kind: str = "json", *, root: Path | str | None = None) -> str:
    try:
        return read_bytes(path, kind, root=root).decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse(Path(path), "is not UTF-8 text") from None


def read_json(path: Path | str, kind: str = "json", *, root: Path | str | None = None) -> Any:
    text = read_text(path, kind, root=root)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise _refuse(Path(path), f"is not valid JSON ({type(err).__name__}: {_where(err)})") from None


def _where(err: Exception) -> str:
    return f"line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else "too deeply nested"


class _TooLarge(yaml.YAMLError):
    """Raised while composing: more nodes, or deeper nesting, than a file of this kind may have."""


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, line: int, key: Any, first_line: int) -> None:
        super().__init__()
        self.line, self.key, self.first_line = line, key, first_line


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class _BoundedLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """PyYAML's safe loader (libyaml's parser when installed) that counts nodes and depth while
    the document is composed -- so a huge flat list is refused after ``max_nodes`` nodes, in
    milliseconds, instead of being built first -- and refuses a key given twice in one mapping
    (PyYAML would silently keep the last value). Merge keys (``<<: *base``) may still be
    overridden. The composer is PyYAML's own Python one, fed with the C parser's events."""

    max_nodes = 100_000
    max_depth = 50

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.anchors: dict = {}  # the Python composer's state (libyaml's composer is bypassed)
        self._nodes = 0
        self._depth = 0

    get_single_node = yaml.composer.Composer.get_single_node
    compose_document = yaml.composer.Composer.compose_document
    compose_scalar_node = yaml.composer.Composer.compose_scalar_node
    compose_sequence_node = yaml.composer.Composer.compose_sequence_node
    compose_mapping_node = yaml.composer.Composer.compose_mapping_node

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._nodes += 1
        if self._nodes > self.max_nodes:
            raise _TooLarge(f"has more than {self.max_nodes:,} YAML values")
        if self._depth > self.max_depth:
            raise _TooLarge(f"is nested more than {self.max_depth} levels deep")
        self._depth += 1
        try:
            return yaml.composer.Composer.compose_node(self, parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in first:
                        raise _DuplicateKey(key_node.start_mark.line + 1, key, first[key])
                    first[key] = key_node.start_mark.line + 1
                except TypeError:  # an unhashable key: the base class refuses it
                    break
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, *, path: Path | str, max_nodes: int = 100_000, max_depth: int = 50,
               name_keys: bool = False) -> Any:
    """Safe-load YAML text read from ``path`` (no Python objects, no duplicate keys, at most
    ``max_nodes`` values and ``max_depth`` levels, also after aliases are expanded). Raises
    UnsafeFile naming ``path`` and the line, never the content: a key given twice is named only
    with ``name_keys`` (a config file the user wrote and named on the command line), and then only
    when it is a plain word."""
    loader = _BoundedLoader(text)
    loader.max_nodes, loader.max_depth = max_nodes, max_depth
    try:
        data = loader.get_single_data()
    except _TooLarge as err:
        raise _refuse(path, f"{err}; refused") from None
    except _DuplicateKey as err:
        plain = name_keys and isinstance(err.key, str) and _PLAIN_KEY.match(err.key)
        name = f"key {err.key!r}" if plain else "a key"
        raise _refuse(path, f"line {err.line}: {name} is given twice (first on line {err.first_line}); "
                            "give each key once") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise _refuse(path, f"is not valid YAML ({where}{getattr(err, 'problem', None) or 'parse error'})") from None
    except RecursionError:
        raise _refuse(path, "is nested too deeply") from None
    finally:
        loader.dispose()
    check_size(data, max_nodes=max_nodes, max_depth=max_depth, what=str(path))
    return data


def read_yaml(path: Path | str, kind: str = "yaml", *, root: Path | str | None = None,
              max_nodes: int = 100_000) -> Any:
    """Safe-load a YAML file (``parse_yaml``): no Python objects, no duplicate keys, no alias
    bombs, no very deep nesting."""
    return parse_yaml(read_text(path, kind, root=root), path=path, max_nodes=max_nodes)


def check_size(node: Any, *, max_nodes: int = 100_000, max_depth: int = 50, what: str = "config") -> None:
    """Refuse a parsed document with more than ``max_nodes`` nodes or deeper than ``max_depth``:
    YAML aliases expand lazily into shared objects, so a small file can stand for a huge one.
    Raises UnsafeFile naming ``what`` (the file)."""
    budget = max_nodes
    stack: list[tuple[Any, int]] = [(node, 0)]
    while stack:
        item, depth = stack.pop()
        budget -= 1
        if budget < 0 or depth > max_depth:
            raise UnsafeFile(what, f"too large or too deeply nested: more than {max_nodes:,} values or "
                                   f"{max_depth} levels once YAML aliases are expanded")
        if isinstance(item, dict):
            for k, v in item.items():
                stack.append((k, depth + 1))
                stack.append((v, depth + 1))
        elif isinstance(item, (list, tuple, set)):
            stack.extend((v, depth + 1) for v in item)


def iter_lines(path: Path | str, kind: str = "events", *, root: Path | str | None = None,
               max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """(line number from 1, text without the newline) of a text file, streamed. A line longer
    than ``max_line_bytes`` is refused without being read whole."""
    with open_regular(path, kind, root=root) as fh:
        number = 0
        while True:
            raw = fh.readline(max_line_bytes + 1)
            if not raw:
                return
            number += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise _refuse(Path(path), f"line {number} is longer than {max_line_bytes:,} bytes")
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise _refuse(Path(path), f"line {number} is not UTF-8 text") from None


def sha256(path: Path | str, *, root: Path | str | None = None, chunk_bytes: int = 1 * MIB) -> str:
    """SHA-256 of a file, read in chunks (never whole)."""
    digest = hashlib.sha256()
    with open_regular(path, "any", root=root) as fh:
        for chunk in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()
