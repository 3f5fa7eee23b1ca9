"""
The hedge's reply accounting: each message counted once, a bad reply is ``bad_reply`` (r7 #2).

A reply carrying the hedged request's id whose tensors failed to decode was
counted as delivered twice (the reply guard then allowed one reply more for
each such message, without limit) and skipped as garbage, so the call waited
for its deadline and raised a timeout.  The watch thread of a hedge's socket
ends with the hedge (r7 #7).  One replica's stale replies do not put off the
look at its twin's unfinished reply (r15).
"""

from __future__ import annotations

import gc
import socket
import threading
import time

import pytest
import torch
import zmq

from rrto_testing import reply_guard_watchers, stream_unfinished_reply

from bench.transport_hold import part, read_message, zmtp_handshake

from rrto_ros.client import RemoteError
from rrto_ros.hedge import Hedge
from rrto_wire import protocol as wire
from rrto_wire.errors import ErrorCode
from rrto_wire.messages import Kind

TIMING = {'queue_ms': 0.0, 'compute_ms': 0.0}


def test_a_reply_with_bad_tensors_is_a_bad_reply_counted_once():
    ctx = zmq.Context()
    srv = ctx.socket(zmq.ROUTER)
    endpoint = f'tcp://127.0.0.1:{srv.bind_to_random_port("tcp://127.0.0.1")}'
    hedge = Hedge(ctx)
    try:
        pending = hedge.start([endpoint], Kind.INFER, {'replay': 'r'}, [torch.zeros(4)], 5000,
                              'raw', expect=[('float32', (4,))])
        ident, *_ = srv.recv_multipart()
        header, frame = wire.encode({'kind': 'ok', 'id': 1, 'timing': TIMING},
                                    [torch.zeros(16384)])      # 64 KiB where 16 B are expected
        timer = threading.Timer(0.3, srv.send_multipart, ([ident, bytes(header), bytes(frame)],))
        timer.start()                                          # after the call's first look
        started = time.monotonic()
        with pytest.raises(RemoteError) as error:
            pending.result()
        assert error.value.code == ErrorCode.BAD_REPLY.value
        assert time.monotonic() - started < 2.5, 'it waited for its deadline'
        assert hedge.counters['timeouts'] == 0 and hedge.counters['errors'] == 1
        held = hedge.guards[endpoint].held()                   # no heartbeats on a hedge socket
        assert 0 <= held < 1024, f'{held} bytes held: the reply was counted twice'
        timer.join()
    finally:
        hedge.close()
        srv.close(linger=0)
        ctx.destroy(linger=0)


@pytest.mark.parametrize('ending', ['close', 'collected'])
def test_no_watch_thread_outlives_its_hedge(ending):
    """r7 #7: the thread held the hedge (a lambda), so one never closed polled forever."""
    before = reply_guard_watchers()
    ctx = zmq.Context()
    srv = ctx.socket(zmq.ROUTER)
    hedge = Hedge(ctx)
    try:
        hedge.socket(f'tcp://127.0.0.1:{srv.bind_to_random_port("tcp://127.0.0.1")}')
        started = reply_guard_watchers() - before
        assert len(started) == 1
        if ending == 'close':
            hedge.close()
        else:
            del hedge
            gc.collect()
        deadline = time.monotonic() + 5
        while any(t.is_alive() for t in started):
            assert time.monotonic() < deadline, 'the watch thread is still running'
            time.sleep(0.01)
    finally:
        srv.close(linger=0)
        ctx.destroy(linger=0)


def _stale_replies(listener: socket.socket, stop: threading.Event) -> None:
    """Answer the request with complete replies to another request, every 30 ms."""
    conn, _ = listener.accept()
    with conn:
        zmtp_handshake(conn, b'ROUTER')
        read_message(conn)
        stale = part(bytes(wire.encode({'kind': 'ok', 'id': 999})[0]), more=False)
        try:
            while not stop.is_set():
                conn.sendall(stale)
                time.sleep(0.03)
        except OSError:
            pass


def test_a_replicas_stale_replies_do_not_put_off_the_look_at_its_twin():
    # r15: the caller waits again after each stale reply, and each wait began with CHECK_S of
    # poll and no look; a replica answering stale replies every 30 ms kept the other's 96 MiB
    # stream (a hello's bound: a header) from being looked at until the call's deadline
    stale, streaming = (socket.create_server(('127.0.0.1', 0)) for _ in range(2))
    stop, sent = threading.Event(), [0]
    servers = [threading.Thread(target=_stale_replies, args=(stale, stop), daemon=True),
               threading.Thread(target=stream_unfinished_reply,
                                args=(streaming, sent, 256 << 10, 0.01, None, stop),
                                daemon=True)]
    for server in servers:
        server.start()
    endpoints = [f'tcp://127.0.0.1:{s.getsockname()[1]}' for s in (stale, streaming)]
    ctx = zmq.Context()
    hedge = Hedge(ctx)
    try:
        with pytest.raises(RemoteError) as failed:
            hedge.start(endpoints, Kind.HELLO, {}, [], 4000, 'raw').take()
        assert failed.value.code == ErrorCode.BAD_REPLY.value, failed.value
        assert endpoints[1] not in hedge.guards, 'the streaming replica was kept'
    finally:
        stop.set()
        hedge.close()
        ctx.destroy(linger=0)
        for server in servers:
            server.join(10)
        stale.close()
        streaming.close()
