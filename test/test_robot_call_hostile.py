"""
The robot's offloaded call against a hostile server, in the steps issue 11 inlined.

The client receives a reply's frames itself and views raw frames the export describes
exactly through numpy; a reply whose frames disagree with the export (lengths, count,
dtypes, shapes, codec, empty or huge frames) is refused ``bad_reply`` before a byte of
it is viewed, never handed back as outputs.  A request abandoned from another thread
while its reply is taken releases the client once.
"""

import sys
import threading

import pytest
import torch
import zmq

from rrto_ros.client import RemoteError, RrtoClient
from rrto_wire import protocol as wire
from rrto_wire.errors import ErrorCode

TIMING = {'queue_ms': 0.0, 'compute_ms': 0.0}
WANT = torch.arange(6, dtype=torch.float32).reshape(2, 3)
LEAVES = (('float32', (2, 3)),)


def _raw(dtype, shape, codec='raw'):
    return {'dtype': dtype, 'shape': list(shape), 'codec': codec}


REPLIES = {     # name: (descriptors, frames), against one float32[2, 3] output
    'short': ([_raw('float32', (2, 3))], [WANT.numpy().tobytes()[:-1]]),
    'long': ([_raw('float32', (2, 3))], [WANT.numpy().tobytes() + b'\0']),
    'empty frame': ([_raw('float32', (2, 3))], [b'']),
    'huge frame': ([_raw('float32', (2, 3))], [bytes(8 << 20)]),
    'one frame more': ([_raw('float32', (2, 3))], [WANT.numpy().tobytes()] * 2),
    'no frame': ([_raw('float32', (2, 3))], []),
    'described twice': ([_raw('float32', (2, 3))] * 2, [WANT.numpy().tobytes()] * 2),
    'other dtype, same bytes': ([_raw('int32', (2, 3))], [WANT.numpy().tobytes()]),
    'float64 of the same size': ([_raw('float64', (3,))], [WANT.numpy().tobytes()]),
    'other shape, same bytes': ([_raw('float32', (3, 2))], [WANT.numpy().tobytes()]),
    'empty shape': ([_raw('float32', (0, 3))], [b'']),
    'bfloat16': ([_raw('bfloat16', (4, 3))], [WANT.numpy().tobytes()]),
    'zstd of raw bytes': ([_raw('float32', (2, 3), 'zstd')], [WANT.numpy().tobytes()]),
}


@pytest.fixture
def pair():
    """A ROUTER playing the server and a robot client connected to it."""
    ctx = zmq.Context()
    srv = ctx.socket(zmq.ROUTER)
    srv.setsockopt(zmq.LINGER, 0)
    robot = RrtoClient(f'tcp://127.0.0.1:{srv.bind_to_random_port("tcp://127.0.0.1")}',
                       call_timeout_ms=20000, context=ctx)
    yield srv, robot
    robot.close()
    srv.close(linger=0)
    ctx.destroy(linger=0)


def _answer(srv, descriptors, frames):
    """Answer the next request with ``descriptors`` over ``frames``; return its connection."""
    assert srv.poll(20000)
    ident, header, *_ = srv.recv_multipart()
    request_id = int(bytes(header).split(b'"id":', 1)[1].split(b',', 1)[0])
    head = wire.encode({'kind': 'ok', 'id': request_id, 'timing': TIMING}, [])[0]
    head = head.replace(b'"tensors":[]', b'"tensors":' + wire.encode_header(descriptors))
    srv.send_multipart([ident, head, *frames])
    return ident


def test_an_honest_reply_is_viewed_as_the_export_says(pair):
    srv, robot = pair
    for _ in range(3):          # the first call and the cached header's
        pending = robot.start_infer('r', [torch.zeros(1, 4)], expect=LEAVES)
        _answer(srv, [_raw('float32', (2, 3))], [WANT.numpy().tobytes()])
        header, (out,) = pending.result()
        assert out.dtype == torch.float32 and torch.equal(out, WANT)


@pytest.mark.parametrize('name', sorted(REPLIES))
def test_a_reply_unlike_the_export_is_refused_before_it_is_viewed(pair, name):
    srv, robot = pair
    pending = robot.start_infer('r', [torch.zeros(1, 4)], expect=LEAVES)
    _answer(srv, *REPLIES[name])
    with pytest.raises(RemoteError) as err:
        pending.result()
    assert err.value.code == ErrorCode.BAD_REPLY.value
    pending = robot.start_infer('r', [torch.zeros(1, 4)], expect=LEAVES)   # then honest
    _answer(srv, [_raw('float32', (2, 3))], [WANT.numpy().tobytes()])
    assert torch.equal(pending.result()[1][0], WANT)


@pytest.mark.parametrize('dtype', ['float64', 'int64', 'int16', 'bfloat16', 'uint8'])
def test_small_and_odd_frames_are_viewed_with_their_values(pair, dtype):
    """Frames of a few bytes (kept inside libzmq's message) hold their values as sent."""
    srv, robot = pair
    want = torch.arange(3).to(getattr(torch, dtype))
    sent = want.view(torch.int16) if dtype == 'bfloat16' else want
    for shape in ((3,), (1, 3)):
        pending = robot.start_infer('r', [torch.zeros(1)], expect=((dtype, shape),))
        _answer(srv, [_raw(dtype, shape)], [sent.numpy().tobytes()])
        out = pending.result()[1][0]
        assert out.dtype == want.dtype and torch.equal(out, want.reshape(shape))


def test_a_request_cancelled_while_its_reply_is_taken_releases_the_client_once(pair):
    """Another thread's ``cancel()`` during ``take()`` (here from inside its wait): one release."""
    srv, robot = pair
    pending = robot.start_infer('r', [torch.zeros(1, 4)], expect=LEAVES)
    _answer(srv, [_raw('float32', (2, 3))], [WANT.numpy().tobytes()])
    cancelled = threading.Event()

    def cancel_in_the_wait(frame, event, arg):
        if (event == 'call' and frame.f_code.co_name == 'wait' and not cancelled.is_set()
                and frame.f_code.co_filename.endswith('reply_guard.py')):
            cancelled.set()
            pending.cancel()

    sys.setprofile(cancel_in_the_wait)
    try:
        header, (out,) = pending.take()
    finally:
        sys.setprofile(None)
    assert cancelled.is_set() and torch.equal(out, WANT)
    pending = robot.start_infer('r', [torch.zeros(1, 4)], expect=LEAVES)   # the client works
    _answer(srv, [_raw('float32', (2, 3))], [WANT.numpy().tobytes()])
    assert torch.equal(pending.result()[1][0], WANT)


def test_a_reply_of_too_many_frames_is_refused_without_taking_them_all(pair):
    """
    Past MAX_TENSORS frames the robot drops the connection, not receiving the rest.

    Empty frames cost ~2 bytes on the wire, under any reply's bound, and a Python object
    each on the robot: 600k of them took 2.6 s of its CPU and 158 MB before the count check.
    """
    srv, robot = pair
    pending = robot.start_infer('r', [torch.zeros(1, 4)], expect=LEAVES)
    assert srv.poll(20000)
    first, header, *_ = srv.recv_multipart()
    request_id = int(bytes(header).split(b'"id":', 1)[1].split(b',', 1)[0])
    head = wire.encode({'kind': 'ok', 'id': request_id, 'timing': TIMING}, [])[0]
    srv.send_multipart([first, head] + [b''] * 4000)    # whole before the robot looks
    with pytest.raises(RemoteError) as err:
        pending.result()
    assert err.value.code == ErrorCode.BAD_REPLY.value
    pending = robot.start_infer('r', [torch.zeros(1, 4)], expect=LEAVES)   # then honest
    again = _answer(srv, [_raw('float32', (2, 3))], [WANT.numpy().tobytes()])
    assert torch.equal(pending.result()[1][0], WANT)
    assert again != first, 'the rest of that reply was taken in on the same connection'
