"""Fault injection for the reliability tests: a worker dies, or a run stalls, at an epoch's end.

Owns: reading ``BATCHSCALE_FAULT`` and what each fault does. The launcher builds the hook on
the driver (``from_environment()``) and installs it in every worker as
``WorkerContext.after_epoch``; the worker calls it at the end of each epoch, after the epoch's
checkpoint. The worker itself knows nothing about faults.

``BATCHSCALE_FAULT`` values::

    RUN_ID:EPOCH        the last rank of the group exits (os._exit, no clean-up) after that epoch,
                        unless the run was resumed from a checkpoint (so a restart gets past it)
    RUN_ID:EPOCH:stall  every rank sleeps STALL_S there: a run too slow to finish before a
                        signal lands, however fast the machine (the interruption tests)

Must not import: ray, torch, pandas.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from bench.errors import UserError

ENV = "BATCHSCALE_FAULT"
STALL_S = 600.0
KILL_EXIT_CODE = 17  # what the killed worker exits with (Ray reports the actor as died)

# hook(run_id, epoch, restored, rank, world_size): called by every rank at every epoch's end
EpochHook = Callable[[str, int, bool, int, int], None]


@dataclass(frozen=True)
class Fault:
    run_id: str
    epoch: int
    stall: bool = False

    def __call__(self, run_id: str, epoch: int, restored: bool, rank: int, world_size: int) -> None:
        if run_id != self.run_id or epoch != self.epoch:
            return
        if self.stall:
            time.sleep(STALL_S)  # until the driver is stopped (and its Ray with it)
        elif not restored and rank == world_size - 1:
            # Checkpoints are written by rank 0 straight into the run folder before this hook
            # runs, so there is nothing to wait for: die the way a lost node would, at once.
            os._exit(KILL_EXIT_CODE)

    @property
    def spec(self) -> str:
        return f"{self.run_id}:{self.epoch}" + (":stall" if self.stall else "")


def parse(spec: str) -> Fault:
    """``RUN_ID:EPOCH[:stall]`` -> Fault; a UserError naming the variable otherwise."""
    parts = spec.strip().split(":")
    if len(parts) in (2, 3) and parts[0] and parts[1].isdigit() and parts[2:] in ([], ["stall"]):
        return Fault(parts[0], int(parts[1]), stall=len(parts) == 3)
    raise UserError(f"{ENV}={spec!r} is not RUN_ID:EPOCH or RUN_ID:EPOCH:stall")


def from_environment(environ: Mapping[str, str] | None = None) -> Fault | None:
    """The epoch-end hook ``BATCHSCALE_FAULT`` asks for, or None when it is unset or empty."""
    spec = (os.environ if environ is None else environ).get(ENV, "")
    return parse(spec) if spec.strip() else None
