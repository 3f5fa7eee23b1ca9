"""
Hand messages from any thread to the one thread that owns a ZeroMQ socket.

ZeroMQ sockets are not thread-safe: only the thread that serves a ROUTER may
send on it.  Other threads push what they want sent to an inproc PULL socket
(``Outbox.socket``) that the serving thread polls beside the ROUTER and
drains; each pushing thread gets its own PUSH socket, made on its first push
and closed with the outbox.

:func:`receive` and :func:`send` move one message in and out of a socket with
the least Python: pyzmq's ``recv_multipart`` asks libzmq for ``RCVMORE`` after
each frame and its ``send_multipart`` combines enum flags per frame (2-3 us a
message on the 2-core VM, issue 11); a received frame says itself whether more
follow, and plain ints combine for free; and :func:`send` calls libzmq's binding
directly rather than through pyzmq's Python ``Socket.send``, which only adds the
``routing_id`` and ``group`` options of draft sockets (a Python call a frame).
:func:`readable` lets a loop that drains a socket stop at the last message
instead of on a ``zmq.Again``.
"""

from __future__ import annotations

import threading
import uuid

import zmq

NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE) | NOBLOCK
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_SENDABLE = (zmq.Frame, bytes, memoryview)
_SEND = zmq.backend.Socket.send     # pyzmq's Socket.send without its draft-socket options


def receive(sock: zmq.Socket) -> list:
    """Return the next message on ``sock`` as zero-copy frames; raise zmq.Again if none."""
    recv = sock.recv
    frame = recv(NOBLOCK, copy=False)
    frames = [frame]
    while frame.more:
        frame = recv(NOBLOCK, copy=False)
        frames.append(frame)
    return frames


def readable(sock: zmq.Socket) -> bool:
    """Return True if a complete message waits on ``sock`` (what a receive would find)."""
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)


def send(sock: zmq.Socket, frames: list) -> None:
    """
    Send ``frames`` as one message without blocking (zero-copy above the socket's threshold).

    Every frame is checked to be a buffer first, as ``send_multipart`` does: a
    message must never stop half sent.  Raises as ``send_multipart`` would.
    """
    for frame in frames:
        if not isinstance(frame, _SENDABLE):
            memoryview(frame)       # TypeError before any frame is sent
    for frame in frames[:-1]:
        _SEND(sock, frame, _MORE, copy=False)
    _SEND(sock, frames[-1], NOBLOCK, copy=False)


class Outbox:
    """An inproc PULL socket, and one PUSH socket per thread that sends to it."""

    def __init__(self, ctx: zmq.Context, name: str, copy_threshold: int | None = None):
        self._ctx, self._copy_threshold = ctx, copy_threshold
        self._addr = f'inproc://{name}-{uuid.uuid4().hex}'
        self.socket = ctx.socket(zmq.PULL)
        self.socket.bind(self._addr)
        self._local = threading.local()
        self._pushers: list[zmq.Socket] = []
        self._lock = threading.Lock()

    def pusher(self) -> zmq.Socket:
        """Return the calling thread's PUSH socket to the outbox."""
        sock = getattr(self._local, 'sock', None)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            if self._copy_threshold is not None:
                sock.copy_threshold = self._copy_threshold
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self._addr)
            self._local.sock = sock
            with self._lock:
                self._pushers.append(sock)
        return sock

    def close(self) -> None:
        """Close every PUSH socket and the PULL (after every pushing thread has stopped)."""
        with self._lock:
            for sock in self._pushers:
                sock.close(linger=0)
            self._pushers.clear()
        self.socket.close(linger=0)
