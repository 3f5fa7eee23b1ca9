"""
``make demo``: the launch file's nodes composed in one process, plus the server process.

For machines without the ROS 2 CLI.  Starts ``python -m rrto_server`` on the
endpoint the config names (a fresh store under /tmp), then runs
``camera_sim``, ``offload_node`` and ``bandwidth_monitor`` with the same YAML
``ros2 launch rrto_ros offload.launch.py`` uses, in one rclpy executor,
driving the lifecycle nodes through configure and activate as the launch
does; SIGINT and SIGTERM end it as they end a node (:mod:`rrto_ros.nodes.spin`).
Prints a live latency summary from ``/rrto/latency``
every ``--summary-period`` seconds and, after ``--duration`` seconds (or
Ctrl-C), the run's summary: calls, round trips, latency percentiles,
fallbacks.  Exits non-zero if no inference was offloaded.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import rclpy
import yaml
from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions

from rrto_ros.latency import parse_values
from rrto_ros.nodes import messages as m
from rrto_ros.nodes.bandwidth_monitor import BandwidthMonitor
from rrto_ros.nodes.camera_sim import CameraSim
from rrto_ros.nodes.offload_node import OffloadNode
from rrto_ros.nodes.params import ParameterError
from rrto_ros.nodes.spin import SPIN_PERIOD_S, start, stop_spinning, StopSignals
from rrto_server.process import ServerProcess
from rrto_wire.hello import hello
from rrto_wire.summary import percentile


def default_config() -> Path:
    """Return config/offload.yaml from the installed share directory, else from the source."""
    try:
        from ament_index_python.packages import get_package_share_directory
        path = Path(get_package_share_directory('rrto_ros')) / 'config' / 'offload.yaml'
        if path.is_file():
            return path
    except (ImportError, LookupError, ValueError, OSError):
        pass
    return Path(__file__).resolve().parents[1] / 'config' / 'offload.yaml'


class LatencySummary(Node):
    """Collect ``/rrto/latency`` and ``/rrto/bandwidth``; print a line every period."""

    def __init__(self, period_s: float, **kwargs):
        super().__init__('rrto_latency_summary', **kwargs)
        self.records: list[dict] = []
        self.link: dict = {}
        self.started = time.monotonic()
        self._printed = 0
        self.create_subscription(DiagnosticStatus, m.LATENCY_TOPIC, self._on_latency,
                                 m.LATENCY_QOS)
        self.create_subscription(DiagnosticStatus, m.BANDWIDTH_TOPIC, self._on_link,
                                 m.STATUS_QOS)
        self.create_timer(period_s, self._print_live)

    def _on_latency(self, msg: DiagnosticStatus) -> None:
        self.records.append(parse_values(m.values_of(msg)))

    def _on_link(self, msg: DiagnosticStatus) -> None:
        self.link = parse_values(m.values_of(msg))

    def _print_live(self) -> None:
        recent, self._printed = self.records[self._printed:], len(self.records)
        elapsed = time.monotonic() - self.started
        if not recent:
            print(f'[{elapsed:5.1f} s] no inference yet', flush=True)
            return
        totals = [r['total_ms'] for r in recent]
        counts = {k: sum(r['result'] == k for r in recent)
                  for k in ('offloaded', 'local', 'local_fallback')}
        line = (f'[{elapsed:5.1f} s] {len(recent)} inferences: {counts["offloaded"]} offloaded, '
                f'{counts["local"]} local, {counts["local_fallback"]} fallback | total p50 '
                f'{percentile(totals, 50):.1f} ms, max {max(totals):.1f} ms')
        offloaded = [r for r in recent if r['result'] == 'offloaded']
        if offloaded:
            line += ' | network {:.1f} + server {:.1f} + robot {:.1f} ms'.format(
                statistics.median(r['network_ms'] for r in offloaded),
                statistics.median(r['server_ms'] for r in offloaded),
                statistics.median(r['robot_compute_ms'] for r in offloaded))
        if self.link:
            line += ' | link {} rtt {:.2f} ms up {:.0f} Mbit/s'.format(
                self.link.get('health', '?'), float(self.link.get('rtt_ms', math.nan)),
                float(self.link.get('uplink_mbps', math.nan)))
        print(line, flush=True)


def summary(records: list[dict], stats: dict, dropped: int) -> str:
    """Format the end-of-run summary."""
    lines = [f'calls {stats["calls"]}: offloaded {stats["offloaded"]}, local {stats["local"]}, '
             f'fallbacks {stats["fallbacks"]}; frames dropped (newest kept) {dropped}',
             f'round trips {stats["round_trips"]} in all, {stats["infer_round_trips"]} for '
             f'inference ({stats["infer_round_trips"] / max(1, stats["offloaded"]):.2f} per '
             f'offloaded call); uploads {stats["uploads"]}, records {stats["records"]}']
    totals = [r['total_ms'] for r in records]
    if totals:
        lines.append('latency ms (/rrto/latency total): p50 {:.2f}  p90 {:.2f}  p99 {:.2f}  '
                     'max {:.2f}'.format(percentile(totals, 50), percentile(totals, 90),
                                         percentile(totals, 99), max(totals)))
    offloaded = [r for r in records if r['result'] == 'offloaded']
    if offloaded:
        lines.append('offloaded call ms (median): total {:.2f} = network {:.2f} + server queue '
                     '{:.2f} + server compute {:.2f} + robot {:.2f}; image age {:.2f}'.format(
                         *(statistics.median(r[k] for r in offloaded) for k in (
                             'total_ms', 'network_ms', 'server_queue_ms', 'server_compute_ms',
                             'robot_compute_ms', 'age_ms'))))
    return '\n'.join(lines)


def _start_server(endpoint: str, store: str) -> ServerProcess:
    if hello(endpoint, 300) is not None:
        raise RuntimeError(f'a server already answers on {endpoint}: pass --no-server to use it, '
                           'or --server tcp://127.0.0.1:PORT for another port')
    return ServerProcess(store, bind=endpoint, device='auto',
                         log=Path(store) / 'server.log').start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', type=Path, default=default_config(),
                        help='parameters YAML (default: %(default)s)')
    parser.add_argument('--duration', type=float, default=20.0, help='seconds to run')
    parser.add_argument('--server', default='', help='override offload_node.server')
    parser.add_argument('--model', default='', help='override offload_node.model')
    parser.add_argument('--timeout-ms', type=float, default=0.0,
                        help='override offload_node.timeout_ms (0: keep the config value)')
    parser.add_argument('--no-server', action='store_true',
                        help='use a server that is already running instead of starting one')
    parser.add_argument('--summary-period', type=float, default=2.0,
                        help='seconds between live summary lines')
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.summary_period <= 0:
        parser.error('--duration and --summary-period must be positive')
    params = yaml.safe_load(args.config.read_text())
    endpoint = args.server or params['offload_node']['ros__parameters']['server']
    overrides = [Parameter('server', value=endpoint)]
    offload_overrides = overrides + ([Parameter('model', value=args.model)] if args.model else [])
    if args.timeout_ms:
        offload_overrides.append(Parameter('timeout_ms', value=args.timeout_ms))

    server = None
    store = tempfile.TemporaryDirectory(prefix='rrto-demo-store-')
    if not args.no_server:
        try:
            server = _start_server(endpoint, store.name)
        except RuntimeError as exc:
            print(f'rrto bring-up: {exc}', file=sys.stderr)
            store.cleanup()
            return 2
    rclpy.init(args=['--ros-args', '--params-file', str(args.config)],
               signal_handler_options=SignalHandlerOptions.NO)
    stop = StopSignals()
    nodes, executor, offload, live, stats = [], None, None, None, None
    try:
        camera = CameraSim()
        nodes.append(camera)
        offload = OffloadNode(parameter_overrides=offload_overrides)
        nodes.append(offload)
        nodes.append(BandwidthMonitor(parameter_overrides=overrides))
        for node in nodes[1:]:
            failure = start(node)
            if failure:
                raise ParameterError(failure)
        live = LatencySummary(args.summary_period)
        nodes.append(live)
        print(f'rrto bring-up: {offload.params["model"]} on {endpoint} for {args.duration:g} s '
              f'(config {args.config})', flush=True)
        executor = SingleThreadedExecutor()   # the blocking work runs on the nodes' own threads
        for node in nodes:
            executor.add_node(node)
        end = time.monotonic() + args.duration
        while rclpy.ok() and not stop.event.is_set() and time.monotonic() < end:
            executor.spin_once(timeout_sec=SPIN_PERIOD_S)
    except ParameterError as exc:
        print(f'rrto bring-up: {exc}', file=sys.stderr)
        return 2
    except ExternalShutdownException:
        pass
    finally:
        stop_spinning(executor)
        if offload is not None and offload.engine is not None:
            stats = offload.engine.stats()
        dropped = offload.slot.dropped if offload is not None else 0
        records = list(live.records) if live is not None else []
        for node in nodes:
            node.destroy_node()
        rclpy.try_shutdown()
        if server is not None:
            server.stop()
        store.cleanup()
    if stats is None:
        return 1
    print(summary(records, stats, dropped), flush=True)
    if not stats['offloaded']:
        print('rrto bring-up: no inference was offloaded', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
