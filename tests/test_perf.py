"""The speed scripts on CPU with tiny sizes: output format, not performance."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from bench.perf import loader, noise_overhead, overhead, telemetry_overhead, throughput

TINY = ["--device", "cpu", "--model", "small_cnn", "--image-size", "16"]


def test_throughput_table_on_cpu(tmp_path: Path, capsys):
    out_json, out_csv = tmp_path / "t.json", tmp_path / "t.csv"
    code = throughput.main([*TINY, "--min-batch-size", "4", "--max-batch-size", "16", "--steps", "2",
                            "--warmup-steps", "1", "--json", str(out_json), "--csv", str(out_csv)])
    assert code == 0
    text = capsys.readouterr().out
    assert "TFLOP/s" in text and "best: batch" in text
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["batch_size"] for r in rows] == [4, 8, 16]
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["samples_per_s"] > 0 and r["step_ms"] > 0 and r["tflops"] > 0 for r in rows)
    assert all(r["peak_allocated_gib"] is None for r in rows)  # no CUDA memory on CPU
    # FLOPs of forward + backward are linear in the batch for a conv net.
    flops = [r["gflop_per_step"] for r in rows]
    assert flops[1] == pytest.approx(2 * flops[0]) and flops[2] == pytest.approx(4 * flops[0])
    table = list(csv.DictReader(out_csv.open()))
    assert list(table[0]) == list(throughput.COLUMNS)
    batches = [int(r["batch_size"]) for r in table]
    assert batches == sorted(batches) == [4, 8, 16]
    assert all(float(r["tflops"]) > 0 for r in table)


def test_throughput_refuses_bad_range(capsys):
    with pytest.raises(SystemExit):
        throughput.main([*TINY, "--min-batch-size", "64", "--max-batch-size", "32"])
    assert "below --min-batch-size" in capsys.readouterr().err


def test_noise_overhead_times_the_worker_step_with_the_probe_off_and_on(tmp_path: Path, capsys):
    out_json = tmp_path / "n.json"
    code = noise_overhead.main([*TINY, "--micro-batch-size", "4", "--accum", "2", "--every", "2", "3",
                                "--num-rounds", "2", "--steps-per-round", "5", "--json", str(out_json)])
    assert code == 0
    assert "overhead ratio every2=" in capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["steps_per_round"] == 6  # rounded up to a multiple of lcm(2, 3)
    # warm-up block + 2 rounds = 18 steps: a probe on every 2nd / 3rd step, none when off
    assert data["probe_events"] == {"off": 0, "every 2": 9, "every 3": 6}
    assert set(data["overhead_ratio"]) == {"every 2", "every 3"}
    assert all(len(v) == 2 and min(v) > 0 for v in data["step_ms"].values())
    with pytest.raises(SystemExit):
        noise_overhead.main([*TINY, "--accum", "1"])
    assert "--accum must be >= 2" in capsys.readouterr().err


def test_telemetry_overhead_times_the_workers_step(capsys, monkeypatch):
    """What it times is bench.step.TrainStep (its output format: tests/test_telemetry.py)."""
    from bench.step import TrainStep

    calls: list[int] = []
    real = TrainStep.__call__
    monkeypatch.setattr(TrainStep, "__call__", lambda self, mb, n, lr, **kw: calls.append(n) or real(self, mb, n, lr, **kw))
    assert telemetry_overhead.main(["--device", "cpu", "--micro-batch-size", "3", "--num-rounds", "2",
                                    "--steps-per-round", "2", "--warmup-steps", "1", "--rates-hz", "50"]) == 0
    assert calls == [3] * (1 + 2 * 2 * 2)  # warm-up, then 2 rounds x (off, 50 Hz) x 2 steps
    assert "small_cnn" in capsys.readouterr().out  # bench.models' model on the CPU by default
    with pytest.raises(SystemExit):
        telemetry_overhead.main(["--device", "cpu", "--model", "convnet"])  # no private model any more


def test_loader_times_the_streamed_imagenet_pipeline(tmp_path: Path, capsys):
    out_json = tmp_path / "l.json"
    code = loader.main(["--generate", "12", "--processes", "0", "1", "--batch-size", "4", "--batches", "2",
                        "--gpu-rate", "100", "--json", str(out_json)])
    assert code == 0
    out = capsys.readouterr().out
    assert "generated 12 JPEGs (500x375" in out and "a GPU at 100 images/s needs ~" in out
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["processes"], r["images"]) for r in rows] == [(0, 8), (1, 8)]  # 2 timed batches of 4
    assert all(r["images_per_s"] > 0 for r in rows)
    root = loader.generate_jpegs(tmp_path / "few", 3)
    assert loader.main(["--root", str(root), "--processes", "0", "--batch-size", "4"]) == 2
    assert "too few for two batches of 4" in capsys.readouterr().err


def test_overhead_presets_and_side_b_config():
    args = overhead.parse_args(["--device", "cpu", "--preset", "resnet50-224-256", "--steps", "3"])
    assert (args.model, args.image_size, args.micro_batch_size, args.steps) == ("resnet50", 224, 256, 3)
    # Side B trains exactly `steps` steps per epoch for 2 epochs, as side A's warm-up + timed block.
    params = {"device": "cpu", "model": "small_cnn", "image_size": 16, "micro_batch_size": 8, "steps": 5,
              "threads": 1, "telemetry": True}
    from bench.plan import plan_sweep

    (plan,) = plan_sweep(overhead.sweep_for(params, "x"))
    assert (plan.steps_per_epoch, plan.total_steps, plan.micro_batch_size, plan.grad_accum_steps) == (5, 10, 8, 1)
    # The presets fit the synthetic workload's size limit.
    for preset in overhead.PRESETS.values():
        overhead.sweep_for({**params, **preset, "device": "cuda"}, "x")


@pytest.mark.slow
def test_overhead_one_pair_on_cpu(ray_session, tmp_path: Path, capsys):
    out_json = tmp_path / "o.json"
    code = overhead.main([*TINY, "--micro-batch-size", "8", "--steps", "3", "--pairs", "1",
                          "--json", str(out_json)])
    assert code == 0
    text = capsys.readouterr().out
    assert re.search(r"^pair 1/1: A [\d.]+ samples/s, B [\d.]+ samples/s, B/A [\d.]+", text, re.M)
    assert re.search(r"^ratio B/A: median [\d.]+ min [\d.]+ max [\d.]+ over 1 pair\(s\)$", text, re.M)
    result = json.loads(out_json.read_text())
    (pair,) = result["pairs"]
    assert pair["plain"]["samples"] == pair["batchscale"]["samples"] == 3 * 8  # same work counted
    assert pair["ratio"] == pytest.approx(pair["batchscale"]["samples_per_s"] / pair["plain"]["samples_per_s"])
    assert result["ratio"]["median"] == pytest.approx(pair["ratio"]) and result["interleaved"] is True
