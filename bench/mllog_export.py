"""Submission logs: a stored run's event log as an MLPerf ``:::MLLOG`` log, written with
``mlperf_logging.mllog`` (MLPerf's own writer), so that it passes MLPerf's training compliance
checker (the common rules; see bench.mlperf_rules).

Owns: what a submission log holds besides the run's own events, and the mapping of our values
to MLPerf's (docs/submissions.md has the table):

- a header at the time of the run's first event: ``submission_org`` / ``_platform`` /
  ``_division`` / ``_benchmark`` (the workload) / ``_status`` (always; older rulesets' words),
  ``cache_clear`` (False: batchscale does not drop system caches before a run), the precision
  (``lowest_numerical_precision_in_linear`` / ``_attn`` / ``_comm`` from the config's
  ``precision``), the parallelism (tensor, pipeline, context, expert: 1, pure data parallelism)
  and ``config_filename`` (the run's config.yaml in the package);
- the init interval: the worker's own ``init_start`` / ``init_stop`` when it logged them; a log
  written before it did gets both at ``run_start``'s time (zero length) with
  ``metadata.recorded = False``, never an invented duration;
- ``run_stop`` status in MLPerf's sense: ``success`` when an evaluation reached the target
  accuracy (bench.analysis.to_target), otherwise ``aborted``; our own status and reason stay in
  ``metadata.batchscale_status`` / ``reason``.

Must not import: torch, ray; bench.submission, bench.compliance (they import this). pandas
(through bench.analysis) only inside functions.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import IO, Any, Sequence

from mlperf_logging.mllog.mllog import MLLogger
from mlperf_logging.mllog import constants as mlc

from bench import events as ev
from bench import records
from bench.submission_files import MLLOG_PREFIX, STATUSES

HEADER_KEYS = (mlc.SUBMISSION_ORG, mlc.SUBMISSION_PLATFORM, mlc.SUBMISSION_DIVISION, mlc.SUBMISSION_BENCHMARK,
               mlc.SUBMISSION_STATUS)
PRECISION_KEYS = (mlc.LOWEST_NUMERICAL_PRECISION_IN_LINEAR, mlc.LOWEST_NUMERICAL_PRECISION_IN_ATTN,
                  mlc.LOWEST_NUMERICAL_PRECISION_IN_COMM)
PARALLELISM_KEYS = (mlc.TENSOR_PARALLELISM, mlc.PIPELINE_PARALLELISM, mlc.CONTEXT_PARALLELISM,
                    mlc.EXPERT_PARALLELISM)
MLPERF_PRECISION = {"fp32": "fp32", "bf16": "bfloat16"}  # config `precision` -> MLPerf's word
MLPERF_SUCCESS, MLPERF_ABORTED = mlc.SUCCESS, mlc.ABORTED
NOT_RECORDED = "not recorded: this run was logged before batchscale logged its set-up; zero-length at run_start"


def precision_values(config: dict) -> dict[str, str]:
    """The three precision keys. Linear layers run in the autocast dtype; our models have no
    attention (the value is the one attention would get); gradients are all-reduced in the
    parameters' dtype, fp32 in both modes."""
    compute = MLPERF_PRECISION[config.get("precision", "fp32")]
    return {mlc.LOWEST_NUMERICAL_PRECISION_IN_LINEAR: compute, mlc.LOWEST_NUMERICAL_PRECISION_IN_ATTN: compute,
            mlc.LOWEST_NUMERICAL_PRECISION_IN_COMM: "fp32"}


def run_stop_status(record: records.RunRecord) -> tuple[str, dict[str, Any]]:
    """(MLPerf status, what run_stop's metadata adds): success iff an evaluation in the log
    reached the config's target accuracy (the first such is where MLPerf would have stopped),
    whatever happened after; aborted otherwise (a completed run that never reached it, a
    diverged or out-of-memory run)."""
    from bench.analysis import evaluations, target_of
    from bench.crossing import first_index

    target = target_of(record)
    evals = evaluations(record)
    index = first_index([e["test_acc"] for e in evals], target)
    hit = evals[index]["epoch"] if index is not None else math.nan
    reached = index is not None
    ours = record.summary.status if record.summary is not None else None
    return (MLPERF_SUCCESS if reached else MLPERF_ABORTED), {
        "batchscale_status": ours, "target_accuracy": None if math.isnan(target) else target,
        "epochs_to_target": hit if reached else None}


def submission_events(record: records.RunRecord, *, submitter: str, platform: str, division: str,
                      status: str, config_filename: str) -> list[dict[str, Any]]:
    """Every event of the run's submission log, in order (bench.events shape)."""
    events = record.events
    t0 = events[0]["time_ms"]
    at = lambda key, value, **md: ev.make_event(key, value, time_ms=t0, metadata=md)  # noqa: E731
    out = [at(mlc.SUBMISSION_ORG, submitter), at(mlc.SUBMISSION_PLATFORM, platform),
           at(mlc.SUBMISSION_DIVISION, division), at(mlc.SUBMISSION_BENCHMARK, record.plan.get("workload")),
           at(mlc.SUBMISSION_STATUS, STATUSES[status][1]),
           at(mlc.CACHE_CLEAR, False, note="batchscale does not clear system caches before a run")]
    out += [at(k, v, source=f"config precision: {record.config.get('precision', 'fp32')}")
            for k, v in precision_values(record.config).items()]
    out += [at(k, 1, note="pure data parallelism") for k in PARALLELISM_KEYS]
    out.append(at(mlc.CONFIG_FILENAME, config_filename))
    keys = [e["key"] for e in events]
    if ev.INIT_START not in keys and ev.INIT_STOP not in keys:
        start = next(e for e in events if e["key"] == ev.RUN_START)["time_ms"]
        for key, kind in ((ev.INIT_START, ev.INTERVAL_START), (ev.INIT_STOP, ev.INTERVAL_END)):
            out.append(ev.make_event(key, None, event_type=kind, time_ms=start,
                                     metadata={"recorded": False, "note": NOT_RECORDED}))
    mlperf_status, extra = run_stop_status(record)
    for e in events:
        if e["key"] == ev.RUN_STOP:
            md = {k: v for k, v in (e.get("metadata") or {}).items() if k != "status"}
            e = {**e, "metadata": {"status": mlperf_status, **md, **extra}}
        out.append(e)
    return out


class _LineSink(logging.Handler):
    """Writes the ``:::MLLOG`` lines mllog emits at INFO; anything else it emits (an event it
    could not encode, metadata it overrode) raises instead of leaving a stray line in the log."""

    def __init__(self, fh: IO[str]) -> None:
        super().__init__(logging.DEBUG)
        self.fh = fh

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno != logging.INFO or not message.startswith(MLLOG_PREFIX):
            raise ValueError(f"mllog did not write an event: {' '.join(message.split())[:200]}")
        self.fh.write(message + "\n")


def write_mllog(path: Path, events: Sequence[dict[str, Any]]) -> None:
    """Write events (bench.events shape) to a new file with mlperf_logging.mllog. Its call-site
    metadata (file, lineno) names this module, relative to the repository."""
    logger = logging.Logger(f"batchscale-mllog-{id(path)}")  # not registered: nothing global changes
    logger.propagate = False
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(path, "x", encoding="utf-8") as fh:
        logger.addHandler(_LineSink(fh))
        writer = MLLogger(logger=logger, default_namespace="", root_dir=re.escape(repo))
        emit = {ev.INTERVAL_START: writer.start, ev.INTERVAL_END: writer.end, ev.POINT_IN_TIME: writer.event}
        for e in events:
            if e.get("event_type") not in emit:
                raise ValueError(f"event {e.get('key')!r} has event_type {e.get('event_type')!r}, not one of "
                                 f"{', '.join(emit)}")
            emit[e["event_type"]](e["key"], e.get("value"), metadata=e.get("metadata") or None,
                                  time_ms=e["time_ms"])
