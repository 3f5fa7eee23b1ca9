"""
Launch actions for the lifecycle nodes: start one, and (optionally) bring it to active.

The launch files import this (share/ is not on ``sys.path``, the package is).
:func:`managed_node` starts the node with ``autostart: false`` and, when
asked, emits ``configure`` at once and ``activate`` when the node reports
``inactive`` (launch_ros ``ChangeState`` and ``OnStateTransition``), so the
launch brings it up by itself and ``ros2 lifecycle`` can still manage it.
"""

from __future__ import annotations

import lifecycle_msgs.msg
from launch.actions import EmitEvent, RegisterEventHandler
from launch.events import matches_action
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState

TRANSITION = lifecycle_msgs.msg.Transition


def managed_node(executable: str, parameters: list, activate: bool, **kwargs) -> list:
    """Return the actions that start ``executable`` and, if ``activate``, make it active."""
    node = LifecycleNode(package='rrto_ros', executable=executable, name=executable,
                         namespace='', parameters=[*parameters, {'autostart': False}],
                         output='screen', **kwargs)
    if not activate:
        return [node]
    return [
        node,
        RegisterEventHandler(OnStateTransition(
            target_lifecycle_node=node, start_state='configuring', goal_state='inactive',
            entities=[_change(node, TRANSITION.TRANSITION_ACTIVATE)])),
        _change(node, TRANSITION.TRANSITION_CONFIGURE),
    ]


def _change(node: LifecycleNode, transition: int) -> EmitEvent:
    return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                       transition_id=transition))
