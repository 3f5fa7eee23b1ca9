"""
One request on the server, answered exactly once by construction.

The I/O thread wraps every received message in a :class:`Request` before it
decodes anything.  A request owns its reply path: :meth:`Request.ok` and
:meth:`Request.error` send through the server's :class:`ReplySender`, and the
first answer closes the request in the :class:`OpenRequests` registry.  A
second answer is a bug: it is logged and counted, never sent (Triton
python_backend's contract).  A request that is dropped without an answer stays
in the registry, where ``stats`` (``open_requests``) and the tests see it.

:class:`ReplySender` is the only code that writes to the ROUTER socket.  From
the I/O thread it sends directly; other threads hand frames to the I/O thread
through an inproc PUSH/PULL pair (a ZeroMQ socket belongs to one thread).
Replies to a peer whose send queue is full (``SNDHWM`` messages) or who is
gone are dropped and counted: the peer is the slow one, not the server.
Large replies (zero-copy frames, at least ``COPY_THRESHOLD`` bytes) are also
tracked until libzmq has released them; a peer may have at most
``peer_bytes`` of them in flight, beyond that its replies are dropped too.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Sequence

import msgspec
import torch
import zmq

from rrto_wire import protocol as wire
from rrto_wire.errors import ErrorCode, ProtocolError, clip
from rrto_wire.limits import COPY_THRESHOLD
from rrto_server.outbox import Outbox, readable, receive, send
from rrto_server.stats import ServerStats

log = logging.getLogger('rrto_server.requests')


class OpenRequests:
    """Every request not yet answered; closing one is the exactly-once gate."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[int, 'Request'] = {}
        self.double_answers = 0
        # add(id(request), request): open() without its call, one dict set (atomic)
        self.add: Callable[[int, 'Request'], None] = self._open.__setitem__

    def open(self, request: 'Request') -> None:
        self.add(id(request), request)

    def close(self, request: 'Request') -> bool:
        """Return True the first time ``request`` is closed, False ever after."""
        with self._lock:
            if self._open.pop(id(request), None) is not None:
                return True
            self.double_answers += 1
        return False

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def kinds(self) -> list[str]:
        """Return the kinds of the requests still open (for stats and tests)."""
        with self._lock:
            return [r.kind for r in self._open.values()]


# large replies in flight for all peers together, in units of one peer's budget: many
# connections that never read cannot add up to more than this
TOTAL_PEER_BUDGETS = 4


class ReplySender:
    """Write reply frames to the ROUTER from any thread; count what a peer never gets."""

    def __init__(self, ctx: zmq.Context, router: zmq.Socket, stats: ServerStats,
                 peer_bytes: int, total_bytes: int | None = None):
        self.peer_bytes = peer_bytes
        self.total_bytes = TOTAL_PEER_BUDGETS * peer_bytes if total_bytes is None \
            else total_bytes
        self._held: dict[bytes, list] = collections.defaultdict(list)
        self._router = router
        self._stats = stats
        self._handover = Outbox(ctx, 'rrto-outbox', COPY_THRESHOLD)
        self.outbox = self._handover.socket          # the I/O thread polls and drains it
        self._lock = threading.Lock()
        self.io_thread: int | None = None

    def on_io_thread(self) -> bool:
        """Return True when called from the thread that serves the socket."""
        return threading.get_ident() == self.io_thread

    def send(self, frames: list, nbytes: int) -> zmq.MessageTracker | None:
        """
        Send one reply's frames (envelope first) now or through the I/O thread.

        Returns a tracker that is done once libzmq has released every zero-copy
        frame, or None when the reply had none: frames below ``COPY_THRESHOLD``
        are copied while they are sent, so their memory is free on return.
        """
        if nbytes < COPY_THRESHOLD:
            if threading.get_ident() == self.io_thread:
                self._route(frames)
            else:
                self._handover.pusher().send_multipart(frames, copy=False)
            return None
        # zero-copy frames, each tracked, held until libzmq is done (received envelope
        # frames cannot be sent tracked: send copies of them)
        frames = [bytes(f.buffer) if isinstance(f, zmq.Frame) else
                  zmq.Frame(f, copy=False, track=True) if len(f) >= COPY_THRESHOLD else f
                  for f in frames]
        trackers = [f.tracker for f in frames if isinstance(f, zmq.Frame)]
        tracker = zmq.MessageTracker(*trackers)
        peer = frames[0]
        verdict = self._budget(peer, nbytes)
        if verdict is not None:
            self._stats.dropped(verdict)
            return tracker                     # done once the frames are dropped here
        if threading.get_ident() == self.io_thread:
            self._route(frames)
        else:
            self._handover.pusher().send_multipart(frames, copy=False)
        if trackers:
            with self._lock:
                self._held[peer].append((tracker, nbytes))
        return tracker

    def _budget(self, peer: bytes, nbytes: int) -> str | None:
        """Return None if ``peer`` may have ``nbytes`` more large replies in flight, else why."""
        with self._lock:
            held = [(t, n) for t, n in self._held.get(peer, ()) if not t.done]
            if held:
                self._held[peer] = held
            else:
                self._held.pop(peer, None)
            if len(self._held) > 1024:     # forget peers whose replies are all gone
                for key in [k for k, v in self._held.items() if all(t.done for t, _ in v)]:
                    del self._held[key]
            if held and sum(n for _, n in held) + nbytes > self.peer_bytes:
                return 'slow_peer'
            total = sum(n for replies in self._held.values() for t, n in replies if not t.done)
            if total and total + nbytes > self.total_bytes:
                return 'reply_memory'          # every peer's replies together
            return None

    def flush(self) -> None:
        """Route every reply other threads have handed over (call on the I/O thread)."""
        while True:
            try:
                frames = receive(self.outbox)
            except zmq.Again:
                return
            self._route(frames)
            if not readable(self.outbox):
                return

    def _route(self, frames: list) -> None:
        try:
            send(self._router, frames)
        except zmq.Again:
            self._stats.dropped('slow_peer')         # its queue is full: it does not read
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self._stats.dropped('peer_gone')

    def close(self) -> None:
        """Close the hand-over sockets (after every thread that replies has stopped)."""
        self._handover.close()


class Request:
    """One received message: its envelope, decoded header and single reply."""

    __slots__ = ('envelope', 'header', 'kind', 'received', 'size', 'client', 'answered',
                 '_sender', '_registry', '_stats')

    def __init__(self, envelope: list, received: float, size: int, sender: ReplySender,
                 registry: OpenRequests, stats: ServerStats):
        self.envelope = envelope
        self.header: Any = None          # a rrto_wire.messages request once decoded
        self.kind = '?'                  # its kind, once decoded
        self.received = received
        self.size = size
        self.client: Any = None          # the authenticated sender (rrto_server.auth.Peer)
        self.answered: Callable[[], None] | None = None   # called once, with the answer
        self._sender = sender
        self._registry = registry
        self._stats = stats
        registry.add(id(self), self)        # registry.open(self), without its call

    @property
    def id(self) -> Any:
        return getattr(self.header, 'id', None)

    @property
    def peer(self) -> bytes:
        """Return the ZeroMQ routing id of the sender."""
        return bytes(self.envelope[0].buffer)

    def ok(self, tensors: Sequence[torch.Tensor] = (),
           on_sent: Callable[[zmq.MessageTracker | None], None] | None = None,
           **fields: Any) -> None:
        """
        Answer with success, the given fields and tensors.

        ``on_sent(tracker)`` is called once the reply is handed to ZeroMQ (or
        dropped): the tensors' memory may be reused once ``tracker`` is done, or
        at once when it is None.
        """
        self._answer(wire.ok_header(self.id, **fields), tensors, on_sent)

    def ok_ready(self, header: dict, body: tuple[list[dict], list], nbytes: int,
                 on_sent: Callable[[zmq.MessageTracker | None], None] | None = None) -> None:
        """
        Answer with a success header already built and raw tensors already framed.

        The express path builds ``header`` (:func:`rrto_wire.protocol.ok_header`) and
        ``body`` (``(descriptors, frames)`` as :func:`rrto_wire.protocol.raw_body`
        returns them, ``nbytes`` their frames' size) while the device runs; this
        stamps ``server_ms``, encodes the header and sends.  ``on_sent`` as for :meth:`ok`.
        """
        try:
            header['server_ms'] = (time.perf_counter() - self.received) * 1e3
            try:
                frames = wire.encode_raw(header, *body)
            except (msgspec.EncodeError, TypeError, ValueError) as exc:
                header, frames = self._unencodable(exc)
                nbytes = 0
        except BaseException:
            if on_sent is not None:
                on_sent(None)
            raise
        self._send(header, frames, len(frames[0]) + nbytes, on_sent)

    def error(self, error: ProtocolError, request_id: Any = None) -> None:
        """Answer with an error reply (logged with the network's text clipped)."""
        log.info('error reply to %s: %s (%s)', self.kind, clip(error.message), error.code.value)
        rid = self.id if request_id is None else request_id
        self._answer(wire.error_header(rid, error.code, error.message), ())

    def fail(self, exc: BaseException) -> None:
        """Answer an unexpected exception as ``internal`` (a server bug, logged in full)."""
        log.error('internal error serving a %s request', self.kind, exc_info=exc)
        self.error(ProtocolError(ErrorCode.INTERNAL, f'{type(exc).__name__}: {exc}'))

    def _answer(self, header: dict, tensors: Sequence[torch.Tensor],
                on_sent=None) -> None:
        # encoded before the request is closed: a reply that cannot be encoded becomes an
        # error reply, never none at all
        try:
            header['server_ms'] = (time.perf_counter() - self.received) * 1e3
            try:
                frames = wire.encode(header, tensors)
            except (msgspec.EncodeError, TypeError, ValueError, ProtocolError) as exc:
                header, frames = self._unencodable(exc)
            nbytes = wire.message_size(frames)
        except BaseException:
            if on_sent is not None:
                on_sent(None)
            raise
        self._send(header, frames, nbytes, on_sent)

    def _unencodable(self, exc: Exception) -> tuple[dict, list]:
        log.error('a %s reply could not be encoded: %s', self.kind, clip(exc))
        header = wire.error_header(self.id, ErrorCode.INTERNAL,
                                   f'reply not encodable: {type(exc).__name__}')
        return header, wire.encode(header, ())

    def _send(self, header: dict, frames: list, nbytes: int, on_sent=None) -> None:
        # the one answer: the request is closed here, and nothing else is ever sent for it
        tracker, closed = None, False
        try:
            if not self._registry.close(self):
                log.error('second answer to a %s request (id %s) dropped',
                          self.kind, clip(repr(self.id), 40))
                return
            closed = True       # counted and its admission released after the send
            tracker = self._sender.send(self.envelope + frames, nbytes)
        finally:
            if on_sent is not None:
                on_sent(tracker)
            if closed:      # nothing the reply needs: after it (issue 11), whatever happened
                if self.answered is not None:
                    self.answered()
                self._stats.reply(header, nbytes)
