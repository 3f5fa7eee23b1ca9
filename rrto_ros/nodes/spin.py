"""
The one ``main()`` body every rrto_ros node shares, clean under every way a user stops it.

``rclpy.init(args=args)`` without rclpy's own signal handlers; build the node;
a lifecycle node with ``autostart`` configures and activates itself; spin it
on an explicit executor until SIGINT or SIGTERM.  The first signal ends the
spin and every later one is ignored, so the terminal's Ctrl-C (which reaches
the whole process group, and ``ros2 launch`` forwards again) cannot interrupt
the shutdown half-way: the executor is shut down (letting a callback in flight
finish), the node destroyed and rclpy shut down, and the process exits 0.
An invalid parameter is logged as FATAL under the node's real name (after
``-r __node:=...``) with the parameter's name, and gives exit code 2.
"""

from __future__ import annotations

import signal
import threading

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.signals import SignalHandlerOptions

from rrto_ros.nodes.entry import STOP_SIGNALS, stopped_early
from rrto_ros.nodes.params import ParameterError

SPIN_PERIOD_S = 0.1   # how soon a signal is noticed (Python runs handlers between waits)


class StopSignals:
    """Turn the first SIGINT/SIGTERM into an event; ignore the ones after it."""

    def __init__(self):
        self.event = threading.Event()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        if stopped_early():   # stopped while the node was still importing (entry point)
            self._on_signal(signal.SIGINT, None)

    def _on_signal(self, signum, frame) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)   # a second Ctrl-C must not cut the shutdown
        self.event.set()


def start(node) -> str:
    """Configure and activate a lifecycle node with ``autostart``; return why it failed."""
    if not isinstance(node, LifecycleNode) or not node.params['autostart']:
        return ''
    for trigger in (node.trigger_configure, node.trigger_activate):
        if trigger() != TransitionCallbackReturn.SUCCESS:
            return node.failure or f'{trigger.__name__} failed'
    return ''


def stop_spinning(executor: SingleThreadedExecutor | None) -> None:
    """Ignore stop signals from now on (nothing may interrupt); shut ``executor`` down."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if executor is not None:
        executor.shutdown(timeout_sec=5.0)   # a callback in flight finishes


def run(node_class, args=None) -> int:
    """
    Spin one node of ``node_class`` until SIGINT/SIGTERM or shutdown; return the exit code.

    The executor is single-threaded: callbacks are short, the blocking work runs
    on the node's own threads, so when the spin ends no callback is in flight.
    (A MultiThreadedExecutor's shutdown destroys its guard condition while queued
    callbacks still use it: "exception was never retrieved: cannot use Destroyable".)
    """
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = StopSignals()
    node = executor = None
    try:
        node = node_class()
        failure = start(node)
        if failure:
            node.get_logger().fatal(f'{failure}; exiting')
            return 2
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        while not stop.event.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=SPIN_PERIOD_S)
    except ParameterError as exc:
        rclpy.logging.get_logger(exc.logger or node_class.NODE_NAME).fatal(str(exc))
        return 2
    except ExternalShutdownException:
        pass
    finally:
        stop_spinning(executor)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
