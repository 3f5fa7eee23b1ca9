"""
A long wait for a reply looks when bytes arrive, not every ``CHECK_S`` (issue 11).

The call's thread woke every ``CHECK_S`` and rebuilt its view of the connection
(a monitor read, a duplicate of libzmq's descriptor, a socket object, its peer):
on a robot over a 5 Mbit/s link that was most of the call's CPU.  It now
duplicates the descriptor once per wait and looks again only ``CHECK_S`` after
bytes arrive; the duplicate must still let go of a connection libzmq lost
while the wait goes on (r5 B4).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import zmq

from bench.transport_hold import read_message, zmtp_handshake
from rrto_ros import reply_guard
from rrto_ros.client import OffloadError, RrtoClient
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


def test_a_quiet_wait_looks_once_and_duplicates_the_descriptor_once(monkeypatch):
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
    assert len(dups) == 1, f'{len(dups)} duplicates in one wait'
    # one look once CHECK_S passed, one after each heartbeat's answer: not one per CHECK_S
    assert 1 <= len(looks) <= 4 < QUIET_S / CHECK_S, f'{len(looks)} looks in one quiet wait'


def _descriptors_of(local_port: int) -> int:
    """Return how many of this process's descriptors are the TCP socket bound to ``local_port``."""
    inodes = set()
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(':', 1)[1], 16) == local_port:
                inodes.add(f'socket:[{fields[9]}]')
    count = 0
    for fd in Path('/proc/self/fd').iterdir():
        try:
            count += os.readlink(fd) in inodes
        except OSError:
            pass
    return count


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
        while _descriptors_of(robot_port[0]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert caller.is_alive(), 'the call ended: its wait was not tested'
        assert _descriptors_of(robot_port[0]) == 0, 'the lost connection is still held open'
    finally:
        robot.close()
        caller.join(15)
        server.join(10)
        listener.close()
