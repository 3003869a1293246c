"""The ``batchscale plan`` command: options checked at the door, runs loaded, bench.planner's table,
assumptions and recommendation printed.

Owns: the plan command's parser and the checks of its options. Each bad option is refused with
one line naming the option, what is wrong and what is allowed, exit 2 (``UserError``), before
any result is read: exactly one target, ``--target-accuracy`` a finite number in (0, 1] or
``--target-loss`` (a language model's validation loss) a finite number > 0; ``--gpu-hour-price`` a
finite number >= 0; ``--max-gpus`` and ``--gpus-per-node`` whole numbers >= 1; ``--deadline`` a
positive duration (2h, 90m, 3600s, 1h30m or seconds). Options are taken as text and parsed here,
so that argparse's two-line usage errors never replace the one line.

Must not import: torch, ray; pandas only inside the command.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import Callable

from bench.errors import UserError
from bench import planner_text as words
from bench.planner import parse_duration_s, plan_capacity, plan_context

PRINT_COLUMNS = ["global_batch_size", "num_gpus", "num_nodes", "per_gpu_batch_size", "steps_to_target",
                 "time_to_target_s", "gpu_hours", "cost", "memory_headroom_gib", "meets_deadline", "source", "note"]


def printable(result):
    """The plan table as printed: a worker called what it is ("gpu" or "worker" in the column
    names), times and device time each in one unit for the column (seconds, minutes or hours, by
    the largest value), numbers written out to 4 significant figures."""
    t = result.table[PRINT_COLUMNS].copy()
    d = result.device.lower()
    per_t, short, _ = words.time_unit(float(t["time_to_target_s"].max()))
    device_s = t["gpu_hours"] * 3600.0
    per_d, _, long = words.time_unit(float(device_s.max()))
    t["time_to_target_s"] = t["time_to_target_s"] / per_t
    t["gpu_hours"] = device_s / per_d
    t["per_gpu_batch_size"] = t["per_gpu_batch_size"].round().astype(int)  # B % W == 0 in every row
    return t.rename(columns={"num_gpus": f"num_{d}s", "per_gpu_batch_size": f"per_{d}_batch_size",
                             "time_to_target_s": f"time_to_target_{short}", "gpu_hours": f"{d}_{long}"})


def _number(option: str, text: str | None, allowed: str, ok: Callable[[float], bool],
            integer: bool = False) -> float | int | None:
    if text is None:
        return None
    try:
        value = int(text) if integer else float(text)
    except (TypeError, ValueError):
        raise UserError(f"{option} {text!r}: not a {'whole number' if integer else 'number'}; {allowed}") from None
    if not (math.isfinite(value) and ok(value)):
        raise UserError(f"{option} {text!r}: out of range; {allowed}")
    return value


def check_options(args: argparse.Namespace) -> dict:
    """The plan options as numbers, or UserError for the first bad one (one line, exit 2)."""
    if (args.target_accuracy is None) == (getattr(args, "target_loss", None) is None):
        raise UserError("plan: give one target, --target-accuracy (e.g. 0.93) or --target-loss (e.g. 3.0)")
    out = {"target_accuracy": _number("--target-accuracy", args.target_accuracy,
                                      "must be a test accuracy in (0, 1], e.g. 0.93", lambda v: 0 < v <= 1),
           "target_loss": _number("--target-loss", getattr(args, "target_loss", None),
                                  "must be a validation loss in nats > 0, e.g. 3.0", lambda v: v > 0),
           "gpu_hour_price": _number("--gpu-hour-price", args.gpu_hour_price, "must be a price >= 0, e.g. 2.5",
                                     lambda v: v >= 0),
           "max_gpus": _number("--max-gpus", args.max_gpus, "must be a whole number >= 1", lambda v: v >= 1, True),
           "gpus_per_node": _number("--gpus-per-node", args.gpus_per_node, "must be a whole number >= 1",
                                    lambda v: v >= 1, True)}
    try:
        out["deadline_s"] = parse_duration_s(args.deadline) if args.deadline is not None else None
    except ValueError as err:
        raise UserError(f"--deadline: {err}") from None
    return out


def _cluster_defaults(records) -> tuple[float | None, int | None, float | None]:
    """(price per GPU-hour, GPUs per node, GPU memory GiB) when every run's cluster/worker agrees."""
    def one(values):
        known = {v for v in values if v is not None}
        return known.pop() if len(known) == 1 else None

    hardware = [(r.cluster or {}).get("hardware") or {} for r in records]
    return (one(h.get("price_per_gpu_hour") for h in hardware), one(h.get("gpus_per_node") or None for h in hardware),
            one((r.worker_env or {}).get("gpu_memory_gib") for r in records))


def _comm_model(records, args: argparse.Namespace):
    """The step model for GPU counts beyond those measured (bench.stepmodel.planner_seam): links
    from ``--allreduce FILE`` (measured on the system being planned) or the cluster file's
    ``hardware.interconnect``; gradient bytes from the runs' summaries or ``--gradient-bytes``."""
    from bench.stepmodel import planner_seam

    measured = None
    if args.allreduce:
        from bench.perf.allreduce import load

        try:
            measured = load(args.allreduce).link(args.allreduce)
        except (OSError, ValueError) as err:
            raise UserError(f"--allreduce {args.allreduce}: {' '.join(str(err).split())[:300]}") from None
    size = _number("--gradient-bytes", args.gradient_bytes, "must be a whole number of bytes >= 1",
                   lambda v: v >= 1, True)
    return planner_seam(records, measured=measured, gradient_bytes=size)


def cmd_plan(args: argparse.Namespace) -> int:
    import pandas as pd

    from bench import analysis, store
    from bench import records as stored

    opts = check_options(args)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", store.RunSkipped)
            records = stored.load_results([Path(p) for p in args.results])
    except (ValueError, store.StoreError) as err:
        raise UserError(str(err)) from None
    for w in caught:
        print(f"batchscale: warning: {w.message}", file=sys.stderr)
    if not records:
        raise UserError(f"no runs found under {', '.join(args.results)}", 1)
    price, per_node, memory = _cluster_defaults(records)
    context = plan_context(records)
    comm_model, comm_notes = _comm_model(records, args)
    price = opts["gpu_hour_price"] if opts["gpu_hour_price"] is not None else price
    target = {"target_accuracy": opts["target_accuracy"], "target_loss": opts["target_loss"]}
    try:
        result = plan_capacity(analysis.runs_frame(records, **target), **target,
                               deadline_s=opts["deadline_s"], gpu_hour_price=price, max_gpus=opts["max_gpus"],
                               gpus_per_node=opts["gpus_per_node"] or per_node, gpu_memory_gib=memory,
                               comm_model=comm_model, comm_notes=comm_notes, **context)
    except ValueError as err:
        raise UserError(str(err), 1) from None
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.max_colwidth", 140):
        print(printable(result).to_string(index=False, float_format=lambda v: words.amount(v, 4), na_rep="-"))
    print("\nassumptions:\n  " + "\n  ".join(result.assumptions))
    print("\n" + result.recommendation)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `plan` to the batchscale parser."""
    p = sub.add_parser("plan", help="time, GPU-hours and cost to reach an accuracy, per batch and GPU count")
    p.add_argument("results", nargs="+", help="results folders (a sweep's, or a folder of them)")
    p.add_argument("--target-accuracy", help="test accuracy to reach, in (0, 1], e.g. 0.93")
    p.add_argument("--target-loss", help="instead: validation loss to reach (language models, nats), e.g. 3.0")
    p.add_argument("--deadline", help="e.g. 2h, 90m, 3600s")
    p.add_argument("--gpu-hour-price", help="price per GPU-hour, >= 0 (default: the cluster file's)")
    p.add_argument("--max-gpus", help="largest GPU count to consider, >= 1 (default: the largest measured; "
                                      "counts beyond it are listed with nothing known)")
    p.add_argument("--gpus-per-node", help="for node counts, >= 1 (default: the cluster file's)")
    p.add_argument("--allreduce", help="all-reduce measurements of the planned system (python -m bench.perf "
                                       "allreduce): the link for GPU counts beyond those measured")
    p.add_argument("--gradient-bytes", help="gradient bytes per step, for runs that do not record it")
    p.set_defaults(func=cmd_plan)
