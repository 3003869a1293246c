"""bench.submission and bench.compliance on synthetic results written through bench.store and
bench.events (tests/fixtures_results.py): a clean submission passes (MLPerf's common rules
included); a tampered LR, a missing run, an edited file, a run that converges too fast, a
run_stop status that is not MLPerf's each fail with their specific violation; refusals leave
nothing behind. Hostile packages (links, huge files, wrong shapes): tests/test_compliance.py."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from bench import compare, compliance, mlperf_rules
from bench import events as ev
from bench import submission as sub
from bench import submission_files as files
from bench.mllog_export import HEADER_KEYS, PARALLELISM_KEYS, PRECISION_KEYS
from bench.errors import UserError
from fixtures_results import write_sweep

CLUSTER = Path(__file__).resolve().parent.parent / "clusters" / "local.yaml"
BATCHES, SEEDS, EPOCHS = (4, 16, 64), (0, 1, 2), 20


def _results(root: Path, name: str = "demo", **kw) -> Path:
    kw = {"batches": BATCHES, "seeds": SEEDS, "epochs": EPOCHS, "s_min": 50.0, "b_crit": 64.0, **kw}
    return write_sweep(root, name, **kw)


def _submit(results: Path, out: Path) -> Path:
    return sub.make_submission([results], CLUSTER, out, submitter="ACME Research")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    return _submit(_results(root / "results"), root / "submissions" / "acme-local")


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def test_clean_submission_passes(clean):
    assert compliance.check_submission(clean) == []
    assert compliance.check_submission(clean, reference=clean) == []  # same convergence as the reference


def test_layout_and_system_json(clean):
    system = json.loads((clean / "system.json").read_text())
    assert set(files.SYSTEM_FIELDS) <= set(system)
    assert system["submitter"] == "ACME Research" and system["division"] == "open"
    assert system["system_name"] == "local" and system["number_of_nodes"] == 1
    assert system["framework"] == "PyTorch 2.3.0, Ray 2.60.0"
    assert system["accelerator_model_name"] is None  # unknown stays null
    logs = sorted((clean / "results" / "demo").glob("*.log"))
    assert len(logs) == len(BATCHES) * len(SEEDS)
    lines = logs[0].read_text().splitlines()
    assert all(line.startswith(":::MLLOG {") for line in lines)
    assert system["status"] == "Research, Development, or Internal (RDI)"  # the default, MLPerf's words
    first = [json.loads(line[len(":::MLLOG "):]) for line in lines[:17]]
    assert [e["key"] for e in first] == [*HEADER_KEYS, "cache_clear", *PRECISION_KEYS, *PARALLELISM_KEYS,
                                         "config_filename", ev.INIT_START, ev.INIT_STOP, ev.RUN_START]
    values = {e["key"]: e["value"] for e in first}
    assert values["submission_org"] == "ACME Research" and values["submission_benchmark"] == "blobs"
    assert values["submission_status"] == "research" and values["cache_clear"] is False
    assert values["lowest_numerical_precision_in_linear"] == "fp32" and values["tensor_parallelism"] == 1
    assert values["config_filename"] == f"runs/demo/{logs[0].stem}/config.yaml"
    # the fixture, like every committed results folder, predates init_start/init_stop: a zero-length
    # interval at run_start, marked as not recorded
    assert first[14]["time_ms"] == first[15]["time_ms"] == first[16]["time_ms"]
    assert first[14]["metadata"]["recorded"] is False and first[15]["metadata"]["recorded"] is False
    run = clean / "runs" / "demo" / logs[0].stem
    assert {p.name for p in run.iterdir()} >= {"run.json", "summary.json", "config.yaml", "env.json"}
    table = pd.read_csv(clean / "summary.csv")
    assert len(table) == len(logs) and "epochs_to_target" in table
    listed = (clean / "checksums.sha256").read_text().splitlines()
    assert len(listed) == len([p for p in clean.rglob("*") if p.is_file()]) - 1
    assert not [p for p in clean.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_tampered_lr_is_caught(tmp_path):
    results = _results(tmp_path / "results")
    log = results / "gbs000016-w001-s1" / "events.jsonl"
    events = ev.read_events(log)
    for e in events:
        if e["key"] == ev.OPT_LEARNING_RATE and e["metadata"]["step"] == 3:
            e["value"] *= 1.5
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    problems = compliance.check_submission(_submit(results, tmp_path / "sub"))
    assert len(problems) == 1, problems
    assert "demo/gbs000016-w001-s1: LR applied at step 3 was" in problems[0]
    # 500 samples / 16 = 31 full steps + 1 partial = 32 steps per epoch = 32 warmup steps (1 epoch);
    # warmup from 0.01 to 0.01 x 16/4 = 0.04: step 3 gets 0.01 + 0.03 x 3/32 = 0.0128125;
    # logged: the 32 steps of epoch 1 + the first step of epochs 2..20 = 51
    assert "the linear rule with 32 warmup steps gives 0.0128125 (1 of 51 logged steps differ)" in problems[0]


def test_declared_peak_lr_that_breaks_the_rule_is_caught(tmp_path):
    results = _results(tmp_path / "results")
    plan_path = results / "gbs000064-w001-s0" / "run.json"
    plan = json.loads(plan_path.read_text())
    plan["peak_lr"] = 0.08  # the linear rule gives 0.01 x 64 / 4 = 0.16
    plan_path.write_text(json.dumps(plan))
    problems = compliance.check_submission(_submit(results, tmp_path / "sub"))
    assert any("run.json declares peak_lr 0.08, the linear rule with 8 warmup steps gives 0.16" in p for p in problems)


def test_missing_run_is_caught(tmp_path):
    results = _results(tmp_path / "results")
    shutil.rmtree(results / "gbs000004-w001-s2")
    problems = compliance.check_submission(_submit(results, tmp_path / "sub"))
    assert problems == ["sweep demo: global batch 4 x 1 worker(s): 2 of 3 declared seeds present "
                        "(missing seeds [2])"]


def test_run_removed_from_a_package_is_caught(clean, tmp_path):
    copy = _copy(clean, tmp_path)
    (copy / "results" / "demo" / "gbs000016-w001-s0.log").unlink()
    problems = compliance.check_submission(copy)
    assert "checksums: results/demo/gbs000016-w001-s0.log is listed but missing" in problems
    assert "run demo/gbs000016-w001-s0: folder without a result log" in problems
    assert any("missing seeds [0]" in p for p in problems)


def test_a_diverged_run_is_a_result_not_a_violation(clean, tmp_path):
    """Failures are results: a run that diverged (log and summary agree) stays in a valid
    submission; only the checksums of the two edited files notice the edit here. It reached the
    target before diverging, so MLPerf's status stays success."""
    copy = _copy(clean, tmp_path)
    log = copy / "results" / "demo" / "gbs000004-w001-s0.log"
    log.write_text(log.read_text().replace('"batchscale_status": "success"', '"batchscale_status": "diverged"'))
    summary = copy / "runs" / "demo" / "gbs000004-w001-s0" / "summary.json"
    summary.write_text(summary.read_text().replace('"status": "success"', '"status": "diverged"'))
    assert [p.split(" was modified")[0] for p in compliance.check_submission(copy)] == [
        "checksums: results/demo/gbs000004-w001-s0.log", "checksums: runs/demo/gbs000004-w001-s0/summary.json"]


def test_edited_file_is_caught(clean, tmp_path):
    copy = _copy(clean, tmp_path)
    summary = copy / "runs" / "demo" / "gbs000064-w001-s1" / "summary.json"
    summary.write_text(summary.read_text().replace('"final_test_acc": 0.', '"final_test_acc": 0.9'))
    (copy / "notes.txt").write_text("added later")
    assert compliance.check_submission(copy) == [
        "checksums: notes.txt is not listed in checksums.sha256",
        "checksums: runs/demo/gbs000064-w001-s1/summary.json was modified (sha256 differs)"]


def test_checksum_lines_pointing_outside_are_violations_never_read(clean, tmp_path):
    copy = _copy(clean, tmp_path)
    (tmp_path / "secret.txt").write_text("outside the submission")
    with open(copy / "checksums.sha256", "a", encoding="utf-8") as fh:
        fh.write(f"{'0' * 64}  ../secret.txt\n{'0' * 64}  {tmp_path / 'secret.txt'}\n")
    assert compliance.check_submission(copy) == [
        "checksums: ../secret.txt points outside the submission folder",
        f"checksums: {tmp_path / 'secret.txt'} points outside the submission folder"]


def test_lr_line_without_a_step_is_a_violation_not_a_crash(tmp_path):
    results = _results(tmp_path / "results", batches=(4,), seeds=(0, 1, 2))
    log = results / "gbs000004-w001-s0" / "events.jsonl"
    events = ev.read_events(log)
    next(e for e in events if e["key"] == ev.OPT_LEARNING_RATE)["metadata"]["step"] = None
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    problems = compliance.check_submission(_submit(results, tmp_path / "sub"))
    assert problems == ["run demo/gbs000004-w001-s0: 1 opt_learning_rate line(s) without a whole-number step"]


def test_missing_system_field_and_failed_run(clean, tmp_path):
    copy = _copy(clean, tmp_path)
    system = json.loads((copy / "system.json").read_text())
    del system["cooling"]
    system["framework"] = None
    (copy / "system.json").write_text(json.dumps(system))
    edits = {"gbs000004-w001-s0": ('"status": "success"', '"status": "diverged"'),  # ours, not MLPerf's
             "gbs000016-w001-s0": ('"status": "success"', '"status": "aborted"'),  # but it reached the target
             "gbs000064-w001-s0": ('"batchscale_status": "success"', '"batchscale_status": "oom"'),
             "gbs000064-w001-s1": ('"key": "run_stop"', '"key": "run_stopped"')}
    for run_id, (old, new) in edits.items():
        log = copy / "results" / "demo" / f"{run_id}.log"
        log.write_text(log.read_text().replace(old, new))
    problems = [p for p in compliance.check_submission(copy) if not p.startswith("checksums:")]
    assert problems == ["system.json: field 'cooling' missing", "system.json: field 'framework' is empty",
                        "run demo/gbs000004-w001-s0: run_stop status is not MLPerf's success or aborted",
                        "run demo/gbs000016-w001-s0: run_stop status aborted, but an evaluation reached the "
                        "target accuracy 0.8",
                        "run demo/gbs000064-w001-s0: summary.json status 'success', log says oom",
                        "run demo/gbs000064-w001-s1: not complete (no run_stop line)",
                        f"run demo/gbs000064-w001-s1: MLPerf training {mlperf_rules.newest_ruleset()} common rules: "
                        "Required EXACTLY_ONE occurrence of 'run_stop' but found 0"]


def test_refuses_incomplete_runs_and_leaves_nothing(tmp_path):
    results = _results(tmp_path / "results", failures={16: "incomplete"})
    out = tmp_path / "subs" / "x"
    with pytest.raises(UserError, match=r"1 incomplete run\(s\).*demo/gbs000016-w001-s2") as info:
        _submit(results, out)
    assert info.value.code == 1
    assert not out.exists() and not (tmp_path / "subs").exists()


def test_refuses_non_empty_output(clean, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        _submit(clean, tmp_path / "taken")  # (results path irrelevant: refused first)


# --- convergence against a reference (RCP) ------------------------------------------------------

def test_faster_convergence_than_reference_fails(clean, tmp_path):
    fast = _results(tmp_path / "results", s_min=25.0, batches=(4, 16, 64, 256))  # half the steps
    problems = compliance.check_submission(_submit(fast, tmp_path / "fast"), reference=clean)
    assert [p.split(":")[1].strip() for p in problems] == [
        "blobs global batch 4", "blobs global batch 16", "blobs global batch 64"]  # 256: above the RCPs
    assert all("faster than the reference" in p and "p=" in p for p in problems)


def test_reference_points_prune_and_interpolation():
    df = pd.DataFrame({"global_batch_size": [8, 8, 16, 16, 32, 32, 64, 64, 128, 128],
                       "epochs_to_target": [6, 6, 4, 4, 9, 9, 6, 6, 10, 10]})
    pts = compliance.reference_points(df)
    # 8 is smaller than the fastest batch (16: 4 epochs): pruned; 32 (9) is slower than the
    # interpolation of 16 and 64 (4 + (6 - 4) * 16 / 48 = 4.67): pruned.
    assert pts["global_batch_size"].tolist() == [16, 64, 128]
    assert pts["mean"].tolist() == [4, 6, 10] and pts["n"].tolist() == [2, 2, 2]


def test_single_run_allowance_is_the_prediction_t_test():
    from scipy import stats

    # One run at 3 epochs vs reference mean 5, std 0.5, n 5: t = -2 / (0.5 sqrt(1 + 1/5)) = -3.651,
    # 4 dof -> p = 0.0109 < 0.05: too fast. At 4.4 epochs: t = -1.095, p = 0.17: allowed.
    def p(x):
        return stats.ttest_ind_from_stats(x, 0.0, 1, 5.0, 0.5, 5, equal_var=True, alternative="less").pvalue

    assert p(3.0) == pytest.approx(0.01087, abs=1e-4) and p(4.4) > 0.05


# --- compare and CLI ---------------------------------------------------------------------------------

def test_compare_prints_and_writes_html(clean, tmp_path, capsys):
    other = _submit(_results(tmp_path / "results", s_min=25.0), tmp_path / "a<b>")
    long = compare.compare_submissions([clean, other], tmp_path / "cmp.html")
    assert sorted(long["submission"].unique()) == ["a<b>", "acme-local"]
    row = long[(long["submission"] == "acme-local") & (long["global_batch_size"] == 16)].iloc[0]
    assert row["n_runs"] == 3 and row["samples_per_s"] == pytest.approx(500 / (0.02 * 2))
    out = capsys.readouterr().out
    assert "time_to_target_s" in out and "acme-local" in out
    page = (tmp_path / "cmp.html").read_text()
    assert "a&lt;b&gt;" in page and "a<b>" not in page and "<script" not in page


def _cli(argv):
    parser = argparse.ArgumentParser()
    sub.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_submit_check_compare(tmp_path, capsys):
    results = _results(tmp_path / "results", batches=(4, 16), seeds=(0,))
    out = tmp_path / "subs" / "one"
    assert _cli(["submit", str(results), "--system", str(CLUSTER), "-o", str(out), "--submitter", "ACME",
                 "--status", "rdi"]) == 0
    assert _cli(["check", str(out)]) == 0
    assert json.loads((out / "system.json").read_text())["status"] == "Research, Development, or Internal (RDI)"
    log = next((out / "results").glob("*/*.log")).read_text()
    assert '"key": "submission_status", "value": "research"' in log  # the word MLPerf's 4.0 rules accept
    (out / "summary.csv").write_text("edited")
    assert _cli(["check", str(out), "--reference", str(out)]) == 1
    assert "VIOLATION: checksums: summary.csv was modified" in capsys.readouterr().out
    assert _cli(["compare", str(out), "-o", str(tmp_path / "c.html")]) == 0
    with pytest.raises(UserError):
        _cli(["submit", str(results), "--system", str(CLUSTER), "-o", str(out)])


def test_an_lr_search_sweep_is_not_submitted(tmp_path, capsys):
    """Trials at several LRs per batch are not a submission (MLPerf: one set of hyperparameters)."""
    import json

    from bench.cli import main

    sweep = write_sweep(tmp_path / "results", "lrs", batches=(4, 16), seeds=(0,), epochs=10)
    trial = next(sweep.glob("gbs000004*"))
    plan = json.loads((trial / "run.json").read_text())
    (trial / "run.json").write_text(json.dumps({**plan, "lr_factor": 2.0, "stage": 1}))
    system = tmp_path / "c.yaml"
    system.write_text("name: c\n")
    code = main(["submit", str(sweep), "--system", str(system), "-o", str(tmp_path / "sub")])
    err = capsys.readouterr().err
    assert code == 2 and "at another LR than the rule's" in err and not (tmp_path / "sub").exists()
