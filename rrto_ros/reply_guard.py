"""
Stop reading a reply that grows past what its call can get (a13 #2).

libzmq holds every part of a multipart message until the last one arrives and
bounds only each part (``ZMQ_MAXMSGSIZE``, :data:`rrto_wire.limits.MAX_REPLY_PART_BYTES`
on every robot socket), so a server, a fleet replica or a proxy on an unkeyed
link made the robot buffer 1.7 GB before :mod:`rrto_ros.reply_check` saw a
byte.  The robot knows, before it sends, how large a legitimate reply can be:
the outputs the call expects (their sizes, a data-dependent size at the bound
export proved), else :data:`~rrto_wire.limits.MAX_REPLY_BYTES` for a call with
tensors in its reply, else a header (:func:`reply_limit`).

:class:`ReplyGuard` watches a DEALER's one TCP connection (its descriptor from
the socket's monitor, ``ZMQ_EVENT_CONNECTED``) while a call waits: each time a
wait of ``CHECK_S`` ends with no message, it reads what libzmq has read from
the kernel (``TCP_INFO`` less ``FIONREAD``, :mod:`rrto_wire.wire_bytes`).  No
complete message was waiting, so what was read since the first such look, and
not delivered since, is one unfinished message; past the call's bound (plus
the slack and heartbeats the server allows too) the client drops the socket,
which frees it, and the call fails with ``bad_reply`` (it runs locally).  A
reply is read for at most ``CHECK_S`` before it is looked at: at most the
link's bytes of two periods over the bound (10 MB at 100 MB/s).  A call
answered within ``CHECK_S`` costs nothing.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Sequence

import zmq

from rrto_ros import reply_check
from rrto_wire.limits import MAX_PROBE_BYTES, MAX_REPLY_BYTES, reply_bytes
from rrto_wire.messages import Kind
from rrto_wire.wire_bytes import allowance, queued, received

CHECK_S = 0.05
CHECK_MS = CHECK_S * 1e3
_EVENT = struct.Struct('=HI')
_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
_TENSOR_REPLIES = {Kind.INFER: MAX_REPLY_BYTES, Kind.OP: MAX_REPLY_BYTES,
                   Kind.PROBE: MAX_PROBE_BYTES}


def connect(sock: zmq.Socket, endpoint: str, guarded: bool = True) -> ReplyGuard | None:
    """
    Connect ``sock`` to ``endpoint``, with a guard made first (its monitor sees the connection).

    If the connection cannot be made (a malformed endpoint, perhaps from a fleet
    directory), the guard and the socket are closed before the error goes up: a
    caller that retries leaks neither (r5 B6).
    """
    guard = ReplyGuard(sock) if guarded else None
    try:
        sock.connect(endpoint)
    except Exception:
        if guard is not None:
            guard.close(sock)
        sock.close(linger=0)
        raise
    return guard


def reply_limit(kind: Kind, expect: Sequence[reply_check.Leaf] | None) -> int:
    """Return the most bytes on the wire a legitimate reply to this call takes."""
    most = reply_check.most_bytes(expect) if expect is not None else None
    if most is None:
        most = _TENSOR_REPLIES.get(kind, 0)
    return reply_bytes(most)


class ReplyGuard:
    """The bytes a DEALER's connection has read and not delivered while one call waits."""

    def __init__(self, sock: zmq.Socket):
        self._monitor = sock.get_monitor_socket(_EVENTS)
        self._replies = zmq.Poller()            # one per socket, not one built per wait
        self._replies.register(sock, zmq.POLLIN)
        self._conn: socket.socket | None = None     # a duplicate, only while a wait lasts
        self._target: tuple[int, int] | None = None  # libzmq's descriptor and its peer port
        self._call: tuple = (Kind.HELLO, None)
        self._limit: int | None = None
        self._mark: tuple[int, float] | None = None

    def watch(self, kind: Kind, expect: Sequence[reply_check.Leaf] | None) -> None:
        """Start waiting for the reply to a ``kind`` call expecting ``expect`` (no system call)."""
        self._call = (kind, expect)
        self._limit = self._mark = None

    def ready(self, timeout_ms: float) -> bool:
        """Wait up to ``timeout_ms`` for a message on the watched socket; True if one came."""
        return bool(self._replies.poll(timeout_ms))

    def delivered(self) -> None:
        """Note a delivered message: what was read so far is not held (the wait is over)."""
        self._close_connection()       # a duplicate kept open would hold the TCP connection

    def over(self) -> int | None:
        """Return the bytes held past the call's bound (after a wait with no message), or None."""
        conn = self._connection()
        if conn is None:
            return None
        try:
            read = received(conn) - queued(conn)
        except OSError:
            return None                       # closed: the call times out or reconnects
        now = time.monotonic()
        if self._mark is None:
            self._mark = (read, now)
            return None
        if self._limit is None:
            self._limit = reply_limit(*self._call)
        held = read - self._mark[0]
        return held if held > allowance(self._limit, now - self._mark[1]) else None

    def _connection(self) -> socket.socket | None:
        while True:        # connects and disconnects in order: the descriptor is current
            try:
                event, endpoint = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            kind, fd = _EVENT.unpack_from(event)
            if kind == zmq.EVENT_CONNECTED or (self._target and self._target[0] == fd):
                self._close_connection()
                self._target = None
            if kind == zmq.EVENT_CONNECTED:
                try:
                    self._target = (fd, int(endpoint.rsplit(b':', 1)[1]))
                except (ValueError, IndexError):
                    pass
        if self._conn is None and self._target is not None:
            fd, port = self._target
            try:
                conn = socket.socket(fileno=os.dup(fd))
            except OSError:
                self._target = None
                return None
            try:       # the number may name another socket by now: it must be this peer's
                same = conn.getpeername()[1] == port
            except (OSError, IndexError, TypeError):
                same = False
            if same:
                self._conn = conn
            else:
                conn.close()
        return self._conn

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._mark = None

    def close(self, sock: zmq.Socket) -> None:
        """Stop watching ``sock`` (before it is closed) and release the descriptor."""
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
        self._close_connection()
