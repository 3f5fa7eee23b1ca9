"""
Duplicate requests: one inference sent to two replicas, the first good reply wins.

:class:`Hedge` owns one DEALER socket per replica (not
:class:`~rrto_ros.client.RrtoClient`'s: those serve one request at a time and
block while a stalled replica holds theirs).  The same frames go to both
replicas; :meth:`HedgedReply.result` polls both sockets and returns the first
``ok`` reply with the request's id, waiting for the other copy only after an
error reply.  The slower copy's reply arrives later and is dropped by its id.
A socket queues its copy until connected (no ``IMMEDIATE``), so a replica
that is still connecting or has stopped reading costs nothing while the
other answers; a full queue (``HEDGE_QUEUE``) skips that replica.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Sequence

import msgspec
import torch
import zmq

from rrto_ros import reply_check
from rrto_ros.client import RemoteError, ServerUnavailable
from rrto_ros.reply_guard import OWED, ReplyGuard, connect, wait_any
from rrto_wire import replies
from rrto_wire.curve import ClientKeys
from rrto_wire import protocol as wire
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.limits import COPY_THRESHOLD, MAX_REPLY_BYTES, MAX_REPLY_PART_BYTES
from rrto_wire.messages import Kind

HEDGE_QUEUE = OWED // 2   # requests queued for one replica before hedged copies skip it:
#                           the guard remembers the bounds of as many more at the replica
COUNTERS = ('round_trips', 'bytes_sent', 'bytes_received', 'timeouts', 'reconnects', 'errors')


class Hedge:
    """One inference sent to two replicas at once; the first good reply wins."""

    def __init__(self, context: zmq.Context, keys: ClientKeys | None = None):
        self._ctx = context
        self._keys = keys
        self._socks: dict[str, zmq.Socket] = {}
        self.guards: dict[str, ReplyGuard] = {}     # what each socket holds of a reply
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(COUNTERS, 0)

    def socket(self, endpoint: str) -> zmq.Socket:
        sock = self._socks.get(endpoint)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.copy_threshold = COPY_THRESHOLD
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, HEDGE_QUEUE)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_PART_BYTES)
            if self._keys is not None:
                self._keys.apply(sock)
            # queued until connected: the other copy may answer first
            guard = self.guards[endpoint] = connect(sock, endpoint, curve=self._keys is not None)
            guard.watch_idle(self._lock, self.drop, endpoint)   # holds the hedge weakly
            self._socks[endpoint] = sock
        return sock

    def _send(self, endpoint: str, frames: list) -> bool:
        try:
            self.socket(endpoint).send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False   # its queue is full (a replica that stopped reading): skip it
        self.counters['bytes_sent'] += wire.message_size(frames)
        return True

    def start(self, endpoints: list[str], kind: Kind, fields: dict,
              tensors: Sequence[torch.Tensor], timeout_ms: float, codec: str,
              expect=None) -> 'HedgedReply':
        self._lock.acquire()
        try:
            request_id = next(self._ids)
            frames = wire.encode({'kind': kind.value, 'id': request_id, **fields}, tensors, codec)
            sent = [e for e in endpoints if self._send(e, frames)]
            if not sent:
                raise ServerUnavailable(f'cannot send to {endpoints}')
            for endpoint in sent:        # each copy's reply is owed until it comes
                self.guards[endpoint].sent(request_id, kind, expect)
        except BaseException:
            self._lock.release()
            raise
        return HedgedReply(self, sent, request_id, kind, time.monotonic() + timeout_ms / 1e3,
                           expect)

    def release(self) -> None:
        """End the request in flight (its reply taken or abandoned): the next may start."""
        self._lock.release()

    def drop(self, endpoint: str) -> None:
        """Close ``endpoint``'s socket (what it holds is freed); the next request reconnects."""
        sock = self._socks.pop(endpoint, None)
        if sock is not None:
            self.guards.pop(endpoint).close(sock)
            sock.close(linger=0)

    def close(self) -> None:
        with self._lock:
            for endpoint in list(self._socks):
                self.drop(endpoint)


class HedgedReply:
    """The two copies of one hedged request; ``result()`` returns the first good reply."""

    def __init__(self, hedge: Hedge, endpoints: list[str], request_id: int, kind: Kind,
                 deadline: float, expect=None):
        self._hedge = hedge
        self._expect = expect   # the outputs a reply must hold (rrto_ros.reply_check)
        self._kind = kind
        self._endpoints = endpoints
        self._id = request_id
        self._deadline = deadline

    def result(self) -> tuple[dict, list[torch.Tensor]]:
        header, tensors = self.take()
        return msgspec.to_builtins(header), tensors

    def take(self) -> tuple[replies.Ok, list[torch.Tensor]]:
        """As :meth:`result`, with the first good reply's header as decoded."""
        hedge, counters = self._hedge, self._hedge.counters
        poller = zmq.Poller()
        socks = {hedge.socket(e): e for e in self._endpoints}
        guards = {sock: hedge.guards[e] for sock, e in socks.items()}
        for sock in socks:
            poller.register(sock, zmq.POLLIN)
        waiting, error = len(self._endpoints), None
        try:
            while waiting:
                ready, over = wait_any(poller, guards, self._deadline)
                for sock in over:                 # a reply past what the socket's calls can get
                    del guards[sock]
                    poller.unregister(sock)
                    hedge.drop(socks[sock])
                    waiting -= 1
                    counters['errors'] += 1
                    error = RemoteError(ErrorCode.BAD_REPLY.value,
                                        f'the reply from {socks[sock]} outgrew the call')
                if not ready and not over:
                    break
                for sock in ready:
                    frames = sock.recv_multipart(copy=False)
                    try:
                        reply = replies.decode_reply(frames[0], self._kind)
                        reply_id = reply.id
                    except ProtocolError as exc:
                        reply = RemoteError(ErrorCode.BAD_REPLY.value, exc.message)
                        reply_id = exc.request_id
                    guards[sock].delivered(frames, reply_id)     # once for each message
                    if reply_id != self._id:
                        continue   # garbage, or the slower copy of an earlier request
                    if isinstance(reply, replies.Ok):
                        try:
                            tensors = reply_check.decode_outputs(
                                reply.tensors, frames[1:], self._expect, MAX_REPLY_BYTES)
                        except ProtocolError as exc:    # our own reply, undecodable
                            reply = RemoteError(ErrorCode.BAD_REPLY.value, exc.message)
                    waiting -= 1
                    counters['round_trips'] += 1
                    counters['bytes_received'] += wire.message_size(frames)
                    if isinstance(reply, replies.Ok):
                        return reply, tensors
                    counters['errors'] += 1
                    error = (reply if isinstance(reply, RemoteError)
                             else RemoteError(reply.code, reply.message))
        finally:
            self._hedge.release()
        if error is not None:
            raise error
        counters['timeouts'] += 1
        raise ServerUnavailable(f'no reply from {self._endpoints} in time')

    def cancel(self) -> None:
        self._hedge.release()
