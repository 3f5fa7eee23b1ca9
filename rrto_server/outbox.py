"""
Hand messages from any thread to the one thread that owns a ZeroMQ socket.

ZeroMQ sockets are not thread-safe: only the thread that serves a ROUTER may
send on it.  Other threads push what they want sent to an inproc PULL socket
(``Outbox.socket``) that the serving thread polls beside the ROUTER and
drains; each pushing thread gets its own PUSH socket, made on its first push
and closed with the outbox.
"""

from __future__ import annotations

import threading
import uuid

import zmq


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
