"""
The lifecycle shape the socket-owning nodes share (offload_node, server_node, bandwidth_monitor).

Parameters are declared in the constructor (so ``ros2 param`` works in every
state and a value outside its range fails at once); each transition calls one
method of the node: ``_configure`` (check parameters together, load what is
slow to load, create lifecycle publishers), ``_activate`` (connect or bind,
create timers and subscriptions), ``_deactivate`` and ``_cleanup`` (undo them;
both must be safe to call twice).  A :class:`ParameterError` raised by a
transition fails it, names the parameter in the log and leaves the node where
it was, as ROS 2's lifecycle prescribes.  Each state change is logged once.

``autostart`` (default true) lets the process configure and activate itself
(:func:`rrto_ros.nodes.spin.run`); the launch file sets it to false and drives
the transitions, so ``ros2 lifecycle`` can manage the nodes as any others.
"""

from __future__ import annotations

from typing import Sequence

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from rrto_ros.nodes import log_bridge
from rrto_ros.nodes.params import Param, ParameterError, declare

AUTOSTART = Param('autostart', True, 'configure and activate at start (false: wait for '
                  "'ros2 lifecycle set' or a launch file's transitions)")
SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


class ManagedNode(LifecycleNode):
    """A LifecycleNode whose transitions call ``_configure`` ... ``_cleanup``."""

    def __init__(self, name: str, params: Sequence[Param], on_change=None, **kwargs):
        super().__init__(name, **kwargs)
        log_bridge.install()
        self.params = declare(self, [*params, AUTOSTART], on_change=on_change)
        self.failure = ''   # why the last transition failed ('' if it did not)

    # ------------------------------------------------------------------ per node
    def _configure(self) -> None:
        raise NotImplementedError

    def _activate(self) -> str:
        """Start working; return what the node now does, for the log."""
        raise NotImplementedError

    def _deactivate(self) -> None:
        raise NotImplementedError

    def _cleanup(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ transitions
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Check the parameters together and prepare; FAILURE names the parameter."""
        try:
            self._configure()
        except ParameterError as exc:
            self._cleanup()
            return self._failed('configure', exc)
        self.get_logger().info('configured')
        return SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Connect or bind and start publishing."""
        try:
            doing = self._activate()
        except ParameterError as exc:
            self._deactivate()
            return self._failed('activate', exc)
        result = super().on_activate(state)   # enables the lifecycle publishers
        self.get_logger().info(f'active: {doing}')
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop publishing and close connections."""
        self._deactivate()
        self.get_logger().info('inactive')
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release what configure made."""
        self._cleanup()
        self.get_logger().info('unconfigured')
        return SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release everything, from any state."""
        self._deactivate()
        self._cleanup()
        self.get_logger().info('finalized')
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release everything after an unexpected error; the node returns to unconfigured."""
        self._deactivate()
        self._cleanup()
        return SUCCESS

    def _failed(self, transition: str, exc: ParameterError) -> TransitionCallbackReturn:
        self.failure = str(exc)
        self.get_logger().error(f'cannot {transition}: {exc}')
        return FAILURE

    def destroy_node(self) -> None:
        """Release sockets, threads and entities, then destroy the node."""
        self._deactivate()
        self._cleanup()
        super().destroy_node()
