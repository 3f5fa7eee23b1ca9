"""The minimal-server floor of bench.gpu_floor answers right (the CUDA half skips without it)."""

import collections
import functools
import itertools

import pytest
import torch

from bench import gpu_floor, gpu_models
from bench.gpu_minimal import Minimal
from rrto_ros.engine import OffloadedModel
from rrto_server.process import ServerProcess
from rrto_wire import treespec

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
DEVICES = ['cpu', pytest.param('cuda', marks=[pytest.mark.gpu, CUDA])]


@pytest.mark.parametrize('device', DEVICES)
def test_minimal_server_answers_the_local_outputs(device):
    model, frame = gpu_models.build('resnet18')
    with torch.inference_mode():
        local = [model(frame)]
    minimal = Minimal('resnet18', device)
    try:
        for _ in range(3):      # the reply buffers are reused: every reply is the whole answer
            wall, server, replies = minimal.round_trip(frame)
            outputs = [torch.frombuffer(bytearray(r.buffer), dtype=x.dtype).reshape(x.shape)
                       for r, x in zip(replies, local)]
            assert len(replies) == len(local)
            assert gpu_floor.rel_error(outputs, local) < 1e-4
            assert 0 < server < wall
    finally:
        minimal.close()


def test_minimal_server_sends_outputs_that_are_not_contiguous_on_the_cpu():
    # keypoint_net's outputs are channels-last views: sent as bytes, they are copied
    # contiguous once (the CPU minimal server did not start: memoryview cast refused)
    model, frame = gpu_models.build('keypoint_net')
    with torch.inference_mode():
        local = treespec.flatten(model(frame))[0]
    assert not all(x.is_contiguous() for x in local)
    minimal = Minimal('keypoint_net', 'cpu')
    try:
        replies = minimal.round_trip(frame)[2]
        outputs = [torch.frombuffer(bytearray(r.buffer), dtype=x.dtype).reshape(x.shape)
                   for r, x in zip(replies, local)]
        assert len(replies) == len(local)
        assert gpu_floor.rel_error(outputs, local) < 1e-4
    finally:
        minimal.close()


@pytest.mark.parametrize('device', DEVICES)
def test_floor_rows_carry_the_bare_client_and_the_minimal_server(tmp_path, device,
                                                                 monkeypatch):
    events = []
    for name, owner, attr in (('robot', OffloadedModel, '__call__'),
                              ('bare', gpu_floor.BareClient, 'round_trip'),
                              ('echo', gpu_floor.Echo, 'round_trip'),
                              ('minimal', Minimal, 'round_trip')):
        monkeypatch.setattr(owner, attr, _noting(events, name, getattr(owner, attr)))
    echo = gpu_floor.Echo()
    server = ServerProcess(str(tmp_path), None, device=device).start()
    try:
        row = gpu_floor.measure('resnet18', server.endpoint, echo, torch.device(device), 3,
                                None, None)
    finally:
        server.stop()
        echo.close()
    # the timed loop: a warm-up block of 20 rounds, then a block of the 3 timed rounds and
    # the SETTLE rounds after the GPU's switch, on the project's server (robot, echo, bare
    # client) and then on the minimal server (echo, minimal): the servers' requests come
    # in blocks, not one each per round, and within a block the robot and the bare client
    # each follow their own kind of call as often (+-1) as they follow the echo
    rounds = 20 + 3 + gpu_floor.SETTLE
    loop = events[-(rounds * 3 + rounds * 2):]
    kinds = ['minimal' if who == 'minimal' else 'project' for who in loop if who != 'echo']
    runs = [(kind, len(list(calls))) for kind, calls in itertools.groupby(kinds)]
    assert runs == [('project', 40), ('minimal', 20), ('project', 2 * (rounds - 20)),
                    ('minimal', rounds - 20)], runs
    project = [who for who in loop if who != 'minimal']
    before = {who: collections.Counter(a for a, b in zip(project, project[1:]) if b == who)
              for who in ('robot', 'bare')}
    assert abs(before['robot']['robot'] - before['robot']['echo']) <= 2, before
    assert abs(before['bare']['bare'] - before['bare']['echo']) <= 2, before
    # the bare client sent the robot's own request and got the same answer
    assert row['bare_client_rel_error'] < 1e-4
    assert row['robot_beyond_bare_client_ms'] == pytest.approx(
        row['wall_ms'] - row['bare_client_wall_ms'])
    # and its parts: the robot's own work, its wait beyond the server, the server's time
    assert 0 < row['robot_outside_remote_ms'] < row['wall_ms']
    assert 0 <= row['robot_network_ms'] < row['wall_ms']
    assert 0 < row['bare_client_network_ms'] < row['bare_client_wall_ms']
    assert row['robot_server_beyond_bare_client_ms'] == pytest.approx(
        row['server_ms'] - row['bare_client_server_ms'])
    assert row['minimal_rel_error'] < 1e-4
    assert row['server_beyond_minimal_ms'] == pytest.approx(
        row['server_ms'] - row['minimal_server_ms'])
    # the first request after the minimal server's block is timed apart
    assert row['server_after_switch_ms'] > 0 and 'gpu_switch_ms' in row


def _noting(events: list, name: str, method):
    @functools.wraps(method)
    def noted(*args, **kwargs):
        events.append(name)
        return method(*args, **kwargs)
    return noted


def test_e2e_rows_carry_the_robots_cpu_and_its_part_beyond_the_echo():
    """Each link's row says how much of a call the robot's thread worked and waited (issue 11)."""
    import time
    from bench import gpu_e2e
    from bench.link_config import PRESETS
    from rrto_ros.records import CallRecord, OffloadResult

    class Model:        # works 2 ms of CPU, waits 3 ms; the server took 1 ms of it
        last = None

        def __call__(self, frame):
            end = time.thread_time() + 0.002
            while time.thread_time() < end:
                pass
            time.sleep(0.003)
            self.last = CallRecord(OffloadResult.OFFLOADED, 'offload', server_ms=1.0,
                                   bytes_sent=100, bytes_received=10)

    class Echo:         # the link alone: 1.5 ms
        def round_trip(self, sent, received):
            return 1.5

    class Emulator:
        def set_link(self, link):
            pass

    row = gpu_e2e.measure_link(Model(), None, [Emulator()], Echo(), PRESETS['unlimited'],
                               calls=5, bare_ms=1.0)
    assert 2.0 <= row['robot_cpu_ms'] < 2.0 + 1.0
    # wall (>= 5 ms) - echo 1.5 - server 1.0: the rest of the call is the robot's own
    assert row['robot_beyond_echo_ms'] == pytest.approx(row['median_ms'] - 2.5, abs=0.5)
    assert row['robot_beyond_echo_ms'] >= 2.5
