"""The scheduler on a CUDA device: streams, graph save/restore under preemption, packing."""

import threading

import pytest
import torch
from rrto_testing import assert_packing_invariant, call_concurrently, prepare, wait_running

from rrto_ros.client import RrtoClient
from rrto_ros.zoo import keypoint_net, mobilenet, resnet18

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]


@pytest.fixture
def gpu_server(make_server):
    return make_server(device='cuda', sched_trace=8192)


def test_lanes_are_a_high_and_a_low_priority_stream(gpu_server):
    lanes = gpu_server.scheduler.lanes
    assert len(lanes) == 2 and gpu_server.scheduler.theta == 1.0
    assert lanes[0].stream.priority < lanes[1].stream.priority    # lower number: more urgent


class Deep(torch.nn.Module):
    """Much compute for a small input: a request arrives well before an inference ends."""

    def __init__(self, depth: int = 80, width: int = 256):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, width, 3, padding=1)
        self.body = torch.nn.Sequential(*[torch.nn.Sequential(
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU()) for _ in range(depth)])

    def forward(self, x):
        return self.body(self.stem(x)).mean(dim=(2, 3))


def test_preempted_cuda_graph_replay_equals_the_unpreempted_one(gpu_server):
    torch.manual_seed(0)
    model = Deep().eval()
    x_low, x_high = torch.randn(1, 3, 96, 96), torch.randn(1, 3, 96, 96)
    replay = prepare(gpu_server.endpoint, model, x_low, segments='ops:2')
    client = RrtoClient(gpu_server.endpoint, call_timeout_ms=60000)
    try:
        reference_low, _ = client.infer(replay, [x_low], task='alone')
        reference_high, _ = client.infer(replay, [x_high], task='alone')
    finally:
        client.close()
    results = {}

    def low() -> None:
        rrto = RrtoClient(gpu_server.endpoint, call_timeout_ms=60000)
        try:
            results['low'] = rrto.infer(replay, [x_low], priority=0, task='low')
        finally:
            rrto.close()

    rrto = RrtoClient(gpu_server.endpoint, call_timeout_ms=60000)
    rrto.hello()   # connected before the low-priority inference starts
    thread = threading.Thread(target=low)
    thread.start()
    wait_running(gpu_server, 'low')
    try:
        out_high, reply_high = rrto.infer(replay, [x_high], priority=5, task='high')
    finally:
        rrto.close()
    thread.join(60)
    out_low, reply_low = results['low']
    assert all(torch.equal(a, b) for a, b in zip(out_low, reference_low))
    assert all(torch.equal(a, b) for a, b in zip(out_high, reference_high))
    assert reply_low['timing']['preemptions'] >= 1
    # and the replay computes the network (strict fp32 on the GPU against the CPU)
    with torch.inference_mode():
        eager = model(x_low)
    torch.testing.assert_close(out_low[0], eager, rtol=1e-3, atol=1e-3 * float(eager.abs().max()))


def test_profiled_utilisations_drive_packing_within_theta(gpu_server):
    specs = {'KeypointNet': (keypoint_net(), (1, 3, 256, 320), 'block:3', 2),
             'MobileNet': (mobilenet(), (4, 3, 224, 224), 'block:3', 1),
             'ResNet18': (resnet18(), (16, 3, 224, 224), 'block:3', 0)}
    replays = {label: prepare(gpu_server.endpoint, model, torch.randn(shape), segments=seg)
               for label, (model, shape, seg, _) in specs.items()}
    for info in gpu_server.snapshot()['replays']:
        assert 0.0 <= info['utilisation'] <= 1.0, info
        assert len(info['segment_ms']) == info['segments']
    calls = {label: (replays[label], torch.randn(shape), priority, None)
             for label, (_, shape, _, priority) in specs.items()}
    failures = call_concurrently(gpu_server.endpoint, calls, 3.0)
    assert not failures
    snapshot = gpu_server.snapshot()['scheduler']
    assert_packing_invariant(snapshot['trace'], snapshot['theta'])
    print('packed steps', snapshot['packed_steps'], 'of', snapshot['steps'],
          {i['label']: i['utilisation'] for i in gpu_server.snapshot()['replays']})
