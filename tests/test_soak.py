"""The soak script (tools/soak.py; the soak itself is run by hand): its verdict, and how it
counts live Ray actors without the dashboard."""

from __future__ import annotations

import time

import pytest

from tools import soak


def test_soak_verdict_flags_growth_but_not_noise():
    Sample, leaks = soak.Sample, soak.leaks
    base = Sample(round=1, elapsed_s=20.0, rss_mib=400.0, num_fds=36, num_threads=27, live_actors=3, ray_processes=7)
    noise = Sample(round=90, elapsed_s=1800.0, rss_mib=430.0, num_fds=40, num_threads=27, live_actors=4,
                   ray_processes=7)
    leaky = Sample(round=90, elapsed_s=1800.0, rss_mib=700.0, num_fds=126, num_threads=27, live_actors=93,
                   ray_processes=97)
    assert leaks(base, noise, max_rss_growth_pct=50) == []
    assert [p.split(" grew")[0] for p in leaks(base, leaky, max_rss_growth_pct=50)] == [
        "RSS", "open file descriptors", "live Ray actors"]


@pytest.mark.slow
def test_a_leaked_actor_is_counted_without_the_dashboard(ray_session):
    """Ray 2.60 as the launcher starts it (no dashboard): the public state API does not answer,
    so the soak counts this driver's actor processes, and sees an actor come and go."""
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Leak:
        def pid(self) -> int:
            import os

            return os.getpid()

    before = soak.actor_processes()
    leak = Leak.remote()
    ray.get(leak.pid.remote())
    counted, what = soak.actor_counter()
    assert counted() == before + 1
    if soak.state_api_actors() is None:
        assert counted is soak.actor_processes and "actor processes" in what
    ray.kill(leak)
    for _ in range(100):  # the process ends a moment after the kill
        if soak.actor_processes() == before:
            break
        time.sleep(0.1)
    assert soak.actor_processes() == before
    assert soak.sample(1, 0.0, counted).ray_processes >= 1
