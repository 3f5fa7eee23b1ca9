"""
Round-trip time and bandwidth to the server: samples, smoothing, hysteresis, health.

Two kinds of sample feed one :class:`LinkEstimator`:

* active probes (:class:`LinkMonitor`): a tiny ``probe`` request measures the
  RTT; now and then a probe carrying ``payload_bytes`` up, and one asking for
  ``payload_bytes`` down, measure each direction's bandwidth;
* passive samples from offload traffic the estimator is told about (bytes
  sent, bytes received, network milliseconds of one inference), which cost
  nothing, so payload probes are skipped while they are fresh.

A transfer's time is its network time minus the path's base RTT (the minimum
RTT of the last ``rtt_window_s``, as BBR estimates propagation delay).  RTT is
smoothed as TCP does (SRTT/RTTVAR, RFC 6298); bandwidths by an exponentially
weighted average.  What is *published* moves only when the smoothed value has
stayed more than ``hysteresis`` (relative) away from the published one for
``hold`` consecutive samples, so a consumer such as a plan switch does not
flap.  Health is DOWN at once after ``down_after`` consecutive failures or
when no sample arrived for ``stale_s``.
"""

from __future__ import annotations

import collections
import enum
import functools
import math
import threading
import time
from dataclasses import dataclass

import torch

from rrto_ros.client import OffloadError, RemoteError, RrtoClient
from rrto_wire.messages import Kind


class LinkHealth(str, enum.Enum):
    """How usable the link to the server is."""

    UNKNOWN = 'unknown'      # no sample yet
    OK = 'ok'
    DEGRADED = 'degraded'    # slow, far, or losing probes
    DOWN = 'down'            # probes fail or nothing was measured for a while


class Hysteresis:
    """Publish a new value only once the input stayed outside a relative band for a while."""

    def __init__(self, threshold: float = 0.2, hold: int = 3):
        if threshold < 0 or hold < 1:
            raise ValueError('threshold must be >= 0 and hold >= 1')
        self.threshold = threshold
        self.hold = hold
        self.value = math.nan
        self._streak = 0
        self._side = 0

    def update(self, x: float) -> float:
        """Feed one smoothed value; return the published value."""
        if math.isnan(self.value):
            self.value = x
            return x
        band = self.threshold * abs(self.value)
        side = 1 if x > self.value + band else -1 if x < self.value - band else 0
        if side == 0:
            self._streak, self._side = 0, 0
            return self.value
        self._streak = self._streak + 1 if side == self._side else 1
        self._side = side
        if self._streak >= self.hold:
            self.value, self._streak, self._side = x, 0, 0
        return self.value


@dataclass
class LinkEstimate:
    """What :class:`LinkEstimator` publishes (NaN where nothing is known yet)."""

    rtt_ms: float
    rtt_var_ms: float
    base_rtt_ms: float
    uplink_mbps: float
    downlink_mbps: float
    health: LinkHealth
    reason: str
    active_samples: int
    passive_samples: int
    failures: int
    loss: float
    age_s: float


def _locked(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class LinkEstimator:
    """Fuse active and passive samples into a smoothed, hysteresis-filtered estimate."""

    def __init__(self, *, bw_alpha: float = 0.25, hysteresis: float = 0.2, hold: int = 3,
                 rtt_window_s: float = 10.0, min_transfer_ms: float = 0.05,
                 rtt_warn_ms: float = 50.0, min_uplink_mbps: float = 5.0,
                 loss_warn: float = 0.2, down_after: int = 3, stale_s: float = 5.0):
        if not 0 < bw_alpha <= 1:
            raise ValueError('bw_alpha must be in (0, 1]')
        if min_transfer_ms <= 0 or down_after < 1 or stale_s <= 0 or rtt_window_s <= 0:
            raise ValueError('min_transfer_ms, down_after, stale_s and rtt_window_s must be > 0')
        self.bw_alpha = bw_alpha
        self.min_transfer_ms = min_transfer_ms
        self.rtt_warn_ms = rtt_warn_ms
        self.min_uplink_mbps = min_uplink_mbps
        self.loss_warn = loss_warn
        self.down_after = down_after
        self.stale_s = stale_s
        self.rtt_window_s = rtt_window_s
        self.srtt = math.nan
        self.rttvar = math.nan
        self.bps = {'up': math.nan, 'down': math.nan}
        self.published = {k: Hysteresis(hysteresis, hold) for k in ('rtt', 'up', 'down')}
        self._rtts: collections.deque = collections.deque()   # (time, rtt_ms)
        self._outcomes: collections.deque = collections.deque(maxlen=20)
        self.active_samples = 0
        self.passive_samples = 0
        self.failures = 0
        self.last_good = math.nan
        self.last_passive = -math.inf
        self._lock = threading.RLock()   # probes and passive samples come from two threads

    # ------------------------------------------------------------------ samples
    @_locked
    def add_rtt(self, rtt_ms: float, now: float | None = None) -> None:
        """Add one measured round trip (an active probe without payload)."""
        now = time.monotonic() if now is None else now
        rtt_ms = max(0.0, float(rtt_ms))
        if math.isnan(self.srtt):
            self.srtt, self.rttvar = rtt_ms, rtt_ms / 2
        else:   # RFC 6298: beta 1/4, alpha 1/8
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt_ms)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt_ms
        self.published['rtt'].update(self.srtt)
        self._rtts.append((now, rtt_ms))
        self._good(now)
        self.active_samples += 1

    @_locked
    def add_transfer(self, direction: str, nbytes: int, network_ms: float,
                     now: float | None = None) -> None:
        """Add one active bandwidth probe: ``nbytes`` moved one way in ``network_ms``."""
        now = time.monotonic() if now is None else now
        self._bandwidth(direction, nbytes, network_ms - self.base_rtt_ms(now))
        self._good(now)
        self.active_samples += 1

    @_locked
    def add_passive(self, bytes_sent: int, bytes_received: int, network_ms: float,
                    now: float | None = None) -> None:
        """Add one offloaded call's traffic; it counts for its larger direction."""
        now = time.monotonic() if now is None else now
        base = self.base_rtt_ms(now)
        if math.isnan(base):
            base = 0.0   # no RTT yet: the whole time was transfer, a conservative estimate
        up = bytes_sent >= bytes_received
        small = bytes_received if up else bytes_sent
        other_bps = self.bps['down' if up else 'up']
        transfer_ms = network_ms - base
        if not math.isnan(other_bps) and other_bps > 0:
            transfer_ms -= small * 8 / other_bps * 1e3
        self._bandwidth('up' if up else 'down', bytes_sent if up else bytes_received,
                        transfer_ms)
        self._good(now)
        self.passive_samples += 1
        self.last_passive = now

    @_locked
    def add_failure(self, now: float | None = None) -> None:
        """Count a probe that got no answer in time."""
        self.failures += 1
        self._outcomes.append(False)

    def _good(self, now: float) -> None:
        self.failures = 0
        self.last_good = now
        self._outcomes.append(True)

    def _bandwidth(self, direction: str, nbytes: int, transfer_ms: float) -> None:
        if nbytes <= 0:
            return
        # below the clock's resolution a transfer only bounds the bandwidth from below
        bps = nbytes * 8 / (max(transfer_ms, self.min_transfer_ms) / 1e3)
        old = self.bps[direction]
        self.bps[direction] = bps if math.isnan(old) else old + self.bw_alpha * (bps - old)
        self.published[direction].update(self.bps[direction])

    # ------------------------------------------------------------------ queries
    @_locked
    def base_rtt_ms(self, now: float | None = None) -> float:
        """Return the minimum RTT seen in the last ``rtt_window_s`` (NaN if none)."""
        now = time.monotonic() if now is None else now
        while len(self._rtts) > 1 and self._rtts[0][0] < now - self.rtt_window_s:
            self._rtts.popleft()
        return min((r for _, r in self._rtts), default=math.nan)

    @_locked
    def passive_age(self, now: float | None = None) -> float:
        """Return seconds since the last passive sample (inf if none)."""
        return (time.monotonic() if now is None else now) - self.last_passive

    @_locked
    def estimate(self, now: float | None = None) -> LinkEstimate:
        """Return the published estimate and the link's health."""
        now = time.monotonic() if now is None else now
        rtt = self.published['rtt'].value
        up = self.published['up'].value / 1e6
        down = self.published['down'].value / 1e6
        loss = self._outcomes.count(False) / len(self._outcomes) if self._outcomes else 0.0
        age = now - self.last_good if not math.isnan(self.last_good) else math.inf
        health, reason = self._classify(rtt, up, loss, age)
        return LinkEstimate(rtt, self.rttvar, self.base_rtt_ms(now), up, down, health, reason,
                            self.active_samples, self.passive_samples, self.failures, loss, age)

    def _classify(self, rtt: float, up_mbps: float, loss: float,
                  age: float) -> tuple[LinkHealth, str]:
        if self.failures >= self.down_after:
            return LinkHealth.DOWN, f'{self.failures} probes in a row got no answer'
        if math.isinf(age):
            if self.failures:
                return LinkHealth.DOWN, 'no probe has been answered yet'
            return LinkHealth.UNKNOWN, 'no sample yet'
        if age > self.stale_s:
            return LinkHealth.DOWN, f'no sample for {age:.1f} s'
        problems = []
        if rtt > self.rtt_warn_ms:
            problems.append(f'rtt {rtt:.1f} ms > {self.rtt_warn_ms:g} ms')
        if up_mbps < self.min_uplink_mbps:
            problems.append(f'uplink {up_mbps:.2f} Mbit/s < {self.min_uplink_mbps:g} Mbit/s')
        if loss > self.loss_warn:
            problems.append(f'{loss:.0%} of recent probes lost')
        if problems:
            return LinkHealth.DEGRADED, '; '.join(problems)
        return LinkHealth.OK, 'ok'


class LinkMonitor:
    """Active probing of one server: RTT every tick, payload probes when passive data is old."""

    def __init__(self, client: RrtoClient, estimator: LinkEstimator, *,
                 payload_bytes: int = 32768, bandwidth_every: int = 5,
                 passive_fresh_s: float = 5.0, timeout_ms: float = 1000.0):
        if payload_bytes < 0 or bandwidth_every < 1 or timeout_ms <= 0:
            raise ValueError('payload_bytes >= 0, bandwidth_every >= 1, timeout_ms > 0 needed')
        self.client = client
        self.estimator = estimator
        self.payload = torch.zeros(payload_bytes, dtype=torch.uint8)
        self.bandwidth_every = bandwidth_every
        self.passive_fresh_s = passive_fresh_s
        self.timeout_ms = timeout_ms
        self.ticks = 0
        self.probe_supported = True
        self.payload_enabled = payload_bytes > 0
        self.last_error = ''

    def _timed(self, kind: Kind, fields: dict, tensors=()) -> float:
        start = time.perf_counter()
        header, _ = self.client.call(kind, fields, tensors, timeout_ms=self.timeout_ms)
        return (time.perf_counter() - start) * 1e3 - float(header.get('server_ms', 0.0))

    def tick(self, now: float | None = None) -> bool:
        """Probe once (blocks up to a few timeouts); return True if the server answered."""
        now = time.monotonic() if now is None else now
        self.ticks += 1
        self.last_error = ''
        try:
            try:
                rtt_ms = self._timed(Kind.PROBE if self.probe_supported else Kind.HELLO, {})
            except RemoteError as exc:
                # an older server without 'probe' still answers: time hello from now on
                self.probe_supported, self.last_error = False, str(exc)
                return True
            self.estimator.add_rtt(rtt_ms, now)
            due = (self.ticks - 1) % self.bandwidth_every == 0
            if (self.payload_enabled and due
                    and self.estimator.passive_age(now) > self.passive_fresh_s):
                self._payload_probes(now)
        except OffloadError as exc:
            self.estimator.add_failure(now)
            self.last_error = str(exc)
            return False
        return True

    def _payload_probes(self, now: float) -> None:
        try:
            up_ms = self._timed(Kind.PROBE, {}, [self.payload])
            self.estimator.add_transfer('up', len(self.payload), up_ms, now)
            down_ms = self._timed(Kind.PROBE, {'reply_bytes': len(self.payload)})
            self.estimator.add_transfer('down', len(self.payload), down_ms, now)
        except RemoteError as exc:
            # e.g. a server whose message limit is below the payload: rely on passive samples
            self.payload_enabled, self.last_error = False, str(exc)
