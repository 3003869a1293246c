"""bench.noise: the McCandlish et al. 2018 estimators on numbers, on a problem whose noise
scale is known in closed form, and the torch probe (one process, and two gloo ranks)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bench.noise import (DDPNoiseHook, MicroBatchProbe, ddp_noise_hook, NoiseScaleEMA, gns_estimates, grad_sq_norm,
                         probe_batch_sizes, read_samples)


# --- formulas on numbers -------------------------------------------------------------------


def test_gns_estimates_on_numbers() -> None:
    # Exact expectations |G_b|^2 = |G|^2 + tr/b with |G|^2 = 2, tr = 40: b=4 -> 12, B=20 -> 4.
    g_sq, trace = gns_estimates(12.0, 4.0, 4, 20)
    assert g_sq == pytest.approx(2.0)        # (20*4 - 4*12) / 16 = 32/16
    assert trace == pytest.approx(40.0)      # (12 - 4) / (1/4 - 1/20) = 8 / 0.2
    assert trace / g_sq == pytest.approx(20.0)


def test_gns_estimates_rejects_bad_batch_sizes() -> None:
    for b_small, b_big in [(8, 8), (16, 8), (0, 8)]:
        with pytest.raises(ValueError, match="b_small"):
            gns_estimates(1.0, 1.0, b_small, b_big)


def test_ema_bias_correction_and_b_simple() -> None:
    ema = NoiseScaleEMA(beta=0.9)
    assert ema.b_simple is None and ema.g_sq is None
    assert ema.update(12.0, 4.0, 4, 20) == pytest.approx(20.0)   # bias-corrected from the start
    assert ema.g_sq == pytest.approx(2.0) and ema.trace_sigma == pytest.approx(40.0)
    ema.update(7.0, 3.0, 4, 20)                                 # |G|^2 = 2.0, tr = 20
    w1, w2 = 0.1 * 0.9, 0.1                                     # weights of samples 1 and 2
    assert ema.trace_sigma == pytest.approx((40 * w1 + 20 * w2) / (w1 + w2))
    assert ema.g_sq == pytest.approx(2.0)
    meta = ema.metadata()
    assert meta["grad_sq_small"] == 7.0 and meta["grad_sq_big"] == 3.0 and meta["b_big"] == 20


def test_ema_is_none_until_positive_and_skips_non_finite() -> None:
    ema = NoiseScaleEMA()
    assert ema.update(1.0, 2.0, 4, 20) is None                  # tr(Sigma) < 0: undefined
    assert ema.update(float("nan"), 2.0, 4, 20) is None and ema.num_updates == 1
    assert ema.update(12.0, 4.0, 4, 20) is not None             # averages turn positive
    with pytest.raises(ValueError):
        NoiseScaleEMA(beta=1.0)


def test_batch_sizes() -> None:
    assert probe_batch_sizes(32, 1, 1) is None
    assert probe_batch_sizes(32, 4, 1) == (32, 128)  # one worker: micro-batch vs accumulated
    assert probe_batch_sizes(32, 2, 8) == (64, 512)  # several: per-worker vs global (DDP's hook)
    assert probe_batch_sizes(32, 1, 8) == (32, 256)


# --- closed form: linear regression ---------------------------------------------------------
# y = x.w* + eps, x ~ N(0, I_d), eps ~ N(0, s^2), loss 1/2 (x.w - y)^2, a = w - w*.
# Per-sample gradient g = x (x.a - eps); G = E[x x^T] a = a.
# E|g|^2 = E[(x.a)^2 |x|^2] + s^2 E|x|^2 = a^T E[|x|^2 x x^T] a + d s^2 = (d+2)|a|^2 + d s^2
# (E[|x|^2 x x^T] = (d+2) I for standard Gaussian x), so tr(Sigma) = E|g|^2 - |G|^2
# = (d+1)|a|^2 + d s^2 and B_simple = (d+1) + d s^2 / |a|^2.
D, SIGMA, MICRO, ACCUM = 8, 1.0, 4, 8
A = np.ones(D) / np.sqrt(D)                                   # |a|^2 = 1
B_SIMPLE_TRUE = (D + 1) + D * SIGMA**2                         # = 17 samples


def regression_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, D))
    return x, x @ A + rng.normal(scale=SIGMA, size=n)         # w* = A, so at w = 0: a = -A


def test_closed_form_noise_scale_recovered_from_simulated_norms() -> None:
    rng = np.random.default_rng(0)
    n_draws, big = 4000, MICRO * ACCUM
    x = rng.normal(size=(n_draws, big, D))
    eps = rng.normal(scale=SIGMA, size=(n_draws, big))
    g = x * (x @ A - eps)[..., None]                            # per-sample gradients at w = w* + A
    small_sq = (g.reshape(n_draws, ACCUM, MICRO, D).mean(2) ** 2).sum(-1).mean(-1)
    big_sq = (g.mean(1) ** 2).sum(-1)
    g_sq, trace = gns_estimates(small_sq.mean(), big_sq.mean(), MICRO, big)   # plain average
    assert g_sq == pytest.approx(1.0, rel=0.1)
    assert trace == pytest.approx(D + 1 + D * SIGMA**2, rel=0.1)
    assert trace / g_sq == pytest.approx(B_SIMPLE_TRUE, rel=0.1)
    ema = NoiseScaleEMA(beta=0.999)
    for s, b in zip(small_sq, big_sq):
        b_simple = ema.update(s, b, MICRO, big)
    assert b_simple == pytest.approx(B_SIMPLE_TRUE, rel=0.1)


def accumulated_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, accum: int,
                     probe: MicroBatchProbe | None,
                     sync: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
    """The worker's micro-batch loop: mean loss per micro-batch, divided by accum."""
    for xm, ym in zip(x.chunk(accum), y.chunk(accum)):
        with sync():
            loss = 0.5 * ((model(xm).squeeze(-1) - ym) ** 2).mean() / accum
            loss.backward()
        if probe is not None:
            probe.after_micro_backward()


def test_closed_form_noise_scale_recovered_through_the_torch_probe() -> None:
    rng = np.random.default_rng(1)
    model = nn.Linear(D, 1, bias=False, dtype=torch.float64)
    nn.init.zeros_(model.weight)                                # w = 0: a = -A, |a|^2 = 1
    ema = NoiseScaleEMA(beta=0.995)
    smalls, bigs = [], []
    for _ in range(200):
        x, y = (torch.from_numpy(v) for v in regression_batch(rng, MICRO * ACCUM))
        model.zero_grad(set_to_none=True)
        probe = MicroBatchProbe(model.parameters(), MICRO, ACCUM)
        accumulated_step(model, x, y, ACCUM, probe)
        small, big = read_samples([probe.finish()])[0]
        smalls.append(small), bigs.append(big)
        ema.update(small, big, MICRO, MICRO * ACCUM)
    g_sq, trace = gns_estimates(np.mean(smalls), np.mean(bigs), MICRO, MICRO * ACCUM)
    assert trace / g_sq == pytest.approx(B_SIMPLE_TRUE, rel=0.1)
    assert ema.b_simple == pytest.approx(B_SIMPLE_TRUE, rel=0.15)   # EMA: ~ the last 200 draws


# --- torch helpers, one process -------------------------------------------------------------


def test_grad_sq_norm_equals_manual_sum() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3, bias=False))
    model(torch.randn(7, 5)).square().mean().backward()
    manual = sum(float((p.grad.double() ** 2).sum()) for p in model.parameters())
    got = grad_sq_norm(model.parameters())
    assert got.shape == () and got.dtype == torch.float32
    assert float(got) == pytest.approx(manual, rel=1e-6)
    assert float(grad_sq_norm(nn.Linear(2, 2).parameters())) == 0.0   # no grads yet


def test_probe_matches_per_micro_batch_norms_and_leaves_the_accumulated_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    x, y = torch.randn(12, 6), torch.randn(12)
    accum = 3
    manual_small = []
    for xm, ym in zip(x.chunk(accum), y.chunk(accum)):               # each micro-batch alone
        model.zero_grad(set_to_none=True)
        (0.5 * ((model(xm).squeeze(-1) - ym) ** 2).mean()).backward()
        manual_small.append(float(grad_sq_norm(model.parameters())))
    model.zero_grad(set_to_none=True)
    accumulated_step(model, x, y, accum, probe=None)                  # ordinary accumulation
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    probe = MicroBatchProbe(model.parameters(), 4, accum)
    accumulated_step(model, x, y, accum, probe)
    small, big = read_samples([probe.finish()])[0]
    for p, w in zip(model.parameters(), want):
        assert torch.allclose(p.grad, w)
    assert small == pytest.approx(np.mean(manual_small), rel=1e-5)
    assert big == pytest.approx(sum(float((w ** 2).sum()) for w in want), rel=1e-5)


def test_probe_misuse_raises() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="two batch sizes"):
        MicroBatchProbe(model.parameters(), 8, 1)
    probe = MicroBatchProbe(model.parameters(), 8, 2)
    model(torch.randn(8, 2)).sum().backward()
    probe.after_micro_backward()
    with pytest.raises(RuntimeError, match="1 of 2"):
        probe.finish()
    with pytest.raises(RuntimeError, match="armed"):
        DDPNoiseHook(world_size=2).take()


def test_read_samples_reads_many_in_one_go_as_each_would_alone() -> None:
    from bench import noise

    samples = [noise.NoiseSample(torch.tensor(float(i)), torch.tensor(i / 2.0, dtype=torch.float64), 4, 8)
               for i in range(5)]
    assert read_samples(samples) == [(float(i), i / 2.0) for i in range(5)]
    assert read_samples([]) == []


# --- two gloo ranks: the full DDP protocol --------------------------------------------------


def _plain_ddp_step(ddp: nn.parallel.DistributedDataParallel, x: torch.Tensor, y: torch.Tensor,
                    accum: int) -> list[torch.Tensor]:
    """Ordinary accumulation under DDP: no_sync for all but the last micro-batch."""
    ddp.zero_grad(set_to_none=True)
    for j, (xm, ym) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
        with ddp.no_sync() if j < accum - 1 else contextlib.nullcontext():
            (0.5 * ((ddp(xm).squeeze(-1) - ym) ** 2).mean() / accum).backward()
    return [p.grad.clone() for p in ddp.parameters()]


def _ddp_rank(rank: int, world: int, store_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    torch.manual_seed(0)                                             # same initial weights
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    plain = nn.parallel.DistributedDataParallel(net)
    hooked_net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    hooked_net.load_state_dict(net.state_dict())
    hooked = nn.parallel.DistributedDataParallel(hooked_net)
    hook = DDPNoiseHook(world)
    hooked.register_comm_hook(hook, ddp_noise_hook)
    gen = torch.Generator().manual_seed(100 + rank)                  # different data per rank
    x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(8, generator=gen, dtype=torch.float64)
    out = {}
    for accum in (1, 2):
        want = _plain_ddp_step(plain, x, y, accum)
        net.zero_grad(set_to_none=True)                              # this rank's gradient, by hand
        accumulated_step(net, x, y, accum, probe=None)
        local_sq = float(grad_sq_norm(net.parameters()))
        hook.arm(8, 8 * world)
        got = _plain_ddp_step(hooked, x, y, accum)                   # the same step, measured
        sample = hook.take()
        small, big = read_samples([sample], world)[0]
        after = _plain_ddp_step(hooked, x, y, accum)                 # unarmed: an ordinary DDP step
        out[accum] = {"want": want, "got": got, "after": after, "small": small, "big": big,
                      "local_sq": local_sq, "b": (sample.b_small, sample.b_big)}
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    # Leave without destructors: freeing the DDP reducer after the group is gone once hung in
    # ProcessGroupGloo's destructor (joining a gloo thread) in a forked rank under a full run.
    os._exit(0)


def test_ddp_hook_with_two_gloo_ranks(tmp_path: Path) -> None:
    """The hook averages exactly as DDP does, and measures per-worker vs global gradient norms."""
    world = 2
    # fork: the children inherit the imported torch (spawn would re-import it: seconds on 2 cores);
    # DDP's constructor imports torch._dynamo (~3 s), so import it once here, before forking.
    import torch._dynamo  # noqa: F401
    mp.start_processes(_ddp_rank, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
                       join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for accum in (1, 2):
        res = [r[accum] for r in ranks]
        for r in res:                                                # .grad as after a DDP step
            assert r["b"] == (8, 16)
            for got, want, after in zip(r["got"], r["want"], r["after"]):
                assert torch.allclose(got, want)
                assert torch.allclose(after, want)
        global_sq = sum(float((w ** 2).sum()) for w in res[0]["want"])
        mean_local = np.mean([r["local_sq"] for r in res])           # |G_b|^2 averaged over the ranks
        for r in res:
            assert r["small"] == pytest.approx(mean_local, rel=1e-6)
            assert r["big"] == pytest.approx(global_sq, rel=1e-6)
        assert res[0]["small"] > res[0]["big"] > 0
