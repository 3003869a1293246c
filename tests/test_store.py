"""The result store read back: a damaged run folder never raises and never vanishes.

Each class of damage a run folder meets in practice (a crash, a full disk, a bad copy, a hand
edit, a hostile submission) is tested on its own first, then hypothesis combines them at random
on a real run folder: ``load_results`` returns every run, marks a damaged one with a reason
that names the file (never its content), and ``batchscale results`` lists it as damaged
without a traceback. Deterministic as tests/test_fuzz.py is (derandomized, bounded examples, no
timing checks)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import safeio
from bench.cli import main
from bench.store import RunSkipped, SweepDir
from bench.records import RunRecord, load_results
from fixtures_results import Eval, RunSpec, make_plan, sweep_config, write_run

SECRET = "SECRET-CONTENT-NEVER-SHOWN"
FILES = ("summary.json", "run.json", "config.yaml", "cluster.yaml", "env.json", "worker_env.json",
         "events.jsonl", "telemetry-rank0.csv")
EVALS = [Eval(e, 0.5 + 0.1 * e, 0.45 + 0.1 * e) for e in range(4)]


def write_template(root: Path) -> Path:
    """A sweep folder with two complete runs: gbs 4 (to damage) and gbs 8 (left intact)."""
    sweep = root / "s"
    config = sweep_config("s", batches=(4, 8), epochs=3)
    for batch in (4, 8):
        write_run(sweep, RunSpec(make_plan("s", batch, epochs=3), EVALS), config=config)
    return sweep


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return write_template(tmp_path_factory.mktemp("template"))


DAMAGED, INTACT = "gbs000004-w001-s0", "gbs000008-w001-s0"


def load(sweep: Path) -> dict[str, RunRecord]:
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        return {r.run_id: r for r in load_results([sweep])}


@contextlib.contextmanager
def unreadable(path: Path):
    """Opening ``path`` fails as it would for a file of mode 000 (root ignores the mode bits)."""
    real_open = os.open

    def denied(p, flags, *a):
        if Path(p) == path:
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, flags, *a)

    with mock.patch.object(os, "open", denied):
        yield


# --- each class of damage on its own ----------------------------------------------------------

def _write(name: str, data: str | bytes) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        (run / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return apply


def _symlink(name: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        outside = run.parent.parent / "outside.json"
        outside.write_text(json.dumps({"secret": SECRET}))
        (run / name).unlink()
        (run / name).symlink_to(outside)
    return apply


def _sparse(name: str, size: int) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        with open(run / name, "r+b") as fh:
            fh.truncate(size)  # sparse: no disk used, and never read
    return apply


def _replace_plan(**change: Any) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        plan = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**plan, **change}))
    return apply


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    # name: (damage, what the reason must say)
    "summary.json is a list": (_write("summary.json", "[1, 2]"), r"^summary\.json: \(top level\): Input should "),
    "summary.json is a string": (_write("summary.json", '"hello"'), r"^summary\.json: "),
    "summary.json is not JSON": (_write("summary.json", f'{{"status": {SECRET}'), r"^summary\.json: is not valid JSON"),
    "summary.json wrong status": (lambda run: _write("summary.json", json.dumps(
        {**json.loads((run / "summary.json").read_text()), "status": "great"}))(run), r"^summary\.json: status: "),
    "config.yaml a plain string": (_write("config.yaml", "just a string\n"),
                                   r"^config\.yaml: expected a mapping, got a string"),
    "config.yaml invalid sweep": (_write("config.yaml", "name: s\nepochs: true\n"), r"^config\.yaml: "),
    "config.yaml duplicate key": (lambda run: _write("config.yaml", (run / "config.yaml").read_text()
                                                     + "epochs: 3\n")(run), r"^config\.yaml: line \d+: a key is given twice"),
    "cluster.yaml is a list": (_write("cluster.yaml", "- 1\n"), r"^cluster\.yaml: expected a mapping, got a list"),
    "run.json is a list": (_write("run.json", "[]"), r"^run\.json: expected a mapping, got a list"),
    "run.json string batch": (_replace_plan(global_batch_size="4"), r"^run\.json: not a run plan \(global_batch_size"),
    "run.json unknown key": (_replace_plan(surprise=1), r"^run\.json: not a run plan \(1 unknown key"),
    "env.json is a number": (_write("env.json", "42"), r"^env\.json: expected a mapping, got an integer"),
    "events garbled mid-file": (lambda run: _write("events.jsonl", (run / "events.jsonl").read_bytes()
                                                   .replace(b"\n", b"\n\x00garbage\n", 1))(run),
                                r"^events\.jsonl:2: broken event line"),
    "events metadata a list": (_write("events.jsonl", '{"key": "eval_accuracy", "metadata": [1]}\n'),
                               r"^events\.jsonl: event 1: its metadata is not a mapping"),
    "events line too long": (_write("events.jsonl", "x" * (safeio.MAX_LINE_BYTES + 10) + "\n"),
                             r"^events\.jsonl: line 1 is longer than"),
    "summary.json missing events": (lambda run: (run / "events.jsonl").unlink(), r"^missing events\.jsonl$"),
    "run.json missing": (lambda run: (run / "run.json").unlink(), r"^missing run\.json$"),
    "summary.json a link outside": (_symlink("summary.json"), r"^summary\.json: .*symbolic link"),
    "config.yaml a link": (_symlink("config.yaml"), r"^config\.yaml: .*symbolic link"),
    "summary.json sparse 17 MiB": (_sparse("summary.json", 17 * 2**20), r"^summary\.json: is 17,825,792 bytes, above"),
    "events.jsonl sparse 600 MiB": (_sparse("events.jsonl", 600 * 2**20), r"^events\.jsonl: is 629,145,600 bytes"),
    "summary.json is a folder": (lambda run: ((run / "summary.json").unlink(), (run / "summary.json").mkdir()),
                                 r"^summary\.json: is a directory"),
    "env.json is a FIFO": (lambda run: ((run / "env.json").unlink(), os.mkfifo(run / "env.json")),
                           r"^env\.json: is not a regular file"),
    "summary.json not UTF-8": (_write("summary.json", b"\xff\xfe{}"), r"^summary\.json: is not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_each_damage_marks_the_run_and_names_the_file(case, template: Path, tmp_path: Path):
    sweep = shutil.copytree(template, tmp_path / "s", symlinks=True)
    damage, reason = DAMAGE[case]
    damage(sweep / DAMAGED)
    with pytest.warns(RunSkipped, match=rf"damaged run folder .*{DAMAGED}"):
        records = {r.run_id: r for r in load_results([sweep])}
    assert set(records) == {DAMAGED, INTACT}  # nothing vanishes
    bad, good = records[DAMAGED], records[INTACT]
    assert bad.status == "damaged" and not bad.complete
    import re
    assert re.search(reason, bad.damage), bad.damage
    assert SECRET not in bad.damage and "\n" not in bad.damage
    assert good.status == "success" and good.damage is None


def test_unreadable_file_is_named(template: Path, tmp_path: Path):
    sweep = shutil.copytree(template, tmp_path / "s")
    with unreadable(sweep / DAMAGED / "summary.json"):
        records = load(sweep)
    assert records[DAMAGED].damage == "summary.json: cannot read (Permission denied)"


def test_damage_keeps_the_parts_that_could_be_read(template: Path, tmp_path: Path):
    sweep = shutil.copytree(template, tmp_path / "s")
    (sweep / DAMAGED / "summary.json").write_text("[]")
    (sweep / DAMAGED / "env.json").write_text('"x"')
    bad = load(sweep)[DAMAGED]
    assert bad.damage.startswith("env.json: expected a mapping") and "; summary.json: " in bad.damage
    assert bad.plan["global_batch_size"] == 4 and bad.config["name"] == "s" and len(bad.events) > 10


def test_a_torn_last_event_line_is_not_damage(template: Path, tmp_path: Path):
    """A crash mid-write leaves half a line at the end: the events before it stand."""
    sweep = shutil.copytree(template, tmp_path / "s")
    with open(sweep / DAMAGED / "events.jsonl", "a") as fh:
        fh.write('{"key": "eval_acc')
    assert load(sweep)[DAMAGED].status == "success"


def test_a_run_folder_without_run_json_or_that_is_a_link_does_not_vanish(template: Path, tmp_path: Path):
    sweep = shutil.copytree(template, tmp_path / "s")
    shutil.rmtree(sweep / DAMAGED)
    (sweep / DAMAGED).mkdir()  # emptied: only its name says it is a run
    (sweep / "gbs000016-w001-s0").symlink_to(sweep / INTACT, target_is_directory=True)
    records = load(sweep)
    assert records[DAMAGED].damage == "missing run.json, config.yaml, env.json"
    assert records["gbs000016-w001-s0"].damage == "the run folder is a symbolic link; links are not followed"
    assert records[INTACT].status == "success"


def test_telemetry_problems_are_named_and_the_rest_kept(template: Path, tmp_path: Path):
    sweep = shutil.copytree(template, tmp_path / "s")
    run = sweep / DAMAGED
    (run / "telemetry-rank1.csv").write_text(f"not,a,header\n{SECRET}\n")
    rows, problems = load(sweep)[DAMAGED].read_telemetry()
    assert len(rows) == 40  # rank 0's rows
    assert len(problems) == 1 and "telemetry-rank1.csv: not a telemetry CSV" in problems[0]
    assert SECRET not in problems[0]


def test_results_lists_a_damaged_run_and_exits_0(template: Path, tmp_path: Path, capsys):
    sweep = shutil.copytree(template, tmp_path / "s")
    (sweep / DAMAGED / "summary.json").write_text("[1, 2]")
    assert main(["results", str(sweep)]) == 0
    out, err = capsys.readouterr()
    assert DAMAGED in out and "damaged" in out and "success" in out
    assert f"batchscale: warning: damaged run folder {sweep / DAMAGED}: summary.json:" in err
    assert "Traceback" not in out + err


def test_results_exits_1_when_every_run_is_damaged(template: Path, tmp_path: Path, capsys):
    sweep = shutil.copytree(template, tmp_path / "s")
    for run in (DAMAGED, INTACT):
        (sweep / run / "run.json").write_text('"hello"')
    assert main(["results", str(sweep)]) == 1
    out, err = capsys.readouterr()
    assert out.count("damaged") == 2
    assert err.strip().splitlines()[-1] == f"batchscale: error: every run found under {sweep} is damaged (listed above)"


# --- hypothesis: damage combined at random -------------------------------------------------------

WRONG_SHAPES = ("[1, 2]", '"hello"', "null", "42", "{}", "true", "plain string\n", '{"status": "success"}',
                "- a\n- b\n", "a: [unclosed\n", f"{SECRET}: 1\n{SECRET}: 2\n")
KINDS = ("wrong_shape", "truncate", "garble", "delete", "symlink_outside", "symlink_inside", "sparse",
         "unreadable", "folder", "fifo", "append_garbage")


@st.composite
def damages(draw):
    """1-3 (file, kind, parameter) edits of the run folder."""
    out = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        name, kind = draw(st.sampled_from(FILES)), draw(st.sampled_from(KINDS))
        if kind == "wrong_shape":
            arg: Any = draw(st.sampled_from(WRONG_SHAPES))
        elif kind in ("truncate", "garble"):
            arg = (draw(st.floats(min_value=0.0, max_value=1.0)), draw(st.binary(min_size=1, max_size=12)))
        elif kind == "append_garbage":
            arg = draw(st.sampled_from(["\n{oops\n", '{"key": 5}\n', '{"key": "k", "time_ms": "x"}\n',
                                        "\ufeff\u2028\n", '{"key": "k", "metadata": "m"}\n{"key": "k"}\n']))
        else:
            arg = None
        out.append((name, kind, arg))
    return out


def apply_damage(run: Path, name: str, kind: str, arg: Any, stack: contextlib.ExitStack) -> None:
    path = run / name
    if path.is_symlink() or path.is_file():
        path.unlink()
        data = b"" if not (run.parent / INTACT / name).is_file() else (run.parent / INTACT / name).read_bytes()
    elif path.is_dir():
        path.rmdir()
        data = b"{}"
    elif path.exists():  # a FIFO made by an earlier edit
        path.unlink()
        data = b""
    else:
        data = b""
    if kind == "wrong_shape":
        path.write_text(arg)
    elif kind == "truncate":
        path.write_bytes(data[: int(len(data) * arg[0])])
    elif kind == "garble":
        cut = int(len(data) * arg[0])
        path.write_bytes(data[:cut] + arg[1] + data[cut + len(arg[1]):])
    elif kind == "append_garbage":
        path.write_bytes(data + arg.encode())
    elif kind == "symlink_outside":
        path.symlink_to(run.parent.parent / "outside.txt")
    elif kind == "symlink_inside":
        path.symlink_to(run.parent / INTACT / "env.json")
    elif kind == "sparse":
        with open(path, "wb") as fh:
            fh.truncate(safeio.LIMITS["events"] + 1)  # above every limit
    elif kind == "unreadable":
        path.write_bytes(data)
        stack.enter_context(unreadable(path))
    elif kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    # "delete": nothing more


@pytest.mark.slow
@settings(max_examples=100, deadline=None, database=None, derandomize=True, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=damages())
def test_random_damage_never_raises_and_never_hides_a_run(edits, template: Path, capsys):
    with tempfile.TemporaryDirectory(prefix="store-fuzz-") as d, contextlib.ExitStack() as stack:
        root = Path(d)
        (root / "outside.txt").write_text(SECRET)
        sweep = shutil.copytree(template, root / "s", symlinks=True)
        for name, kind, arg in edits:
            apply_damage(sweep / DAMAGED, name, kind, arg, stack)
        records = load(sweep)
        assert set(records) == {DAMAGED, INTACT}
        good, bad = records[INTACT], records[DAMAGED]
        assert good.status == "success" and good.damage is None
        assert bad.status in ("damaged", "success", "incomplete")
        if bad.damage is not None:
            assert any(name in bad.damage for name, _, _ in edits), (edits, bad.damage)
            assert SECRET not in bad.damage and "\n" not in bad.damage
        else:
            assert bad.status == "incomplete" or bad.summary is not None
        rows, problems = bad.read_telemetry()
        assert all("telemetry-rank0.csv" in p and SECRET not in p for p in problems)
        capsys.readouterr()
        assert main(["results", str(sweep), "--all-columns", "--format", "csv"]) == 0
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err and SECRET not in out + err
        assert DAMAGED in out and INTACT in out
        if bad.damage is not None:
            assert "damaged" in out


def test_sweep_dir_lists_runs_by_name(template: Path):
    assert [r.run_id for r in SweepDir(template).run_dirs()] == [DAMAGED, INTACT]
