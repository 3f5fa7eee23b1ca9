"""
``server_node``: rrto_server in-process, with its counters on ``/diagnostics``.

The same :class:`rrto_server.server.Server` that ``python -m rrto_server``
runs (that command stays ROS-free), configured from ROS parameters; its
``snapshot()`` (requests and replies by kind, errors by code, bytes, models,
recorded replays, scheduler) is published every ``diagnostics_period_s``.
"""

from __future__ import annotations

import os
import sys

import zmq
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node

from rrto_ros.nodes import log_bridge, spin
from rrto_ros.nodes import messages as m
from rrto_ros.nodes.params import Param, ParameterError, Parameters, check_endpoint, fail
from rrto_wire.limits import DEFAULT_MAX_MESSAGE_BYTES
from rrto_server.lanes import DROP, LATE_POLICIES
from rrto_server.scheduler import POLICIES, PREEMPTIVE
from rrto_server.server import Server, ServerConfig

PARAMS = [
    Param('bind', 'tcp://127.0.0.1:5555', 'ZeroMQ endpoint to bind (tcp://0.0.0.0:5555: all)',
          check=check_endpoint),
    Param('store', '~/.cache/rrto_ros/store', 'model store directory; survives restarts'),
    Param('device', 'auto', "'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'",
          check=lambda v: None if v in ('auto', 'cpu', 'cuda') or v.startswith('cuda:')
          else f'{v!r} is not auto, cpu, cuda or cuda:N'),
    Param('allow_upload', True, 'accept model uploads (false: serve stored models only)'),
    Param('max_message_mb', DEFAULT_MAX_MESSAGE_BYTES / 2**20, 'largest request, MiB',
          range=(0.001, 4096.0)),
    Param('max_replays', 32, 'recorded replays kept (least recently used dropped)',
          range=(1, 100000)),
    Param('max_replay_mb', 8192.0, 'device memory for recorded replays, MiB',
          range=(1.0, 1e7)),
    Param('cpu_backend', 'fx', 'CPU replay backend', choices=('fx', 'frozen')),
    Param('sched_policy', PREEMPTIVE, 'device scheduling policy', choices=POLICIES),
    Param('pack_theta', -1.0, 'packing threshold for the low-priority CUDA stream, 0 = off, '
          '-1 = auto (1.0 on CUDA, off on CPU)', range=(-1.0, 2.0)),
    Param('late_policy', DROP, "requests past their deadline: 'drop' or 'run' late",
          choices=LATE_POLICIES),
    Param('cpu_workers', 2, 'threads for decoding, staging, copy-back and encoding',
          range=(1, 64)),
    Param('diagnostics_period_s', 1.0, 'period of /diagnostics', range=(0.1, 60.0)),
]


def stats_values(snapshot: dict, prefix: str = '') -> list[tuple[str, str]]:
    """Flatten a server snapshot into ``('requests/infer', '12')`` pairs."""
    pairs = []
    for key, value in snapshot.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            pairs += stats_values(value, name + '/')
        elif isinstance(value, list):
            pairs.append((name, str(len(value))))
        else:
            pairs.append((name, str(value)))
    return pairs


class ServerNode(Node):
    """Serve offloaded inference from this process and report on /diagnostics."""

    NODE_NAME = 'server_node'

    def __init__(self, **kwargs):
        super().__init__('server_node', **kwargs)
        log_bridge.install()
        try:
            self.params = p = Parameters(self, PARAMS)
            self.server = self._start(p)
        except ParameterError:
            super().destroy_node()
            raise
        self._errors_seen = 0
        self._diag_pub = self.create_publisher(DiagnosticArray, m.DIAGNOSTICS_TOPIC,
                                               m.DIAGNOSTICS_QOS)
        self.create_timer(p['diagnostics_period_s'], self._publish_diagnostics)
        self.get_logger().info(f'rrto_server listening on {self.server.endpoint} '
                               f'(device {self.server.device}, store {self.server.store.root})')

    def _start(self, p: Parameters) -> Server:
        config = ServerConfig(
            bind=p['bind'], store=os.path.expanduser(p['store']), device=p['device'],
            allow_upload=p['allow_upload'], max_message_bytes=int(p['max_message_mb'] * 2**20),
            max_replays=p['max_replays'], max_replay_bytes=int(p['max_replay_mb'] * 2**20),
            cpu_backend=p['cpu_backend'], sched_policy=p['sched_policy'],
            pack_theta=None if p['pack_theta'] < 0 else p['pack_theta'],
            late_policy=p['late_policy'], cpu_workers=p['cpu_workers'])
        try:
            server = Server(config)
        except ValueError as exc:   # ServerConfig.check() names the option it rejects
            name = next((p.name for p in PARAMS if p.name in str(exc)), 'device')
            raise fail(name, str(exc)) from None
        except zmq.ZMQError as exc:
            raise fail('bind', f'cannot bind {p["bind"]}: {exc}') from None
        except OSError as exc:
            raise fail('store', f'cannot use {p["store"]}: {exc}') from None
        server.start()
        return server

    def _publish_diagnostics(self) -> None:
        snapshot = self.server.snapshot()
        errors = sum(snapshot['errors'].values())
        new_errors, self._errors_seen = errors - self._errors_seen, errors
        if new_errors:
            level, message = m.WARN, f'{new_errors} error replies since the last report'
        else:
            level, message = m.OK, f'serving on {self.server.endpoint}'
        values = [('endpoint', self.server.endpoint), ('store', str(self.server.store.root))]
        values += stats_values(snapshot)
        self._diag_pub.publish(m.diagnostic_array(
            self.get_clock().now().to_msg(),
            [m.status(f'{self.get_name()}: rrto_server', level, message, values,
                      hardware_id=self.server.endpoint)]))

    def destroy_node(self) -> None:
        """Stop serving (sockets, threads, device), then destroy the node."""
        server = getattr(self, 'server', None)
        if server is not None:
            server.close()
        super().destroy_node()


def main(args=None) -> int:
    """Serve until Ctrl-C or shutdown; exit 2 on invalid parameters."""
    return spin.run(ServerNode, args, threads=1)


if __name__ == '__main__':
    sys.exit(main())
