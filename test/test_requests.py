"""Every request is answered exactly once; a peer that never reads cannot pin server memory."""

import collections
import json
import threading
import time

import pytest
import torch
import zmq
from rrto_testing import SentReplies, exchange, raw_socket, reply_header

from rrto_server.requests import OpenRequests, Request
from rrto_server.runner_fx import Tf32Gate
from rrto_server.stats import ServerStats
from rrto_wire import protocol as wire
from rrto_wire.errors import ErrorCode, ProtocolError


def test_a_request_answers_once_and_a_second_answer_is_dropped_and_counted():
    sent, registry, stats = SentReplies(), OpenRequests(), ServerStats()
    request = Request([b'peer'], time.perf_counter(), 0, sent, registry, stats)
    assert len(registry) == 1
    request.ok(complete=True)
    request.error(ProtocolError(ErrorCode.INTERNAL, 'a bug answering twice'))
    assert len(sent.messages) == 1 and len(registry) == 0 and registry.double_answers == 1
    dropped = Request([b'peer'], time.perf_counter(), 0, sent, registry, stats)
    assert registry.kinds() == [dropped.kind], 'an unanswered request stays visible'


def _storm(request_id: int) -> list:
    """Return one malformed (or odd) message per id, cycling through the kinds of damage."""
    cases = [
        [b'\x00\xffnot a header'],
        [json.dumps({'v': 2, 'kind': 'put', 'id': request_id, 'digest': 'ab' * 32,
                     'blob_kind': 'program', 'upload': 'u', 'offset': 0.0, 'total': 4}).encode()],
        [json.dumps({'v': True, 'kind': 'hello', 'id': request_id}).encode()],
        [b'{"v":2,"kind":"hello","id":%d,"x":' % request_id + b'[' * 5000 + b']' * 5000 + b'}'],
        [json.dumps({'v': 2, 'kind': 'infer', 'id': request_id, 'replay': ['x']}).encode()],
        [json.dumps({'v': 2, 'kind': 'infer', 'id': request_id, 'replay': 'r',
                     'tensors': [{'dtype': 'uint8', 'shape': [2 ** 63]}]}).encode(), b''],
        [json.dumps({'v': 2, 'kind': 'record', 'id': request_id, 'model': 'ab' * 32,
                     'signature': []}).encode()],
        wire.encode({'kind': 'probe', 'id': request_id}, [torch.zeros(3, dtype=torch.uint8)],
                    'zstd') + [b'extra frame'],
        wire.encode({'kind': 'hello', 'id': request_id}),
        [],
    ]
    return cases[request_id % len(cases)]


def test_a_storm_of_malformed_requests_is_answered_exactly_once_each(server, zmq_ctx):
    per_socket, sockets = 60, 3
    results = {}

    def client(c: int) -> None:
        sock = raw_socket(zmq_ctx, server.endpoint)
        sent = collections.Counter()
        for i in range(per_socket):
            request_id = c * 1000 + i
            frames = _storm(request_id)
            if not frames:
                continue                    # an empty message is not deliverable by DEALER
            sock.send_multipart(frames)
            sent[None if request_id % 10 in (0, 3) else request_id] += 1
        got = collections.Counter()
        deadline = time.monotonic() + 60
        while sum(got.values()) < sum(sent.values()) and time.monotonic() < deadline:
            if sock.poll(100):
                frame = sock.recv_multipart()[0]
                kind = 'hello' if json.loads(frame)['kind'] == 'ok' else None
                got[reply_header(frame, kind)['id']] += 1
        while sock.poll(300):
            got['after the last'] += 1
        sock.close(linger=0)
        results[c] = (sent, got)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(sockets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == sockets
    for sent, got in results.values():
        assert got == sent, server.snapshot()['dropped_replies']
    snapshot = server.snapshot()
    assert snapshot['open_requests'] == 0 and snapshot['double_answers'] == 0
    assert 'internal' not in snapshot['errors']
    assert exchange(raw_socket(zmq_ctx, server.endpoint),
                    wire.encode({'kind': 'hello', 'id': 1}))['kind'] == 'ok'


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096


def test_a_peer_that_never_reads_cannot_pin_server_memory(make_server, zmq_ctx):
    server = make_server(max_queued_replies=4, max_peer_reply_bytes=16 << 20)
    reader = raw_socket(zmq_ctx, server.endpoint)
    assert exchange(reader, wire.encode({'kind': 'hello', 'id': 0}))['kind'] == 'ok'
    slow = zmq_ctx.socket(zmq.DEALER)
    slow.setsockopt(zmq.LINGER, 0)
    slow.setsockopt(zmq.RCVHWM, 1)
    slow.setsockopt(zmq.RCVBUF, 64 << 10)
    slow.connect(server.endpoint)
    probes, size = 100, 4 << 20
    before = _rss_bytes()
    for i in range(probes):
        slow.send_multipart(wire.encode({'kind': 'probe', 'id': i, 'reply_bytes': size}))
    deadline = time.monotonic() + 60
    while server.snapshot()['requests'].get('probe', 0) < probes:
        assert time.monotonic() < deadline, 'the server did not take every probe'
        time.sleep(0.05)
    time.sleep(0.5)
    held = _rss_bytes() - before
    dropped = server.snapshot()['dropped_replies'].get('slow_peer', 0)
    assert dropped >= probes // 2, dropped
    assert held < probes * size // 2, f'{held >> 20} MiB held for a peer that never reads'
    assert exchange(reader, wire.encode({'kind': 'hello', 'id': 1}))['kind'] == 'ok'
    slow.close(linger=0)


def test_tf32_is_only_switched_while_no_segment_wants_the_other_setting():
    gate, errors = Tf32Gate(), []

    def lane(tf32: bool) -> None:
        for _ in range(200):
            with gate.hold(tf32):
                if torch.backends.cuda.matmul.allow_tf32 != tf32:
                    errors.append(tf32)
                time.sleep(0.0001)
                if torch.backends.cuda.matmul.allow_tf32 != tf32 \
                        or torch.backends.cudnn.allow_tf32 != tf32:
                    errors.append(tf32)

    threads = [threading.Thread(target=lane, args=(i % 2 == 0,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    with gate.hold(False):
        pass
    assert not errors and gate.active == 0


@pytest.mark.parametrize('bad', [b'', b'{}'])
def test_an_answered_request_leaves_nothing_open(server, zmq_ctx, bad):
    sock = raw_socket(zmq_ctx, server.endpoint)
    reply = exchange(sock, [bad])
    assert reply['kind'] == 'error' and reply['code'] in ('bad_request', 'version_mismatch')
    assert server.snapshot()['open_requests'] == 0


def test_every_request_kind_has_exactly_one_handler(server):
    from rrto_wire.messages import REQUEST_TYPES
    assert set(server.handlers) == set(REQUEST_TYPES)
