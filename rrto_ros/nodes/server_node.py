"""
``server_node``: rrto_server in-process as a lifecycle node, its counters on ``/diagnostics``.

The same :class:`rrto_server.server.Server` that ``python -m rrto_server``
runs (that command stays ROS-free), with the same options
(:data:`rrto_server.options.OPTIONS`, one ROS parameter each).  Configure
checks the options and the device and sets up the process (GIL switch
interval, torch threads); activate binds and starts publishing the server's
``snapshot()`` (requests and replies by kind, errors by code, bytes, models,
recorded replays, scheduler) every ``diagnostics_period_s``; deactivate stops
serving and unbinds.
"""

from __future__ import annotations

import sys

import zmq

from rrto_ros.nodes import messages as m
from rrto_ros.nodes import spin
from rrto_ros.nodes.diagnostics import Diagnostics, Health
from rrto_ros.nodes.managed import ManagedNode
from rrto_ros.nodes.params import check_endpoint, fail, Param
from rrto_server import options
from rrto_server.server import Server
from rrto_wire import heap

_CHECKS = {'bind': check_endpoint}
PARAMS = [Param(o.name, o.default, o.help, range=o.range, choices=o.choices,
                check=_CHECKS.get(o.name, o.check)) for o in options.OPTIONS] + [
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


class ServerNode(ManagedNode):
    """Serve offloaded inference from this process and report on /diagnostics."""

    NODE_NAME = 'server_node'

    def __init__(self, **kwargs):
        self.server: Server | None = None
        self.config: options.ServerConfig | None = None
        self.diagnostics: Diagnostics | None = None
        self._errors_seen = 0
        super().__init__(self.NODE_NAME, PARAMS, **kwargs)

    def _configure(self) -> None:
        values = {o.name: self.params[o.name] for o in options.OPTIONS}
        config = options.config_from(values)
        try:
            config.check()
            config.resolved_device()
        except ValueError as exc:   # ServerConfig names the option it rejects
            name = next((o.name for o in options.OPTIONS if o.name in str(exc)), 'device')
            raise fail(name, str(exc)) from None
        options.setup_process(config)
        self.config = config
        self.diagnostics = Diagnostics(self, self.params['diagnostics_period_s'])
        self.diagnostics.add('rrto_server', self._health)

    def _activate(self) -> str:
        bind = self.params['bind']
        self._threads_before = options.threads_now()
        try:
            self.server = Server(self.config)
        except zmq.ZMQError as exc:
            raise fail('bind', f'cannot bind {bind}: {exc}') from None
        except OSError as exc:
            raise fail('store', f'cannot use {self.params["store"]}: {exc}') from None
        except ValueError as exc:
            raise fail('device', str(exc)) from None
        self.server.start()
        self._errors_seen = 0
        self.diagnostics.start()
        return f'serving on {self.server.endpoint}'

    def _deactivate(self) -> None:
        if self.diagnostics is not None:
            self.diagnostics.stop()
        if self.server is not None:
            self.server.close()
            options.drain_threads(self._threads_before)   # a lane may outlive close()
            self.server = None

    def _cleanup(self) -> None:
        if self.diagnostics is not None:
            self.diagnostics.destroy()
            self.diagnostics = None
        self.config = None

    def _health(self) -> Health:
        server = self.server
        snapshot = server.snapshot()
        errors = sum(snapshot['errors'].values())
        new_errors, self._errors_seen = errors - self._errors_seen, errors
        if new_errors:
            level, message = m.WARN, f'{new_errors} error replies since the last report'
        else:
            level, message = m.OK, f'serving on {server.endpoint}'
        values = [('endpoint', server.endpoint), ('store', str(server.store.root))]
        return Health(level, message, values + stats_values(snapshot), server.endpoint)


def main(args=None) -> int:
    """Serve until Ctrl-C or shutdown; exit 2 on invalid parameters."""
    heap.enable()       # the server's long-lived heap is frozen (rrto_wire.heap)
    return spin.run(ServerNode, args)


if __name__ == '__main__':
    sys.exit(main())
