"""The communication model on hand-computed answers; the all-reduce benchmark run for real."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from bench import comm
from bench.comm import GB, MIB, AllreduceResult, AllreduceRow, Link
from bench.interconnect import Links, links_for, parse_interconnect
from bench.stepmodel import ComputeCurve, StepPoint, fit_overlap, fit_step_model, step_time_from_events

# --- nccl-tests conventions and the ring formula ----------------------------------------------


def test_busbw_is_algbw_times_ring_factor():
    algbw = comm.algbw_bytes_per_s(1e9, 0.5)  # 1 GB in 0.5 s
    assert algbw == 2e9
    assert comm.busbw_bytes_per_s(algbw, 8) == pytest.approx(3.5e9)  # 2 x 7/8 = 1.75
    assert comm.busbw_bytes_per_s(algbw, 2) == pytest.approx(2e9)  # factor 1 at n = 2
    assert comm.busbw_bytes_per_s(algbw, 1) == 0.0  # one rank sends nothing


def test_ring_allreduce_on_hand_computed_numbers():
    link = Link("test", alpha_s=5e-6, beta_bytes_per_s=10 * GB, source="hand")
    # n = 4, S = 100 MB: 2 x 3 x 5 us = 30 us of latency; 2 x 3/4 x 1e8 / 1e10 = 15 ms of bytes
    assert comm.ring_allreduce_s(1e8, 4, link) == pytest.approx(0.015030)
    # the same bytes in three calls pay the latency three times: 90 us + 15 ms
    assert comm.ring_allreduce_s(0, 4, link, bucket_bytes=[2e7, 3e7, 5e7]) == pytest.approx(0.015090)
    assert comm.ring_allreduce_s(1e8, 1, link) == 0.0
    with_base = Link("test", 5e-6, 10 * GB, "hand", base_s=8e-6)  # + 8 us per call
    assert comm.ring_allreduce_s(1e8, 4, with_base) == pytest.approx(0.015038)


def test_hierarchical_allreduce_as_nccl_counts_its_steps():
    nvlink = Link("nvl", 3.4e-6, 450 * GB, "hand", base_s=8.4e-6)
    net = Link("net", 14e-6, 400 * GB, "hand", base_s=8.4e-6)
    # 16 ranks on 2 nodes: 30 steps, 2 of them across nodes. 8.4 + 2 x 14 + 28 x 3.4 = 131.6 us;
    # bytes at the slower 400 GB/s: 2 x 15/16 x 1e9 / 4e11 = 4.6875 ms
    assert comm.hierarchical_allreduce_s(1e9, 16, 2, nvlink, net) == pytest.approx(131.6e-6 + 4.6875e-3)
    # one rank per node: every step crosses the network, no intra link needed
    assert comm.hierarchical_allreduce_s(1e9, 4, 4, None, net) == pytest.approx(8.4e-6 + 6 * 14e-6 + 1.5 * 2.5e-3)


def test_ddp_buckets_follow_the_first_small_then_capped_rule():
    # from a total: 1 MiB, then 25 MiB buckets, then the rest
    assert comm.ddp_bucket_sizes(60 * MIB) == [1 * MIB, 25 * MIB, 25 * MIB, 9 * MIB]
    assert comm.ddp_bucket_sizes(0.5 * MIB) == [0.5 * MIB]
    # from parameter sizes, reversed, a bucket closes once it reaches its cap
    params = [10 * MIB, 10 * MIB, 10 * MIB, 10 * MIB, 0.25 * MIB, 2 * MIB]
    assert comm.ddp_bucket_sizes(params) == [2 * MIB, 30.25 * MIB, 10 * MIB]  # 2; 0.25+10+10+10; 10


# --- fitting alpha and beta --------------------------------------------------------------------

SIZES = [4 * 2**k for k in range(27)]  # 4 B .. 256 MiB, doubling


@pytest.mark.parametrize("n,alpha_s,beta", [(2, 20e-6, 3 * GB), (4, 5e-6, 40 * GB), (8, 60e-6, 1.2 * GB)])
def test_fit_ring_recovers_known_alpha_and_beta(n, alpha_s, beta):
    link = Link("truth", alpha_s, beta, "synthetic")
    times = [comm.ring_allreduce_s(s, n, link) for s in SIZES]
    fit = comm.fit_ring(SIZES, times, n)
    assert fit.alpha_s == pytest.approx(alpha_s, rel=0.01)
    assert fit.beta_bytes_per_s == pytest.approx(beta, rel=0.01)
    assert fit.max_rel_residual < 1e-9
    # +-0.5 % alternating noise moves neither by more than 1 %
    noisy = [t * (1.005 if i % 2 else 0.995) for i, t in enumerate(times)]
    fit = comm.fit_ring(SIZES, noisy, n)
    assert fit.alpha_s == pytest.approx(alpha_s, rel=0.01)
    assert fit.beta_bytes_per_s == pytest.approx(beta, rel=0.01)


def test_fit_ring_without_latency_and_refusals():
    times = [s / 2e9 for s in SIZES[10:]]  # no latency at all: 2 GB/s exactly
    fit = comm.fit_ring(SIZES[10:], times, 2)
    assert fit.alpha_s == pytest.approx(0.0, abs=1e-12)
    assert fit.beta_bytes_per_s == pytest.approx(2e9)
    with pytest.raises(ValueError, match="distinct sizes"):
        comm.fit_ring([1024, 1024], [1e-3, 1e-3], 2)
    with pytest.raises(ValueError, match="does not grow"):
        comm.fit_ring([1024, 2048], [2e-3, 1e-3], 2)
    with pytest.raises(ValueError, match=">= 2 ranks"):
        comm.fit_ring([1024, 2048], [1e-3, 2e-3], 1)


def _result(n: int, link: Link, wrong_at: int | None = None) -> AllreduceResult:
    rows = []
    for s in SIZES:
        t = comm.ring_allreduce_s(s, n, link)
        algbw = s / t
        rows.append(AllreduceRow(size_bytes=s, count=s // 4, time_us=t * 1e6, algbw_gb_s=algbw / GB,
                                 busbw_gb_s=comm.busbw_bytes_per_s(algbw, n) / GB,
                                 num_wrong=3 if s == wrong_at else 0))
    return AllreduceResult(system="test", backend="gloo", num_workers=n, device="cpu", dtype="float32",
                           warmup_iters=1, iters=5, rows=rows)


def test_measured_link_reproduces_the_measured_times_and_skips_wrong_rows():
    truth = Link("truth", 30e-6, 2 * GB, "synthetic")
    result = _result(2, truth, wrong_at=1024)
    assert result.ring_fit().num_points == len(SIZES) - 1  # the row with wrong elements is left out
    link = result.link("allreduce-gloo-w2.json")
    assert link.alpha_s == pytest.approx(30e-6, rel=0.01)
    assert link.bandwidth_curve  # bandwidth-carrying sizes only (>= half of the time)
    assert all(b == pytest.approx(2 * GB, rel=0.01) for _, b in link.bandwidth_curve)
    # a size-dependent bandwidth: the model gives back the "measured" time at each size and n
    bent = Link("bent", 0.0, 1 * GB, "x", bandwidth_curve=((1e6, 4 * GB), (1e8, 1 * GB)))
    assert bent.beta_at(1e4) == 4 * GB and bent.beta_at(1e9) == 1 * GB
    assert bent.beta_at(1e7) == pytest.approx(2.5 * GB)  # halfway in log2(size)
    assert AllreduceResult.model_validate(json.loads(result.model_dump_json())) == result


# --- nominal links and the cluster file's interconnect --------------------------------------


def test_parse_interconnect_of_the_aws_h100_cluster_file():
    parsed = parse_interconnect("NVLink 4 + NVSwitch within a node; EFA (3200 Gbps) between nodes")
    assert parsed.intra.beta_bytes_per_s == 450 * GB  # 900 GB/s both directions, per GPU
    assert parsed.intra.alpha_s == pytest.approx(3.4e-6)
    assert parsed.inter.beta_bytes_per_s == 400 * GB  # 3200 Gb/s per node
    assert parsed.inter.alpha_s == pytest.approx(14e-6)
    assert "cluster file" in parsed.inter.source and not parsed.notes


@pytest.mark.parametrize("text,intra,inter", [
    ("8x InfiniBand NDR between nodes; NVLink 5", 900 * GB, 400 * GB),  # 8 ports x 50 GB/s
    ("PCIe Gen4 x16", 16 * 16 * 128 / 130 / 8 * GB, None),  # 31.5 GB/s
    ("PCIe 5.0", 32 * 16 * 128 / 130 / 8 * GB, None),
    ("100 GbE", None, 12.5 * GB),
    ("NVLink 3; 2 x 200 Gb/s Ethernet", 300 * GB, 50 * GB),
    ("NVLink 4 (400 GB/s)", 400 * GB, None),  # a stated figure wins over the table
])
def test_parse_interconnect_table(text, intra, inter):
    parsed = parse_interconnect(text)
    assert (parsed.intra.beta_bytes_per_s if parsed.intra else None) == pytest.approx(intra)
    assert (parsed.inter.beta_bytes_per_s if parsed.inter else None) == pytest.approx(inter)


def test_parse_interconnect_says_what_it_does_not_know():
    assert parse_interconnect(None).notes == ("no hardware.interconnect in the cluster file",)
    parsed = parse_interconnect("NVLink; EFA between nodes; carrier pigeon")
    assert parsed.intra is None and parsed.inter is None
    assert any("generation not stated" in n for n in parsed.notes)
    assert any("EFA bandwidth not stated" in n for n in parsed.notes)
    assert any("'carrier pigeon' not recognised" in n for n in parsed.notes)
    assert any("one InfiniBand NDR port per node" in n for n in parse_interconnect("IB NDR").notes)


def test_links_pick_intra_or_inter_by_node_count():
    measured = Link("measured", 10e-6, 100 * GB, "file")
    links = links_for(measured=measured, interconnect="NVLink 4; 8x NDR", workers_per_node=8)
    assert links.intra is measured and any("measured link is used" in n for n in links.assumptions)
    assert links.allreduce_s(1e9, 8) == comm.ring_allreduce_s(1e9, 8, measured)
    assert links.num_nodes(16) == 2 and "between 2 nodes" in links.describe(16)
    assert links.allreduce_s(1e9, 16) == comm.hierarchical_allreduce_s(1e9, 16, 2, measured, links.inter)
    no_net = links_for(interconnect="NVLink 4", workers_per_node=8)
    assert no_net.allreduce_s(1e9, 16) is None and no_net.allreduce_s(1e9, 1) == 0.0
    unknown_nodes = links_for(measured=measured)
    assert unknown_nodes.num_nodes(1024) == 1 and any("per node unknown" in n for n in unknown_nodes.assumptions)


# --- the step model ----------------------------------------------------------------------------


def test_step_time_from_events_leaves_the_first_epoch_out():
    events = [{"key": "epoch_stop", "metadata": {"epoch_num": e, "step": 90 * e, "epoch_train_time_s": t}}
              for e, t in ((1, 0.9), (2, 0.2), (3, 0.25))]
    events.insert(1, {"key": "eval_accuracy", "value": 0.5, "metadata": {}})
    assert step_time_from_events(events) == (pytest.approx(0.45 / 180), 180)
    assert step_time_from_events(events[:1]) == (pytest.approx(0.01), 90)  # one epoch: it counts
    assert step_time_from_events([]) is None


def test_compute_curve_interpolates_samples_per_s_in_log2_batch():
    curve = ComputeCurve([(8, 0.1), (32, 0.2), (32, 0.2)], num_workers=1)  # 80 and 160 samples/s
    assert curve.compute_s(8) == 0.1 and curve.compute_s(32) == 0.2
    assert curve.compute_s(16) == pytest.approx(16 / 120)  # halfway in log2: 120 samples/s
    assert curve.compute_s(4) == 0.1  # below: step time held
    assert curve.compute_s(64) == pytest.approx(0.4)  # above: samples/s held
    assert "held" in curve.note(64) and "held" not in curve.note(16)


LINK = Link("loopback", 50e-6, 1 * GB, "synthetic")
GRAD = 40_000_000  # 40 MB of gradients


def _compute(b: float) -> float:
    return 0.004 + 0.002 * b  # seconds per step at per-worker batch b


def _synthetic_points(phi: float) -> list[StepPoint]:
    links = Links(LINK, None, None)
    points = [StepPoint(b, 1, _compute(b)) for b in (4, 8, 16, 32, 64)]
    for w in (2, 4):
        for b in (4, 8, 16, 32, 64):  # the all-reduce is longer than compute at small b: min() switches
            ar = links.allreduce_s(GRAD, w, comm.ddp_bucket_sizes(GRAD))
            points.append(StepPoint(b, w, _compute(b) + ar - phi * min(ar, _compute(b))))
    return points


@pytest.mark.parametrize("phi", [0.0, 0.4, 1.0])
def test_overlap_fit_recovers_a_known_overlap(phi):
    model = fit_step_model(_synthetic_points(phi), gradient_bytes=GRAD, links=Links(LINK, None, None))
    assert model.overlap.fraction == pytest.approx(phi, abs=1e-9)
    assert model.overlap.num_points == 10


def test_overlap_fit_clips_and_says_so():
    assert fit_overlap([(1.0, 0.5, 2.0)]).raw_fraction == pytest.approx(-1.0)  # slower than the sum
    assert fit_overlap([(1.0, 0.5, 2.0)]).fraction == 0.0
    assert fit_overlap([(1.0, 0.0, 1.0)]) is None  # no communication: nothing to fit


def test_prediction_on_a_hand_computed_row():
    links = links_for(interconnect="NVLink 4; 8x NDR", workers_per_node=8)
    fitted = fit_step_model(_synthetic_points(0.5), gradient_bytes=GRAD, links=Links(LINK, None, None))
    model = dataclasses.replace(fitted, links=links)  # fitted on one node's link, planned on a cluster's
    p = model.predict(16, 64)  # 8 nodes of 8
    ar = comm.hierarchical_allreduce_s(GRAD, 64, 8, links.intra, links.inter, bucket_bytes=model.bucket_bytes)
    assert p.allreduce_s == pytest.approx(ar)
    assert p.step_s == pytest.approx(_compute(16) + ar - 0.5 * min(ar, _compute(16)))
    assert p.samples_per_s == pytest.approx(16 * 64 / p.step_s)
    assert p.num_nodes == 8 and "between 8 nodes" in p.note() and "overlap 0.50" in p.note()
    one = model.predict(16, 1)
    assert one.step_s == _compute(16) and one.allreduce_s == 0.0


def test_prediction_without_a_link_is_unknown_not_a_guess():
    model = fit_step_model([StepPoint(8, 1, 0.1)], gradient_bytes=GRAD,
                           links=links_for(interconnect=None, workers_per_node=8))
    p = model.predict(8, 4)
    assert p.step_s is None and p.samples_per_s is None and "not modelled" in p.note()
    assert "no overlap assumed" in fit_step_model(
        [StepPoint(8, 1, 0.1)], gradient_bytes=GRAD, links=Links(LINK, None, None)).predict(8, 2).note()


def test_without_one_worker_runs_compute_is_the_step_less_its_allreduce():
    links = Links(LINK, None, None)
    ar2 = links.allreduce_s(GRAD, 2, comm.ddp_bucket_sizes(GRAD))
    model = fit_step_model([StepPoint(32, 2, 0.5)], gradient_bytes=GRAD, links=links)
    assert model.compute.compute_s(32) == pytest.approx(0.5 - ar2)
    assert model.overlap is None
    assert model.predict(32, 4).step_s == pytest.approx(0.5 - ar2 + links.allreduce_s(GRAD, 4, model.bucket_bytes))
    with pytest.raises(ValueError, match="not shorter than the measured step"):
        fit_step_model([StepPoint(32, 2, ar2 / 2)], gradient_bytes=GRAD, links=links)


# --- the benchmark, for real -------------------------------------------------------------------


def test_message_sizes_and_size_parsing():
    from bench.perf.allreduce import message_sizes, parse_size

    assert parse_size("256M") == 256 * 2**20 and parse_size("4") == 4 and parse_size("64k") == 65536
    with pytest.raises(ValueError):
        parse_size("1.5M")
    assert message_sizes(4, 64, 2, 4) == [4, 8, 16, 32, 64]
    assert message_sizes(1, 8, 2, 4) == [4, 8]  # whole float32 elements, at least one


def test_allreduce_cli_refuses_bad_input_without_writing(tmp_path):
    from bench.perf.allreduce import main

    assert main(["--num-workers", "1", "--results-dir", str(tmp_path)]) == 2
    assert main(["--min-bytes", "1K", "--max-bytes", "4", "--results-dir", str(tmp_path)]) == 2
    assert main(["--system", "../up", "--results-dir", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_allreduce_benchmark_with_two_gloo_processes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.perf", "allreduce", "--backend", "gloo", "--num-workers", "2",
                           "--min-bytes", "4", "--max-bytes", "64K", "--factor", "4", "--warmup-iters", "1",
                           "--iters", "3", "--system", "ci", "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = AllreduceResult.model_validate_json((tmp_path / "ci" / "allreduce-gloo-w2.json").read_text())
    sizes = [r.size_bytes for r in result.rows]
    assert sizes == [4, 16, 64, 256, 1024, 4096, 16384, 65536]
    assert all(r.time_us > 0 and r.algbw_gb_s > 0 and r.num_wrong == 0 for r in result.rows)
    assert all(r.busbw_gb_s == pytest.approx(r.algbw_gb_s) for r in result.rows)  # factor 1 at n = 2
    assert all(math.isclose(r.algbw_gb_s, r.size_bytes / r.time_us / 1e3, rel_tol=1e-9) for r in result.rows)
    assert result.machine["hostname"] and result.device == "cpu" and result.threads_per_worker == 1
    assert "Avg bus bandwidth" in proc.stdout and proc.stdout.count(" sum ") == len(sizes)


# --- the validation script --------------------------------------------------------------------


def test_validation_predicts_a_known_overlap_leave_one_out():
    from bench.perf.validate_comm import compare

    param_bytes = [GRAD // 4] * 4  # four 10 MB parameters
    links = Links(LINK, None, None)
    points = [StepPoint(b, 1, _compute(b)) for b in (4, 8, 16, 32, 64)]
    for b in (4, 8, 16, 32):
        ar = links.allreduce_s(GRAD, 2, comm.ddp_bucket_sizes(param_bytes))
        points.append(StepPoint(b, 2, _compute(b) + ar - 0.3 * min(ar, _compute(b))))
    rows = compare(points, param_bytes, links, tolerance=0.2)
    assert [r["global_batch_size"] for r in rows] == [8, 16, 32, 64]
    for r in rows:  # phi from the three other runs is the 0.3 they were made with
        assert r["overlap_fraction"] == pytest.approx(0.3)
        assert r["model_ratio"] == pytest.approx(1.0) and r["within_tolerance"]
        assert r["no_overlap_ratio"] > 1.0  # nothing hidden: slower than measured
        assert r["allreduce_ms"] == pytest.approx(1e3 * links.allreduce_s(GRAD, 2, comm.ddp_bucket_sizes(param_bytes)))


def test_validation_end_to_end_on_stored_runs(tmp_path, capsys):
    from fixtures_results import make_plan, write_sweep

    from bench import records as stored
    from bench.perf.validate_comm import gradient_buckets, main, measured_points

    sweep = write_sweep(tmp_path / "results", "pairs", batches=(8, 16, 32), seeds=(0,), workers=(1, 2), epochs=4)
    points, config = measured_points(stored.load_results([sweep]))
    for p in points:  # the fixture's epochs take 0.02 (1 + 16 / B) / sqrt(W) s
        b = int(p.per_worker_batch_size * p.num_workers)
        spe = make_plan("pairs", b, num_workers=p.num_workers).steps_per_epoch
        assert p.step_s == pytest.approx(0.02 * (1 + 16 / b) / p.num_workers ** 0.5 / spe)
    assert gradient_buckets(config) == [400, 200, 600, 12]  # blobs MLP 2 -> 50 -> 3, fp32
    allreduce = tmp_path / "allreduce-gloo-w2.json"
    allreduce.write_text(_result(2, LINK).model_dump_json())
    code = main([str(sweep), "--allreduce", str(allreduce), "--format", "markdown", "--json", str(tmp_path / "v.json")])
    out = capsys.readouterr().out
    assert code in (0, 1) and "| B | b/worker | W |" in out and "model predictions within 20 %" in out
    assert len(json.loads((tmp_path / "v.json").read_text())["rows"]) == 2  # B 16 and 32 have a 1-worker twin
    assert main([str(sweep), "--allreduce", str(tmp_path / "missing.json")]) == 2


def test_model_from_records_reads_the_cluster_files_hardware(tmp_path):
    from fixtures_results import write_sweep

    from bench import records as stored
    from bench.stepmodel import model_from_records

    hardware = {"interconnect": "NVLink 4 within a node; 8x InfiniBand NDR between nodes", "gpus_per_node": 8}
    sweep = write_sweep(tmp_path, "hw", batches=(8, 16), seeds=(0, 1), workers=(1,), epochs=3,
                        cluster={"name": "h100", "hardware": hardware})
    records = stored.load_results([sweep])
    model = model_from_records(records, gradient_bytes=GRAD)
    assert model.compute.num_workers == 1 and model.compute.batches == [8.0, 16.0]
    assert model.links.intra.beta_bytes_per_s == 450 * GB and model.links.inter.beta_bytes_per_s == 400 * GB
    assert model.links.workers_per_node == 8
    p = model.predict(8, 32)
    assert p.num_nodes == 4 and "NVLink 4" in p.note() and "8x InfiniBand NDR" in p.note()
    measured = Link("measured", 1e-6, 100 * GB, "file")
    assert model_from_records(records, gradient_bytes=GRAD, measured=measured).links.intra is measured


def test_the_packaged_cluster_files_interconnect_is_understood():
    from pathlib import Path

    from bench.config import load_cluster

    cluster, _ = load_cluster(Path(__file__).parent.parent / "clusters" / "aws-h100.yaml")
    parsed = parse_interconnect(cluster.hardware.interconnect)
    assert (parsed.intra.beta_bytes_per_s, parsed.inter.beta_bytes_per_s) == (450 * GB, 400 * GB)
    links = links_for(interconnect=cluster.hardware.interconnect, workers_per_node=cluster.hardware.gpus_per_node)
    assert links.num_nodes(16) == 16 // cluster.hardware.gpus_per_node
