"""The robot keeps working when the server dies, and offloads again when it returns."""

import threading
import time

import pytest
import torch

from rrto_ros import OffloadResult, ServerUnavailable
from rrto_ros.client import RrtoClient
from rrto_ros.preparer import PrepState
from rrto_ros.zoo import keypoint_net, resnet18
from rrto_wire.messages import Kind
from rrto_testing import assert_same_as_local

TIMEOUT_MS = 1000


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f'timed out waiting for {what}')


@pytest.mark.slow
def test_server_killed_mid_run_then_restarted(server_process, offloaded, tmp_path):
    proc = server_process(tmp_path / 'store')
    model = keypoint_net()
    x = torch.randn(1, 3, 96, 96)
    expected = model(x)
    om = offloaded(model, proc.endpoint, timeout_ms=TIMEOUT_MS, connect_timeout_ms=300)
    assert om.warmup(x)

    results = []
    while results.count(OffloadResult.OFFLOADED) < 3:
        om(x)
        results.append(om.last.result)
        assert len(results) < 50, om.last.reason
    killer = threading.Timer(0.02, proc.kill)  # lands while a call is in flight
    killer.start()
    give_up = time.monotonic() + 120
    # run until the kill has landed and two calls in a row fell back (however loaded the
    # machine, the loop ends on what happened, not on a wall-clock window)
    while killer.is_alive() or results[-2:] != [OffloadResult.LOCAL_FALLBACK] * 2:
        assert time.monotonic() < give_up, results
        start = time.perf_counter()
        out = om(x)
        waited_ms = (time.perf_counter() - start) * 1e3 - om.last.robot_compute_ms
        results.append(om.last.result)
        assert_same_as_local(out['heatmaps'], expected['heatmaps'])
        # no call waits for the server longer than its timeout (plus wake-up slack): the
        # local run it falls back to is measured in the record and not counted here
        assert waited_ms < TIMEOUT_MS + 500, (waited_ms, om.last)
    killer.join()
    assert OffloadResult.OFFLOADED in results
    assert om.stats()['fallbacks'] >= 1

    uploads_before = om.stats()['uploads']
    proc.start()  # same port, same store: the model is there, the replay is not
    _wait_for(lambda: (om(x), om.last.result)[1] ==
              OffloadResult.OFFLOADED, 30, 'offloading to resume')
    assert_same_as_local(om(x)['offsets'], expected['offsets'])
    stats = om.stats()
    assert stats['uploads'] == uploads_before, 'the store survived: nothing is re-uploaded'
    assert stats['records'] == 2 and stats['reconnects'] >= 1


def test_model_uploaded_once_across_client_and_server_restarts(
        server_process, offloaded, tmp_path):
    store = tmp_path / 'store'
    proc = server_process(store)
    model = resnet18()
    x = torch.randn(1, 3, 64, 64)
    first = offloaded(model, proc.endpoint, timeout_ms=30000)
    assert first.warmup(x) and first.stats()['uploads'] == 2
    first.close()

    second = offloaded(resnet18(), proc.endpoint, timeout_ms=30000)  # a client restart
    assert second.warmup(x) and second.stats()['uploads'] == 0
    second.close()

    proc.stop()
    proc.start()  # a server restart over the same store
    third = offloaded(resnet18(), proc.endpoint, timeout_ms=30000)
    assert third.warmup(x)
    assert third.stats()['uploads'] == 0 and third.stats()['records'] == 1
    third(x)
    assert third.last.result == OffloadResult.OFFLOADED


def test_no_server_means_local_results_without_waiting(offloaded):
    model = keypoint_net()
    x = torch.randn(1, 3, 64, 64)
    om = offloaded(model, 'tcp://127.0.0.1:9', timeout_ms=200, connect_timeout_ms=200)
    # warmup returns once an attempt found the server unreachable (not after its timeout)
    assert not om.warmup(x, timeout_s=120)
    [prepared] = om.prepared()
    assert prepared.state == PrepState.PREPARING and 'unreachable' in prepared.error
    assert prepared.artifact is None     # no server: the robot did not spend CPU on an export
    for _ in range(5):
        out = om(x)
        assert om.last.result == OffloadResult.LOCAL
        # no call waits on the network: beyond its local run, less than one call timeout
        assert om.last.total_ms - om.last.robot_compute_ms < 200, om.last
    torch.testing.assert_close(out['score'], model(x)['score'], rtol=0, atol=0)
    assert 'unreachable' in om.last.reason


def test_a_silent_server_times_out_and_the_client_marks_it_down(zmq_ctx):
    import zmq
    silent = zmq_ctx.socket(zmq.ROUTER)
    port = silent.bind_to_random_port('tcp://127.0.0.1')
    client = RrtoClient(f'tcp://127.0.0.1:{port}', call_timeout_ms=150, connect_timeout_ms=500)
    try:
        start = time.perf_counter()
        with pytest.raises(ServerUnavailable):
            client.call(Kind.HELLO)
        assert 0.1 < time.perf_counter() - start < 1.0
        assert not client.available and client.counters['timeouts'] == 1
        with pytest.raises(ServerUnavailable, match='reconnecting'):
            client.call(Kind.HELLO)  # fails at once while the probe runs
    finally:
        client.close()
        silent.close(linger=0)


def test_a_server_that_cannot_start_says_why(server_process, tmp_path):
    from rrto_server.process import ServerProcess
    running = server_process(tmp_path / 'store')
    second = ServerProcess(tmp_path / 'other', running.port, log=tmp_path / 'second.log')
    with pytest.raises(RuntimeError, match='already answers'):
        second.start(timeout_s=30)
    assert second.proc is None
    running.kill()   # a port whose server died can be reused at once
    assert ServerProcess(tmp_path / 'store', running.port).start().stop() == 0
