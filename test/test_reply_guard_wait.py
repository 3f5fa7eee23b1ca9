"""
A long wait for a reply duplicates the connection's descriptor once (issue 11), and still looks.

The call's thread woke every ``CHECK_S`` and rebuilt its view of the connection
(a monitor read, a duplicate of libzmq's descriptor, a socket object, its peer):
on a robot over a 5 Mbit/s link that was most of the call's CPU.  It now
duplicates the descriptor once per wait; the duplicate must still let go of a
connection libzmq lost while the wait goes on (r5 B4), and the looks must not
wait for a wake that libzmq's own reader can take first (r15).
"""

from __future__ import annotations

import os
import select
import socket
import stat
import threading
import time

import zmq

from rrto_testing import stream_unfinished_reply, tcp_descriptors

from bench.transport_hold import read_message, zmtp_handshake
from rrto_ros import reply_guard
from rrto_ros.client import OffloadError, RemoteError, RrtoClient
from rrto_ros.reply_guard import CHECK_S
from rrto_wire import protocol as wire

QUIET_S = 0.6              # the reply's delay: twelve CHECK_S, under two heartbeats


def _counting(monkeypatch, owner, name: str, thread: threading.Thread) -> list:
    """Count the calls of ``owner.name`` made on ``thread``."""
    calls, real = [], getattr(owner, name)

    def count(*args):
        if threading.current_thread() is thread:
            calls.append(1)
        return real(*args)
    monkeypatch.setattr(owner, name, count)
    return calls


def test_a_quiet_wait_duplicates_the_descriptor_once(monkeypatch):
    ctx = zmq.Context()
    srv = ctx.socket(zmq.ROUTER)
    robot = RrtoClient(f'tcp://127.0.0.1:{srv.bind_to_random_port("tcp://127.0.0.1")}',
                       call_timeout_ms=5000, context=ctx)
    caller = threading.current_thread()
    looks = _counting(monkeypatch, reply_guard, 'received', caller)
    dups = _counting(monkeypatch, os, 'dup', caller)

    def answer() -> None:
        if srv.poll(5000):
            ident, *_ = srv.recv_multipart()
            time.sleep(QUIET_S)
            header = wire.encode({'kind': 'ok', 'id': 1, 'stats': {}})[0]   # its first request
            srv.send_multipart([ident, bytes(header)])

    server = threading.Thread(target=answer, daemon=True)
    server.start()
    try:
        robot.stats()
    finally:
        server.join(10)
        robot.close()
        srv.close(linger=0)
        ctx.destroy(linger=0)
    assert looks, 'a wait past CHECK_S never looked'
    assert len(dups) == 1, f'{len(dups)} duplicates in {len(looks)} looks of one wait'


def _serve_then_vanish(listener: socket.socket, robot_port: list, vanished: threading.Event
                       ) -> None:
    """Take the robot's request, let its wait start looking, then close the connection."""
    conn, peer = listener.accept()
    with conn:
        zmtp_handshake(conn, b'ROUTER')
        read_message(conn)
        time.sleep(4 * CHECK_S)               # the wait looks: it holds its duplicate
        robot_port.append(peer[1])
    vanished.set()


def test_a_connection_lost_during_a_wait_is_let_go_at_once():
    """The wait's duplicate would keep the robot's end open (no FIN) until its deadline."""
    listener = socket.create_server(('127.0.0.1', 0))
    robot_port, vanished = [], threading.Event()
    server = threading.Thread(target=_serve_then_vanish, args=(listener, robot_port, vanished),
                              daemon=True)
    server.start()
    robot = RrtoClient(f'tcp://127.0.0.1:{listener.getsockname()[1]}', call_timeout_ms=2500)
    outcome: list = []

    def call() -> None:
        try:
            robot.stats()
        except OffloadError as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    try:
        assert vanished.wait(10)
        deadline = time.monotonic() + 1.5
        while tcp_descriptors(robot_port[0], 'local') and time.monotonic() < deadline:
            time.sleep(0.02)
        assert caller.is_alive(), 'the call ended: its wait was not tested'
        held = tcp_descriptors(robot_port[0], 'local')
        assert held == 0, 'the lost connection is still held open'
    finally:
        robot.close()
        caller.join(15)
        server.join(10)
        listener.close()


_EPOLL = select.epoll


def _is_tcp(fd) -> bool:
    fd = fd if isinstance(fd, int) else fd.fileno()
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return False            # libzmq's ZMQ_FD: an eventfd
    with socket.socket(fileno=os.dup(fd)) as conn:
        return conn.family in (socket.AF_INET, socket.AF_INET6)


class _Outrun:
    """
    An epoll on which libzmq's I/O thread always reads first.

    The kernel reports a descriptor's readiness as it stands when the waiter
    collects it: libzmq's reader, woken by the same bytes, has often emptied the
    connection by then, and the waiter sleeps on (r15, measured on the 2-core VM
    with the robot's cores busy: 9 to 22 of 40 paced arrivals woke the wait).
    Here it always has: a TCP connection's readiness never reaches the waiter.
    """

    def __init__(self):
        self._epoll, self._tcp = _EPOLL(), set()

    def register(self, fd, mask=select.EPOLLIN):
        if _is_tcp(fd):
            self._tcp.add(fd if isinstance(fd, int) else fd.fileno())
        self._epoll.register(fd, mask)

    def modify(self, fd, mask):
        self._epoll.modify(fd, mask)

    def unregister(self, fd):
        self._tcp.discard(fd if isinstance(fd, int) else fd.fileno())
        self._epoll.unregister(fd)

    def poll(self, timeout=-1):
        return [(fd, ev) for fd, ev in self._epoll.poll(timeout) if fd not in self._tcp]

    def close(self):
        self._epoll.close()


def test_a_trickled_reply_is_looked_at_though_no_arrival_wakes_the_wait(monkeypatch):
    """a13 #2: a wait woken only by arrivals libzmq let it see slept to its deadline (r15)."""
    monkeypatch.setattr(reply_guard.select, 'epoll', _Outrun)
    listener = socket.create_server(('127.0.0.1', 0))
    sent = [0]
    server = threading.Thread(target=stream_unfinished_reply,   # 32 MiB over 10 s
                              args=(listener, sent, 64 << 10, 0.02, 500), daemon=True)
    server.start()
    robot = RrtoClient(f'tcp://127.0.0.1:{listener.getsockname()[1]}', call_timeout_ms=8000)
    try:
        try:
            robot.call(reply_guard.Kind.HELLO, timeout_ms=8000)
            outcome = None
        except OffloadError as exc:
            outcome = exc
    finally:
        robot.close()
        server.join(15)
        listener.close()
    # past a hello's bound (a header, its slack) the robot drops the connection: bad_reply,
    # not the call's timeout with the server's 32 MiB taken in
    assert isinstance(outcome, RemoteError), f'{outcome!r} after {sent[0] >> 10} KiB'
    assert outcome.code == 'bad_reply'
