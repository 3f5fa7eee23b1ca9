"""CUDA-graph record/replay through the server (skipped without CUDA; see docs/benchmarks.md)."""

import pytest
import torch

from rrto_ros import OffloadResult
from rrto_ros.zoo import ARCHITECTURES

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]

SIZE = (1, 3, 224, 224)
# Stated tolerances for GPU servers against the robot's CPU result (max |diff| / max |ref|):
# strict fp32 (TF32 off) differs only by reduction order; fp16 autocast by half precision.
FP32_TOL = 1e-4
FP16_TOL = 2e-2


def _leaves(out):
    if isinstance(out, dict):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _leaves(v)]
    return [out]


def _rel_error(actual, expected) -> float:
    return max(float((a.float() - e.float()).abs().max() / e.float().abs().max().clamp_min(1e-12))
               for a, e in zip(_leaves(actual), _leaves(expected)))


@pytest.fixture
def gpu_server(make_server):
    return make_server(device='cuda')


@pytest.mark.parametrize('arch', sorted(ARCHITECTURES))
@pytest.mark.parametrize('precision, tol', [('fp32', FP32_TOL), ('fp16', FP16_TOL)])
def test_cuda_graph_replay_matches_local_cpu(arch, precision, tol, gpu_server, offloaded):
    model = ARCHITECTURES[arch]()
    om = offloaded(model, gpu_server.endpoint, timeout_ms=30000, precision=precision)
    x = torch.randn(*SIZE)
    assert om.warmup(x)
    out = om(x)
    assert om.last.result == OffloadResult.OFFLOADED and om.last.round_trips == 1
    assert _rel_error(out, model(x)) < tol
    replay = gpu_server.snapshot()['replays'][0]
    assert replay['backend'] == 'cudagraph'


@pytest.mark.parametrize('arch', sorted(ARCHITECTURES))
def test_replay_equals_eager_on_the_same_gpu(arch, gpu_server, offloaded):
    model = ARCHITECTURES[arch]()
    x = torch.randn(*SIZE)
    replayed = offloaded(model, gpu_server.endpoint, timeout_ms=30000)
    eager = offloaded(model, gpu_server.endpoint, timeout_ms=30000, mode='eager')
    assert replayed.warmup(x) and eager.warmup(x)
    for a, b in zip(_leaves(replayed(x)), _leaves(eager(x))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_segmented_cuda_graphs_equal_one_graph(gpu_server, offloaded):
    model = ARCHITECTURES['resnet18']()
    x = torch.randn(*SIZE)
    whole = offloaded(model, gpu_server.endpoint, timeout_ms=30000)
    split = offloaded(model, gpu_server.endpoint, timeout_ms=30000, segments='block:2')
    assert whole.warmup(x) and split.warmup(x)
    assert torch.equal(whole(x), split(x))
    segments = sorted(r['segments'] for r in gpu_server.snapshot()['replays'])
    assert segments[0] == 1 and segments[1] > 5


def test_replay_memory_is_bounded(make_server, offloaded):
    server = make_server(device='cuda', max_replays=2)
    model = ARCHITECTURES['keypoint_net']()
    om = offloaded(model, server.endpoint, timeout_ms=30000)
    for size in (64, 96, 128):
        assert om.warmup(torch.randn(1, 3, size, size))
    snap = server.snapshot()
    assert len(snap['replays']) == 2 and snap['evictions'] == 1 and snap['replay_bytes'] > 0
    om(torch.randn(1, 3, 64, 64))  # evicted: recorded again in the background, answered locally
    assert om.last.result == OffloadResult.LOCAL_FALLBACK
    assert om.warmup(torch.randn(1, 3, 64, 64))


def test_copies_to_the_host_reuse_page_locked_buffers_per_thread():
    import threading

    from rrto_server import transfers as rp
    device = torch.device('cuda')
    out = torch.randn(2, 17, 56, 56, device=device).permute(0, 2, 3, 1)   # not contiguous
    errors = []

    def worker(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(50):
            frame = torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8, generator=gen)
            staged, = rp.stage([frame], device)
            host = rp.to_host([out, staged], [torch.float16, torch.uint8])   # two buffers
            if not (torch.equal(host[0], out.half().cpu()) and torch.equal(host[1], frame)):
                errors.append(seed)
        buffers = rp.pinned_buffers()
        if not all(b.is_pinned() for b in buffers) or len(buffers) != 2:   # fp16 and uint8
            errors.append(('cache', seed, len(buffers)))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    staged, = rp.stage([torch.arange(6.0)], device)
    first = rp.to_host([staged], [torch.float32])[0]
    second = rp.to_host([staged * 2], [torch.float32])[0]
    assert not first.is_pinned(), 'replies own their memory: the bounce buffer is reused'
    big = torch.zeros(rp.PINNED_BYTES_PER_THREAD // 4 + 1, device=device)
    assert torch.equal(rp.to_host([big], [torch.float32])[0], big.cpu()), 'too large: direct'
    assert sum(b.nbytes for b in rp.pinned_buffers()) <= rp.PINNED_BYTES_PER_THREAD
    assert torch.equal(first, torch.arange(6.0)) and torch.equal(second, 2 * torch.arange(6.0))
