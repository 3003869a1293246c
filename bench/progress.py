"""Sweep progress on the driver, read from the runs' event logs (not from Ray).

Owns: a background thread that tails each pending run's ``events.jsonl`` and shows
a bar per sweep and per run (rich, on a terminal) or one plain line per finished
run (when stderr is not a TTY, e.g. CI logs).

Must not import: torch, ray, pandas.
"""

from __future__ import annotations

import json
import sys
import threading
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
    started: bool = False

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return
        # Only consume complete lines; a half-written last line is read next time.
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        for line in chunk[:end].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            key = event.get("key")
            if key == ev.RUN_START:
                self.started = True
            elif key == ev.EPOCH_STOP:
                self.epochs += 1
            elif key == ev.EVAL_ACCURACY:
                self.last_test_acc = event.get("value")
            elif key == ev.RUN_STOP:
                self.stopped = event.get("metadata", {})


class SweepProgress:
    """Use as a context manager around the launcher; `runs` is [(run_id, events_path, epochs)]."""

    def __init__(self, runs: list[tuple[str, Path, int]], *, interval_s: float = 0.5,
                 print_fn: Callable[[str], None] | None = None, use_rich: bool | None = None) -> None:
        self.tails = {rid: _Tail(path, epochs) for rid, path, epochs in runs}
        self.interval_s = interval_s
        self.print = print_fn or (lambda s: print(s, file=sys.stderr, flush=True))
        self.use_rich = sys.stderr.isatty() if use_rich is None else use_rich
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="batchscale-progress", daemon=True)
        self._done: set[str] = set()
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
            if self._rich is not None and tail.started:
                if rid not in self._run_tasks:
                    self._run_tasks[rid] = self._rich.add_task(f"  {rid}", total=tail.total_epochs)
                acc = f" test acc {tail.last_test_acc:.3f}" if isinstance(tail.last_test_acc, float) else ""
                self._rich.update(self._run_tasks[rid], completed=tail.epochs,
                                  description=f"  {rid}{acc}")
            if tail.stopped is not None:
                self._done.add(rid)
                self._finished(rid, tail)

    def _finished(self, rid: str, tail: _Tail) -> None:
        status = tail.stopped.get("status", "?")
        acc = f", test acc {tail.last_test_acc:.4f}" if isinstance(tail.last_test_acc, float) else ""
        line = f"[{len(self._done)}/{len(self.tails)}] {rid}: {status} after {tail.epochs} epochs{acc}"
        if self._rich is not None:
            self._rich.update(self._sweep_task, completed=len(self._done))
            if rid in self._run_tasks:
                self._rich.remove_task(self._run_tasks[rid])
            self._rich.console.print(line)
        else:
            self.print(line)
