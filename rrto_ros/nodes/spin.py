"""
The one ``main()`` body every rrto_ros node shares, in the portable form.

``rclpy.init(args=args)``; build the node; spin it on an explicit executor;
``KeyboardInterrupt`` and ``ExternalShutdownException`` end it quietly; the
executor is shut down (letting a callback in flight finish), the node
destroyed and rclpy shut down in ``finally`` (as ros2/demos' talker does,
working on Humble, Jazzy and Kilted).  An invalid parameter is logged as
FATAL with its name and gives exit code 2.
"""

from __future__ import annotations

import rclpy
from rclpy.executors import (ExternalShutdownException, MultiThreadedExecutor,
                             SingleThreadedExecutor)

from rrto_ros.nodes.params import ParameterError


def run(node_class, args=None, threads: int = 1) -> int:
    """Spin one node of ``node_class`` until Ctrl-C or shutdown; return the exit code."""
    rclpy.init(args=args)
    node = executor = None
    try:
        node = node_class()
        executor = (MultiThreadedExecutor(num_threads=threads) if threads > 1
                    else SingleThreadedExecutor())
        executor.add_node(node)
        executor.spin()
    except ParameterError as exc:
        name = getattr(node_class, 'NODE_NAME', node_class.__name__)
        rclpy.logging.get_logger(name).fatal(str(exc))
        return 2
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        if rclpy.ok():
            raise
        # a callback that was publishing when Ctrl-C shut rclpy down: part of shutting down
    finally:
        if executor is not None:
            executor.shutdown(timeout_sec=5.0)   # let a callback in flight finish first
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
