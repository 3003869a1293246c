"""`batchscale check` against hostile and damaged packages, and the logs against MLPerf's own rules.

From a hostile-user review: check followed symbolic links out of the submission (and printed an
outside file's content), read a 1.5 GB sparse log whole (3.1 GB RSS), crashed on wrong-shaped
stored files, and called logs clean that MLPerf's compliance checker fails. Each test here
failed on the code before the fix (the MLPerf ones: no log passed, and check never ran it).
Fuzzing of the same: tests/test_submission_fuzz.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compliance
from bench import events as ev
from bench import submission as sub
from bench.cli import main
from fixtures_results import Eval, RunSpec, make_plan, sweep_config, write_run, write_sweep

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "clusters" / "local.yaml"
SECRET = "SECRET-6f1c9e-outside-the-submission"
RUN = "gbs000004-w001-s0"


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pkg")
    results = write_sweep(root / "results", "demo", batches=(4, 16), seeds=(0,), epochs=6, s_min=20.0)
    return sub.make_submission([results], CLUSTER, root / "sub", submitter="ACME")


@pytest.fixture
def pkg(clean, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(clean, tmp_path / "sub"))


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the package holding a 'secret' file and a YAML mapping with the secret."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text(SECRET + "\n")
    (folder / "config.yaml").write_text(f"name: {SECRET}\nworkload: {SECRET}\n")
    return folder


def _check(path: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["check", str(path), *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _append_checksum(pkg: Path, rel: str, data: bytes) -> None:
    import hashlib

    with open(pkg / "checksums.sha256", "a", encoding="utf-8") as fh:
        fh.write(f"{hashlib.sha256(data).hexdigest()}  {rel}\n")


# --- 1. links are refused, never followed, their targets never printed -------------------------

def test_a_listed_symlink_is_a_violation_not_clean(pkg, outside, capsys):
    os.symlink(outside / "secret.txt", pkg / "evil.txt")
    _append_checksum(pkg, "evil.txt", (SECRET + "\n").encode())  # the attacker lists its true digest
    code, out = _check(pkg, capsys)
    assert code == 1
    assert "VIOLATION: evil.txt: is a symbolic link; links are not followed" in out
    assert SECRET not in out


def test_a_config_replaced_by_a_link_to_outside_yaml_is_refused_unread(pkg, outside, capsys):
    config = pkg / "runs" / "demo" / RUN / "config.yaml"
    config.unlink()
    os.symlink(outside / "config.yaml", config)
    code, out = _check(pkg, capsys)
    assert code == 1 and SECRET not in out
    assert f"VIOLATION: runs/demo/{RUN}/config.yaml: is a symbolic link; links are not followed" in out
    assert f"VIOLATION: run demo/{RUN}: runs/demo/{RUN}/config.yaml: is a symbolic link; links are not " \
           "followed" in out


def test_a_symlinked_folder_is_refused_and_not_hashed(pkg, tmp_path, capsys):
    import shutil

    real = Path(shutil.copytree(pkg / "runs" / "demo" / RUN, tmp_path / "elsewhere"))
    (real / "summary.json").write_text(json.dumps({"note": SECRET}))  # would differ if hashed
    shutil.rmtree(pkg / "runs" / "demo" / RUN)
    os.symlink(real, pkg / "runs" / "demo" / RUN)
    problems = compliance.check_submission(pkg)
    assert f"runs/demo/{RUN}: is a symbolic link; links are not followed" in problems
    assert not any("was modified" in p for p in problems)  # nothing under the link was read
    assert not any(SECRET in p for p in problems)


def test_a_symlinked_submission_or_reference_is_one_line_exit_2(clean, tmp_path, capsys):
    os.symlink(clean, tmp_path / "link")
    code, out = _check(tmp_path / "link", capsys)
    assert code == 2 and out.count("\n") == 1 and "symbolic link" in out
    code, out = _check(clean, capsys, "--reference", str(tmp_path / "link"))
    assert code == 2 and out.count("\n") == 1 and "symbolic link" in out
    code, out = _check(tmp_path / "nothing-here", capsys)
    assert code == 2 and out.startswith("batchscale: error: no submission folder")


def test_a_fifo_is_refused_without_being_opened(pkg, capsys):
    os.mkfifo(pkg / "pipe.log")  # opening it for reading would block
    problems = compliance.check_submission(pkg)
    assert "pipe.log: is not a regular file" in problems


# --- 2. bounded, streamed reads --------------------------------------------------------------------

def test_a_huge_sparse_log_is_refused_by_size(pkg):
    log = pkg / "results" / "demo" / f"{RUN}.log"
    os.truncate(log, 1_500_000_000)  # sparse: no disk used
    problems = compliance.check_submission(pkg)
    assert f"run demo/{RUN}: results/demo/{RUN}.log: is 1,500,000,000 bytes, above the 536,870,912-byte " \
           "limit for a mllog file" in problems
    assert f"checksums: results/demo/{RUN}.log: is 1,500,000,000 bytes, above the 536,870,912-byte limit " \
           "for a mllog file" in problems


def test_a_log_under_the_limit_is_streamed_line_by_line(pkg):
    log = pkg / "results" / "demo" / f"{RUN}.log"
    lines = len(log.read_text().splitlines())
    os.truncate(log, 400_000_000)  # real lines, then 400 MB of zero bytes without a newline
    problems = compliance.check_submission(pkg)
    assert f"run demo/{RUN}: results/demo/{RUN}.log: line {lines + 1} is longer than 1,048,576 bytes" in problems


@pytest.mark.slow
def test_check_memory_on_a_sparse_log_stays_small(pkg):
    """The review measured 3.1 GB RSS on a 1.5 GB sparse log; now the log is refused by its size."""
    os.truncate(pkg / "results" / "demo" / f"{RUN}.log", 1_500_000_000)
    probe = ("import resource, subprocess, sys; "
             "rc = subprocess.run([sys.executable, '-m', 'bench', 'check', sys.argv[1]], capture_output=True).returncode; "
             "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", probe, str(pkg)], capture_output=True, text=True, env=env,
                         check=True, cwd=REPO).stdout.split()
    code, max_rss_kib = int(out[0]), int(out[1])
    assert code == 1
    assert max_rss_kib < 400 * 1024, f"check used {max_rss_kib / 1024:.0f} MiB"  # ~120 MiB measured


# --- 3. wrong-shaped stored files are one violation each ----------------------------------------

@pytest.mark.parametrize("name, content, says", [
    ("summary.json", "[1, 2]", "summary.json: (top level): Input should be a valid dictionary"),
    ("summary.json", '"hello"', "summary.json: (top level): Input should be a valid dictionary"),
    ("config.yaml", "just a string\n", "config.yaml: expected a mapping, got a string"),
    ("run.json", "[1, 2, 3]", "run.json: expected a mapping, got a list"),
    ("env.json", "5", "env.json: expected a mapping, got an integer"),
    ("summary.json", '{"run_id": ', "summary.json: is not valid JSON (JSONDecodeError: line 1 column 12)"),
])
def test_wrong_shaped_run_file_is_one_violation_naming_it(pkg, name, content, says):
    (pkg / "runs" / "demo" / RUN / name).write_text(content)
    problems = [p for p in compliance.check_submission(pkg)
                if not p.startswith(("checksums:", "sweep demo:"))]  # the edit; the run it removes
    assert len(problems) == 1 and problems[0].startswith(f"run demo/{RUN}: ") and says in problems[0], problems


@pytest.mark.parametrize("content", ["[1, 2]", '"hello"', "{"])
def test_wrong_shaped_system_json_is_one_violation(pkg, content):
    (pkg / "system.json").write_text(content)
    problems = [p for p in compliance.check_submission(pkg) if not p.startswith("checksums:")]
    assert len(problems) == 1 and problems[0].startswith("system.json"), problems


@pytest.mark.parametrize("line", [":::MLLOG [1, 2]", ':::MLLOG {"key": 5}', ':::MLLOG {"key": "x", "metadata": []}',
                                  ":::MLLOG {not json"])
def test_a_garbled_log_line_is_a_violation_naming_the_line_not_quoting_it(pkg, line, capsys):
    log = pkg / "results" / "demo" / f"{RUN}.log"
    lines = log.read_text().splitlines()
    lines[20] = line
    log.write_text("\n".join(lines) + "\n")
    code, out = _check(pkg, capsys)
    assert code == 1 and f"VIOLATION: run demo/{RUN}: results/demo/{RUN}.log: line 21 is not" in out
    assert line not in out


@pytest.mark.parametrize("old, new", [('"epoch_num": 2, "step"', '"epoch_num": [2], "step"'),
                                      ('"value": 0.', '"value": 1' + '0' * 400 + ', "was": 0.')])
def test_values_of_the_wrong_type_in_a_log_are_a_violation_of_the_run(pkg, old, new):
    log = pkg / "results" / "demo" / f"{RUN}.log"
    lines = log.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if '"key": "eval_accuracy"' in line and old in line)
    lines[i] = lines[i].replace(old, new, 1)
    log.write_text("\n".join(lines) + "\n")
    problems = [p for p in compliance.check_submission(pkg) if not p.startswith("checksums:")]
    assert problems == [f"run demo/{RUN}: the log holds values that are not usable as numbers "
                        f"({'TypeError' if '[2]' in new else 'OverflowError'})"]


def test_a_run_json_field_of_the_wrong_type_is_a_violation(pkg):
    plan_path = pkg / "runs" / "demo" / RUN / "run.json"
    plan = json.loads(plan_path.read_text())
    plan["global_batch_size"] = [4]
    plan_path.write_text(json.dumps(plan))
    problems = [p for p in compliance.check_submission(pkg) if not p.startswith(("checksums:", "sweep demo:"))]
    assert problems == [f"run demo/{RUN}: run.json: global_batch_size: Input should be a valid integer"]


# --- 4. the logs pass MLPerf's own compliance checker, which check runs ---------------------------

def test_mlperf_checker_entry_points_pinned():
    """The public names bench.mlperf_rules calls, and what they do with a log missing init_*."""
    from mlperf_logging.compliance_checker import mlp_compliance
    from mlperf_logging.compliance_checker.mlp_parser import ruleset_610

    from bench import mlperf_rules

    assert mlperf_rules.newest_ruleset() >= "6.1.0"
    assert mlperf_rules.rules_file("6.1.0").is_file()
    loglines, errors = ruleset_610.parse_generator([':::MLLOG {"namespace": "", "time_ms": 1, "event_type": '
                                                    '"INTERVAL_START", "key": "run_start", "value": null, '
                                                    '"metadata": {}}', "not a log line"])
    assert len(loglines) == 1 and errors == [] and loglines[0].key == "run_start"
    checker = mlp_compliance.make_checker("training", "6.1.0", True, False)
    checker.configured_checks(loglines, str(mlperf_rules.rules_file("6.1.0")))
    assert "run_start" in checker.overwritable and "init_stop" in checker.overwritable
    assert mlp_compliance.enqueued_configs == []  # no division line: nothing queued
    found = mlperf_rules.common_rule_failures([
        ':::MLLOG {"namespace": "", "time_ms": 1, "event_type": "POINT_IN_TIME", "key": "submission_division", '
        '"value": "open", "metadata": {}}',
        f':::MLLOG {{"namespace": "", "time_ms": 2, "event_type": "INTERVAL_START", "key": "run_start", '
        f'"value": null, "metadata": {{"x": "{SECRET}"}}}}'], "6.1.0")
    assert mlp_compliance.enqueued_configs == []  # the open_common.yaml it queued was dropped
    assert "CHECK for 'run_start' failed in MLLOG line 2: failed test: ( s['init_stopped'] == True )" in found
    assert "Required EXACTLY_ONE occurrence of 'init_stop' but found 0" in found
    assert not any(SECRET in f for f in found)  # the checker quotes the line; we do not
    assert mlperf_rules.common_rule_failures([":::MLLOG [1, 2]"]) == ["the checker stopped on this log (TypeError)"]


def test_every_log_passes_mlperf_common_rules_of_three_rulesets(clean):
    from bench import mlperf_rules, safeio

    logs = sorted(clean.glob("results/*/*.log"))
    assert len(logs) == 2
    for ruleset in ("6.1.0", "5.0.0", "4.0.0"):
        for log in logs:
            lines = (text for _, text in safeio.iter_lines(log, "mllog", root=clean))
            assert mlperf_rules.common_rule_failures(lines, ruleset) == [], (ruleset, log.name)


def test_check_reports_mlperf_failures(pkg, capsys):
    log = pkg / "results" / "demo" / f"{RUN}.log"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()
                           if '"key": "init_stop"' not in line and '"key": "cache_clear"' not in line))
    code, out = _check(pkg, capsys)
    assert code == 1
    assert "common rules: CHECK for 'run_start' failed in MLLOG line 15: failed test: ( s['init_stopped'] == True )" in out
    assert "common rules: Required AT_LEAST_ONE occurrence of 'cache_clear' but found 0" in out
    assert "common rules: Required EXACTLY_ONE occurrence of 'init_stop' but found 0" in out


def _mllog(path: Path) -> list[dict]:
    return [json.loads(line[len(":::MLLOG "):]) for line in path.read_text().splitlines()]


def test_run_stop_status_is_mlperfs_with_ours_in_metadata(tmp_path):
    """success iff an evaluation reached the target (0.8), whatever happened after; our status
    and reason stay in the metadata."""
    sweep = tmp_path / "results" / "mapping"
    config = sweep_config("mapping", batches=(4, 8, 16, 32), target=0.8, epochs=3)
    reach = [Eval(0, 0.3, 0.3), Eval(1, 0.6, 0.6), Eval(2, 0.85, 0.81), Eval(3, 0.9, 0.84)]
    short = [Eval(0, 0.3, 0.3), Eval(1, 0.6, 0.6), Eval(2, 0.75, 0.7), Eval(3, 0.8, 0.79)]
    cases = {4: ("success", reach), 8: ("success", short), 16: ("diverged", reach), 32: ("oom", short[:2])}
    for b, (status, evals) in cases.items():
        reason = None if status == "success" else f"{status} in this test"
        write_run(sweep, RunSpec(make_plan("mapping", b, epochs=3), evals, status=status, reason=reason),
                  config=config)
    out = sub.make_submission([sweep], CLUSTER, tmp_path / "sub", submitter="ACME")
    stops = {b: next(e for e in _mllog(out / "results" / "mapping" / f"gbs{b:06d}-w001-s0.log")
                     if e["key"] == ev.RUN_STOP)["metadata"] for b in cases}
    assert [(stops[b]["status"], stops[b]["batchscale_status"], stops[b]["epochs_to_target"]) for b in cases] == [
        ("success", "success", 2),  # reached 0.81 at epoch 2
        ("aborted", "success", None),  # completed, best 0.79 < 0.8
        ("success", "diverged", 2),  # reached the target, then diverged
        ("aborted", "oom", None)]
    assert stops[16]["reason"] == "diverged in this test" and stops[32]["target_accuracy"] == 0.8
    assert compliance.check_submission(out) == []


def test_init_logged_by_the_worker_is_kept_as_it_was(tmp_path):
    results = write_sweep(tmp_path / "results", "demo", batches=(4,), seeds=(0,), epochs=4, s_min=20.0)
    events_path = results / RUN / "events.jsonl"
    events = ev.read_events(events_path)
    t0 = events[0]["time_ms"]
    init = [ev.make_event(ev.INIT_START, None, event_type=ev.INTERVAL_START, time_ms=t0 - 5000.0),
            ev.make_event(ev.INIT_STOP, None, event_type=ev.INTERVAL_END, time_ms=t0 - 10.0)]
    events_path.write_text("".join(json.dumps(e) + "\n" for e in init + events))
    out = sub.make_submission([results], CLUSTER, tmp_path / "sub", submitter="ACME")
    logged = _mllog(out / "results" / "demo" / f"{RUN}.log")
    inits = [e for e in logged if e["key"] in (ev.INIT_START, ev.INIT_STOP)]
    assert [(e["key"], e["time_ms"]) for e in inits] == [(ev.INIT_START, t0 - 5000.0), (ev.INIT_STOP, t0 - 10.0)]
    assert all("recorded" not in e["metadata"] for e in inits)
    assert logged[0]["time_ms"] == t0 - 5000.0  # the header at the log's first event
    assert compliance.check_submission(out) == []


def test_header_and_precision_must_agree_with_the_package(pkg):
    log = pkg / "results" / "demo" / f"{RUN}.log"
    text = log.read_text()
    for old, new in (('"value": "ACME"', '"value": "Someone Else"'), ('"value": "fp32"', '"value": "fp16"'),
                     ("config.yaml", "other.yaml")):
        text = text.replace(old, new, 1)
    log.write_text(text)
    problems = [p for p in compliance.check_submission(pkg) if not p.startswith("checksums:")]
    assert problems == [f"run demo/{RUN}: submission_org in the log differs from system.json submitter",
                        f"run demo/{RUN}: lowest_numerical_precision_in_linear in the log does not match the "
                        "config's precision fp32",
                        f"run demo/{RUN}: config_filename in the log is not runs/demo/{RUN}/config.yaml"]


# --- 5. no import cycle -----------------------------------------------------------------------------

def _modules_after(code: str) -> str:
    """What a fresh interpreter prints after running code with this checkout's bench."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True).stdout.strip()


def test_compliance_does_not_import_submission():
    assert _modules_after("import sys, bench.compliance, bench.compare, bench.mllog_export, "
                          "bench.submission_files; print('bench.submission' in sys.modules)") == "False"


def test_building_the_cli_parser_loads_neither_mlperf_logging_nor_numpy():
    assert _modules_after("import sys, bench.cli; bench.cli.build_parser(); print(sorted(m for m in "
                          "('numpy', 'pandas', 'mlperf_logging') if m in sys.modules))") == "[]"
