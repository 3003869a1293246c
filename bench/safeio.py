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
}
MAX_LINE_BYTES = 1 * MIB  # one event / log / CSV line


class UnsafeFile(ValueError):
    """A file that is refused (a link, not a regular file, outside the root, too large, or
    unreadable). The message names the file and the reason, never the content."""


def _refuse(path: Path, why: str) -> UnsafeFile:
    return UnsafeFile(f"{path}: {why}")


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


def read_yaml(path: Path | str, kind: str = "yaml", *, root: Path | str | None = None,
              max_nodes: int = 100_000) -> Any:
    """Safe-load YAML (no Python objects), refusing alias bombs and very deep nesting."""
    text = read_text(path, kind, root=root)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise _refuse(Path(path), f"is not valid YAML ({where}{getattr(err, 'problem', None) or 'parse error'})") from None
    except RecursionError:
        raise _refuse(Path(path), "is nested too deeply") from None
    check_size(data, max_nodes=max_nodes, what=str(path))
    return data


def check_size(node: Any, *, max_nodes: int = 100_000, max_depth: int = 50, what: str = "config") -> None:
    """Refuse a parsed document with more than ``max_nodes`` nodes or deeper than ``max_depth``:
    YAML aliases expand lazily into shared objects, so a small file can stand for a huge one."""
    budget = [max_nodes]
    stack: list[tuple[Any, int]] = [(node, 0)]
    while stack:
        item, depth = stack.pop()
        budget[0] -= 1
        if budget[0] < 0 or depth > max_depth:
            raise UnsafeFile(f"{what}: too large or too deeply nested (YAML alias expansion?)")
        if isinstance(item, dict):
            for k, v in item.items():
                stack.append((k, depth + 1))
                stack.append((v, depth + 1))
        elif isinstance(item, list):
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
