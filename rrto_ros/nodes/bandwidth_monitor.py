"""
``bandwidth_monitor``: RTT and bandwidth to the server on ``/rrto/bandwidth``.

Probes the server's endpoint ``probe_rate_hz`` times a second with a tiny
``probe`` request (RTT), and every ``bandwidth_every`` probes with a
``payload_bytes`` payload each way, unless ``/rrto/latency`` records of
offloaded calls to the same server (passive samples, free) arrived within
``passive_fresh_s``.  Publishes the smoothed, hysteresis-filtered estimate as
``diagnostic_msgs/DiagnosticStatus`` on ``/rrto/bandwidth`` (reliable,
transient local: late joiners get the current estimate) and the link's
health on ``/diagnostics``.  Against a server that authenticates, give it the
same ``server_key`` and ``client_key`` as ``offload_node`` (CURVE: the probes
are encrypted, and the monitor talks only to the server holding that key).
A lifecycle node: configure checks the keys and builds the estimator,
activate connects and starts probing and publishing, deactivate stops.
"""

from __future__ import annotations

import math
import sys
import threading
import time

from diagnostic_msgs.msg import DiagnosticStatus

from rrto_ros import latency
from rrto_ros.bandwidth import LinkEstimate, LinkEstimator, LinkHealth, LinkMonitor
from rrto_ros.client import RrtoClient
from rrto_ros.nodes import messages as m
from rrto_ros.nodes import spin
from rrto_ros.nodes.diagnostics import Diagnostics, Health
from rrto_ros.nodes.managed import ManagedNode
from rrto_ros.nodes.params import check_endpoint, client_keys, KEY_PARAMS, Param

HEALTH_LEVEL = {LinkHealth.OK: m.OK, LinkHealth.DEGRADED: m.WARN, LinkHealth.DOWN: m.ERROR,
                LinkHealth.UNKNOWN: m.STALE}

HEALTH_LOG_S = 10.0   # least time between two logged health changes (DOWN: at once)

PARAMS = [
    Param('server', 'tcp://127.0.0.1:5555', 'rrto_server endpoint to measure',
          check=check_endpoint),
    *KEY_PARAMS,
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


class BandwidthMonitor(ManagedNode):
    """Probe one server's link; publish the estimate and its health."""

    NODE_NAME = 'bandwidth_monitor'

    def __init__(self, **kwargs):
        self.client = self.monitor = self.estimator = self.keys = None
        self._bandwidth_pub = self.diagnostics = self._subscription = self._prober = None
        self._stop = threading.Event()
        super().__init__(self.NODE_NAME, PARAMS, **kwargs)
        self.server = self.params['server']

    def _configure(self) -> None:
        p = self.params
        self.keys = client_keys(p['server_key'], p['client_key'])
        self.estimator = LinkEstimator(
            hysteresis=p['hysteresis'], hold=p['hold'], rtt_warn_ms=p['rtt_warn_ms'],
            min_uplink_mbps=p['min_uplink_mbps'], loss_warn=p['loss_warn'],
            down_after=p['down_after'], stale_s=p['stale_s'])
        self._last_health, self._logged_at = LinkHealth.UNKNOWN, -HEALTH_LOG_S
        self._link = Health(m.STALE, 'no probe yet')
        self._bandwidth_pub = self.create_lifecycle_publisher(
            DiagnosticStatus, m.BANDWIDTH_TOPIC, m.STATUS_QOS)
        # published with every probe (force_update), like the link estimate
        self.diagnostics = Diagnostics(self, 1.0 / p['probe_rate_hz'])
        self.diagnostics.add(f'link to {self.server}', self._health)

    def _activate(self) -> str:
        p = self.params
        timeout = p['probe_timeout_ms']
        self.client = RrtoClient(self.server, connect_timeout_ms=timeout,
                                 call_timeout_ms=timeout, backoff_s=(0.1, 1.0),
                                 name='bandwidth-monitor', keys=self.keys)
        self.monitor = LinkMonitor(self.client, self.estimator, payload_bytes=p['payload_bytes'],
                                   bandwidth_every=p['bandwidth_every'],
                                   passive_fresh_s=p['passive_fresh_s'], timeout_ms=timeout)
        self._subscription = self.create_subscription(
            DiagnosticStatus, m.LATENCY_TOPIC, self._on_latency, m.LATENCY_QOS)
        # probes block up to their timeout: their own thread, so samples keep arriving
        self._stop.clear()
        self._prober = threading.Thread(target=self._probe_loop, args=(1 / p['probe_rate_hz'],),
                                        name='bandwidth_monitor-probe', daemon=True)
        self._prober.start()
        secure = ', CURVE' if self.keys is not None else ''
        return f'measuring the link to {self.server} at {p["probe_rate_hz"]:g} Hz{secure}'

    def _deactivate(self) -> None:
        if self._prober is not None:
            self.destroy_subscription(self._subscription)
            self._stop.set()
            self._prober.join()   # a probe in flight ends within its timeout
            self._prober = self._subscription = None
        if self.client is not None:
            self.client.close()
            self.client = self.monitor = None

    def _cleanup(self) -> None:
        if self._bandwidth_pub is not None:
            self.destroy_lifecycle_publisher(self._bandwidth_pub)
            self.diagnostics.destroy()
        self._bandwidth_pub = self.diagnostics = self.estimator = self.keys = None

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

    def _probe_loop(self, period_s: float) -> None:
        due = time.monotonic()
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            self._probe()
            due = max(due + period_s, time.monotonic())   # late probes are not made up

    def _probe(self) -> None:
        self.monitor.tick()
        estimate = self.estimator.estimate()
        self._publish(estimate)
        self._log_health(estimate)

    def _log_health(self, estimate: LinkEstimate) -> None:
        """Log a change of health once; a link flapping around a threshold at most every 10 s."""
        now = time.monotonic()
        if estimate.health == self._last_health or (
                estimate.health != LinkHealth.DOWN and now - self._logged_at < HEALTH_LOG_S):
            return
        why = f'rtt {estimate.rtt_ms:.2f} ms' if estimate.health == LinkHealth.OK else \
            estimate.reason
        text = f'link to {self.server} is {estimate.health.value}: {why}'
        if estimate.health == LinkHealth.DOWN:
            text += self._down_hint()
        if estimate.health in (LinkHealth.DOWN, LinkHealth.DEGRADED):
            self.get_logger().warning(text)
        else:
            self.get_logger().info(text)
        self._last_health, self._logged_at = estimate.health, now

    def _down_hint(self) -> str:
        if self.keys is not None:
            return ''
        return ('; no server_key/client_key given: a server that requires CURVE answers no '
                'plain-TCP probe')

    def _publish(self, e: LinkEstimate) -> None:
        values = [('rtt_ms', _num(e.rtt_ms)), ('rtt_var_ms', _num(e.rtt_var_ms)),
                  ('base_rtt_ms', _num(e.base_rtt_ms)), ('uplink_mbps', _num(e.uplink_mbps)),
                  ('downlink_mbps', _num(e.downlink_mbps)), ('health', e.health.value),
                  ('active_samples', e.active_samples), ('passive_samples', e.passive_samples),
                  ('consecutive_failures', e.failures), ('loss', f'{e.loss:.3f}'),
                  ('age_s', _num(e.age_s)), ('last_error', self.monitor.last_error)]
        message = (f'{e.health.value}: rtt {e.rtt_ms:.2f} ms, up {e.uplink_mbps:.1f} Mbit/s, '
                   f'down {e.downlink_mbps:.1f} Mbit/s' if e.health != LinkHealth.DOWN
                   else f'down: {e.reason}{self._down_hint()}')
        level = HEALTH_LEVEL[e.health]
        link = m.status('rrto/link', level, message, values, hardware_id=self.server)
        self._bandwidth_pub.publish(link)
        self._link = Health(level, e.reason if e.health != LinkHealth.OK else message, values,
                            self.server)
        self.diagnostics.force_update()

    def _health(self) -> Health:
        return self._link


def _num(value: float) -> str:
    return 'nan' if math.isnan(value) else 'inf' if math.isinf(value) else f'{value:.3f}'


def main(args=None) -> int:
    """Run the monitor until Ctrl-C or shutdown; exit 2 on invalid parameters."""
    return spin.run(BandwidthMonitor, args)


if __name__ == '__main__':
    sys.exit(main())
