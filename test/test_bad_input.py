"""Malformed, oversized, unknown, mismatched requests: an error reply each; service goes on."""

import hashlib
import json

import pytest
import torch
import zmq
from rrto_testing import assert_same_as_local, exchange, raw_socket

from rrto_ros import OffloadResult
from rrto_ros.zoo import keypoint_net
from rrto_wire import protocol as wire


@pytest.fixture
def recorded(server, offloaded):
    model = keypoint_net()
    om = offloaded(model, server.endpoint, timeout_ms=30000)
    x = torch.randn(1, 3, 64, 64)
    assert om.warmup(x)
    replay = om.prepared()[0].replay
    return model, om, x, replay


def _infer(replay, tensors, **extra):
    header = {'kind': 'infer', 'id': 5, 'replay': replay}
    header.update(extra)
    return wire.encode(header, tensors)


def _bad_cases(replay, x):
    good = _infer(replay, [x])
    truncated = good[:1] + [bytes(good[1])[:-7]]
    wrong_dtype = _infer(replay, [x.double()])
    wrong_shape = _infer(replay, [torch.randn(1, 3, 32, 32)])
    too_many = _infer(replay, [x, x])
    digest = 'ab' * 32
    return [
        ('garbage', [b'\x00\xffnot a header'], 'bad_request'),
        ('empty', [b''], 'bad_request'),
        ('truncated tensor', truncated, 'bad_request'),
        ('frame count', good[:1] + [bytes(good[1]), b'extra'], 'bad_request'),
        ('wrong dtype', wrong_dtype, 'signature_mismatch'),
        ('wrong shape', wrong_shape, 'signature_mismatch'),
        ('too many inputs', too_many, 'signature_mismatch'),
        ('unknown replay', _infer('nope', [x]), 'not_recorded'),
        ('unknown model', wire.encode({'kind': 'record', 'id': 5, 'model': digest,
                                       'signature': [{'dtype': 'uint8', 'shape': [1]}]}),
         'unknown_model'),
        ('bad digest', wire.encode({'kind': 'missing', 'id': 5, 'digests': ['../../etc/passwd']}),
         'bad_request'),
        ('reply kind', wire.encode({'kind': 'ok', 'id': 5}), 'bad_request'),
        ('old protocol', [json.dumps({'v': 0, 'kind': 'hello', 'id': 5}).encode()],
         'version_mismatch'),
        ('bad priority', _infer(replay, [x], priority='high'), 'bad_request'),
        ('bad options', wire.encode({'kind': 'record', 'id': 5, 'model': digest, 'signature': [],
                                     'options': {'precision': 'fp4'}}), 'bad_request'),
        ('wrong upload digest', wire.encode(
            {'kind': 'put', 'id': 5, 'digest': digest, 'blob_kind': 'program', 'upload': 'u1',
             'offset': 0, 'total': 4}, [torch.tensor([1, 2, 3, 4], dtype=torch.uint8)]),
         'digest_mismatch'),
    ]


def test_each_bad_request_gets_an_error_reply_and_others_are_served(server, recorded, zmq_ctx):
    model, om, x, replay = recorded
    sock = raw_socket(zmq_ctx, server.endpoint)
    for name, frames, code in _bad_cases(replay, x):
        reply = exchange(sock, frames)
        assert reply['kind'] == wire.Kind.ERROR, name
        assert reply['code'] == code, (name, reply)
        assert reply['message'], name
        out = om(x)  # a well-behaved client is still served, correctly
        assert om.last.result == OffloadResult.OFFLOADED, name
        assert_same_as_local(out['heatmaps'], model(x)['heatmaps'])
    errors = server.snapshot()['errors']
    assert sum(errors.values()) == len(_bad_cases(replay, x))


def test_req_sockets_get_replies_too(server, zmq_ctx):
    sock = raw_socket(zmq_ctx, server.endpoint, zmq.REQ)
    assert exchange(sock, [b'junk'])['code'] == 'bad_request'
    assert exchange(sock, wire.encode({'kind': 'hello', 'id': 2}))['kind'] == 'ok'


def test_a_message_part_over_the_limit_drops_the_connection_in_libzmq(make_server, zmq_ctx):
    server = make_server(max_message_bytes=1 << 20)
    sock = raw_socket(zmq_ctx, server.endpoint)
    assert exchange(sock, wire.encode({'kind': 'hello', 'id': 1}))['kind'] == 'ok'
    big = torch.zeros(2 << 20, dtype=torch.uint8)
    sock.send_multipart(_infer('whatever', [big]))
    assert not sock.poll(1500), 'ZMQ_MAXMSGSIZE: dropped before Python saw it, no reply'
    assert server.snapshot()['requests'].get('infer', 0) == 0
    other = raw_socket(zmq_ctx, server.endpoint)
    assert exchange(other, wire.encode({'kind': 'hello', 'id': 3}))['kind'] == 'ok'


def test_parts_that_add_up_over_the_limit_get_a_too_large_reply(make_server, zmq_ctx):
    server = make_server(max_message_bytes=1 << 20)
    sock = raw_socket(zmq_ctx, server.endpoint)
    half = torch.zeros(600_000, dtype=torch.uint8)
    reply = exchange(sock, _infer('whatever', [half, half]))
    assert reply['code'] == 'too_large' and str(1 << 20) in reply['message']
    assert exchange(sock, wire.encode({'kind': 'hello', 'id': 3}))['kind'] == 'ok'


def test_no_upload_server_refuses_uploads_but_serves_stored_models(
        make_server, offloaded, tmp_path):
    store = str(tmp_path / 'shared-store')
    seeding = make_server(store=store)
    model = keypoint_net()
    x = torch.randn(1, 3, 64, 64)
    assert offloaded(model, seeding.endpoint, timeout_ms=30000).warmup(x)

    locked = make_server(store=store, allow_upload=False)
    om = offloaded(model, locked.endpoint, timeout_ms=30000)
    assert om.warmup(x)
    om(x)
    assert om.last.result == OffloadResult.OFFLOADED and om.stats()['uploads'] == 0

    other = offloaded(keypoint_net(seed=1), locked.endpoint, timeout_ms=30000)
    assert not other.warmup(x)
    other(x)
    assert other.last.result == OffloadResult.LOCAL and 'upload_disabled' in other.last.reason


def test_blob_digests_are_checked_before_anything_is_stored(server, zmq_ctx):
    sock = raw_socket(zmq_ctx, server.endpoint)
    data = b'{"format": "rrto-program"}'
    digest = hashlib.sha256(data).hexdigest()
    chunk = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    reply = exchange(sock,
                     wire.encode({'kind': 'put',
                                  'id': 1,
                                  'digest': digest,
                                  'blob_kind': 'program',
                                  'upload': 'x',
                                  'offset': 0,
                                  'total': len(data)},
                                 [chunk]))
    assert reply['code'] == 'bad_request' and 'invalid program' in reply['message']
    record = wire.encode({'kind': 'record', 'id': 2, 'model': digest, 'signature': []})
    assert exchange(sock, record)['code'] == 'unknown_model'   # refused blobs are not stored
