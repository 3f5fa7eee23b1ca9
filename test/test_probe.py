"""The ``probe`` request: payloads of a requested size up and down, bad probes rejected."""

import pytest
import torch
from rrto_testing import exchange, raw_socket, reply_header

from rrto_wire import messages
from rrto_wire import protocol as wire
from rrto_wire.limits import MAX_PROBE_BYTES


def _probe(sock, payload=(), **fields):
    header = {'kind': 'probe', 'id': 9}
    header.update(fields)
    sock.send_multipart(wire.encode(header, list(payload)))
    assert sock.poll(5000), 'server did not reply'
    frames = [bytearray(f) for f in sock.recv_multipart()]   # writable, as zmq frames are
    return reply_header(frames[0], 'probe'), frames[1:]


def test_probe_carries_payloads_of_the_requested_sizes(server, zmq_ctx):
    sock = raw_socket(zmq_ctx, server.endpoint)
    reply, frames = _probe(sock)
    assert reply['kind'] == 'ok' and frames == [] and reply['server_ms'] >= 0
    up = torch.zeros(100_000, dtype=torch.uint8)
    reply, frames = _probe(sock, [up], reply_bytes=50_000)
    assert reply['kind'] == 'ok' and reply['received_bytes'] > 100_000
    assert [len(f) for f in frames] == [50_000]
    (down,) = wire.decode_tensors(
        [messages.Frame(**d) for d in reply['tensors']], frames, 1 << 20)
    assert down.dtype == torch.uint8 and down.shape == (50_000,)
    assert server.snapshot()['requests']['probe'] == 2


@pytest.mark.parametrize('fields, payload, code', [
    ({'reply_bytes': -1}, [], 'bad_request'),
    ({'reply_bytes': 'lots'}, [], 'bad_request'),
    ({'reply_bytes': True}, [], 'bad_request'),
    ({'reply_bytes': 1.5}, [], 'bad_request'),
    ({'reply_bytes': MAX_PROBE_BYTES + 1}, [], 'too_large'),
    ({}, [torch.zeros(4, dtype=torch.float32)], 'bad_request'),
    ({}, [torch.zeros(2, 2, dtype=torch.uint8)], 'bad_request'),
    ({}, [torch.zeros(4, dtype=torch.uint8)] * 2, 'bad_request'),
])
def test_bad_probes_get_an_error_reply_and_service_goes_on(server, zmq_ctx, fields, payload,
                                                           code):
    sock = raw_socket(zmq_ctx, server.endpoint)
    reply, frames = _probe(sock, payload, **fields)
    assert reply['kind'] == 'error' and reply['code'] == code, reply
    assert frames == []
    assert exchange(sock, wire.encode({'kind': 'hello', 'id': 2}))['kind'] == 'ok'


def test_probe_replies_never_exceed_the_servers_message_limit(make_server, zmq_ctx):
    server = make_server(max_message_bytes=1 << 20)
    sock = raw_socket(zmq_ctx, server.endpoint)
    reply, _ = _probe(sock, reply_bytes=(1 << 20) + 1)
    assert reply['code'] == 'too_large' and str(1 << 20) in reply['message']
