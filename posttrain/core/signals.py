"""Ctrl-C and SIGTERM stop a run cleanly, once: the first signal interrupts, later ones are ignored so
the cleanup (locks released, FAILED marker, nothing half-written) runs to its end and the exit is 130.

Some libraries catch the interruption inside an import or a call and raise their own error instead;
`interrupted()` lets the runner tell such an error from a real stage failure.
"""
from __future__ import annotations

import signal

_state = {"interrupted": False}


def _handle(signum, frame) -> None:
    # From now on the OS drops these signals (a Python-level handler would not do: the interpreter puts
    # the default one back while it shuts down, and a late second Ctrl-C then kills the process).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _state["interrupted"] = True
    raise KeyboardInterrupt


def install() -> None:
    """Handle SIGINT and SIGTERM this way in this process (the CLI does; the Python API leaves them be)."""
    signal.signal(signal.SIGINT, _handle)
    signal.signal(signal.SIGTERM, _handle)


def interrupted() -> bool:
    return _state["interrupted"]
