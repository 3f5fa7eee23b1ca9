"""The request path's hand-offs: which thread serves which request when the device is idle."""

import collections
import threading

from rrto_testing import leaves, prepare

import torch

from rrto_ros.client import RrtoClient
from rrto_ros.zoo import keypoint_net
from rrto_server import server as server_module
from rrto_server.runner import Execution
from rrto_wire import protocol


def _spy(monkeypatch, seen):
    def wrap(name, fn):
        def wrapper(*args, **kwargs):
            thread = threading.current_thread().name
            for prefix, role in (('rrto-io', 'io'), ('rrto-cpu', 'cpu'), ('rrto-gpu', 'lane')):
                if thread.startswith(prefix):
                    seen[name].add(role)
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(protocol, 'decode_tensors', wrap('decode', protocol.decode_tensors))
    monkeypatch.setattr(Execution, 'step', wrap('segment', Execution.step))


def _served(make_server, monkeypatch, **options):
    """Return a server with keypoint_net recorded for a 12 KB input, that input, the replay,
    the roles that decoded and stepped each request (filled as calls go), and a client."""
    server = make_server(**options)
    x = torch.randn(1, 3, 32, 32)                       # 12 KB
    replay = prepare(server.endpoint, keypoint_net(), x)
    seen = collections.defaultdict(set)
    _spy(monkeypatch, seen)
    return x, replay, seen, RrtoClient(server.endpoint, call_timeout_ms=30000)


def test_bulk_inputs_never_hold_the_io_thread_even_when_the_device_is_idle(make_server,
                                                                           monkeypatch):
    x, replay, seen, client = _served(make_server, monkeypatch, inline_max_ms=1000.0)
    try:
        outputs, _ = client.infer(replay, [x])
        assert seen == {'decode': {'io'}, 'segment': {'io'}}, 'small: served inline'
        seen.clear()
        monkeypatch.setattr(server_module, 'INLINE_MAX_INPUT_BYTES', x.nbytes - 1)
        again, _ = client.infer(replay, [x])
        assert seen == {'decode': {'cpu'}, 'segment': {'lane'}}, 'bulk: workers and lane'
        expected = leaves(keypoint_net()(x))
        assert all(torch.equal(a, b) for a, b in zip(outputs, expected))
        assert all(torch.equal(a, b) for a, b in zip(again, expected))
    finally:
        client.close()


def test_small_raw_requests_skip_the_worker_hop_when_they_cannot_run_inline(
        make_server, monkeypatch):
    # no segment is short enough to run inline: queued
    x, replay, seen, client = _served(make_server, monkeypatch, inline_max_ms=0.0)
    try:
        outputs, _ = client.infer(replay, [x])
        assert seen == {'decode': {'io'}, 'segment': {'lane'}}, 'views here, steps on a lane'
        seen.clear()
        flat = torch.full_like(x, 0.25)                 # compresses: travels as lz4
        packed, _ = client.infer(replay, [flat], codec='lz4')
        assert seen == {'decode': {'cpu'}, 'segment': {'lane'}}, 'a codec: decoded by a worker'
        assert all(torch.equal(a, b) for a, b in zip(outputs, leaves(keypoint_net()(x))))
        assert all(torch.equal(a, b) for a, b in zip(packed, leaves(keypoint_net()(flat))))
    finally:
        client.close()
