"""Link estimation: smoothing, hysteresis, passive samples, health, and real probes."""

import math

import pytest

from rrto_ros.bandwidth import Hysteresis, LinkEstimator, LinkHealth, LinkMonitor
from rrto_ros.client import RrtoClient

MB = 1e6


def test_hysteresis_ignores_small_moves_and_short_excursions():
    h = Hysteresis(threshold=0.2, hold=3)
    assert h.update(100) == 100
    for x in [110, 90, 119, 81]:          # inside the band: never published
        assert h.update(x) == 100
    assert h.update(150) == 100 and h.update(150) == 100
    assert h.update(100) == 100            # the excursion ended before `hold` samples
    assert [h.update(150) for _ in range(3)] == [100, 100, 150]
    assert [h.update(60) for _ in range(3)] == [150, 150, 60]


def test_hysteresis_streak_restarts_when_the_side_changes():
    h = Hysteresis(threshold=0.1, hold=2)
    h.update(100)
    assert h.update(200) == 100 and h.update(50) == 100 and h.update(50) == 50


def test_noisy_rtt_is_smoothed_and_the_published_value_does_not_flap():
    est = LinkEstimator(hysteresis=0.2, hold=3)
    published = []
    for i in range(200):
        est.add_rtt(10.0 + (4.0 if i % 2 else -4.0), now=i * 0.1)   # 6 ms / 14 ms alternating
        published.append(est.estimate(now=i * 0.1).rtt_ms)
    assert len(set(published)) <= 2, 'the estimate changed with every sample'
    assert published[-1] == pytest.approx(10.0, rel=0.2)
    assert est.estimate(now=20.0).health == LinkHealth.OK


def test_step_changes_are_followed_after_the_hold_time():
    est = LinkEstimator(hysteresis=0.2, hold=3)
    for i in range(50):
        est.add_rtt(5.0, now=i * 0.1)
    for i in range(50, 120):
        est.add_rtt(80.0, now=i * 0.1)
    e = est.estimate(now=12.0)
    assert e.rtt_ms == pytest.approx(80.0, rel=0.2)
    assert e.health == LinkHealth.DEGRADED and 'rtt' in e.reason


def test_active_transfers_subtract_the_base_rtt():
    est = LinkEstimator(bw_alpha=1.0)
    est.add_rtt(4.0, now=0.0)
    est.add_rtt(6.0, now=0.1)                       # base RTT is the window's minimum: 4 ms
    est.add_transfer('up', 125_000, 14.0, now=0.2)  # 1 Mbit in 10 ms -> 100 Mbit/s
    est.add_transfer('down', 250_000, 24.0, now=0.3)  # 2 Mbit in 20 ms -> 100 Mbit/s
    e = est.estimate(now=0.3)
    assert e.uplink_mbps == pytest.approx(100.0) and e.downlink_mbps == pytest.approx(100.0)
    assert e.base_rtt_ms == 4.0


def test_base_rtt_forgets_old_minima():
    est = LinkEstimator(rtt_window_s=1.0)
    est.add_rtt(1.0, now=0.0)
    est.add_rtt(9.0, now=5.0)
    assert est.base_rtt_ms(now=5.0) == 9.0


def test_passive_samples_count_for_the_larger_direction():
    est = LinkEstimator(bw_alpha=1.0)
    est.add_rtt(2.0, now=0.0)
    est.add_transfer('down', 100_000, 2.0 + 8.0, now=0.0)   # 100 Mbit/s down
    # 150 kB up + 10 kB down in 2 + 12 + 0.8 ms: the 0.8 ms of the reply is taken off
    est.add_passive(150_000, 10_000, 14.8, now=1.0)
    e = est.estimate(now=1.0)
    assert e.uplink_mbps == pytest.approx(100.0, rel=1e-6)
    assert e.passive_samples == 1 and est.passive_age(now=3.0) == pytest.approx(2.0)


def test_unresolvable_transfers_bound_the_bandwidth_instead_of_dividing_by_zero():
    est = LinkEstimator(min_transfer_ms=0.05, bw_alpha=1.0)
    est.add_rtt(1.0, now=0)
    est.add_transfer('up', 1000, 0.5, now=0)          # faster than the RTT itself
    assert est.estimate(now=0).uplink_mbps == pytest.approx(1000 * 8 / 0.05e-3 / MB)


def test_health_goes_down_after_failures_or_silence_and_recovers():
    est = LinkEstimator(down_after=3, stale_s=5.0, loss_warn=1.0)
    assert est.estimate(now=0).health == LinkHealth.UNKNOWN
    est.add_failure(now=0)
    assert est.estimate(now=0).health == LinkHealth.DOWN     # never answered
    est.add_rtt(3.0, now=1)
    assert est.estimate(now=1).health == LinkHealth.OK
    est.add_failure(now=2)
    est.add_failure(now=3)
    assert est.estimate(now=3).health == LinkHealth.OK
    est.add_failure(now=4)
    e = est.estimate(now=4)
    assert e.health == LinkHealth.DOWN and '3 probes' in e.reason
    est.add_rtt(3.0, now=5)
    assert est.estimate(now=5).health == LinkHealth.OK
    e = est.estimate(now=11)
    assert e.health == LinkHealth.DOWN and 'no sample' in e.reason


def test_slow_uplink_and_lost_probes_degrade_the_link():
    est = LinkEstimator(min_uplink_mbps=5.0, loss_warn=0.2, bw_alpha=1.0)
    est.add_rtt(2.0, now=0)
    est.add_transfer('up', 1250, 2.0 + 10.0, now=0)   # 1 Mbit/s
    e = est.estimate(now=0)
    assert e.health == LinkHealth.DEGRADED and 'uplink' in e.reason
    est = LinkEstimator(loss_warn=0.2)
    for i in range(10):
        est.add_rtt(2.0, now=i)
        if i % 3 == 0:
            est.add_failure(now=i)
    e = est.estimate(now=10)
    assert e.health == LinkHealth.DEGRADED and 'lost' in e.reason and e.loss > 0.2


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError):
        Hysteresis(threshold=-1)
    with pytest.raises(ValueError):
        LinkEstimator(bw_alpha=0)
    with pytest.raises(ValueError):
        LinkEstimator(down_after=0)


def test_monitor_probes_a_real_server_and_notices_when_it_dies(make_server):
    server = make_server()
    client = RrtoClient(server.endpoint, connect_timeout_ms=300, call_timeout_ms=300)
    # OK here means every probe answered within its timeout: the rtt and uplink thresholds
    # judge a real link (tested above in virtual time), not a loaded machine's loopback
    est = LinkEstimator(down_after=2, rtt_warn_ms=300, min_uplink_mbps=0.0)
    monitor = LinkMonitor(client, est, payload_bytes=65536, bandwidth_every=1, timeout_ms=300)
    try:
        assert monitor.tick() and monitor.tick()
        e = est.estimate()
        assert e.health == LinkHealth.OK, e.reason
        assert 0 < e.rtt_ms < 300 and e.uplink_mbps > 0 and e.downlink_mbps > 0
        assert not math.isnan(e.base_rtt_ms)
        requests = server.snapshot()['requests']
        assert requests['probe'] == 6          # per tick: rtt, payload up, payload down
        server.close()
        assert not monitor.tick() and not monitor.tick()
        assert est.estimate().health == LinkHealth.DOWN
    finally:
        client.close()


def test_monitor_skips_payload_probes_while_passive_samples_are_fresh(server):
    client = RrtoClient(server.endpoint, call_timeout_ms=1000)
    est = LinkEstimator()
    monitor = LinkMonitor(client, est, payload_bytes=1024, bandwidth_every=1,
                          passive_fresh_s=60.0)
    try:
        est.add_passive(100_000, 1000, 5.0)
        assert monitor.tick()
        assert server.snapshot()['requests']['probe'] == 1
    finally:
        client.close()


def test_monitor_stops_payload_probes_a_server_refuses(make_server):
    server = make_server(max_message_bytes=4096)
    client = RrtoClient(server.endpoint, call_timeout_ms=1000)
    monitor = LinkMonitor(client, LinkEstimator(), payload_bytes=8192, bandwidth_every=1)
    try:
        client.hello()      # the client learns the limit: a larger part would drop the link
        assert monitor.tick() and not monitor.payload_enabled and 'too_large' in monitor.last_error
        assert monitor.tick()
        assert server.snapshot()['requests']['probe'] == 2   # rtt, rtt: refused on the robot
    finally:
        client.close()
