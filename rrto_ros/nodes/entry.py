"""
Console entry points of the nodes (what ``ros2 run`` and ``ros2 launch`` start).

A terminal's Ctrl-C can come while a node is still importing torch (seconds on
a loaded machine), before :mod:`rrto_ros.nodes.spin` handles signals; Python
would then print a ``KeyboardInterrupt`` traceback from deep inside an import
and exit with -2.  Each entry point first turns SIGINT/SIGTERM into a flag,
then imports its node: a node stopped that early exits 0 without starting,
and one stopped between the import and the spin stops at once
(:class:`~rrto_ros.nodes.spin.StopSignals` reads the flag).  Standard library
only, so the handlers are in place within milliseconds of the start.
"""

from __future__ import annotations

import importlib
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_EARLY = threading.Event()   # a stop signal came before the node's own handlers


def stopped_early() -> bool:
    """Return True if a stop signal came before the node's own handlers were installed."""
    return _EARLY.is_set()


def _on_signal(signum, frame) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)   # the shutdown that follows must not be cut
    _EARLY.set()


def _run(module: str) -> int:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    main = importlib.import_module(f'rrto_ros.nodes.{module}').main
    return 0 if _EARLY.is_set() else main()


def offload_node() -> int:
    """``offload_node``."""
    return _run('offload_node')


def server_node() -> int:
    """``server_node``."""
    return _run('server_node')


def bandwidth_monitor() -> int:
    """``bandwidth_monitor``."""
    return _run('bandwidth_monitor')


def camera_sim() -> int:
    """``camera_sim``."""
    return _run('camera_sim')
