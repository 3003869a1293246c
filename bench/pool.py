"""The sweep's run book: which runs wait, which lane holds which, which are done; and how many
lanes to start.

A *lane* is one long-lived Ray Train worker group (one ``TorchTrainer.fit()``) that takes runs of
its worker count one at a time until none is left (bench.launcher). Several lanes run at once;
Ray's placement groups decide where each lands. The book is what they share.

Owns: handing runs out (one at a time, in plan order, per worker count), knowing which attempt of
which lane holds each run, handing a run back when the attempt that held it died (to the front
of its queue: the next lane to ask resumes it from its checkpoint), the failure budget per run
(``max_failures``: a run whose lanes died more often than that is not handed out again and stays
incomplete), and the number of lanes to start (``lanes_to_start``).

Why not ``ray.util.queue.Queue`` alone: a ``get()`` is not acknowledged, so a run taken by a lane
that then died would be lost, and nothing could tell a dead lane's run from a live one's. The
book records the holder with the taking, in one actor call.

bench.launcher runs one ``RunBook`` as a Ray actor (0 CPUs) pinned to the driver's node, so it
lives exactly as long as the driver; its methods are plain Python and tested without Ray.

Must not import: ray, torch, pandas.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping


@dataclass
class _Attempt:
    lane: int
    num_workers: int
    node_id: str | None
    entered_unix_s: float


@dataclass
class Snapshot:
    """What the driver polls: runs waiting and held per worker count, who holds what, and the
    runs given up on."""

    queued: dict[int, int]
    held: dict[int, int]
    holders: dict[str, tuple[int, str | None]]  # run id -> (lane, node id of its rank 0)
    given_up: list[str]

    @property
    def outstanding(self) -> int:
        return sum(self.queued.values()) + sum(self.held.values())


class RunBook:
    def __init__(self, runs: Iterable[tuple[str, int]], max_failures: int,
                 clock: Callable[[], float] = time.time) -> None:
        self._queues: dict[int, deque[str]] = {}
        for run_id, num_workers in runs:
            self._queues.setdefault(num_workers, deque()).append(run_id)
        self._max_failures = max_failures  # -1: hand a run back forever
        self._clock = clock
        self._attempts: dict[str, _Attempt] = {}  # token -> attempt
        self._holder: dict[str, str] = {}  # run id -> token of the attempt that holds it
        self._run_workers = {rid: w for w, q in self._queues.items() for rid in q}
        self._failures: dict[str, int] = {}
        self._given_up: list[str] = []

    # --- called by rank 0 of a lane -----------------------------------------------------------
    def enter(self, lane: int, token: str, num_workers: int, node_id: str | None) -> None:
        """A lane's attempt starts (its loop entered). Whatever an earlier attempt of the same lane
        still held is handed back first: that attempt is dead (Ray Train restarts a group only
        after ending it)."""
        self._release(lambda a: a.lane == lane)
        self._attempts[token] = _Attempt(lane, num_workers, node_id, self._clock())

    def take(self, token: str) -> str | None:
        """The next run for this attempt's worker count, now held by it; None when none waits."""
        attempt = self._attempts.get(token)
        queue = self._queues.get(attempt.num_workers) if attempt else None
        if not queue:
            return None
        run_id = queue.popleft()
        self._holder[run_id] = token
        return run_id

    def owns(self, token: str, run_id: str) -> bool:
        """Whether this attempt still holds ``run_id`` (asked before the run's summary is written:
        an attempt whose run was handed back must not complete it)."""
        return self._holder.get(run_id) == token

    def done(self, token: str, run_id: str) -> None:
        """The attempt finished ``run_id`` (complete, diverged or OOM: not to be handed out again)."""
        if self._holder.get(run_id) == token:
            del self._holder[run_id]

    # --- called by Ray Train's controller (a worker failed) and by the driver (a lane ended) -------
    def release(self, lane: int, before_unix_s: float = math.inf) -> list[str]:
        """Hand back what attempts of ``lane`` that entered before ``before_unix_s`` hold (a failure
        seen at that time; an attempt that entered later is the restart, alive). Returns the runs
        handed back."""
        return self._release(lambda a: a.lane == lane and a.entered_unix_s < before_unix_s)

    def _release(self, dead: Callable[[_Attempt], bool]) -> list[str]:
        back = []
        for run_id, token in list(self._holder.items()):
            if not dead(self._attempts[token]):
                continue
            del self._holder[run_id]
            self._failures[run_id] = self._failures.get(run_id, 0) + 1
            if self._max_failures != -1 and self._failures[run_id] > self._max_failures:
                self._given_up.append(run_id)
            else:
                self._queues[self._run_workers[run_id]].appendleft(run_id)
                back.append(run_id)
        return back

    def snapshot(self) -> Snapshot:
        held: dict[int, int] = {}
        holders = {}
        for run_id, token in self._holder.items():
            attempt = self._attempts[token]
            held[attempt.num_workers] = held.get(attempt.num_workers, 0) + 1
            holders[run_id] = (attempt.lane, attempt.node_id)
        return Snapshot(queued={w: len(q) for w, q in self._queues.items() if q}, held=held, holders=holders,
                        given_up=list(self._given_up))


def lanes_to_start(snapshot: Snapshot, alive: Mapping[int, int], *, max_lanes: int, worker_slots: int) -> list[int]:
    """Worker counts of the lanes to start now (smallest worker count first, one list entry per
    lane). ``alive``: live lanes per worker count. A worker count gets lanes while it has more
    runs waiting or held than live lanes; lanes in all stay within ``max_lanes``, and their
    workers within ``worker_slots`` (how many workers the cluster holds at once)."""
    lanes = sum(alive.values())
    used = sum(w * n for w, n in alive.items())
    start = []
    for num_workers in sorted(set(snapshot.queued) | set(snapshot.held)):
        want = snapshot.queued.get(num_workers, 0) + snapshot.held.get(num_workers, 0) - alive.get(num_workers, 0)
        while want > 0 and lanes < max_lanes and used + num_workers <= worker_slots:
            start.append(num_workers)
            want, lanes, used = want - 1, lanes + 1, used + num_workers
    return start
