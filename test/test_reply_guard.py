"""
The robot's reply bound covers every request owed a reply on the socket (r5 B5).

A request abandoned by its caller (a hybrid call whose robot half raised, a
cancelled resolver) or a hedge's slower copy still gets its reply, later, on
the same connection.  The bound was the waiting call's alone, so a large stale
reply arriving slowly made a small call fail with ``bad_reply`` and reconnect.
"""

from __future__ import annotations

import socket
import threading
import time

import torch

from bench.transport_hold import MIB, part, read_frame, read_message, zmtp_handshake
from rrto_ros.client import RrtoClient
from rrto_wire import protocol as wire
from rrto_wire.messages import Kind

STALE_PARTS = 8              # MiB of the abandoned request's reply
PART_GAP_S = 0.12            # between them: the waiting call looks at least 8 times
TIMING = {'queue_ms': 0.0, 'compute_ms': 0.0}


def _answer_pings(conn: socket.socket, lock: threading.Lock) -> None:
    """Answer the robot's ZMTP heartbeats (libzmq drops a connection that does not)."""
    try:
        while True:
            flags, body = read_frame(conn)
            if flags & 0x04 and body.startswith(b'\x04PING'):
                pong = b'\x04PONG' + body[7:]
                with lock:
                    conn.sendall(b'\x04' + bytes([len(pong)]) + pong)
    except OSError:
        pass                              # the robot closed the connection


def _answer_late(listener: socket.socket, small: torch.Tensor, sent: list) -> None:
    """Take two requests; answer the first with 8 MiB slowly, then the second with ``small``."""
    conn, _ = listener.accept()
    lock = threading.Lock()
    with conn:
        zmtp_handshake(conn, b'ROUTER')
        read_message(conn)
        read_message(conn)
        pings = threading.Thread(target=_answer_pings, args=(conn, lock), daemon=True)
        pings.start()
        header, frame = wire.encode({'kind': 'ok', 'id': 2, 'timing': TIMING}, [small])
        messages = ([part(wire.encode({'kind': 'ok', 'id': 1}, [])[0])]
                    + [part(b'\0' * MIB, more=i < STALE_PARTS - 1) for i in range(STALE_PARTS)]
                    + [part(bytes(header)) + part(bytes(frame), more=False)])
        try:
            for message in messages:
                with lock:
                    conn.sendall(message)
                time.sleep(PART_GAP_S)
            sent.append(True)
            pings.join(30)                  # until the robot closes
        except OSError:
            sent.append(False)           # the robot dropped the connection


def test_a_late_reply_to_an_abandoned_request_does_not_fail_the_next_call():
    small = torch.arange(4, dtype=torch.float32)
    listener = socket.create_server(('127.0.0.1', 0))
    sent: list = []
    server = threading.Thread(target=_answer_late, args=(listener, small, sent), daemon=True)
    server.start()
    robot = RrtoClient(f'tcp://127.0.0.1:{listener.getsockname()[1]}', call_timeout_ms=20000)
    try:
        big = robot.start(Kind.INFER, {'replay': 'big'},
                          expect=[('float32', (STALE_PARTS, MIB // 4))])
        big.cancel()                    # its reply still comes, after the next request
        header, outputs = robot.start(Kind.INFER, {'replay': 'small'},
                                      expect=[('float32', (4,))]).result()
        assert header['id'] == 2 and torch.equal(outputs[0], small)
        assert robot.counters['errors'] == 0 and robot.counters['reconnects'] == 0
    finally:
        robot.close()
        server.join(10)
        listener.close()
    assert sent == [True]


def test_the_bound_is_the_largest_owed_reply_and_forgets_the_oldest():
    """A request never answered is forgotten after ``OWED`` more: the bound cannot only grow."""
    import zmq
    from rrto_ros.reply_guard import OWED, ReplyGuard, reply_limit
    header = reply_limit(Kind.HELLO, None)
    big = [('float32', (1 << 24,))]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    guard = ReplyGuard(sock)
    try:
        assert guard.bound() == header              # owed nothing
        guard.sent(1, Kind.INFER, big)
        guard.sent(2, Kind.HELLO, None)
        assert guard.bound() == reply_limit(Kind.INFER, big) > 64 * MIB
        guard.delivered([], 2)                      # the small one answered: still owes 1
        assert guard.bound() == reply_limit(Kind.INFER, big)
        guard.delivered([], 1)
        assert guard.bound() == header
        guard.sent(3, Kind.INFER, big)
        for request_id in range(4, 4 + OWED):
            guard.sent(request_id, Kind.HELLO, None)
        assert guard.bound() == header              # 3 never answered: forgotten
    finally:
        guard.close(sock)
        sock.close(linger=0)
        ctx.destroy(linger=0)


IDLE_PARTS = 300             # MiB of an unfinished message streamed between calls
IDLE_GAP_S = 0.003           # between parts: the stream lasts at least 0.9 s


def _stream_between_calls(listener: socket.socket, sent: list, done: threading.Event) -> None:
    """Answer one request, then stream an unfinished message of 1 MiB parts, never finished."""
    conn, _ = listener.accept()
    lock = threading.Lock()
    with conn:
        zmtp_handshake(conn, b'ROUTER')
        read_message(conn)
        pings = threading.Thread(target=_answer_pings, args=(conn, lock), daemon=True)
        pings.start()
        try:
            with lock:
                conn.sendall(part(wire.encode({'kind': 'ok', 'id': 1}, [])[0], more=False))
            time.sleep(0.3)                          # the robot is between calls now
            for _ in range(IDLE_PARTS):
                with lock:
                    conn.sendall(part(b'\0' * MIB))
                sent[0] += 1
                time.sleep(IDLE_GAP_S)
        except OSError:
            pass                                     # the robot dropped the connection
        done.set()
        pings.join(30)


def test_a_reply_streamed_between_calls_is_cut():
    """a14 #3: the guard looked only while a call waited; an idle robot took in 1.5 GB."""
    listener = socket.create_server(('127.0.0.1', 0))
    sent, done = [0], threading.Event()
    server = threading.Thread(target=_stream_between_calls, args=(listener, sent, done),
                              daemon=True)
    server.start()
    robot = RrtoClient(f'tcp://127.0.0.1:{listener.getsockname()[1]}', call_timeout_ms=5000)
    try:
        robot.start(Kind.STATS).cancel()       # answered at once; then the robot is idle
        assert done.wait(20)
        assert sent[0] < IDLE_PARTS, f'the idle robot took in all {sent[0]} MiB'
    finally:
        robot.close()
        server.join(10)
        listener.close()
