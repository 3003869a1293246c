"""Reaching an existing Ray cluster before this process joins it: bounded, and quiet.

Owns: the TCP check of a ``host:port`` address, and the probe: one join of the cluster in a child
process (``bench.launcher._probe_child``), killed when it has not joined ``connect_timeout_s``
after its ``import ray``. Why a child process: Ray's C++ core, not Python, does the connecting;
pointed at a port that is open but not Ray's (an HTTP server), ``ray.init`` retries for 400 s and
more, printing warnings straight to the process's stderr, and neither the wait nor the printing
can be interrupted from Python. In a child, the wait is killable and the printing goes to a
temporary file that is read only to name a cause. The cost is one Python start and
``import ray`` (~1 s; ~3 s on a loaded 2-core machine) per ``batchscale run`` on a cluster, not
counted against ``connect_timeout_s``. A protocol check in this process was the alternative; the
Python side of Ray ships no gRPC client to make one, and a join is what the run needs anyway
(it also catches a wrong token or a Ray version mismatch, in one line).

Must not import: ray (the child does, through bench.launcher), torch, pandas.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO

from bench.errors import LauncherError

PROBE_IMPORT_LIMIT_S = 120.0  # python + `import ray` in the child, not counted in connect_timeout_s
PROBE_LEAVE_S = 10.0  # a joined child's ray.shutdown(), after which it is killed


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rstrip("/").rpartition(":")
    if not host or "/" in host or not port.isdigit():
        raise LauncherError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.5:6379) or auto")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast: ray.init() on a dead address retries for a long time, a TCP connect does not."""
    host, port = host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        raise LauncherError(f"cannot reach the Ray cluster at {address} within {timeout_s:g} s "
                            f"({err.strerror or type(err).__name__}); is the head node up "
                            "(`ray status` there), and is the address in the cluster file right?") from None


def probe(address: str, timeout_s: float) -> None:
    """Join the cluster at ``address`` once in a child process; LauncherError (one line) unless it
    joined within ``timeout_s`` of its ``import ray``."""
    root = str(Path(__file__).resolve().parent.parent)  # the child imports this same bench
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    said: list[str] = []
    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen([sys.executable, "-c", "from bench.launcher import _probe_child; _probe_child()",
                                  address], stdout=subprocess.PIPE, stderr=stderr, env=env, text=True,
                                 start_new_session=True)  # a Ctrl-C reaches the driver, which kills it
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True).start()
        try:
            for expect, limit_s in (("imported", PROBE_IMPORT_LIMIT_S), ("joined", timeout_s)):
                try:
                    said.append(lines.get(timeout=limit_s) or "")
                except queue.Empty:
                    break
                if said[-1] != expect:
                    break
            else:
                child.wait(timeout=PROBE_LEAVE_S)  # let it leave the cluster cleanly
                return
        except subprocess.TimeoutExpired:
            return
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
        stderr.seek(0)
        cause = probe_cause(said, stderr.read().decode("utf-8", "replace"))
    if said == ["imported"] and not cause:
        raise LauncherError(f"{address} accepts connections but no Ray cluster answered there within {timeout_s:g} s "
                            "(is it the GCS port of `ray start --head`, 6379 by default, with the same Ray "
                            "version? raise connect_timeout_s for a slow head)")
    raise LauncherError(f"cannot join the Ray cluster at {address}: {cause or 'the probe process failed'}")


def _pump(stream: IO[str], lines: "queue.Queue[str | None]") -> None:
    for line in stream:
        lines.put(line.strip())
    lines.put(None)


def probe_cause(stdout_lines: list[str], stderr: str) -> str:
    """The child's own error line, else the last line Ray's C++ core logged, without its prefix
    (``[time W pid tid] file.cc:NN: ``); empty when neither says anything."""
    for line in stdout_lines:
        if line.startswith("error: "):
            return line[len("error: "):]
    for line in reversed(stderr.strip().splitlines()):
        if "] " in line and ".cc:" in line:
            return line.split("] ", 1)[1].split(": ", 1)[-1].strip()[:300]
    return ""
