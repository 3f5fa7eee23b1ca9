"""
An INFER's header kept apart from its id (issue 11): what goes out is what wire.encode gives.

The client keeps, per replay, keys and input dtypes and shapes, the bytes of an INFER's
header before and after its id, and sends later calls' headers from them; every header
must still be byte for byte the one :func:`rrto_wire.protocol.encode` builds for that call.
"""

import pytest
import torch
import zmq

from rrto_ros.client import RrtoClient
from rrto_wire import protocol as wire
from rrto_wire.messages import Kind

TIMING = {'queue_ms': 0.0, 'compute_ms': 0.0}


def _calls(calls):
    """Run each (tensors, keys) INFER against a ROUTER; return (headers sent, encode's)."""
    ctx = zmq.Context()
    srv = ctx.socket(zmq.ROUTER)
    robot = RrtoClient(f'tcp://127.0.0.1:{srv.bind_to_random_port("tcp://127.0.0.1")}',
                       call_timeout_ms=10000, context=ctx)
    sent, expected = [], []
    try:
        for tensors, keys in calls:
            pending = robot.start_infer('replay-1', tensors, **keys)
            assert srv.poll(10000)
            ident, header, *frames = srv.recv_multipart()
            got = bytes(header)
            request_id = int(got.split(b'"id":', 1)[1].split(b',', 1)[0])
            fields = {'kind': Kind.INFER, 'id': request_id, 'replay': 'replay-1'}
            fields.update({k: v for k, v in keys.items() if v is not None})
            want = wire.encode(fields, tensors)
            sent.append((got, [bytes(f) for f in frames]))
            expected.append((bytes(want[0]), [bytes(f) for f in want[1:]]))
            reply = wire.encode({'kind': 'ok', 'id': request_id, 'timing': TIMING}, [])
            srv.send_multipart([ident, bytes(reply[0])])
            pending.result()
    finally:
        robot.close()
        srv.close(linger=0)
        ctx.destroy(linger=0)
    return sent, expected


def test_repeated_infers_send_what_encode_gives_byte_for_byte():
    frame = torch.arange(24, dtype=torch.uint8).reshape(1, 2, 4, 3)
    keys = {'priority': 3, 'deadline_ms': None, 'task': 'cam "front"', 'late': None}
    sent, expected = _calls([([frame], keys)] * 4)
    assert sent == expected


@pytest.mark.parametrize('second', [
    ({'deadline_ms': 5, 'priority': None}, 'the same values under other keys'),
    ({'priority': 5, 'deadline_ms': None}, 'another value'),
])
def test_other_keys_get_their_own_header(second):
    frame = torch.zeros(1, 4)
    keys, _ = second
    sent, expected = _calls([([frame], {'priority': 5, 'deadline_ms': None}), ([frame], keys),
                             ([frame], {'priority': 5, 'deadline_ms': None}), ([frame], keys)])
    assert sent == expected


def test_same_bytes_of_another_shape_or_dtype_get_their_own_header():
    """A (1, 6, 4) uint8 frame is not described as the (1, 4, 6) one sent before it."""
    first = torch.zeros(1, 4, 6, dtype=torch.uint8)
    calls = [([first], {}), ([first.reshape(1, 6, 4)], {}), ([first.view(torch.int8)], {}),
             ([torch.zeros(1, 2, 3, dtype=torch.bfloat16), first], {}), ([first], {})]
    sent, expected = _calls(calls)
    assert sent == expected


def test_a_header_is_split_only_where_its_id_follows_its_kind():
    tensors = [torch.ones(2, 2)]
    before, after = wire.split_header({'kind': 'infer', 'id': 0, 'replay': 'r'}, tensors)
    for request_id in (1, 99, 10 ** 15):
        assert b'%b%d%b' % (before, request_id, after) == wire.encode(
            {'kind': 'infer', 'id': request_id, 'replay': 'r'}, tensors)[0]
    assert wire.split_header({'id': 0, 'kind': 'infer'}, tensors) is None


@pytest.mark.parametrize('values', [
    (True, 1, 1.0), (1.0, 1, True), (0, False, 0.0),
])
def test_equal_values_of_other_types_get_their_own_header(values):
    """
    ``priority=1`` after ``priority=True`` or ``1.0`` is sent as 1 (equal keys, other bytes).

    The server refuses ``true`` and ``1.0`` for an int: a header kept from a careless
    call sent later honest calls with them (their keys hash and compare equal).
    """
    frame = torch.zeros(1, 4)
    calls = [([frame], {'priority': v}) for v in values]
    calls += [([frame], {'deadline_ms': 5}), ([frame], {'deadline_ms': 5.0})]
    sent, expected = _calls(calls)
    assert sent == expected


def test_inputs_given_as_an_iterator_leave_no_header_for_a_later_call():
    """A one-shot iterable is read once: a later list of the same tensors is described in full."""
    frame = torch.zeros(1, 4)
    sent, expected = _calls([(iter([frame]), {}), ([frame], {})])
    assert sent[1] == expected[1]
