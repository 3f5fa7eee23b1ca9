"""
``/diagnostics`` for a lifecycle node, in the shape of ROS's ``diagnostic_updater``.

PyPI has no Python ``diagnostic_updater`` (only the ``diagnostic_msgs``
messages), so this is the one helper the nodes share: a node adds named
tasks, each returning a :class:`Health` (level, message, key/values); every
``period_s`` while active (or at :meth:`Diagnostics.force_update`) one
``DiagnosticArray`` carries a status per task, named ``<node>: <task>``.  A
task that raises reports ERROR with the exception instead of stopping the
node, as ``diagnostic_updater`` does.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.lifecycle import LifecycleNode

from rrto_ros.nodes import messages as m


class Health(NamedTuple):
    """What one diagnostic task reports."""

    level: bytes
    message: str
    values: Sequence[tuple[str, object]] = ()
    hardware_id: str = ''


class Diagnostics:
    """Named diagnostic tasks of ``node``, published together (create it in ``on_configure``)."""

    def __init__(self, node: LifecycleNode, period_s: float):
        self._node = node
        self._period_s = period_s
        self._tasks: list[tuple[str, Callable[[], Health]]] = []
        self._pub = node.create_lifecycle_publisher(DiagnosticArray, m.DIAGNOSTICS_TOPIC,
                                                    m.DIAGNOSTICS_QOS)
        self._timer = None

    def add(self, name: str, task: Callable[[], Health]) -> None:
        """Report ``task()`` as ``<node name>: <name>`` on every update."""
        self._tasks.append((name, task))

    def start(self) -> None:
        """Publish every period (call in ``on_activate``; the publisher activates with it)."""
        if self._timer is None:
            self._timer = self._node.create_timer(self._period_s, self.force_update)

    def stop(self) -> None:
        """Stop the periodic updates (call in ``on_deactivate``)."""
        if self._timer is not None:
            self._node.destroy_timer(self._timer)
            self._timer = None

    def destroy(self) -> None:
        """Stop and release the publisher (call in ``on_cleanup``)."""
        self.stop()
        self._node.destroy_lifecycle_publisher(self._pub)

    def force_update(self) -> None:
        """Run every task now and publish their statuses in one array."""
        statuses = []
        for name, task in self._tasks:
            try:
                health = task()
            except Exception as exc:  # noqa: B902 - a failing check is a status, not a crash
                health = Health(m.ERROR, f'{type(exc).__name__}: {exc}')
            statuses.append(m.status(f'{self._node.get_name()}: {name}', health.level,
                                     health.message, health.values, health.hardware_id))
        self._pub.publish(m.diagnostic_array(self._node.get_clock().now().to_msg(), statuses))
