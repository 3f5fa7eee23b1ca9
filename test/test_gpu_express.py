"""
The express path on a CUDA server: its reply built while the graph runs, sent after the wait.

``ExpressJob.serve`` launches the express graph, builds the reply's header and
body (the page-locked output buffers, not yet written) before it waits for the
lane's stream, and sends only after the wait.  These tests check that every
reply carries its own request's outputs (consecutive inputs, small and 6 MiB
outputs: a reply sent before the wait would carry the last request's bytes or a
mix), in that order on the I/O thread, and that a failed wait answers the
request and frees the lane.  Skipped without CUDA.
"""

import threading

import pytest
import torch

from rrto_ros.client import RemoteError, RrtoClient
from rrto_ros.zoo import keypoint_net
from rrto_server.express_job import ExpressJob
from rrto_server.requests import Request
from rrto_wire import treespec
from rrto_testing import prepare

from test_gpu_transfers import Upsample   # the 4x upsampling conv

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]

SIZE = (1, 3, 64, 96)   # Upsample's output: 6 MiB, a zero-copy tracked reply


def _spy(monkeypatch, order):
    """Note, per call on the I/O thread, the reply built, the stream waited for, the send."""
    def note(name, fn):
        def wrapper(*args, **kwargs):
            if threading.current_thread().name == 'rrto-io':
                order.append(name)
            return fn(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(ExpressJob, 'reply_parts', note('built', ExpressJob.reply_parts))
    monkeypatch.setattr(torch.cuda.Stream, 'synchronize',
                        note('waited', torch.cuda.Stream.synchronize))
    monkeypatch.setattr(Request, 'ok_ready', note('sent', Request.ok_ready))


@pytest.mark.parametrize('model_cls', [keypoint_net, Upsample])
def test_each_reply_is_built_during_the_graph_and_sent_after_the_wait(
        make_server, monkeypatch, model_cls):
    model = model_cls().eval()
    server = make_server(device='cuda', inline_max_ms=1000.0)
    x = torch.randn(*SIZE)
    key = prepare(server.endpoint, model, x)
    replay = server.replays.get(key)
    assert replay.express is not None and replay.express.body is not None
    client = RrtoClient(server.endpoint, call_timeout_ms=30000)
    order = []
    try:
        client.infer(key, [x])      # served runs: the express path from here on
        client.infer(key, [x])
        client.infer(key, [x])
        _spy(monkeypatch, order)
        gen = torch.Generator().manual_seed(1)
        for _ in range(20):
            y = torch.randn(*SIZE, generator=gen)
            order.clear()
            outputs, header = client.infer(key, [y])
            assert order == ['built', 'waited', 'sent'], 'built, waited for, then sent'
            expected = treespec.flatten(model(y))[0]
            assert all(torch.allclose(a, e, rtol=1e-4, atol=1e-5)
                       for a, e in zip(outputs, expected)), 'its own outputs, whole'
            assert header['timing']['compute_ms'] > 0 and header['server_ms'] > 0
        general = replay.start([y]).run()       # the general path on the last input
        assert all(torch.equal(a, b) for a, b in zip(outputs, general)), 'bit for bit'
        stats = client.stats()
        assert stats['double_answers'] == 0 and stats['open_requests'] == 0
    finally:
        client.close()


def test_a_failed_wait_answers_the_request_and_frees_the_lane(make_server, monkeypatch):
    model = keypoint_net()
    server = make_server(device='cuda', inline_max_ms=1000.0)
    x = torch.randn(*SIZE)
    key = prepare(server.endpoint, model, x)
    client = RrtoClient(server.endpoint, call_timeout_ms=30000)
    real = torch.cuda.Stream.synchronize
    failing = []

    def synchronize(stream):
        real(stream)
        if failing and threading.current_thread().name == 'rrto-io':
            failing.pop()
            raise RuntimeError('CUDA error: an illegal memory access was encountered')
    try:
        for _ in range(3):
            client.infer(key, [x])
        monkeypatch.setattr(torch.cuda.Stream, 'synchronize', synchronize)
        failing.append(True)
        with pytest.raises(RemoteError) as failed:
            client.infer(key, [x])
        assert failed.value.code == 'internal'
        assert server.scheduler.running() == [], 'the lane is free again'
        outputs, _ = client.infer(key, [x])     # served again, on the express path
        assert all(torch.allclose(a, e, rtol=1e-4, atol=1e-5)
                   for a, e in zip(outputs, treespec.flatten(model(x))[0]))
        stats = client.stats()
        assert stats['double_answers'] == 0 and stats['open_requests'] == 0
        assert stats['scheduler']['failed'] == 1
    finally:
        client.close()
