"""Errors and exit codes: the one place every module takes them from.

Owns: the exception classes a user can act on (each printed by the CLI as one line, without a
traceback) and the process exit codes. Every error class carries the exit code it ends with.

Must not import: anything from bench (it sits below every other module), torch, ray, pandas.

Exit codes::

    0    ok
    1    a cluster, results-folder or runtime problem, or runs left incomplete (EXIT_FAILED)
    2    a mistake in the input: one line naming file, key and what is allowed; nothing written
    130  interrupted (Ctrl-C or SIGTERM)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class BatchscaleError(Exception):
    """Anything batchscale reports as one line and an exit code instead of a traceback."""

    default_code = EXIT_FAILED

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = self.default_code if code is None else code


class UserError(BatchscaleError):
    """A mistake the user can fix (a bad option, a missing file): exit 2 unless told otherwise."""

    default_code = EXIT_USAGE


class ConfigError(UserError):
    """A mistake in a sweep or cluster file: one line naming the file, the key and what is allowed."""


class PlanError(UserError, ValueError):
    """The sweep asks for something the batch arithmetic forbids (the message names key and numbers)."""


class StoreError(BatchscaleError):
    """A results folder that cannot be used (unwritable, locked, owned by another sweep)."""


class LauncherError(BatchscaleError):
    """The cluster cannot be used (unreachable address, missing resources)."""
