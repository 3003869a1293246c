"""bench.divergence: the rule on numbers (no torch), and its wording."""

from __future__ import annotations

import math

import pytest

from bench.divergence import WINDOW_STEPS, DivergenceMonitor, describe


def test_non_finite_loss_is_caught_at_its_step():
    mon = DivergenceMonitor(10.0)
    assert mon.feed(0, [2.3, 2.2, 2.1]) is None
    v = mon.feed(3, [2.0, math.nan, 1.0])
    assert (v.step, v.criterion, v.loss) == (4, "non_finite_loss", None)
    assert mon.feed(0, [math.inf]).criterion == "non_finite_loss"  # even a first step


def test_smoothed_loss_trips_once_the_window_mean_crosses_the_limit():
    # initial 2, factor 10: limit 20. The window (20 steps) is padded with the initial loss, so
    # after k steps at 100 the mean is (k * 100 + (20 - 1 - k) * 2 + 2) / 20 (step 0 counts as 2).
    mon = DivergenceMonitor(10.0)
    losses = [2.0] + [100.0] * 10
    v = mon.feed(0, losses)
    # k = 4: (400 + 32) / 20 = 21.6 > 20, k = 3: (300 + 34) / 20 = 16.7
    assert (v.step, v.criterion) == (4, "smoothed_loss")
    assert v.loss == pytest.approx((4 * 100 + 16 * 2) / 20) and v.limit == 20.0 and v.initial == 2.0


def test_a_single_spike_is_not_divergence_and_state_survives_a_checkpoint():
    mon = DivergenceMonitor(10.0)
    assert mon.feed(0, [2.0, 2.0, 30.0, 2.0] + [1.5] * 30) is None  # one step at 15x: mean stays low
    resumed = DivergenceMonitor(10.0)
    resumed.load_state(mon.state())
    assert resumed.smoothed() == mon.smoothed() and resumed.limit == 20.0
    # the same losses judged in one go or split at a checkpoint give the same verdict
    tail = [2.0] + [80.0] * 8
    assert resumed.feed(34, tail) == mon.feed(34, tail)


def test_steps_are_counted_across_reads():
    mon = DivergenceMonitor(3.0, window=2)
    assert mon.feed(0, [1.0, 1.0]) is None
    assert mon.feed(2, [1.0, 4.0]) is None  # mean(1, 4) = 2.5 < 3
    assert mon.feed(4, [4.0]).step == 4  # mean(4, 4) = 4 > 3


def test_describe_says_whether_the_peak_was_reached():
    v = DivergenceMonitor(10.0).feed(0, [2.0] + [500.0] * 3)
    during = describe(v, lr=0.377, peak_lr=1.6, in_warmup=True)
    assert "during warm-up at LR 0.377 (peak 1.6 not reached)" in during and f"mean over {WINDOW_STEPS}" in during
    assert "at peak LR 1.6" in describe(v, lr=1.6, peak_lr=1.6, in_warmup=False)
    assert "non-finite training loss at step 7" in describe(
        DivergenceMonitor(10.0).feed(7, [math.nan]), lr=0.1, peak_lr=0.1, in_warmup=False)


def test_bad_factor_refused():
    for bad in (1.0, 0.5, math.nan, math.inf):
        with pytest.raises(ValueError):
            DivergenceMonitor(bad)
