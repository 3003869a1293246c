"""The project's own lab tooling, beside the package rather than in it: scripts run from a
checkout (``python tools/NAME.py``) that may import ``bench``; ``bench`` never imports them.

- ``gpu_session.py``: the GPU measurements still owed, run within a lease's device time, resumably
  (``session.py``: the runner behind it).
- ``soak.py``: many short sweeps in one driver, watching its memory, descriptors and Ray actors.
"""
