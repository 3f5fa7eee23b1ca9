"""The attacks of a9's review (docs/security.md, findings 1-13): each one is refused now."""

import io
import json
import struct
import threading
import time

import exploits
import msgspec
import numpy as np
import pytest
import torch
import zmq
from PIL import Image
from rrto_testing import SentReplies, exchange, raw_socket, reply_header

from rrto_ros.client import RemoteError, RrtoClient
from rrto_server import store as store_module
from rrto_server.requests import OpenRequests, ReplySender, Request
from rrto_server.sandbox import FREE
from rrto_server import segments
from rrto_server.models import ModelRegistry
from rrto_server.naive import NaiveSessions
from rrto_server.sandbox import Sandbox
from rrto_server.stats import ServerStats
from rrto_server.store import BlobStore

from rrto_wire import codecs
from rrto_wire import protocol as wire
from rrto_wire import messages
from rrto_wire.messages import Kind
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire import program as program_module
from rrto_wire.program import Program, sha256
from rrto_wire.weights import pack_weights
from rrto_wire.tensors import TensorSpec


def _refused(blob: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as err:
        Program.parse(blob)
    return err.value


# ----------------------------------------------------------------------------- 1: static sizes

@pytest.mark.parametrize('op', ['aten.new_zeros.default', 'aten.expand.default',
                                'aten.repeat.default', 'aten.full.default'])
def test_sizes_computed_from_input_values_are_refused(op):
    err = _refused(exploits.size_from_input(op))      # the sandbox's zero inputs give size 0
    assert err.code == ErrorCode.UNSAFE_PROGRAM and 'static' in err.message


@pytest.mark.parametrize('op, args', [
    ('aten.where.default', ({'n': 'x'},)),                        # nonzero: k results
    ('aten.eq.Tensor_list', ([{'n': 'x'}], [{'n': 'x'}])),        # a Python bool
    ('aten.add.t', ([1], [2])),                                   # list concatenation
    ('aten.mul.left_t', ([1], 1 << 40))])                         # a 2**40-element list
def test_operators_on_python_values_or_with_data_dependent_shapes_are_refused(op, args):
    err = _refused(exploits.program([exploits.node('y', op, *args)], ['y']))
    assert err.code == ErrorCode.BAD_REQUEST and 'not allowed' in err.message


def test_a_boolean_mask_index_is_refused_when_it_runs():
    blob = exploits.program([
        exploits.node('m', 'aten.gt.Scalar', {'n': 'x'}, 0.0),
        exploits.node('y', 'aten.index.Tensor', {'n': 'x'}, [{'n': 'm'}])], ['y'])
    module = Program.parse(blob).module({}, torch.device('cpu'))
    with pytest.raises(ValueError, match='data-dependent'):
        module(torch.ones(4))                        # k = 4 here, 12,000 in finding 1


# ----------------------------------------------------------------------------- 2: JPEG scans

def _scan_bomb(repeats: int, progressive: bool = True) -> bytes:
    """A 64x64 grey JPEG whose last scan is repeated: tiny, decoding cost grows with repeats."""
    out = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8), 'L').save(
        out, 'JPEG', progressive=progressive, quality=90)
    data, pos, last = out.getvalue(), 2, None
    while data[pos + 1] != 0xD9:
        end = pos + 2 + struct.unpack('>H', data[pos + 2:pos + 4])[0]
        if data[pos + 1] == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] not in (0, *range(0xD0, 0xD8))):
                end += 1
            last = (pos, end)
        pos = end
    return data[:last[1]] + data[last[0]:last[1]] * repeats + data[last[1]:]


@pytest.mark.parametrize('progressive', [True, False])
def test_jpeg_frames_with_repeated_scans_are_refused_before_decoding(progressive):
    stream = _scan_bomb(200, progressive)
    frame = struct.pack('<2I', 1, len(stream)) + stream
    with pytest.raises(ProtocolError, match='sequential JPEG') as err:
        codecs.decode('jpeg', memoryview(frame), TensorSpec('uint8', (64, 64, 1)), 0)
    assert err.value.code == ErrorCode.BAD_REQUEST
    image = (torch.rand(64, 64, 3) * 255).to(torch.uint8)
    name, good = codecs.encode('jpeg', image)                # our own frames still decode
    assert codecs.decode(name, memoryview(good), TensorSpec('uint8', (64, 64, 3)), 0).shape \
        == (64, 64, 3)


def test_a_probe_checks_its_payload_shape_before_decoding_any_frame(server, zmq_ctx):
    sock = raw_socket(zmq_ctx, server.endpoint)
    stream = _scan_bomb(50)[:-40]         # broken too: a decode attempt would say so
    header = json.dumps({'v': wire.PROTOCOL_VERSION, 'kind': 'probe', 'id': 3, 'tensors': [
        {'dtype': 'uint8', 'shape': [64, 64, 1], 'codec': 'jpeg'}]}).encode()
    reply = exchange(sock, [header, struct.pack('<2I', 1, len(stream)) + stream])
    assert reply['code'] == 'bad_request' and '1-D uint8' in reply['message']


# ----------------------------------------------------------------------------- 5: one reply

def test_a_reply_that_cannot_be_encoded_becomes_an_error_reply_not_silence():
    sent, registry, stats = SentReplies(), OpenRequests(), ServerStats()
    request = Request([b'peer'], time.perf_counter(), 0, sent, registry, stats)
    request.ok(stats={'label': '\ud800'})               # a lone surrogate: not UTF-8
    assert len(sent.messages) == 1 and len(registry) == 0
    reply = msgspec.json.decode(sent.messages[0][1])
    assert reply['kind'] == 'error' and 'not encodable' in reply['message']


def test_a_program_label_with_a_lone_surrogate_is_refused_at_upload():
    doc = json.loads(exploits.program([exploits.node('y', 'aten.relu.default', {'n': 'x'})],
                                      ['y']))
    doc['label'] = 'model'
    blob = json.dumps(doc).encode().replace(b'"model"', b'"\\ud800"')
    assert _refused(blob).code == ErrorCode.BAD_REQUEST


# ----------------------------------------------------------------------------- 9: bad blobs

def _weights(index, data: bytes = b'\0' * 4) -> bytes:
    header = json.dumps({'tensors': index}).encode()
    blob = b'RRTOWTS1' + struct.pack('<Q', len(header)) + header
    return blob + b'\0' * ((-len(blob)) % 64) + data


_ENTRY = {'key': 'a', 'dtype': 'float32', 'shape': [1], 'nbytes': 4, 'offset': 0}
_MALFORMED = {
    'program nested 100k deep': ('program', b'[' * 100_000),
    'program arguments nested 100k deep': ('program', exploits.program(
        [exploits.node('y', 'aten.relu.default', {'n': 'x'})], ['y']).replace(
            b'"args": [{"n": "x"}]', b'"args": ' + b'[' * 50_000 + b']' * 50_000)),
    'reference {"n": [1]}': ('program', exploits.program(
        [exploits.node('y', 'aten.relu.default', {'n': [1]})], ['y'])),
    'output {"n": {}}': ('program', json.dumps({
        'format': 'rrto-program', 'version': 1, 'inputs': [], 'in_spec': 'T',
        'out_spec': {'tuple': ['T']}, 'nodes': [], 'outputs': [{'n': {'a': 1}}]}).encode()),
    'weight without offset': ('weights', _weights([{k: v for k, v in _ENTRY.items()
                                                    if k != 'offset'}])),
    'weight offset "x"': ('weights', _weights([dict(_ENTRY, offset='x')])),
    'negative weight offset': ('weights', _weights([dict(_ENTRY, offset=-100_000)])),
    'weights tensors = 5': ('weights', _weights(5)),
    'weight key [1]': ('weights', _weights([dict(_ENTRY, key=[1])])),
    'weights header nested 100k deep': ('weights', b'RRTOWTS1' + struct.pack('<Q', 100_000)
                                        + b'[' * 100_000),
}


@pytest.mark.parametrize('case', sorted(_MALFORMED))
def test_a_malformed_blob_is_refused_as_bad_request_and_leaves_no_partial_file(case, tmp_path):
    kind, blob = _MALFORMED[case]
    store = BlobStore(tmp_path / 'store')
    with pytest.raises(ProtocolError) as err:
        store.put(sha256(blob), kind, blob)
    assert err.value.code == ErrorCode.BAD_REQUEST, err.value.message
    assert not store.has(sha256(blob)) and not list((tmp_path / 'store').rglob('*.local'))


def test_a_part_file_goes_whatever_refuses_the_blob(tmp_path, monkeypatch):
    store = BlobStore(tmp_path / 'store')
    blob = b'{}'
    monkeypatch.setattr(store_module, 'check_kind', _raises_memory_error)
    with pytest.raises(MemoryError):
        store.put(sha256(blob), 'program', blob)
    assert not list((tmp_path / 'store').rglob('*.local'))


def _raises_memory_error(kind, data):
    raise MemoryError('a parser ran out of memory')


# ----------------------------------------------------------------------------- 11: exec_failed

def test_a_model_failing_on_its_input_is_answered_exec_failed_and_the_server_goes_on(server):
    blob = exploits.program([                # x // (x + 1) in int64: fine on the trial's zeros
        exploits.node('i', 'aten._to_copy.default', {'n': 'x'}, dtype={'dtype': 'int64'}),
        exploits.node('d', 'aten.add.Scalar', {'n': 'i'}, 1),
        exploits.node('q', 'aten.div.Tensor_mode', {'n': 'i'}, {'n': 'd'},
                      rounding_mode='floor'),
        exploits.node('y', 'aten._to_copy.default', {'n': 'q'}, dtype={'dtype': 'float32'},
                      out=('float32', (4,)))], ['y'])
    client = RrtoClient(server.endpoint, call_timeout_ms=60_000)
    try:
        client.upload({sha256(blob): ('program', blob)})
        reply, _ = client.call(Kind.RECORD, {'model': sha256(blob), 'signature': [
            {'dtype': 'float32', 'shape': [4]}]})
        (y,), _ = client.infer(reply['replay'], [torch.full((4,), 3.0)])
        assert torch.equal(y, torch.zeros(4))
        with pytest.raises(RemoteError) as err:
            client.infer(reply['replay'], [torch.full((4,), -1.0)])    # divides by zero
        assert err.value.code == 'exec_failed', err.value
        (y,), _ = client.infer(reply['replay'], [torch.full((4,), 7.0)])
        assert torch.equal(y, torch.zeros(4))
    finally:
        client.close()


# ----------------------------------------------------------------------------- 6: store quota

def _blob(nbytes: int, seed: int = 0) -> bytes:
    """A valid weights blob of about ``nbytes`` bytes."""
    return pack_weights({'w': torch.full((nbytes // 4,), float(seed))})


def _start(store, blob: bytes, upload: str, owner=None, quota=None, chunk=64):
    return store.put_chunk(sha256(blob), 'weights', upload, 0, len(blob),
                           memoryview(blob)[:chunk], owner, quota)


def test_interleaved_and_abandoned_uploads_count_against_the_store_quota(tmp_path):
    store = BlobStore(tmp_path, max_store_bytes=4096)
    first, second = _blob(2500, 1), _blob(2500, 2)
    assert _start(store, first, 'a') is False                 # reserves its 2.5 KB
    with pytest.raises(ProtocolError) as err:
        _start(store, second, 'b')                             # would be 5 KB of 4 KB
    assert err.value.code == ErrorCode.TOO_LARGE
    assert not list(store.partial.glob(f'{sha256(second)}.*'))
    store.sweep_partial()
    with pytest.raises(ProtocolError):
        _start(store, second, 'b')                             # a live upload still reserves
    store.partial_ttl_s = 0.0
    time.sleep(0.01)
    assert store.sweep_partial() == 1                          # an abandoned one expires
    assert _start(store, second, 'b') is False


def test_a_key_cannot_exceed_its_quota_with_interleaved_uploads(tmp_path):
    store = BlobStore(tmp_path)
    assert _start(store, _blob(2500, 1), 'a', 'mallory', 4096) is False
    with pytest.raises(ProtocolError) as err:
        _start(store, _blob(2500, 2), 'b', 'mallory', 4096)
    assert err.value.code == ErrorCode.FORBIDDEN
    assert _start(store, _blob(2500, 3), 'c', 'victim', 4096) is False


def test_the_total_of_an_upload_is_fixed_by_its_first_chunk(tmp_path):
    store = BlobStore(tmp_path, max_store_bytes=4096)
    blob = _blob(8000)
    store.put_chunk(sha256(blob), 'weights', 'u', 0, 64, memoryview(blob)[:32])
    with pytest.raises(ProtocolError, match='declared 64 bytes') as err:
        store.put_chunk(sha256(blob), 'weights', 'u', 32, len(blob), memoryview(blob)[32:])
    assert err.value.code == ErrorCode.BAD_REQUEST and not store.has(sha256(blob))


def test_starting_an_upload_evicts_nothing_committing_one_evicts_what_it_needs(tmp_path):
    store = BlobStore(tmp_path, max_store_bytes=4096)
    old = _blob(2500, 1)
    store.put(sha256(old), 'weights', old)
    new = _blob(2500, 2)
    assert _start(store, new, 'n') is False
    assert store.has(sha256(old)) and store.evictions == 0
    store.put_chunk(sha256(new), 'weights', 'n', 64, len(new), memoryview(new)[64:])
    assert store.has(sha256(new)) and not store.has(sha256(old)) and store.evictions == 1


# ----------------------------------------------------------------------------- 12: ownership

def test_a_key_owns_a_stored_blob_only_after_uploading_all_its_bytes(tmp_path):
    store = BlobStore(tmp_path)
    blob = _blob(1000)
    store.put_chunk(sha256(blob), 'weights', 'v', 0, len(blob), memoryview(blob), 'victim')
    for claim in (b'x', blob[:-1] + b'?'):          # a 1-byte put, then one wrong byte
        with pytest.raises(ProtocolError) as err:
            store.put_chunk(sha256(blob), 'weights', 'm', 0, len(claim), memoryview(claim),
                            'mallory')
        assert err.value.code == ErrorCode.DIGEST and store.owners(sha256(blob)) == ['victim']
    assert store.put_chunk(sha256(blob), 'weights', 'm3', 0, len(blob), memoryview(blob),
                           'mallory') is True
    assert store.owners(sha256(blob)) == ['victim', 'mallory']
    assert not list(store.partial.iterdir())


def test_a_key_sees_only_its_own_task_names_in_stats(make_server):
    server = make_server()
    server.tasks.arrived('victim/front_camera/detect', 3, 'victim')
    server.tasks.arrived('eve/probe', 1, 'eve')
    assert list(server.snapshot(client='eve')['tasks']) == ['eve/probe']
    assert list(server.snapshot()['tasks']) == ['eve/probe', 'victim/front_camera/detect']


# ----------------------------------------------------------------------------- 3: ONNX trials

def test_an_onnx_model_is_tried_at_the_exact_signature_recorded(tmp_path):
    blob = exploits.onnx_symbolic_add_one()
    store = BlobStore(tmp_path / 'store')
    store.put(sha256(blob), 'onnx', blob)
    sandbox = Sandbox(store.root, max_bytes=128 << 20, max_s=20)
    assert sandbox.check(sha256(blob), 'onnx', pay=FREE).outcome == 'safe'          # N = 1
    assert sandbox.check(sha256(blob), 'onnx', [[1000]], pay=FREE).outcome == 'safe'
    with pytest.raises(ProtocolError) as err:                              # 2 x 256 MiB
        sandbox.check(sha256(blob), 'onnx', [[1 << 26]], pay=FREE)
    assert err.value.code == ErrorCode.UNSAFE_PROGRAM


def test_constants_folded_while_the_onnx_session_loads_count_in_its_memory(tmp_path):
    blob = exploits.onnx_folds_into(8192)                                  # 256 MiB folded
    store = BlobStore(tmp_path / 'store')
    store.put(sha256(blob), 'onnx', blob)
    with pytest.raises(ProtocolError) as err:
        Sandbox(store.root, max_bytes=128 << 20, max_s=20).check(sha256(blob), 'onnx', pay=FREE)
    assert err.value.code == ErrorCode.UNSAFE_PROGRAM


# ----------------------------------------------------------------------------- 7: aliases

_W = {'n': 'p_w'}


@pytest.mark.parametrize('via', [
    [exploits.node('a', 'aten.type_as.default', _W, _W)],
    [exploits.node('a', 'aten.dropout.default', _W, 0.5, False)],
    [exploits.node('a', 'aten.einsum.default', 'i->i', [_W])],
    [exploits.node('a', 'aten._unsafe_view.default', _W, [4])],
    [exploits.node('m', 'aten.meshgrid.default', [_W]),
     exploits.node('a', 'operator.getitem', {'n': 'm'}, 0)]])
def test_operators_returning_their_input_unannotated_count_as_views(via):
    blob = exploits.program(via + [
        exploits.node('z', 'aten.add_.Tensor', {'n': 'a'}, 1.0),
        exploits.node('y', 'aten.mul.Tensor', {'n': 'x'}, _W, out=('float32', (4,)))],
        ['y'], params={'p_w': 'w'}, weights=exploits.weights_blob())
    err = _refused(blob)
    assert err.code == ErrorCode.UNSAFE_PROGRAM and 'writes into' in err.message


@pytest.mark.parametrize('op, args', [
    ('aten.batch_norm.default', ({'n': 'xx'}, None, None, _W, _W, True, 0.1, 1e-5, False)),
    ('aten.native_batch_norm.default', ({'n': 'xx'}, None, None, _W, _W, True, 0.1, 1e-5)),
    ('aten.instance_norm.default', ({'n': 'xx'}, None, None, _W, _W, True, 0.1, 1e-5, False)),
    ('aten.dropout.default', ({'n': 'xx'}, 0.5, True))])
def test_training_mode_norms_and_dropout_are_refused(op, args):
    def blob(training):
        call = [training if a is True else a for a in args]
        return exploits.program([
            exploits.node('xx', 'aten.reshape.default', {'n': 'x'}, [1, 4]),
            exploits.node('b', op, *call)], ['b'],
            params={'p_w': 'w'}, weights=exploits.weights_blob())
    err = _refused(blob(True))
    assert err.code == ErrorCode.UNSAFE_PROGRAM and 'training mode' in err.message
    Program.parse(blob(False))                               # eval mode is an inference graph


# ----------------------------------------------------------------------------- 4: sizes of work

def _chain(length: int) -> bytes:
    nodes, last = [], 'x'
    for i in range(length):
        nodes.append(exploits.node(f'a{i}', 'aten.add.Tensor', {'n': last}, {'n': 'x'},
                                   out=('float32', (4,))))
        last = f'a{i}'
    return exploits.program(nodes, [last])


def test_a_program_has_a_bounded_number_of_nodes():
    err = _refused(_chain(program_module.MAX_NODES + 1))
    assert err.code == ErrorCode.BAD_REQUEST and 'at most' in err.message


def test_a_record_has_a_bounded_number_of_segments():
    program = Program.parse(_chain(segments.MAX_SEGMENTS + 10))
    assert len(segments.bounds(program, f'ops:{segments.MAX_SEGMENTS // 2}')) == 2
    with pytest.raises(ProtocolError, match='segments') as err:
        segments.bounds(program, 'ops:1')
    assert err.value.code == ErrorCode.BAD_REQUEST


def test_live_ranges_match_their_definition():
    program = Program.parse(exploits.program([
        exploits.node('s', 'aten.split.Tensor', {'n': 'x'}, 2),
        exploits.node('a', 'operator.getitem', {'n': 's'}, 0),
        exploits.node('b', 'operator.getitem', {'n': 's'}, 1),
        exploits.node('c', 'aten.mul.Tensor', {'n': 'a'}, {'n': 'p_w'}, out=('float32', (2,))),
        exploits.node('d', 'aten.add.Tensor', {'n': 'b'}, 1.0, out=('float32', (2,))),
        exploits.node('e', 'aten.cat.default', [{'n': 'c'}, {'n': 'd'}],
                      out=('float32', (4,)))], ['e', 'a'], params={'p_w': 'w'},
        weights=exploits.weights_blob()))
    names = [n.name for n in program.nodes]
    for cuts in ([], [3], [1, 4], [1, 2, 3, 4, 5]):
        edges = [0] + cuts + [len(names)]
        expected = []
        for a, b in zip(edges, edges[1:]):
            used = set().union(*(n.refs for n in program.nodes[a:b]))
            later = set().union(*(n.refs for n in program.nodes[b:])) | {'e', 'a'}
            expected.append((sorted(used - set(names[a:b]) - {'p_w'}),
                             [n for n in names[a:b] if n in later]))
        assert program.live_ranges(cuts) == expected, cuts


# ----------------------------------------------------------------------------- 8: reply memory

def test_many_connections_that_never_read_share_one_reply_budget():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind('inproc://replies')       # inproc: a reply's frames live until they are read
    stats = ServerStats()
    sender = ReplySender(ctx, router, stats, peer_bytes=3 << 20, total_bytes=4 << 20)
    sender.io_thread = threading.get_ident()
    peers = []
    try:
        for _ in range(4):                # each peer within its own 3 MiB; 8 MiB in all
            peer = ctx.socket(zmq.DEALER)
            peer.connect('inproc://replies')
            peer.send(b'request')
            envelope = router.recv_multipart(copy=False)[:1]
            for _ in range(2):
                request = Request(envelope, time.perf_counter(), 0, sender, OpenRequests(),
                                  stats)
                request.ok([torch.zeros(1 << 18)])           # 1 MiB, never read
            peers.append(peer)
        assert dict(stats.dropped_replies) == {'reply_memory': 5}      # 3 of 8 fit in 4 MiB
    finally:
        for sock in peers + [router, sender.outbox]:
            sock.close(linger=0)
        ctx.term()


# ----------------------------------------------------------------------------- 10: put queue

def test_uploads_queued_behind_a_busy_control_thread_are_bounded(make_server, zmq_ctx):
    """In all 4 messages' bytes, half of them per key (a10 #3: per connection here)."""
    server = make_server(max_message_bytes=1 << 20)              # 4 queued messages in all
    busy = threading.Event()
    server.control.queue.submit(busy.wait)                             # as a long sandbox trial
    socks = [raw_socket(zmq_ctx, server.endpoint) for _ in range(3)]
    chunk = torch.zeros(900_000, dtype=torch.uint8)
    try:
        for i in range(9):                                       # 3 from each connection
            socks[i // 3].send_multipart(wire.encode({
                'kind': 'put', 'id': i, 'digest': f'{i:02x}' * 32, 'blob_kind': 'weights',
                'upload': f'u{i}', 'offset': 0, 'total': 1 << 20}, [chunk]))
            time.sleep(0.05)                                     # in this order
        refused = []
        for sock, count in zip(socks, (1, 1, 3)):                # while the thread is busy
            for _ in range(count):
                assert sock.poll(10_000)
                refused.append(reply_header(sock.recv_multipart()[0], 'put'))
        assert [(r['code'], r['id']) for r in refused] == [
            ('overloaded', 2), ('overloaded', 5), ('overloaded', 6), ('overloaded', 7),
            ('overloaded', 8)], refused
    finally:
        busy.set()
    replies = [reply_header(sock.recv_multipart()[0], 'put') for sock in socks[:2]
               for _ in range(2)]
    assert sorted(r['id'] for r in replies if r['kind'] == 'ok') == [0, 1, 3, 4], replies


# ----------------------------------------------------------------------------- 13: naive

def _op(op: str, *args, out: str = 'z', session: str = 's'):
    return messages.decode_request(wire.encode({
        'kind': 'op', 'id': 1, 'model': _NAIVE_DIGEST, 'session': session, 'op': op,
        'args': list(args), 'out': out, 'fetch': []})[0])


_NAIVE_PROGRAM, _NAIVE_WEIGHTS = exploits.scale_by_weights()
_NAIVE_DIGEST = sha256(_NAIVE_PROGRAM)


def test_naive_sessions_are_bounded_in_bytes_before_a_result_is_allocated(tmp_path):
    store = BlobStore(tmp_path)
    store.put(sha256(_NAIVE_WEIGHTS), 'weights', _NAIVE_WEIGHTS)
    store.put(_NAIVE_DIGEST, 'program', _NAIVE_PROGRAM)
    naive = NaiveSessions(ModelRegistry(store), torch.device('cpu'), session_bytes=1 << 20)
    naive.run('s', _op('aten.ones.default', [1 << 17], out='a'), [])     # 512 KiB: fits
    with pytest.raises(ProtocolError) as err:
        naive.run('s', _op('aten.ones.default', [1 << 18], out='b'), [])  # 1 MiB more: no
    assert err.value.code == ErrorCode.TOO_LARGE
    with pytest.raises(ProtocolError) as err:                # 4 TiB: refused, never tried
        naive.run('t', _op('aten.ones.default', [1 << 40], out='c'), [])
    assert err.value.code == ErrorCode.TOO_LARGE
    for i in range(8):                                       # 4 sessions' bytes in all
        try:
            naive.run(f'u{i}', _op('aten.ones.default', [200_000], out='d', session=f'u{i}'),
                      [])
        except ProtocolError as exc:
            assert exc.code == ErrorCode.TOO_LARGE and i >= 4
