"""Sweep progress on the driver, read from the runs' event logs (not from Ray).

Owns: a background thread that tails each pending run's ``events.jsonl`` and shows
a bar per sweep and per running run (rich, on a terminal) or one plain line per finished
run (when stderr is not a TTY, e.g. CI logs). Runs that go at once show at once; given
``where`` (run id -> 'lane 2, node 1a2b3c4d', from the driver's run book), each bar and line
says where its run is, and the plain lines also say when a run starts. A run's bar moves within an epoch too
(an ImageNet epoch takes minutes): by the LR lines of the first epoch, which name
every step, and later by the time since epoch_start against the last epoch's length. After a
worker-group restart, rank 0 cuts a run's log back to its checkpoint (or starts it again) and
rewrites it; a tail notices (the file is shorter, or the bytes it read last are no longer there)
and reads the log again from the start.

Must not import: torch, ray, pandas.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench import events as ev


@dataclass
class _Tail:
    path: Path
    total_epochs: int
    offset: int = 0
    epochs: int = 0
    stopped: dict | None = None
    last_test_acc: float | None = None
    last_test_loss: float | None = None
    tokens: bool = False  # a language model's run (batch_unit tokens): its validation loss is shown
    started: bool = False
    steps_per_epoch: int | None = None
    last_step: int = -1  # the last step an opt_learning_rate line named (every step of epoch 1)
    epoch_started_at: float | None = None  # clock() when the running epoch's epoch_start was read
    last_epoch_s: float | None = None  # training seconds of the last finished epoch
    clock: Callable[[], float] = time.monotonic
    seen: bytes = b""  # the last bytes consumed (up to SEEN_BYTES), to notice a rewritten log

    SEEN_BYTES = 64

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                if self.offset and not self._unchanged(fh):
                    self.__dict__.update(_Tail(self.path, self.total_epochs, clock=self.clock).__dict__)
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return
        # Only consume complete lines; a half-written last line is read next time.
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        self.seen = (self.seen + chunk[:end])[-self.SEEN_BYTES:]
        for line in chunk[:end].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            key, meta = event.get("key"), event.get("metadata") or {}
            if key == ev.RUN_START:
                self.started = True
            elif key == ev.STEPS_PER_EPOCH and isinstance(event.get("value"), int):
                self.steps_per_epoch = event["value"]
            elif key == ev.OPT_LEARNING_RATE and isinstance(meta.get("step"), int):
                self.last_step = meta["step"]
            elif key == ev.EPOCH_START:
                self.epoch_started_at = self.clock()
            elif key == ev.EPOCH_STOP:
                self.epochs += 1
                self.epoch_started_at = None
                seconds = meta.get("epoch_train_time_s")
                self.last_epoch_s = seconds if isinstance(seconds, (int, float)) and seconds > 0 else None
            elif key == ev.EVAL_ACCURACY:
                self.last_test_acc = event.get("value")
            elif key == ev.EVAL_LOSS:
                self.last_test_loss = event.get("value")
            elif key == ev.BATCH_UNIT:
                self.tokens = event.get("value") == "tokens"
            elif key == ev.RUN_STOP:
                self.stopped = meta

    def _unchanged(self, fh) -> bool:
        """Whether the log still holds what was read: not cut back, same bytes before the offset."""
        if os.fstat(fh.fileno()).st_size < self.offset:
            return False
        fh.seek(self.offset - len(self.seen))
        return fh.read(len(self.seen)) == self.seen

    def metric(self, digits: int) -> str:
        """" test acc 0.912", or for a language model " val loss 2.345"; "" before the first evaluation."""
        name, value = ("val loss", self.last_test_loss) if self.tokens else ("test acc", self.last_test_acc)
        return f" {name} {value:.{digits}f}" if isinstance(value, float) else ""

    @property
    def progress(self) -> float:
        """Epochs done, plus how far the running epoch has got: from the step of the last LR
        line (logged at every step of the first epoch and of warmup), else from the time since
        the epoch started against the last epoch's length; never a whole epoch ahead."""
        if self.epoch_started_at is None:
            return float(self.epochs)
        fraction = 0.0
        if self.steps_per_epoch:
            fraction = (self.last_step + 1 - self.epochs * self.steps_per_epoch) / self.steps_per_epoch
        if self.last_epoch_s:
            fraction = max(fraction, (self.clock() - self.epoch_started_at) / self.last_epoch_s)
        return self.epochs + min(max(fraction, 0.0), 0.99)


class SweepProgress:
    """Use as a context manager around the launcher; `runs` is [(run_id, events_path, epochs)]."""

    def __init__(self, runs: list[tuple[str, Path, int]], *, interval_s: float = 0.5,
                 print_fn: Callable[[str], None] | None = None, use_rich: bool | None = None,
                 where: Callable[[str], str | None] | None = None) -> None:
        self.tails = {rid: _Tail(path, epochs) for rid, path, epochs in runs}
        self.where = where
        self.interval_s = interval_s
        self.print = print_fn or (lambda s: print(s, file=sys.stderr, flush=True))
        self.use_rich = sys.stderr.isatty() if use_rich is None else use_rich
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="batchscale-progress", daemon=True)
        self._done: set[str] = set()
        self._started: set[str] = set()
        self._rich = None

    def __enter__(self) -> "SweepProgress":
        if self.use_rich:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), transient=False)
            self._rich.start()
            self._sweep_task = self._rich.add_task("sweep (runs)", total=len(self.tails))
            self._run_tasks: dict[str, int] = {}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._update()
        if self._rich is not None:
            self._rich.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._update()

    def _update(self) -> None:
        for rid, tail in self.tails.items():
            if rid in self._done:
                continue
            tail.poll()
            at = self._at(rid)
            if tail.started and rid not in self._started:
                self._started.add(rid)
                if self._rich is None and self.where is not None:
                    self.print(f"{rid}: started{at} ({self._running()} running)")
            if self._rich is not None and tail.started:
                if rid not in self._run_tasks:
                    self._run_tasks[rid] = self._rich.add_task(f"  {rid}", total=tail.total_epochs)
                acc = tail.metric(3)
                self._rich.update(self._run_tasks[rid], completed=tail.progress,
                                  description=f"  {rid}{at}{acc}")
            if tail.stopped is not None:
                self._done.add(rid)
                self._finished(rid, tail, at)

    def _at(self, rid: str) -> str:
        where = self.where(rid) if self.where is not None else None
        return f" ({where})" if where else ""

    def _running(self) -> int:
        return len(self._started - self._done)

    def _finished(self, rid: str, tail: _Tail, at: str) -> None:
        status = tail.stopped.get("status", "?")
        acc = "," + tail.metric(4) if tail.metric(4) else ""
        line = f"[{len(self._done)}/{len(self.tails)}] {rid}: {status} after {tail.epochs} epochs{acc}{at}"
        if self._rich is not None:
            self._rich.update(self._sweep_task, completed=len(self._done))
            if rid in self._run_tasks:
                self._rich.remove_task(self._run_tasks[rid])
            self._rich.console.print(line)
        else:
            self.print(line)
