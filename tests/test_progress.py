"""The driver's progress tail: epochs, and how far the running epoch has got."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import events as ev
from bench.progress import _Tail


def test_progress_moves_within_an_epoch(tmp_path: Path):
    path = tmp_path / "events.jsonl"
    now = [100.0]
    tail = _Tail(path, total_epochs=3, clock=lambda: now[0])
    log = ev.EventLog(path, mode="w")
    log.log(ev.RUN_START, None, event_type=ev.INTERVAL_START)
    log.log(ev.STEPS_PER_EPOCH, 10)
    log.log(ev.EPOCH_START, None, event_type=ev.INTERVAL_START, metadata={"epoch_num": 1})
    for step in range(4):  # the first epoch logs the LR of every step
        log.log(ev.OPT_LEARNING_RATE, 0.1, metadata={"step": step})
    tail.poll()
    assert tail.started and tail.progress == pytest.approx(0.4)
    for step in range(4, 10):
        log.log(ev.OPT_LEARNING_RATE, 0.1, metadata={"step": step})
    tail.poll()
    assert tail.progress == pytest.approx(0.99)  # never a whole epoch ahead of epoch_stop
    log.log(ev.EPOCH_STOP, None, event_type=ev.INTERVAL_END, metadata={"epoch_num": 1, "epoch_train_time_s": 20.0})
    tail.poll()
    assert tail.progress == 1.0 and tail.epochs == 1
    log.log(ev.EPOCH_START, None, event_type=ev.INTERVAL_START, metadata={"epoch_num": 2})
    log.log(ev.OPT_LEARNING_RATE, 0.1, metadata={"step": 10})  # later epochs: first step only
    tail.poll()
    assert tail.progress == pytest.approx(1.1)
    now[0] += 5.0  # a quarter of the last epoch's 20 s
    assert tail.progress == pytest.approx(1.25)
    now[0] += 60.0
    assert tail.progress == pytest.approx(1.99)
    log.log(ev.RUN_STOP, None, event_type=ev.INTERVAL_END, metadata={"status": "success"})
    log.close()
    tail.poll()
    assert tail.stopped == {"status": "success"}


def test_progress_of_a_run_without_step_lines(tmp_path: Path):
    path = tmp_path / "events.jsonl"
    tail = _Tail(path, total_epochs=2)
    assert tail.progress == 0.0  # no file yet
    tail.poll()
    assert not tail.started and tail.progress == 0.0
