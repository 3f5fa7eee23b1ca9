"""A preempted inference returns exactly what an unpreempted one returns."""

import threading
import time

import pytest
import torch

from rrto_ros import OffloadResult
from rrto_ros.local_model import TorchModule
from rrto_ros.zoo import ARCHITECTURES, keypoint_net, resnet18
from rrto_wire import treespec
from rrto_server.models import ModelRegistry
from rrto_server.sandbox import FREE
from rrto_server.replay import Replay
from rrto_wire.messages import RecordOptions
from rrto_server.store import BlobStore

SIZES = {'resnet18': (1, 3, 96, 96), 'mobilenet': (1, 3, 96, 96), 'keypoint_net': (1, 3, 64, 96)}
DEVICES = ['cpu', pytest.param('cuda', marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')])]


def make_replay(tmp_path, model, example, segments, device='cpu') -> Replay:
    """Record ``model`` for ``example``'s signature straight into a Replay (no server)."""
    store = BlobStore(tmp_path / 'store')
    flat, spec = treespec.flatten(((example,), {}))
    artifact = TorchModule(model).artifact(flat, spec)
    for digest, (kind, data) in artifact.blobs.items():
        store.put(digest, kind, data)
    loaded = ModelRegistry(store).get(artifact.model, FREE)
    return Replay(loaded, artifact.signature, RecordOptions(segments=segments),
                  torch.device(device))


def _leaves(outputs) -> list:
    return treespec.flatten(outputs)[0]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('arch', sorted(ARCHITECTURES))
def test_suspended_execution_resumes_to_the_same_output(tmp_path, arch, device):
    model = ARCHITECTURES[arch]()
    x, y = torch.randn(*SIZES[arch]), torch.randn(*SIZES[arch])
    replay = make_replay(tmp_path, model, x, 'ops:7', device)
    other = make_replay(tmp_path / 'other', keypoint_net(), torch.randn(1, 3, 32, 32), 'ops:5',
                        device)
    assert replay.num_segments > 3
    unpreempted = replay.start([x]).run()
    reference_y = replay.start([y]).run()

    suspended = replay.start([x])
    for _ in range(replay.num_segments // 2):
        assert not suspended.step()
    # two other inferences run in between: one of the same replay (on CUDA it takes the
    # static buffers, so the suspended one's live tensors must be saved and restored)
    between = replay.start([y]).run()
    other.start([torch.randn(1, 3, 32, 32)]).run()
    while not suspended.step():
        pass
    resumed = suspended.host_outputs()

    assert all(torch.equal(a, b) for a, b in zip(resumed, unpreempted))
    assert all(torch.equal(a, b) for a, b in zip(between, reference_y))
    if device == 'cpu':
        # the fx backend is bit-exact with eager: so is the preempted inference
        expected = _leaves(model(x))
        assert all(torch.equal(a, b) for a, b in zip(resumed, expected))
    else:
        assert suspended.saves == 1


def test_abandoned_execution_releases_the_shared_buffers(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    replay = make_replay(tmp_path, keypoint_net(), x, 'ops:5')
    abandoned = replay.start([x])
    abandoned.step()
    abandoned.release()
    assert abandoned.env == {} and abandoned.saved is None
    out = replay.start([x]).run()
    assert all(torch.equal(a, b) for a, b in zip(out, _leaves(keypoint_net()(x))))


def _wait_running(server, task, steps, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r['task'] == task and r['steps_done'] >= steps
               for r in server.scheduler.running()):
            return
        time.sleep(0.0005)
    pytest.fail(f'{task} never ran {steps} segments')


@pytest.mark.parametrize('same_replay', [False, True], ids=['other-model', 'same-replay'])
def test_preempted_inference_through_the_server_equals_local(server, offloaded, same_replay):
    low_model = resnet18()
    x_low = torch.randn(4, 3, 160, 160)
    low = offloaded(low_model, server.endpoint, timeout_ms=60000, segments='ops:3',
                    priority=0, task='low')
    if same_replay:
        high_model, x_high = low_model, torch.randn(4, 3, 160, 160)
        high = offloaded(high_model, server.endpoint, timeout_ms=60000, segments='ops:3',
                         priority=5, task='high')
    else:
        high_model, x_high = keypoint_net(), torch.randn(1, 3, 64, 64)
        high = offloaded(high_model, server.endpoint, timeout_ms=60000, priority=5, task='high')
    expected_low, expected_high = low_model(x_low), high_model(x_high)
    assert low.warmup(x_low) and high.warmup(x_high)

    results = {}
    thread = threading.Thread(target=lambda: results.setdefault('low', low(x_low)))
    thread.start()
    _wait_running(server, 'low', steps=2)
    out_high = high(x_high)
    thread.join(60)

    assert low.last.result == high.last.result == OffloadResult.OFFLOADED
    assert low.last.preemptions >= 1 and high.last.preemptions == 0
    assert torch.equal(results['low'], expected_low)
    assert all(torch.equal(a, b) for a, b in zip(_leaves(out_high), _leaves(expected_high)))
    tasks = server.snapshot()['tasks']
    assert tasks['low']['preemptions'] >= 1
    assert tasks['high']['preempt_ms']['n'] == 1
