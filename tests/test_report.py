"""bench.report: a synthetic results folder -> one self-contained HTML page, opened in a real
headless browser when /usr/bin/chromium and websocket-client are installed."""

from __future__ import annotations

import base64
import json
import re
import resource
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bench.report import write_report
from bench.store import RunSkipped
from fixtures_results import Eval, RunSpec, make_plan, sweep_config, write_run, write_sweep

EVIL = '<script>alert("x")</script>'
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """8 runs x 40 epochs, one diverged and one incomplete, batch 256 never reaches 0.80."""
    root = tmp_path_factory.mktemp("results")
    return write_sweep(root, "demo", batches=(4, 16, 64, 256), seeds=(0, 1), epochs=40,
                       description=f"blobs sweep {EVIL}", failures={16: "diverged", 64: "incomplete"})


@pytest.fixture(scope="module")
def report(sweep_dir, tmp_path_factory) -> tuple[Path, str]:
    out = write_report([sweep_dir], tmp_path_factory.mktemp("reports") / "demo.html")
    return out, out.read_text(encoding="utf-8")


def _external_refs(page: str) -> list[str]:
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page, flags=re.I)
    return [r for r in refs if not r.startswith("data:")]


def test_report_is_self_contained(report):
    out, page = report
    assert out.is_file() and page.startswith("<!DOCTYPE html>")
    for needle in ("http://", "https://", 'src="//', "<link", "@import", "url("):
        assert needle not in page, needle
    assert _external_refs(page) == []
    assert page.count("<script") == 1  # the inline table sorter, nothing else
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 7
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert out.stat().st_size < 5 * 2**20


def test_header_and_tables_come_from_the_data(report):
    _, page = report
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page and EVIL not in page
    for text in ("blobs", "mlp", "linear", "test-cluster", "abc1234", "2.60.0", "0.8"):
        assert f"<td>{text}</td>" in page, text
    assert "<td>unknown</td>" in page  # driver and GPU model of a CPU run are not guessed
    assert "<td>the whole training set</td>" in page  # train metrics (and the gap) cover every sample
    assert "diverged in a synthetic run" in page and "no summary.json" in page  # failed runs listed
    # computed captions: batch 64 needs 200 steps (25 epochs of 8) in seed 0; seed 1 is incomplete, so
    # the one run is not the batch's result and no speed-up over batch 4 is claimed
    assert ("batch 64 reached 0.80 test accuracy in 1 of 2 runs (seed 0, epoch 25); the other run never did "
            "(seed 1 is incomplete)") in page
    assert "batch 256 never reached it" in page
    assert "no GPU telemetry (CPU run)" in page
    assert "could not be drawn" not in page


def test_escapes_names_and_reasons(tmp_path):
    """A sweep folder name and a failure reason are text from disk: they must never become markup."""
    write_sweep(tmp_path, 'sw<b onmouseover="x">$a$', batches=(4, 16), seeds=(0,), epochs=20,
                description=EVIL, failures={16: "oom"})
    write_sweep(tmp_path, "plain", batches=(4, 16), seeds=(0,), epochs=20)  # two sweeps: names go into plots
    page = write_report([tmp_path], tmp_path / "r.html", title=f"title {EVIL}").read_text()
    assert "<b onmouseover" not in page and "&lt;b onmouseover=&quot;x&quot;&gt;$a$" in page
    assert EVIL not in page and page.count("<script") == 1
    assert "could not be drawn" not in page  # '$' in a name is not taken for maths by matplotlib
    assert "\\$" not in page  # the escape that keeps it from maths is for figures, never for the page's text


def test_nothing_reached_and_several_sweeps(tmp_path):
    a = write_sweep(tmp_path / "a", "cluster-a", batches=(4, 64), seeds=(0,), epochs=10, target=0.99)
    b = write_sweep(tmp_path / "b", "cluster-b", batches=(4, 64), seeds=(0,), epochs=10, target=0.99,
                    telemetry_kind="gpu", worker_env={"torch": "2.11", "gpu_model": "NVIDIA H100", "driver": "580.1"})
    page = write_report([a, b], tmp_path / "r.html").read_text()
    assert "cluster-a" in page and "cluster-b" in page
    assert page.count("Not shown: No run reached the target accuracy") == 2  # steps and time figures
    assert page.count("no agreement to report: B_crit could not be fitted: fewer than two batch sizes "
                      "reached the target") == 2
    assert "<td>NVIDIA H100</td>" in page and "<td>580.1</td>" in page
    assert "could not be drawn" not in page


def test_capacity_figure_is_a_note_when_nothing_reached_the_target(tmp_path):
    sweep = write_sweep(tmp_path, "never", batches=(4, 64), seeds=(0,), epochs=10, target=0.99)
    page = write_report([sweep], tmp_path / "r.html").read_text()
    section = page.split('id="fig-capacity"')[1].split("</section>")[0]
    assert "Not shown: no configuration reaches the target" in section and "<img" not in section


def test_target_override_empty_and_corrupt(tmp_path):
    small = write_sweep(tmp_path, "small", batches=(4, 256), seeds=(0, 1), epochs=20)
    (small / "gbs000004-w001-s0" / "events.jsonl").write_text('{"key": "x"}\nnot json\n{"key": "y"}\n')
    with pytest.warns(RunSkipped):
        page = write_report([small], tmp_path / "r.html", target_accuracy=0.5).read_text()
    assert "overridden to 0.5" in page and "never reached it" not in page
    # The corrupt run is listed with its reason (no raw bytes) and left out of every figure and fit
    # (before, it was dropped without a trace: the report never showed it).
    assert "gbs000004-w001-s1" in page
    failures = page.split("<h2>Failed, diverged")[1].split("<h2>Figures")[0]
    assert "gbs000004-w001-s0" in failures and "damaged: events.jsonl:2: broken event line" in failures
    assert "not json" not in page
    assert page.count("1 damaged run(s) (a file missing or corrupt) are listed in the failures table") == 2
    summary = page.split("<h2>Summary per global batch size")[1].split("<h2>Critical")[0]
    assert "1 (1 success)" in summary  # batch 4: the damaged seed is not counted
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No runs were found" in write_report([empty], tmp_path / "e.html").read_text()


@pytest.mark.slow
def test_eight_runs_of_200_epochs_in_under_10_s(tmp_path):
    """As the CLI runs it: a fresh process, imports included. CPU time is what is asserted, since
    the wall time on a shared 2-core machine depends on the neighbours."""
    small = write_sweep(tmp_path, "eight", batches=(4, 16, 64, 256), seeds=(0, 1), epochs=200)
    code = ("import sys; from pathlib import Path; from bench.report import write_report; "
            "write_report([Path(sys.argv[1])], Path(sys.argv[2]))")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code, str(small), str(tmp_path / "eight.html")], check=True,
                   cwd=Path(__file__).resolve().parent.parent, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu_s < 10.0, f"report generation took {cpu_s:.1f} s of CPU"
    assert (tmp_path / "eight.html").is_file()


@pytest.mark.slow
def test_hundred_runs_under_5_mb(tmp_path):
    big = write_sweep(tmp_path, "hundred", batches=(4, 8, 16, 32, 64, 96, 128, 192, 256, 500),
                      seeds=tuple(range(10)), epochs=12, s_min=10)
    page = write_report([big], tmp_path / "hundred.html").read_text()
    assert len(page.encode()) < 5 * 2**20
    assert page.count("<img ") == 9 and "Not shown" not in page  # every figure drawn, capacity plan included


# --- what the report now says about its numbers ---------------------------------------------

@pytest.fixture(scope="module")
def v2_page(tmp_path_factory) -> str:
    """Schema-v2 summaries, step-based evaluation (eval_every_steps: auto), GPU telemetry; batch
    256 never reaches the target and its last seed diverges at its peak LR."""
    root = tmp_path_factory.mktemp("v2")
    sweep = write_sweep(root, "v2demo", batches=(4, 16, 64, 256), seeds=(0, 1), epochs=40, v2=True,
                        telemetry_kind="gpu", failures={256: "diverged"})
    return write_report([sweep], root / "v2.html").read_text()


def test_v2_report_words_failures_memory_and_the_fit(v2_page):
    page = v2_page
    assert "diverged at peak LR 0.64: smoothed training loss 30 above the limit 23 at step 19" in page
    assert "PyTorch training peak, allocated goes from 0.22 GiB at per-worker batch 4 to 1.48 GiB at 256" in page
    assert "v1 summaries" not in page and "could not be drawn" not in page
    # steps 100 (1 + 64 / B) +1 % for seed 1, resolved to 16 % or better: every point is used
    assert "B_crit from the steps-to-target fit = 63.3, S_min = 103 steps (3 batch sizes, 6 runs); 95% bootstrap " \
           "interval 60.4 to 66.4 (2,000 resamples of the runs within each batch size; 3 of 3 batch sizes" in page
    assert "left out of the fit" not in page
    assert "hollow points: sustained crossing (held for 3 evaluations in a row)" in page
    assert "a difference counts as beyond the seed spread when the gap between the means exceeds twice" in page
    assert "No run ended below a target it had reached." in page


def test_runs_that_end_below_a_target_they_reached_are_flagged(tmp_path):
    sweep = write_sweep(tmp_path, "flag", batches=(4, 16), seeds=(0,), epochs=20)
    accs = [0.3, 0.5, 0.81, 0.6, 0.7, 0.75]  # crossed once at epoch 2, ends at 0.75
    plan = make_plan("flag", 64, epochs=5)
    write_run(sweep, RunSpec(plan, [Eval(i, a, a) for i, a in enumerate(accs)]),
              config=sweep_config("flag", batches=(4, 16, 64), epochs=20))
    page = write_report([sweep], tmp_path / "r.html").read_text()
    section = page.split("<h2>Runs that ended below a target they had reached")[1].split("<h2>")[0]
    assert "1 run(s) ended below a target they had reached" in section
    assert '<td data-v="gbs000064-w001-s0">' in section and "<td data-v=\"never\">never</td>" in section


def test_provenance_warnings(tmp_path):
    cluster = {"name": "gpu8", "use_gpu": True, "hardware": {"gpus_per_node": 8, "nodes": 1}}
    sweep = write_sweep(tmp_path, "prov", batches=(4, 16), seeds=(0,), epochs=10, cluster=cluster)
    page = write_report([sweep], tmp_path / "r.html").read_text()
    assert ("Provenance: cluster file &#x27;gpu8&#x27; has use_gpu: true, but the workers ran on the CPU "
            "(CPU on an unknown host) (2 runs)") in page
    assert "<td>CPU on an unknown host</td>" in page
    assert "<td>use_gpu true; 8 GPU(s) per node x 1 node(s); GPU model not given</td>" in page


def test_a_corrupt_telemetry_file_is_named_and_the_rest_drawn(tmp_path):
    sweep = write_sweep(tmp_path, "tele", batches=(4, 16), seeds=(0,), epochs=10)
    bad = sweep / "gbs000004-w001-s0" / "telemetry-rank0.csv"
    bad.write_text(bad.read_text().splitlines()[0] + "\n1,2\x00\x01secret\n")
    page = write_report([sweep], tmp_path / "r.html").read_text()
    assert ("tele/gbs000004-w001-s0: telemetry file skipped: telemetry-rank0.csv: line 2 has 2 fields, "
            "the header 17") in page
    assert "secret" not in page
    section = page.split('id="fig-telemetry"')[1].split("</section>")[0]
    assert "<img" in section and "over 1 run(s)" in section  # the other run's telemetry is drawn


@pytest.mark.parametrize("target", [1.5, 0, -5, float("nan"), float("inf")])
def test_write_report_refuses_a_target_outside_0_1(tmp_path, target):
    from bench.errors import UserError

    sweep = write_sweep(tmp_path, "t", batches=(4,), seeds=(0,), epochs=5)
    with pytest.raises(UserError, match="--target-accuracy .*must be a number in \\(0, 1\\]"):
        write_report([sweep], tmp_path / "r.html", target_accuracy=target)
    assert not (tmp_path / "r.html").exists()


def test_write_report_refuses_a_folder_as_output(tmp_path):
    from bench.errors import UserError

    sweep = write_sweep(tmp_path, "o", batches=(4,), seeds=(0,), epochs=5)
    with pytest.raises(UserError, match="is a folder; give a file name"):
        write_report([sweep], tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="cannot create its folder"):
        write_report([sweep], a_file / "r.html")


def test_write_report_refuses_an_unwritable_folder(tmp_path):
    import os

    from bench.errors import UserError

    sweep = write_sweep(tmp_path, "o", batches=(4,), seeds=(0,), epochs=5)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(UserError, match="is not writable"):
            write_report([sweep], locked / "r.html")
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_figures_escape_names_and_render_tick_labels(sweep_dir):
    """'$' in a name is printed, not read as maths; matplotlib's maths stays on, so no tick label
    shows raw mathtext (the capacity figure's y axis printed '$\\mathdefault{3\\times10^{0}}$')."""
    from matplotlib import cbook
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from bench import analysis as an
    from bench import report_figures as rf
    from bench.report import build_figures
    from bench.records import load_results

    assert rf.tex("sw$a$") == r"sw\$a\$" and not cbook.is_math_text(rf.tex("sw$a$")) and cbook.is_math_text("sw$a$")
    records = [r for r in load_results([sweep_dir]) if r.damage is None]
    runs = an.runs_frame(records)
    figures = [f for f in build_figures(records, runs, an.speedup_frame(runs)) if f.figure is not None]
    assert len(figures) >= 8
    for result in figures:
        FigureCanvasAgg(result.figure).draw()
        for ax in result.figure.axes:
            labels = [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
            assert not any("mathdefault" in t for t in labels), (result.key, labels)
            figure_box = result.figure.bbox
            title = ax.title.get_window_extent()
            assert title.y1 <= figure_box.y1 + 0.5, (result.key, "title clipped")
    capacity = next(f for f in figures if f.key == "capacity").figure
    ax = capacity.axes[0]
    top = max(line.get_ydata().max() for line in ax.get_lines() if len(line.get_ydata()))
    assert top * 1.05 < ax.get_ylim()[1]  # the top line keeps a margin from the frame


# --- the page in a real browser ------------------------------------------------------------

class _DevTools:
    """The few Chrome DevTools Protocol calls this test needs, over websocket-client."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.events: list[dict] = []
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(e.get("method") == method for e in self.events):
            assert time.monotonic() < deadline, f"no {method} within {timeout_s} s"
            self.events.append(json.loads(self.ws.recv()))

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def _start_chromium(profile: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
         "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not (port_file.is_file() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("chromium did not start (no DevToolsActivePort)")
        time.sleep(0.1)
    port = port_file.read_text().split()[0]
    targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
    page = next(t for t in targets if t.get("type") == "page")
    return proc, page["webSocketDebuggerUrl"]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium not installed")
def test_report_in_headless_chromium(report, tmp_path):
    pytest.importorskip("websocket", reason="websocket-client not installed (test extra)")
    out, _ = report
    proc, ws_url = _start_chromium(tmp_path / "profile")
    try:
        cdp = _DevTools(ws_url)
        for domain in ("Page", "Runtime", "Log", "Network"):
            cdp.call(f"{domain}.enable")
        cdp.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        url = out.resolve().as_uri()
        cdp.call("Page.navigate", url=url)
        cdp.wait_for("Page.loadEventFired")
        images = cdp.evaluate("Array.from(document.images).map(i => [i.naturalWidth, i.naturalHeight, "
                              "i.getBoundingClientRect().width, i.getBoundingClientRect().height])")
        # the sorter works: one click sorts the batch column ascending, a second descending
        sort = ("(() => { const t = document.querySelector('table.sortable'), th = t.tHead.rows[0].cells[1];"
                " const col = () => Array.from(t.tBodies[0].rows).map(r => +r.cells[1].dataset.v);"
                " th.click(); const a = col(); th.click(); return [a, col()]; })()")
        ascending, descending = cdp.evaluate(sort)
        height = cdp.evaluate("document.documentElement.scrollHeight")
        cdp.call("Emulation.setDeviceMetricsOverride", width=1280, height=int(height), deviceScaleFactor=1,
                 mobile=False)
        shot = cdp.call("Page.captureScreenshot", format="png")["data"]
        events = list(cdp.events)
        cdp.ws.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "report.png").write_bytes(base64.b64decode(shot))

    requests = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    assert [u for u in requests if u != url and not u.startswith("data:")] == []
    errors = [e for e in events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") == "error")
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error")]
    assert errors == []
    assert len(images) >= 7 and all(w > 0 and h > 0 and bw > 0 and bh > 0 for w, h, bw, bh in images)
    assert ascending == sorted(ascending) and descending == sorted(descending, reverse=True)
