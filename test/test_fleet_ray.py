"""Fleet mode on Ray: fake-GPU local clusters, replica and node loss, robots served throughout."""

import os
import signal
import time

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from rrto_fleet.ray_fleet import runtime_env, start_fleet
from rrto_ros import OffloadResult
from rrto_server.server import ServerConfig
from rrto_testing import assert_same_as_local
from test_fleet import tiny_net

# small and quick on a shared 2-core machine: fake GPUs, no dashboard, fast node-death detection
FAST_HEALTH = {'health_check_period_ms': 500, 'health_check_failure_threshold': 4}
RECOVERY_S = 90.0


def _ready(om, x, timeout_s: float) -> bool:
    """Wait until ``om`` is prepared: warmup ends at an attempt that found no replica yet."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if om.warmup(x, timeout_s=max(0.1, deadline - time.monotonic())):
            return True
        time.sleep(0.2)
    return False


def _config(tmp_path) -> ServerConfig:
    return ServerConfig(bind='tcp://127.0.0.1:0', store=str(tmp_path / 'store'), device='cpu',
                        cpu_workers=1, threads=1)


def _serve_through(om, x, expected, until, limit_s: float) -> list:
    """Call until ``until()`` holds after an offloaded call; every call must equal local."""
    results = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        out = om(x)
        results.append(om.last.result)
        assert_same_as_local(out, expected)
        if om.last.result == OffloadResult.OFFLOADED and until():
            return results
        time.sleep(0.02)
    pytest.fail(f'not recovered within {limit_s:g} s: {results[-5:]}, {om.last.reason}')


def _snapshot(fleet) -> dict:
    return ray.get(fleet.directory.snapshot.remote(), timeout=30)


@pytest.mark.slow
def test_replica_killed_is_restarted_and_rerouted(tmp_path, offloaded):
    os.environ.setdefault('RAY_AUTH_MODE', 'disabled')
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, runtime_env=runtime_env(),
             log_to_driver=False)
    try:
        fleet = start_fleet(_config(tmp_path), 2, 'tcp://127.0.0.1:*', poll_s=0.3)
        infos = ray.get([h.info.remote() for h in fleet.replicas], timeout=30)
        assert len({i['endpoint'] for i in infos}) == 2
        assert ray.available_resources().get('GPU', 0) == 0   # one fake GPU each
        model, x = tiny_net(), torch.randn(1, 16)
        expected = model(x)
        om = offloaded(model, '', timeout_ms=1000, connect_timeout_ms=300,
                       directory=fleet.endpoint, duplicate=True)
        assert _ready(om, x, 120)
        (digest,) = _snapshot(fleet)['models']
        assert len(_snapshot(fleet)['models'][digest]['holders']) == 2
        _serve_through(om, x, expected, lambda: True, 30)

        os.kill(infos[0]['pid'], signal.SIGKILL)
        killed = time.monotonic()

        def restarted() -> bool:
            snap = _snapshot(fleet)
            victim = snap['replicas']['rrto-replica-0']
            return (victim['alive'] and victim['instance'] != infos[0]['instance']
                    and len(snap['models'][digest]['holders']) == 2)

        results = _serve_through(om, x, expected, restarted, RECOVERY_S)
        assert set(results) <= {OffloadResult.OFFLOADED, OffloadResult.LOCAL_FALLBACK}
        print(f'replica back and re-warmed {time.monotonic() - killed:.1f} s after SIGKILL; '
              f'{results.count(OffloadResult.LOCAL_FALLBACK)} of {len(results)} calls local')
        # a single-sending robot resolves to the new endpoints too
        single = offloaded(model, '', timeout_ms=1000, directory=fleet.endpoint)
        assert _ready(single, x, 60)
        _serve_through(single, x, expected, lambda: True, 30)
        fleet.stop()
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_node_loss_on_a_two_node_cluster(tmp_path, offloaded):
    os.environ.setdefault('RAY_AUTH_MODE', 'disabled')
    cluster = Cluster(initialize_head=True, head_node_args={
        'num_cpus': 1, 'num_gpus': 0, 'include_dashboard': False, '_system_config': FAST_HEALTH})
    cluster.add_node(num_cpus=1, num_gpus=2)
    doomed = cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env=runtime_env(), log_to_driver=False)
    try:
        fleet = start_fleet(_config(tmp_path), 2, 'tcp://127.0.0.1:*', poll_s=0.3)
        model, x = tiny_net(), torch.randn(1, 16)
        expected = model(x)
        robots = [offloaded(model, '', timeout_ms=1000, connect_timeout_ms=300,
                            directory=fleet.endpoint, duplicate=dup) for dup in (True, False)]
        for om in robots:
            assert _ready(om, x, 120)
        (digest,) = _snapshot(fleet)['models']
        before = _snapshot(fleet)
        assert len(before['models'][digest]['holders']) == 2

        cluster.remove_node(doomed)
        lost = time.monotonic()

        def rerouted() -> bool:
            snap = _snapshot(fleet)
            return (all(r['alive'] for r in snap['replicas'].values())
                    and len(snap['models'][digest]['holders']) == 2
                    and snap['models'][digest]['holders'] != before['models'][digest]['holders'])

        for om in robots:
            results = _serve_through(om, x, expected, rerouted, RECOVERY_S)
            assert set(results) <= {OffloadResult.OFFLOADED, OffloadResult.LOCAL_FALLBACK}
        print(f'both replicas serving again {time.monotonic() - lost:.1f} s after the node loss')
        fleet.stop()
    finally:
        ray.shutdown()
        cluster.shutdown()
