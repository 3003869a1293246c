"""Property-based fuzzing of `batchscale check` with damaged submission packages.

Every example copies one small valid package (2 runs) and applies 1 to 3 damages to files drawn
from it: truncation, bytes flipped, the file replaced by a random JSON or YAML document, one field
of a JSON file or of an MLLOG line set to a random value, deletion, a symbolic link (to a file
holding a secret outside the package, or a folder swapped for a link to a copy of itself), a
1.5 GB sparse file, lines duplicated, a FIFO. For each one ``check`` must end with exit 1 and
one ``VIOLATION:`` line per problem (any damage changes a checksummed file, so there is always
at least one), or exit 2 with exactly one ``batchscale: error:`` line; never a traceback, never a
line break from the input in its output, never the outside secret.

Deterministic and bounded: ``derandomize=True`` (the same examples on every run, no flaky CI),
``database=None`` (no ``.hypothesis/`` folder), MAX_EXAMPLES (40) examples, each one a copy of a small
package and one in-process ``check``: about 4 s on an idle 2-core machine, plus ~6 s to build the
package. A failure prints the example. Exploring with derandomize=False and 600 + 1,000 examples
found a run.json field of the wrong type reaching the arithmetic (fixed: run.json is typed as
RunPlan declares) and nothing else.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import submission as sub
from bench.cli import main
from fixtures_results import write_sweep

CLUSTER = Path(__file__).resolve().parent.parent / "clusters" / "local.yaml"
SECRET = "SECRET-0b7d2a-outside-the-package"
MAX_EXAMPLES = 40
SPARSE_BYTES = 1_500_000_000

FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-10**30, max_value=10**400) | st.floats()
    | st.text(max_size=12) | st.sampled_from(["success", "aborted", "diverged", "nan", ":::MLLOG {", "..", "\n"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)

damages = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999)),
    st.tuples(st.just("garble"), st.lists(st.tuples(st.floats(0.0, 0.999), st.integers(1, 255)), min_size=1,
                                          max_size=6)),
    st.tuples(st.just("json"), json_values),
    st.tuples(st.just("yaml"), json_values),
    st.tuples(st.just("field"), st.integers(0, 10_000), st.sampled_from(["key", "value", "metadata", "time_ms",
                                                                          "event_type", "status", "epoch_num"]),
              json_values),
    st.tuples(st.just("delete")),
    st.tuples(st.just("link_file")),
    st.tuples(st.just("link_folder")),
    st.tuples(st.just("sparse")),
    st.tuples(st.just("duplicate"), st.floats(0.0, 0.999), st.integers(1, 3)),
    st.tuples(st.just("fifo")),
)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    results = write_sweep(root / "results", "demo", batches=(4, 16), seeds=(0,), epochs=4, s_min=20.0)
    package = sub.make_submission([results], CLUSTER, root / "sub", submitter="ACME")
    assert main(["check", str(package)]) == 0
    return package


def _set_field(path: Path, which: int, field: str, value: Any) -> None:
    """Set one field of a JSON file, or of one MLLOG line (metadata fields inside metadata)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    try:  # an earlier damage may have broken what this one edits: then it edits nothing
        if path.suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict) and data:
                data[sorted(data)[which % len(data)]] = value
            path.write_text(json.dumps(data))
        elif lines:
            i = which % len(lines)
            event = json.loads(lines[i][len(":::MLLOG "):])
            if field in ("status", "epoch_num"):
                event.setdefault("metadata", {})[field] = value
            else:
                event[field] = value
            lines[i] = ":::MLLOG " + json.dumps(event)
            path.write_text("\n".join(lines) + "\n")
    except (ValueError, TypeError, AttributeError):
        pass


def _damage(pkg: Path, rel: str, damage: tuple, outside: Path) -> None:
    path = pkg / rel
    if (not path.is_file() or path.stat().st_size > 10_000_000
            or not os.path.realpath(path).startswith(os.path.realpath(pkg) + os.sep)):
        return  # an earlier damage removed, inflated or linked it (or a folder above it)
    kind, *args = damage
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[:int(len(data) * args[0])])
    elif kind == "garble":
        buf = bytearray(data)
        for where, xor in args[0]:
            if buf:
                buf[int(len(buf) * where)] ^= xor
        path.write_bytes(bytes(buf))
    elif kind == "json":
        path.write_text(json.dumps(args[0]))
    elif kind == "yaml":
        path.write_text(yaml.safe_dump(args[0]))
    elif kind == "field" and path.suffix in (".json", ".log"):
        _set_field(path, *args)
    elif kind == "delete":
        path.unlink()
    elif kind == "link_file":
        path.unlink()
        os.symlink(outside / "secret.txt", path)
    elif kind == "link_folder" and path.parent != pkg:
        copy = Path(tempfile.mkdtemp(dir=outside))
        shutil.copytree(path.parent, copy, dirs_exist_ok=True)
        shutil.rmtree(path.parent)
        os.symlink(copy, path.parent)
    elif kind == "sparse":
        os.truncate(path, SPARSE_BYTES)
    elif kind == "duplicate":
        lines = data.splitlines(keepends=True)
        if lines:
            i = int(len(lines) * args[0])
            path.write_bytes(b"".join(lines[:i + 1] + [lines[i]] * args[1] + lines[i + 1:]))
    elif kind == "fifo":
        path.unlink()
        os.mkfifo(path)
    else:  # a field damage on a file that is neither JSON nor a log
        path.write_bytes(data + b"\x00")


def _same(path: Path, raw: bytes) -> bool:
    if path.is_symlink() or not path.is_file() or path.stat().st_size != len(raw):
        return False
    return path.read_bytes() == raw


@FUZZ
@given(data=st.data())
def test_check_on_damaged_packages_never_crashes(clean, data):
    files = sorted(p.relative_to(clean).as_posix() for p in clean.rglob("*") if p.is_file())
    plan = data.draw(st.lists(st.tuples(st.sampled_from(files), damages), min_size=1, max_size=3), label="damages")
    with tempfile.TemporaryDirectory() as tmp:
        outside = Path(tmp) / "outside"
        outside.mkdir()
        (outside / "secret.txt").write_text(f"{SECRET}\n")
        pkg = Path(shutil.copytree(clean, Path(tmp) / "pkg"))
        before = {rel: (pkg / rel).read_bytes() for rel in files}
        for rel, damage in plan:
            _damage(pkg, rel, damage, outside)
        changed = not all(_same(pkg / rel, raw) for rel, raw in before.items())
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["check", str(pkg)])
    out_lines, err_lines = out.getvalue().splitlines(), err.getvalue().splitlines()
    assert SECRET not in out.getvalue() + err.getvalue()
    if not changed:  # e.g. a field set to the value it had
        assert code in (0, 1)
        return
    assert code in (1, 2), (code, out_lines[-3:])
    if code == 1:
        assert err_lines == [] and len(out_lines) >= 2
        assert all(line.startswith("VIOLATION: ") for line in out_lines[:-1])
        assert out_lines[-1].endswith(f": {len(out_lines) - 1} violation(s)")
    else:
        assert out_lines == [] and len(err_lines) == 1 and err_lines[0].startswith("batchscale: error: ")
