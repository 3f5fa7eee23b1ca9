"""
Robot-side connection to rrto_server: one helper for every remote call.

Reliability follows the zguide's Lazy Pirate pattern, adapted to a DEALER
socket: every call polls with a timeout, and a call that times out closes its
socket (``LINGER=0``) so a late reply can never be mistaken for a later
answer.  After a failure the client is marked unavailable and a background
thread probes the server with ``hello`` requests, doubling its back-off up to
a cap (Paranoid Pirate); calls made meanwhile fail at once with
:class:`ServerUnavailable` instead of waiting, so the caller can run locally
without stalling.
"""

from __future__ import annotations

import itertools
import logging
import operator
import threading
import time
import uuid
from typing import Any, Sequence

import torch
import zmq

from rrto_ros import reply_check
from rrto_ros.pending import PendingReply
from rrto_ros.reply_guard import ReplyGuard, connect
from rrto_wire import codecs, replies
from rrto_wire.curve import ClientKeys
from rrto_wire import protocol as wire
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.hello import ask_hello
from rrto_wire.limits import (COPY_THRESHOLD, MAX_DIGESTS, MAX_REPLY_BYTES,
                              MAX_REPLY_PART_BYTES, MAX_TENSORS, UPLOAD_CHUNK_BYTES)
from rrto_wire.messages import Kind
from rrto_wire.tensors import TensorSpec, tensor_frame

log = logging.getLogger('rrto_ros.client')
LATE_LOG_PERIOD_S = 10.0   # late replies are logged at most this often, with their count
MAX_HEADS = 64             # INFER headers kept (replay, keys, input signature)
_SPEC = operator.attrgetter('dtype', 'shape')


class OffloadError(Exception):
    """Base class of the errors a remote call raises."""


class ServerUnavailable(OffloadError):
    """No server answered within the timeout (or the link is known to be down)."""


class RemoteError(OffloadError):
    """The server answered with an error reply."""

    def __init__(self, code: str, message: str):
        super().__init__(f'{code}: {message}')
        self.code = code
        self.message = message


class RrtoClient:
    """A DEALER connection to one server endpoint with timeouts and background reconnects."""

    def __init__(self, endpoint: str, *, connect_timeout_ms: float = 1000.0,
                 call_timeout_ms: float = 1000.0, backoff_s: tuple[float, float] = (0.1, 2.0),
                 context: zmq.Context | None = None, name: str = 'rrto',
                 keys: ClientKeys | None = None):
        self.endpoint = endpoint
        self.keys = keys
        self.connect_timeout_ms = connect_timeout_ms
        self.call_timeout_ms = call_timeout_ms
        self.backoff_s = backoff_s
        self.name = name
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._guard: ReplyGuard | None = None     # what the data socket holds of a reply
        self._heartbeat_ms = 0
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._available = threading.Event()
        self._available.set()
        self._closed = threading.Event()
        self._prober: threading.Thread | None = None
        self._announced = False          # 'unavailable' was logged; 'is back' will be
        self._late = [0, -LATE_LOG_PERIOD_S]   # late replies not logged yet, last log time
        self.server_info: dict = {}
        self._heads: dict[tuple, tuple[bytes, bytes]] = {}   # an INFER's header, its id apart
        self.counters = {'round_trips': 0, 'bytes_sent': 0, 'bytes_received': 0,
                         'timeouts': 0, 'reconnects': 0, 'errors': 0}

    # ------------------------------------------------------------------ state
    @property
    def available(self) -> bool:
        """Return False while the server is known to be unreachable (a probe is running)."""
        return self._available.is_set()

    def wait_available(self, timeout_s: float) -> bool:
        return self._available.wait(timeout_s)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._drop_socket()
        if self._prober is not None:
            self._prober.join(timeout=5)

    def _new_socket(self, heartbeat_timeout_ms: int = 2000, data: bool = False) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.copy_threshold = COPY_THRESHOLD
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 500)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_timeout_ms)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_PART_BYTES)   # a part; ReplyGuard: a reply
        if self.keys is not None:
            self.keys.apply(sock)
        guard = connect(sock, self.endpoint, guarded=data, curve=self.keys is not None)
        if data:
            self._guard = guard
            guard.watch_idle(self._lock, self._drop_socket)   # between calls too (a14 #3)
        return sock

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._guard.close(self._sock)   # the data socket's guard: made with it
            self._sock.close(linger=0)
            self._sock = None

    def _mark_down(self, reason: str) -> None:
        self._drop_socket()
        if self._available.is_set() and reason != 'reply timed out':
            log.warning('%s: server %s unavailable (%s); probing in the background',
                        self.name, self.endpoint, reason)
            self._announced = True
        self._available.clear()
        if not self._closed.is_set() and (self._prober is None or not self._prober.is_alive()):
            self._prober = threading.Thread(
                target=self._probe, name=f'{self.name}-probe', daemon=True)
            self._prober.start()

    def _probe(self) -> None:
        delay = self.backoff_s[0]
        while not self._closed.is_set():
            sock = self._new_socket()   # set up like the data socket, CURVE keys included
            try:
                info = ask_hello(sock, self.connect_timeout_ms)
            finally:
                sock.close(linger=0)
            if info is not None:
                self.counters['reconnects'] += 1
                self.server_info = info
                if self._announced:
                    log.info('%s: server %s is back', self.name, self.endpoint)
                self._announced = False
                self._available.set()
                return
            if not self._announced:   # a late reply, and now no answer at all
                log.warning('%s: server %s unavailable (no answer to hello); probing in the '
                            'background', self.name, self.endpoint)
                self._announced = True
            self._closed.wait(delay)
            delay = min(delay * 2, self.backoff_s[1])

    # ------------------------------------------------------------------ the one call helper
    def call(self, kind: Kind, fields: dict | None = None, tensors: Sequence[torch.Tensor] = (),
             timeout_ms: float | None = None, codec: str = codecs.RAW,
             ) -> tuple[dict, list[torch.Tensor]]:
        """
        Send one request and wait for its reply.

        Raises :class:`ServerUnavailable` if the server is known to be down, cannot
        be reached within the connect timeout, or does not answer within
        ``timeout_ms``; raises :class:`RemoteError` for an error reply.
        """
        return self.start(kind, fields, tensors, timeout_ms, codec).result()

    def start(self, kind: Kind, fields: dict | None = None, tensors: Sequence[torch.Tensor] = (),
              timeout_ms: float | None = None, codec: str = codecs.RAW,
              expect: Sequence[reply_check.Leaf] | None = None) -> 'PendingReply':
        """
        Send one request now and return a handle whose ``result()`` waits for the reply.

        The client serves one request at a time: until ``result()`` or ``cancel()``
        is called, other calls wait.  Use it to compute while the server works.
        ``expect``: the outputs the reply must hold (:mod:`rrto_ros.reply_check`).
        """
        return self._start(kind, fields, tensors, timeout_ms, codec, expect, None)

    def _start(self, kind: Kind, fields: dict | None, tensors: Sequence[torch.Tensor],
               timeout_ms: float | None, codec: str, expect: Sequence[reply_check.Leaf] | None,
               head: tuple[bytes, bytes] | None) -> 'PendingReply':
        """:meth:`start`; ``head``: the header's bytes around its id (raw tensors, no fields)."""
        if not self._available.is_set():
            raise ServerUnavailable(f'server {self.endpoint} is unreachable (reconnecting)')
        timeout_ms = self.call_timeout_ms if timeout_ms is None else timeout_ms
        self._lock.acquire()
        try:
            if self._closed.is_set():
                raise ServerUnavailable('client is closed')
            # ZeroMQ counts a heartbeat as answered only once a whole message part has
            # arrived; on a slow link a large output tensor takes longer than 2 s, so the
            # heartbeat timeout must cover the call's deadline or the reply is dropped
            heartbeat_ms = int(max(2000, self.call_timeout_ms, timeout_ms))
            if self._sock is not None and self._heartbeat_ms < heartbeat_ms:
                self._drop_socket()   # the timeout grew: reconnect with a longer heartbeat
            if self._sock is None:
                self._sock = self._new_socket(heartbeat_ms, data=True)
                self._heartbeat_ms = heartbeat_ms
            request_id = next(self._ids)
            if head is not None:        # the bytes wire.encode gives, its id put in
                frames = [b'%b%d%b' % (head[0], request_id, head[1])]
                frames += map(tensor_frame, tensors)
                size = sum(map(len, frames))    # bytes and 'B' memoryviews: len is nbytes
            else:
                header = {'kind': kind, 'id': request_id}    # a str enum: encoded as its value
                header.update(fields or {})
                frames = wire.encode(header, tensors, codec)
                size = wire.message_size(frames)
            # a part over the server's limit makes libzmq drop the connection: refuse it here
            limit = self.server_info.get('max_message_bytes')
            if limit is not None and size > limit:
                self._too_large(size, limit)
            started = time.monotonic()
            try:
                wire.send_frames(self._sock, frames)
            except zmq.Again:       # no connection yet (IMMEDIATE): wait for one, once
                self._send(frames, min(timeout_ms, self.connect_timeout_ms))
            self._guard.sent(request_id, kind, expect)    # its reply's bound, until it comes
            self.counters['bytes_sent'] += size
        except BaseException:
            self._lock.release()
            raise
        return PendingReply(self, request_id, kind, started + timeout_ms / 1e3, expect)

    def _too_large(self, size: int, limit: int) -> None:
        self.counters['errors'] += 1
        raise RemoteError(ErrorCode.TOO_LARGE.value,
                          f'message of {size} bytes exceeds the server limit {limit}')

    def _send(self, frames: list, connect_ms: float) -> None:
        """Send once a connection is made (the first try found none), or mark the server down."""
        if not self._sock.poll(connect_ms, zmq.POLLOUT):
            self._mark_down('no connection')
            raise ServerUnavailable(f'cannot connect to {self.endpoint}')
        try:
            wire.send_frames(self._sock, frames)
        except zmq.Again:
            self._mark_down('send would block')
            raise ServerUnavailable(f'cannot send to {self.endpoint}') from None

    def _log_late(self) -> None:
        """Log late replies (not an unavailable server) at most every LATE_LOG_PERIOD_S."""
        self._late[0] += 1
        now = time.monotonic()
        if now - self._late[1] >= LATE_LOG_PERIOD_S:
            log.warning('%s: %d repl%s from %s later than %g ms (slow server or link): dropped, '
                        'those calls fell back', self.name, self._late[0],
                        'y' if self._late[0] == 1 else 'ies', self.endpoint, self.call_timeout_ms)
            self._late = [0, now]

    def _finish(self, reply_header: replies.Ok | replies.Error, reply: list,
                expect: Sequence[reply_check.Leaf] | None = None
                ) -> tuple[replies.Ok, list[torch.Tensor]]:
        self.counters['round_trips'] += 1
        self.counters['bytes_received'] += sum(map(len, reply))    # zmq.Frames: their bytes
        if isinstance(reply_header, replies.Error):
            self.counters['errors'] += 1
            raise RemoteError(reply_header.code, reply_header.message)
        try:
            tensors = reply_check.decode_outputs(reply_header.tensors, reply[1:], expect,
                                                 MAX_REPLY_BYTES)
        except ProtocolError as exc:
            self.counters['errors'] += 1
            raise RemoteError(ErrorCode.BAD_REPLY.value, exc.message) from None
        return reply_header, tensors

    def _await(self, request_id: int, kind: Kind, deadline: float) -> tuple[replies.Ok, list]:
        while True:
            ready, held = self._guard.wait(deadline)
            if held is not None:          # a reply past what the calls owed can get: drop it
                self.counters['errors'] += 1
                self._drop_socket()           # frees what libzmq holds; the next call reconnects
                raise RemoteError(ErrorCode.BAD_REPLY.value, f'{held} bytes of a reply to '
                                  f'{kind.value} unfinished, more than the call can get')
            if not ready:
                self.counters['timeouts'] += 1
                self._log_late()
                self._mark_down('reply timed out')
                raise ServerUnavailable(f'no reply from {self.endpoint} in time')
            frame = self._sock.recv(0, copy=False)      # wire.recv_frames, inline
            frames = [frame]
            while frame.more:
                if len(frames) > MAX_TENSORS:     # 600k empty frames: 1.2 MB, 2.6 s of CPU
                    self.counters['errors'] += 1  # here: the rest dropped with the socket
                    self._drop_socket()
                    raise RemoteError(ErrorCode.BAD_REPLY.value, 'a reply of too many frames')
                frame = self._sock.recv(0, copy=False)
                frames.append(frame)
            try:
                reply_header = replies.decode_reply(frames[0], kind)
            except ProtocolError as exc:
                self._guard.delivered(frames, exc.request_id)
                if exc.request_id != request_id:
                    continue          # garbage or a stale reply to an earlier request
                self.counters['errors'] += 1
                raise RemoteError(ErrorCode.BAD_REPLY.value, exc.message) from None
            reply_id = reply_header.id
            self._guard.delivered(frames, reply_id)
            if reply_id == request_id:
                return reply_header, frames
            log.debug('dropping stale reply %s (waiting for %s)', reply_id, request_id)

    # ------------------------------------------------------------------ requests
    def hello(self, timeout_ms: float | None = None) -> dict:
        header, _ = self.call(Kind.HELLO, timeout_ms=timeout_ms or self.connect_timeout_ms)
        self.server_info = header
        return header

    def upload(self, blobs: dict[str, tuple[str, bytes]], timeout_ms: float = 30000.0) -> int:
        """Upload the blobs ``{digest: (kind, data)}`` that the server lacks; return how many."""
        digests, missing = list(blobs), []
        for start in range(0, len(digests), MAX_DIGESTS):   # the server's limit per request
            header, _ = self.call(Kind.MISSING, {'digests': digests[start:start + MAX_DIGESTS]},
                                  timeout_ms=timeout_ms)
            missing += header['missing']
        chunk = int(self.server_info.get('chunk_bytes', UPLOAD_CHUNK_BYTES))
        for digest in missing:
            kind, data = blobs[digest]
            upload_id = uuid.uuid4().hex
            view = memoryview(data)
            for offset in range(0, len(view), chunk):
                piece = torch.frombuffer(bytearray(view[offset:offset + chunk]), dtype=torch.uint8)
                self.call(Kind.PUT,
                          {'digest': digest,
                           'blob_kind': kind,
                           'upload': upload_id,
                           'offset': offset,
                           'total': len(view)},
                          [piece],
                          timeout_ms=timeout_ms)
        return len(missing)

    def record(self, model: str, signature: Sequence[TensorSpec], options: dict,
               timeout_ms: float = 120000.0) -> dict:
        fields = {'model': model, 'signature': [s.to_json() for s in signature],
                  'options': options}
        header, _ = self.call(Kind.RECORD, fields, timeout_ms=timeout_ms)
        return header

    def start_infer(self, replay: str, tensors: Sequence[torch.Tensor],
                    timeout_ms: float | None = None, codec: str = codecs.RAW,
                    expect: Sequence[reply_check.Leaf] | None = None,
                    **keys: Any) -> 'PendingReply':
        """
        Send one INFER of a recorded replay (``keys``: task, priority, deadline...).

        ``expect``: the outputs the reply must hold (else ``bad_reply``).
        """
        if type(tensors) is not list:   # an iterator read once: the key and header from one list
            tensors = list(tensors)
        try:        # the same fields (and their types: 1, 1.0 and True are equal keys, not
            #         equal bytes) and input dtypes and shapes: the same header but its id
            key = ((replay, *keys.items(), *map(type, keys.values()), *map(_SPEC, tensors))
                   if codec == codecs.RAW else None)
            head = self._heads.get(key)
        except TypeError:       # a value that is not hashable: encoded in full
            key = head = None
        if head is not None:
            return self._start(Kind.INFER, None, tensors, timeout_ms, codec, expect, head)
        fields = {'replay': replay}
        fields.update({k: v for k, v in keys.items() if v is not None})
        pending = self.start(Kind.INFER, fields, tensors, timeout_ms=timeout_ms, codec=codec,
                             expect=expect)
        if key is not None:     # kept for the next calls (issue 11): they encoded, so it does
            head = wire.split_header({'kind': Kind.INFER, 'id': 0, **fields}, tensors)
            if len(self._heads) >= MAX_HEADS:
                self._heads.clear()
            if head is not None:
                self._heads[key] = head
        return pending

    def infer(self, replay: str, tensors: Sequence[torch.Tensor], timeout_ms: float | None = None,
              codec: str = codecs.RAW, **keys: Any) -> tuple[list[torch.Tensor], dict]:
        """Run one INFER and wait: return (outputs, reply header)."""
        header, outputs = self.start_infer(replay, tensors, timeout_ms, codec, **keys).result()
        return outputs, header

    def stats(self, timeout_ms: float | None = None) -> dict:
        header, _ = self.call(Kind.STATS, timeout_ms=timeout_ms)
        return header['stats']

    def evict(self, model: str, store: bool = True, timeout_ms: float | None = None) -> dict:
        """Admin keys: drop a model's replays (and with ``store`` its blobs); return what went."""
        header, _ = self.call(Kind.EVICT, {'model': model, 'store': store}, timeout_ms=timeout_ms)
        return {k: header[k] for k in ('replays', 'unloaded', 'deleted', 'kept')}
