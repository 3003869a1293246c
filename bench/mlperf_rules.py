"""MLPerf's own compliance checker (``mlperf_logging.compliance_checker``) on one log: the one
place batchscale calls it.

Owns: running the *common* rules of a training ruleset (``training_<ruleset>/common.yaml``) on
the lines of a log, and turning the checker's findings into one-line problems that never quote
the log. Only the common rules: the division rule file that common.yaml queues
(``open_common.yaml`` / ``closed_common.yaml``) accepts only MLPerf's benchmark names and then
loads a per-benchmark file (``open_<benchmark>.yaml``), which our workloads do not have (the
package's own command line stops with FileNotFoundError on them).

How (public names of the package, pinned by tests/test_compliance.py): the ruleset's parser
module ``mlp_parser.ruleset_<digits>.parse_generator(lines)`` parses lines we stream through
bench.safeio (the package's ``parse_file`` would open the path itself, following links);
``mlp_compliance.make_checker(...).configured_checks(loglines, path_of_common_yaml)`` runs the
rules of one file without following its queue; the queue (``mlp_compliance.enqueued_configs``,
a module-level list the division rule appends to) is emptied afterwards so that nothing leaks
into a later call. Findings are the checker's ``overwritable`` and ``not_overwritable`` messages
(what makes its command line print FAILED); its warnings (e.g. a key logged twice with the same
value) do not fail a log there and are not reported here either.

Must not import: anything from bench; torch, ray, pandas.
"""

from __future__ import annotations

import functools
import importlib
import re
from pathlib import Path
from typing import Iterable

USAGE = "training"
MAX_MESSAGE_CHARS = 300


def _rules_folder() -> Path:
    from mlperf_logging.compliance_checker import mlp_compliance

    return Path(mlp_compliance.__file__).parent


@functools.cache
def newest_ruleset() -> str:
    """The newest training ruleset the installed mlperf-logging ships common rules for
    ("6.1.0" in mlperf-logging 4.1.68, the oldest version pyproject.toml allows)."""
    found = [d.name.split("_", 1)[1] for d in _rules_folder().iterdir()
             if re.fullmatch(rf"{USAGE}_\d+\.\d+\.\d+", d.name) and (d / "common.yaml").is_file()]
    return max(found, key=lambda v: tuple(int(x) for x in v.split(".")))


def rules_file(ruleset: str) -> Path:
    return _rules_folder() / f"{USAGE}_{ruleset}" / "common.yaml"


def common_rule_failures(lines: Iterable[str], ruleset: str | None = None) -> list[str]:
    """MLPerf's common training rules of ``ruleset`` (default: the newest) on these log lines:
    one line per failure (empty: the log passes them). A failure of the checker itself on odd
    input is a failure."""
    from mlperf_logging.compliance_checker import mlp_compliance

    ruleset = ruleset or newest_ruleset()

    parser = importlib.import_module(f"mlperf_logging.compliance_checker.mlp_parser.ruleset_"
                                     f"{ruleset.replace('.', '')}")
    checker = mlp_compliance.make_checker(USAGE, ruleset, True, False)  # quiet, warnings are not errors
    try:
        loglines, errors = parser.parse_generator(lines)
        checker.configured_checks(loglines, str(rules_file(ruleset)))
    except Exception as err:  # noqa: BLE001 -- third-party code that evals its rules on our input
        return [f"the checker stopped on this log ({type(err).__name__})"]
    finally:
        mlp_compliance.enqueued_configs.clear()
    found = [f"{len(errors)} line(s) are not valid MLLOG lines"] if errors else []
    found += [_one_line(m) for m in (*checker.overwritable.values(), *checker.not_overwritable)]
    return found


def _one_line(message: str) -> str:
    """A checker message without the log line it quotes, the checker's state dump or the values
    it saw, its MLLOG line numbers counted from 1."""
    message = message.split("\ncurrent context")[0].split(" with different values:")[0]
    kept = [part.strip() for part in message.split("\n")  # only "\n": a quoted line may hold a "\r"
            if part.strip() and not part.strip().startswith(":::MLLOG")]
    text = re.sub(r"\s*triggered by line\s*:", "", " ".join(kept))
    text = re.sub(r"\bin line (\d+)", lambda m: f"in MLLOG line {int(m.group(1)) + 1}", text)
    return " ".join(text.split())[:MAX_MESSAGE_CHARS]
