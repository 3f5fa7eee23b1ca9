"""
The robot never trusts a reply's structure (a10's finding 7, docs/security.md).

A proxy in front of a real server rewrites the INFER replies the way a man in
the middle on an unkeyed link (or a compromised replica) could: each rewritten
reply gives a local fallback equal to the local output with a ``bad_reply``
reason, never an OFFLOADED result, and the next honest reply is offloaded again.
"""

import json
import threading

import pytest
import torch
import zmq
import zstandard

from rrto_ros import OffloadResult
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.messages import Frame


def _rewrite(header: dict, frames: list, mode: str) -> list:
    if mode in ('fewer', 'over'):
        return _rewrite_detections(header, mode)
    if mode == 'shape':         # one float32[1] instead of float32[1, 4]
        header['tensors'] = [{'dtype': 'float32', 'shape': [1], 'codec': 'raw'}]
        return [torch.tensor([42.0]).numpy().tobytes()]
    if mode == 'count':         # the outputs left out
        header['tensors'] = []
        return []
    if mode == 'extra':         # one output too many
        header['tensors'] = header['tensors'] * 2
        return frames * 2
    if mode == 'dtype':         # the same bytes read as another dtype of the same size
        header['tensors'] = [dict(t, dtype='int32') for t in header['tensors']]
        return frames
    if mode == 'bomb':          # a 2 KB zstd frame that declares 64 MiB
        n = 64 << 20
        header['tensors'] = [{'dtype': 'uint8', 'shape': [n], 'codec': 'zstd'}]
        return [zstandard.ZstdCompressor().compress(bytes(n))]
    return frames


class RewritingProxy:
    """A ROUTER in front of a server's endpoint that rewrites INFER replies per ``mode``."""

    def __init__(self, backend: str, ctx: zmq.Context):
        self.mode = 'none'
        self.front = ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        port = self.front.bind_to_random_port('tcp://127.0.0.1')
        self.endpoint = f'tcp://127.0.0.1:{port}'
        self.back = ctx.socket(zmq.DEALER)
        self.back.setsockopt(zmq.LINGER, 0)
        self.back.connect(backend)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        ident = None
        while not self.stop.is_set():
            ready = dict(poller.poll(50))
            if self.front in ready:
                frames = self.front.recv_multipart()
                ident = frames[0]
                self.back.send_multipart(frames[1:])
            if self.back in ready:
                frames = self.back.recv_multipart()
                header = json.loads(frames[0])
                if header.get('kind') == 'ok' and 'timing' in header:   # an INFER reply
                    tensors = _rewrite(header, frames[1:], self.mode)
                    frames = [json.dumps(header).encode(), *tensors]
                self.front.send_multipart([ident, *frames])

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.front.close(0)
        self.back.close(0)


@pytest.fixture
def proxy(server, zmq_ctx):
    p = RewritingProxy(server.endpoint, zmq_ctx)
    yield p
    p.close()


@pytest.mark.parametrize('mode', ['shape', 'count', 'extra', 'dtype', 'bomb'])
def test_a_reply_unlike_the_export_falls_back_to_local(mode, proxy, offloaded):
    torch.manual_seed(0)
    net = torch.nn.Linear(16, 4).eval()
    x = torch.randn(1, 16)
    om = offloaded(net, proxy.endpoint, timeout_ms=30000)
    assert om.warmup(x, timeout_s=120)
    out = om(x)
    assert om.last.result == OffloadResult.OFFLOADED     # the honest reply
    torch.testing.assert_close(out, net(x), rtol=0, atol=1e-5)
    proxy.mode = mode
    for _ in range(2):      # a bad reply never marks the model failed: each call falls back
        out = om(x)
        assert om.last.result == OffloadResult.LOCAL_FALLBACK, om.last
        assert ErrorCode.BAD_REPLY.value in om.last.reason, om.last.reason
        torch.testing.assert_close(out, net(x), rtol=0, atol=0)
    proxy.mode = 'none'
    out = om(x)
    assert om.last.result == OffloadResult.OFFLOADED, om.last.reason
    torch.testing.assert_close(out, net(x), rtol=0, atol=1e-5)


def test_nested_outputs_with_one_leaf_missing_fall_back(proxy, offloaded):
    class Two(torch.nn.Module):
        def forward(self, x):
            return {'a': x * 2, 'b': (x + 1, x.sum(1))}

    net = Two().eval()
    x = torch.randn(2, 3)
    om = offloaded(net, proxy.endpoint, timeout_ms=30000)
    assert om.warmup(x, timeout_s=120)
    proxy.mode = 'count'
    out = om(x)
    assert om.last.result == OffloadResult.LOCAL_FALLBACK and 'bad_reply' in om.last.reason
    torch.testing.assert_close(out, net(x))


def test_the_decoding_bound_is_the_expected_size():
    from rrto_ros.reply_check import decode_bound
    leaves = (('float32', (1, 4)), ('int64', (3,)))
    frames = [Frame('float32', (1, 4)), Frame('int64', (3,), 'zstd')]
    assert decode_bound(frames, leaves, 1 << 30) == 16 + 24
    assert decode_bound(frames, None, 1 << 30) == 1 << 30        # nothing expected (hello...)
    # a frame that declares more than the model gives is refused before any allocation
    with pytest.raises(ProtocolError) as err:
        decode_bound([Frame('float32', (1, 4)), Frame('int64', (1 << 30,), 'zstd')], leaves,
                     1 << 30)
    assert err.value.code == ErrorCode.BAD_REPLY
    # a dimension only known at the call (an ONNX output's value-dependent size): the
    # known dimensions still hold, the general bound applies
    assert decode_bound([Frame('float32', (7, 4))], (('float32', (None, 4)),), 99) == 99
    with pytest.raises(ProtocolError):
        decode_bound([Frame('float32', (7, 5))], (('float32', (None, 4)),), 99)


def test_an_onnx_batch_dimension_must_be_the_requests():
    import onnx
    from onnx import helper, TensorProto

    from rrto_ros.local_model import Artifact
    from rrto_ros.reply_check import decode_bound, expected
    from rrto_wire.program import sha256
    from rrto_wire.tensors import signature_of
    graph = helper.make_graph(
        [helper.make_node('Relu', ['x'], ['y']), helper.make_node('NonZero', ['x'], ['k'])],
        'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['batch', 4])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['batch', 4]),
         helper.make_tensor_value_info('k', TensorProto.INT64, [2, 'nnz'])])
    data = helper.make_model(graph).SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(data))
    artifact = Artifact(sha256(data), signature_of([torch.zeros(3, 4)]),
                        {'tuple': ['T', 'T']}, {sha256(data): ('onnx', data)})
    leaves = expected(artifact)
    assert leaves == (('float32', (3, 4)), ('int64', (2, None)))
    with pytest.raises(ProtocolError):      # the batch of another request
        decode_bound([Frame('float32', (8, 4)), Frame('int64', (2, 5))], leaves, 99)
    assert decode_bound([Frame('float32', (3, 4)), Frame('int64', (2, 5))], leaves, 99) == 99


class Detections(torch.nn.Module):
    """Boxes and scores over a threshold: two outputs of one data-dependent count."""

    def forward(self, scores: torch.Tensor, boxes: torch.Tensor):
        keep = torch.nonzero(scores > 0.5).squeeze(1)
        return boxes[keep] * 2, scores[keep] + 1


def _detections_doc() -> dict:
    from rrto_wire import treespec
    from rrto_wire.program_writer import from_exported
    example = (torch.rand(16), torch.rand(16, 4))
    ep = torch.export.export(Detections(), example, strict=False)
    _, in_spec = treespec.flatten((example, {}))
    _, out_spec = treespec.flatten(ep.module()(*example))
    return json.loads(from_exported(ep, in_spec, out_spec)[0])


def test_outputs_of_one_data_dependent_size_must_agree_and_stay_in_its_bound():
    # a12's finding 7: each data-dependent size was free on its own, the decoding bound 1 GiB
    from rrto_ros.reply_check import check_outputs, decode_bound, program_outputs
    doc = _detections_doc()
    leaves = program_outputs(doc)      # export proves the count <= 16, the scores' numel
    ok = [Frame('float32', (7, 4)), Frame('float32', (7,))]
    assert decode_bound(ok, leaves, 1 << 30) == 16 * 4 * 4 + 16 * 4
    check_outputs([torch.zeros(7, 4), torch.zeros(7)], leaves)
    for bad in ([(7, 4), (3,)], [(17, 4), (17,)], [(0, 4), (1,)]):
        with pytest.raises(ProtocolError) as err:
            decode_bound([Frame('float32', s) for s in bad], leaves, 1 << 30)
        assert err.value.code == ErrorCode.BAD_REPLY
        with pytest.raises(ProtocolError):
            check_outputs([torch.zeros(s) for s in bad], leaves)
    # no bound known: the general bound applies, the sizes must still agree
    for node in doc['nodes']:
        if node['out'] and 'max' in node['out']:
            node['out']['max'] = [None] * len(node['out']['max'])
    leaves = program_outputs(doc)
    assert decode_bound([Frame('float32', (99, 4)), Frame('float32', (99,))], leaves, 7) == 7
    with pytest.raises(ProtocolError):
        decode_bound([Frame('float32', (99, 4)), Frame('float32', (98,))], leaves, 7)


def _rewrite_detections(header: dict, mode: str) -> list:
    rows = header['tensors'][0]['shape'][0]
    if mode == 'fewer':         # one score fewer than boxes
        shapes = [(rows, 4), (rows - 1,)]
    else:                       # 17 consistent rows where export proves at most 16
        shapes = [(17, 4), (17,)]
    header['tensors'] = [{'dtype': 'float32', 'shape': list(s), 'codec': 'raw'} for s in shapes]
    return [torch.zeros(s).numpy().tobytes() for s in shapes]


@pytest.mark.parametrize('mode', ['fewer', 'over'])
def test_a_dynamic_reply_unlike_its_sizes_falls_back_to_local(mode, proxy, offloaded):
    torch.manual_seed(0)
    net = Detections().eval()
    scores, boxes = torch.rand(16), torch.rand(16, 4)
    want = net(scores, boxes)
    assert 0 < len(want[0]) < 16
    om = offloaded(net, proxy.endpoint, timeout_ms=30000)
    assert om.warmup(scores, boxes, timeout_s=120)
    out = om(scores, boxes)
    assert om.last.result == OffloadResult.OFFLOADED, om.last.reason
    assert all(torch.equal(o, w) for o, w in zip(out, want))
    proxy.mode = mode
    out = om(scores, boxes)
    assert om.last.result == OffloadResult.LOCAL_FALLBACK, om.last
    assert ErrorCode.BAD_REPLY.value in om.last.reason, om.last.reason
    # refused by the size check, before any frame is decoded
    assert ('one size in the model' if mode == 'fewer' else 'at most 16') in om.last.reason
    assert all(torch.equal(o, w) for o, w in zip(out, want))


def test_raw_outputs_as_expected_are_viewed_after_the_same_checks():
    from rrto_ros.reply_check import check_outputs, decode_outputs
    leaves = (('float32', (1, 4)), ('int64', (3,)))
    a, b = torch.arange(4.0).reshape(1, 4), torch.arange(3)
    frames = [bytearray(a.numpy().tobytes()), bytearray(b.numpy().tobytes())]
    descs = [Frame('float32', (1, 4)), Frame('int64', (3,))]
    out = decode_outputs(descs, frames, leaves, 1 << 30)
    assert torch.equal(out[0], a) and torch.equal(out[1], b)
    check_outputs(out, leaves)
    # the descriptors as expected, the frames not: each refused like the general decoding
    for bad in ([frames[0][:-4], frames[1]], [frames[0], frames[1] + b'\0' * 8],
                frames + [b''], frames[:1]):
        with pytest.raises(ProtocolError):
            decode_outputs(descs, bad, leaves, 1 << 30)
    compressed = [frames[0], zstandard.ZstdCompressor().compress(frames[1])]
    out = decode_outputs([descs[0], Frame('int64', (3,), 'zstd')], compressed, leaves, 1 << 30)
    assert torch.equal(out[1], b)
    for outputs in ([a, b.int()], [a, b.reshape(1, 3)], [a], [a, b, b], [a, b.tolist()]):
        with pytest.raises(ProtocolError) as err:
            check_outputs(outputs, leaves)
        assert err.value.code == ErrorCode.BAD_REPLY
