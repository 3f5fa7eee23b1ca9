"""
``bandwidth_monitor``: RTT and bandwidth to the server on ``/rrto/bandwidth``.

Probes the server's endpoint ``probe_rate_hz`` times a second with a tiny
``probe`` request (RTT), and every ``bandwidth_every`` probes with a
``payload_bytes`` payload each way, unless ``/rrto/latency`` records of
offloaded calls to the same server (passive samples, free) arrived within
``passive_fresh_s``.  Publishes the smoothed, hysteresis-filtered estimate as
``diagnostic_msgs/DiagnosticStatus`` on ``/rrto/bandwidth`` (reliable,
transient local: late joiners get the current estimate) and the link's
health on ``/diagnostics``.
"""

from __future__ import annotations

import math
import sys

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node

from rrto_ros import latency
from rrto_ros.bandwidth import LinkEstimate, LinkEstimator, LinkHealth, LinkMonitor
from rrto_ros.client import RrtoClient
from rrto_ros.nodes import log_bridge, spin
from rrto_ros.nodes import messages as m
from rrto_ros.nodes.params import Param, check_endpoint, declare

PARAMS = [
    Param('server', 'tcp://127.0.0.1:5555', 'rrto_server endpoint to measure',
          check=check_endpoint),
    Param('probe_rate_hz', 2.0, 'RTT probes per second', range=(0.01, 100.0)),
    Param('probe_timeout_ms', 500.0, 'a probe without answer by then counts as lost',
          range=(1.0, 60000.0)),
    Param('payload_bytes', 32768, 'bandwidth probe payload, each way (0 = RTT only)',
          range=(0, 16 << 20)),
    Param('bandwidth_every', 5, 'one bandwidth probe every N RTT probes', range=(1, 10000)),
    Param('passive_fresh_s', 5.0, 'skip bandwidth probes while offload traffic is this recent',
          range=(0.0, 3600.0)),
    Param('hysteresis', 0.2, 'relative change needed before the estimate moves',
          range=(0.0, 10.0)),
    Param('hold', 3, 'samples the change must persist before the estimate moves',
          range=(1, 1000)),
    Param('rtt_warn_ms', 50.0, 'RTT above this makes the link DEGRADED', range=(0.0, 1e6)),
    Param('min_uplink_mbps', 5.0, 'uplink below this makes the link DEGRADED',
          range=(0.0, 1e6)),
    Param('loss_warn', 0.2, 'lost-probe fraction above this makes the link DEGRADED',
          range=(0.0, 1.0)),
    Param('down_after', 3, 'consecutive lost probes that make the link DOWN', range=(1, 1000)),
    Param('stale_s', 5.0, 'no sample for this long makes the link DOWN', range=(0.1, 3600.0)),
]


class BandwidthMonitor(Node):
    """Probe one server's link; publish the estimate and its health."""

    NODE_NAME = 'bandwidth_monitor'

    def __init__(self, **kwargs):
        super().__init__('bandwidth_monitor', **kwargs)
        log_bridge.install()
        self.params = p = declare(self, PARAMS)
        self.server = p['server']
        self.estimator = LinkEstimator(
            hysteresis=p['hysteresis'], hold=p['hold'], rtt_warn_ms=p['rtt_warn_ms'],
            min_uplink_mbps=p['min_uplink_mbps'], loss_warn=p['loss_warn'],
            down_after=p['down_after'], stale_s=p['stale_s'])
        timeout = p['probe_timeout_ms']
        self.client = RrtoClient(self.server, connect_timeout_ms=timeout,
                                 call_timeout_ms=timeout, backoff_s=(0.1, 1.0),
                                 name='bandwidth-monitor')
        self.monitor = LinkMonitor(self.client, self.estimator, payload_bytes=p['payload_bytes'],
                                   bandwidth_every=p['bandwidth_every'],
                                   passive_fresh_s=p['passive_fresh_s'], timeout_ms=timeout)
        self._last_health = LinkHealth.UNKNOWN
        self._bandwidth_pub = self.create_publisher(DiagnosticStatus, m.BANDWIDTH_TOPIC,
                                                    m.STATUS_QOS)
        self._diag_pub = self.create_publisher(DiagnosticArray, m.DIAGNOSTICS_TOPIC,
                                               m.DIAGNOSTICS_QOS)
        self.create_subscription(DiagnosticStatus, m.LATENCY_TOPIC, self._on_latency,
                                 m.LATENCY_QOS)
        # probes block up to their timeout: their own group, so samples keep arriving
        self.create_timer(1.0 / p['probe_rate_hz'], self._probe,
                          callback_group=MutuallyExclusiveCallbackGroup())
        self.get_logger().info(f'measuring the link to {self.server} '
                               f'at {p["probe_rate_hz"]:g} Hz')

    def _on_latency(self, msg: DiagnosticStatus) -> None:
        if msg.hardware_id != self.server:
            return
        record = latency.parse_values(m.values_of(msg))
        if record.get('result') != 'offloaded' or record.get('round_trips') != 1:
            return   # only single-round-trip calls say what one transfer costs
        if str(record.get('plan', 'offload')).startswith('hybrid'):
            return   # the robot computed while the reply was in flight: not a transfer time
        self.estimator.add_passive(record['bytes_sent'], record['bytes_received'],
                                   record['network_ms'])

    def _probe(self) -> None:
        self.monitor.tick()
        estimate = self.estimator.estimate()
        self._publish(estimate)
        if estimate.health != self._last_health:
            text = f'link to {self.server} is {estimate.health.value}: {estimate.reason}'
            if estimate.health in (LinkHealth.DOWN, LinkHealth.DEGRADED):
                self.get_logger().warning(text)
            else:
                self.get_logger().info(text)
            self._last_health = estimate.health

    def _publish(self, e: LinkEstimate) -> None:
        values = [('rtt_ms', _num(e.rtt_ms)), ('rtt_var_ms', _num(e.rtt_var_ms)),
                  ('base_rtt_ms', _num(e.base_rtt_ms)), ('uplink_mbps', _num(e.uplink_mbps)),
                  ('downlink_mbps', _num(e.downlink_mbps)), ('health', e.health.value),
                  ('active_samples', e.active_samples), ('passive_samples', e.passive_samples),
                  ('consecutive_failures', e.failures), ('loss', f'{e.loss:.3f}'),
                  ('age_s', _num(e.age_s)), ('last_error', self.monitor.last_error)]
        message = (f'{e.health.value}: rtt {e.rtt_ms:.2f} ms, up {e.uplink_mbps:.1f} Mbit/s, '
                   f'down {e.downlink_mbps:.1f} Mbit/s' if e.health != LinkHealth.DOWN
                   else f'down: {e.reason}')
        level = m.HEALTH_LEVEL[e.health]
        link = m.status('rrto/link', level, message, values, hardware_id=self.server)
        self._bandwidth_pub.publish(link)
        health = m.status(f'{self.get_name()}: link to {self.server}', level,
                          e.reason if e.health != LinkHealth.OK else message, values,
                          hardware_id=self.server)
        self._diag_pub.publish(m.diagnostic_array(self.get_clock().now().to_msg(), [health]))

    def destroy_node(self) -> None:
        """Close the probe connection, then the node."""
        client = getattr(self, 'client', None)
        if client is not None:
            client.close()
        super().destroy_node()


def _num(value: float) -> str:
    return 'nan' if math.isnan(value) else 'inf' if math.isinf(value) else f'{value:.3f}'


def main(args=None) -> int:
    """Run the monitor until Ctrl-C or shutdown; exit 2 on invalid parameters."""
    return spin.run(BandwidthMonitor, args, threads=2)


if __name__ == '__main__':
    sys.exit(main())
