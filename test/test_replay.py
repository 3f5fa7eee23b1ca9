"""Recorded replays: segments compose exactly, suspended executions resume correctly, LRU bound."""

import pytest
import torch

from rrto_ros.local_model import TorchModule
from rrto_ros.zoo import keypoint_net, resnet18
from rrto_wire import treespec
from rrto_server.models import ModelRegistry
from rrto_server.sandbox import FREE
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.tensors import signature_of
from rrto_server.replay import Replay
from rrto_server.replay_cache import ReplayCache
from rrto_server.replay_key import check_options
from rrto_wire import messages
from rrto_wire import protocol as wire
from rrto_wire.messages import RecordOptions
from rrto_server.store import BlobStore

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def _load(tmp_path, model, x):
    flat, in_spec = treespec.flatten(((x,), {}))
    artifact = TorchModule(model).artifact(flat, in_spec)
    store = BlobStore(tmp_path / 'store')
    for digest, (kind, data) in artifact.blobs.items():
        store.put(digest, kind, data)
    return ModelRegistry(store).get(artifact.model, FREE)


@pytest.fixture(scope='module')
def resnet(tmp_path_factory):
    model, x = resnet18(), torch.randn(1, 3, 96, 96)
    return model, x, _load(tmp_path_factory.mktemp('r18'), model, x)


def _run(loaded, x, device='cpu', **options):
    replay = Replay(loaded, signature_of([x]), RecordOptions(**options), torch.device(device))
    return replay, replay.start([x]).run()


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('segments', ['ops:7', 'block:2', 'block:3'])
def test_segmented_replay_equals_whole_replay(resnet, device, segments):
    _, x, loaded = resnet
    whole_replay, (whole,) = _run(loaded, x, device)
    replay, (out,) = _run(loaded, x, device, segments=segments)
    assert whole_replay.num_segments == 1 and replay.num_segments > 3
    assert torch.equal(out, whole)


def test_cpu_replay_is_bit_exact_with_local_eager(resnet):
    model, x, loaded = resnet
    _, (out,) = _run(loaded, x)
    with torch.inference_mode():
        assert torch.equal(out, model(x))


@pytest.mark.parametrize('device', DEVICES)
def test_a_suspended_execution_resumes_with_its_own_values(resnet, device):
    model, x, loaded = resnet
    y = torch.randn_like(x)
    options = RecordOptions(segments='block:2')
    replay = Replay(loaded, signature_of([x]), options, torch.device(device))
    _, (expect_x,) = _run(loaded, x, device)
    _, (expect_y,) = _run(loaded, y, device)
    first = replay.start([x])
    first.step()
    first.step()  # suspended mid-way, its activations live in the replay's buffers
    second = replay.start([y])
    (out_y,) = second.run()  # takes the buffers over
    (out_x,) = first.run()  # must restore its own activations first
    assert torch.equal(out_y, expect_y) and torch.equal(out_x, expect_x)
    if device == 'cuda':
        assert first.saves == 1   # its live values left the shared buffers once


def test_wrong_signature_is_refused(resnet):
    _, x, loaded = resnet
    replay, _ = _run(loaded, x)
    with pytest.raises(ProtocolError) as err:
        replay.start([torch.randn(1, 3, 64, 64)])
    assert err.value.code == ErrorCode.SIGNATURE
    with pytest.raises(ProtocolError) as err:
        other = signature_of([torch.zeros(2, 3, 96, 96)])
        Replay(loaded, other, RecordOptions(), torch.device('cpu'))
    assert err.value.code == ErrorCode.SIGNATURE and 'exported for' in err.value.message


def test_replay_cache_keeps_the_most_recently_used(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    cache = ReplayCache(max_replays=2)
    replays = [Replay(_load(tmp_path / str(seed), keypoint_net(seed=seed), x), signature_of([x]),
                      RecordOptions(), torch.device('cpu')) for seed in range(3)]
    cache.add(replays[0])
    cache.add(replays[1])
    assert cache.get(replays[0].key) is replays[0]  # now the most recent
    cache.add(replays[2])
    assert len(cache) == 2 and cache.evictions == 1
    assert cache.get(replays[1].key) is None and cache.get(replays[0].key) is replays[0]


def test_bad_options_are_refused():
    for options in ({'precision': 'fp8'}, {'mode': 'magic'}, {'segments': 'ops:0'},
                    {'segments': 'layers'}, 'fast', {'unknown': 1}):
        header = wire.encode({'kind': 'record', 'id': 1, 'model': 'ab' * 32, 'signature': [],
                              'options': options})[0]
        with pytest.raises(ProtocolError) as err:
            check_options(messages.decode_request(header).options)
        assert err.value.code == ErrorCode.BAD_REQUEST
