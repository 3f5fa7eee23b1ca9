"""
The directory's ZeroMQ front: robots resolve and warm models over :mod:`rrto_wire.fleet`.

One I/O thread owns the ROUTER socket and answers ``hello`` and ``resolve``
inline; ``warm`` (a recording, seconds) runs on a small pool of worker threads
whose replies come back through an inproc PUSH/PULL pair, as in the server.
The pool serves keys round robin, one warm per key at a time
(:class:`~rrto_server.put_queue.ControlQueue`), so one key's many warms delay
another key's by at most one warm per key ahead of it in the round (a11's
finding 4: the pool was one FIFO for every key); without keys, connections
take turns (a13 S1: every robot was the one key ``anonymous``).  A
second thread polls the replicas and scales models every ``poll_s``.  Every
request gets exactly one reply; a malformed one an error naming the problem.

With ``keys`` the front is a CURVE server of the replicas' key directory and
acts for the key that asks, as the server would: that key's role must allow
``record``, its warms in flight count against its ``max_in_flight``
(``overloaded`` past it) and the directory holds its claims to its
``max_replays`` and lets only admin keys raise a model's minimum of replicas
(:class:`~rrto_fleet.directory.Caller`).  ``fleet_key`` (the client key the
replicas record with) caps all keys' claims together at that key's
``max_replays``.
"""

from __future__ import annotations

import logging
import threading

import zmq
import zmq.auth

from rrto_fleet.directory import Caller, Directory, ReplicaDown, WarmError
from rrto_server.auth import ANONYMOUS, CurveGate, KeyRing, Peer, Policy, router_socket
from rrto_server.conn_watchdog import ConnectionWatchdog
from rrto_server.outbox import Outbox
from rrto_server.put_queue import ControlQueue
from rrto_wire import fleet
from rrto_wire.errors import ProtocolError

log = logging.getLogger('rrto_fleet.front')

POLL_S = 0.5
WARM_WORKERS = 4


class Front:
    """Serve a :class:`Directory` on ``bind`` and keep it current (see the module docstring)."""

    def __init__(self, directory: Directory, bind: str, poll_s: float = POLL_S,
                 keys: str | None = None, fleet_key: str | None = None):
        self.directory = directory
        self.poll_s = poll_s
        self._ctx = zmq.Context()     # its own: a CURVE gate (ZAP handler) per context
        self.router = router_socket(self._ctx)     # unknowable automatic ids (a13 #0)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, fleet.MAX_MESSAGE_BYTES)
        # the replicas' key directory: robots allowed there may ask the directory
        self._gate = CurveGate(self._ctx, KeyRing(keys)) if keys else None
        self._policy = Policy()      # per key: its role, its warms in flight
        if self._gate is not None and fleet_key:
            # the replicas record as the fleet key: keep every claim within its replay quota
            public, _ = zmq.auth.load_certificate(fleet_key)
            quota = self._gate.keyring.peer(public.decode()).grant.max_replays
            directory.policy.max_claims = min(directory.policy.max_claims, quota)
        if self._gate is not None:
            self._gate.keyring.secure(self.router)
        # libzmq bounds each part only: cut a peer holding more of an unfinished message
        self._watchdog = ConnectionWatchdog(self.router, fleet.MAX_MESSAGE_BYTES, bind)
        self.router.bind(bind)
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._outbox = Outbox(self._ctx, 'rrto-directory')   # replies from warm-up workers
        self._workers = ControlQueue('rrto-warm', WARM_WORKERS)     # round robin by key
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> 'Front':
        """Serve and poll in background threads; return self."""
        for target, name in ((self._serve, 'rrto-directory'), (self._tick, 'rrto-poll')):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def close(self) -> None:
        """Stop both threads and release the sockets."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._workers.shutdown(wait=True, cancel_futures=True)
        self._outbox.close()
        self._watchdog.close()
        self.router.close(linger=0)
        if self._gate is not None:
            self._gate.close()
        self._ctx.term()

    # ------------------------------------------------------------------ threads
    def _tick(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.directory.poll()
                self.directory.scale()
            except Exception:  # noqa: B902 - keep the directory current whatever one round did
                log.exception('directory poll failed')

    def _serve(self) -> None:
        poller = zmq.Poller()
        for sock in self._watchdog.sockets:     # its connection events and proof requests
            poller.register(sock, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._outbox.socket, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(100))
            if self._outbox.socket in events:
                while self._outbox.socket.poll(0):
                    self.router.send_multipart(self._outbox.socket.recv_multipart())
            for frames in self._watchdog.drain(events):     # every message waiting
                self._on_message(frames)

    def _peer(self, frame: zmq.Frame) -> Peer:
        """Return the key that sent ``frame`` (its CURVE ``User-Id``); raise if not allowed."""
        return ANONYMOUS if self._gate is None else self._gate.keyring.sender(frame)

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        envelope, body = [f.bytes for f in frames[:-1]], frames[-1]
        request_id = 0
        try:
            if len(frames) < 2:
                raise fleet.DirectoryError('bad_request', 'empty message')
            request = fleet.decode_request(body.buffer)
            request_id = request.id
            if request.kind == 'warm':
                if not request.model:
                    raise fleet.DirectoryError('bad_request', 'warm needs a model digest')
                try:
                    peer = self._peer(body)
                    self._policy.authorize(peer, 'record')
                    self._policy.begin(peer)
                except ProtocolError as exc:
                    raise fleet.DirectoryError(exc.code.value, exc.message) from None
                # whose turn: the key, or on a front without keys (every robot 'anonymous')
                # the connection, as the server's control queue does (a13 S1)
                turn = peer.name if self._gate is not None else envelope[0]
                self._workers.submit(lambda: self._warm(envelope, request, peer), turn)
                return
            try:
                self._policy.authorize(self._peer(body), 'infer')
            except ProtocolError as exc:
                raise fleet.DirectoryError(exc.code.value, exc.message) from None
            holders = [] if request.kind == 'hello' else self.directory.resolve(request.model)
            reply = fleet.ok(request_id, holders)
        except fleet.DirectoryError as exc:
            reply = fleet.error(request_id, exc.code, exc.message)
        self.router.send_multipart(envelope + [fleet.encode(reply)])

    def _warm(self, envelope: list[bytes], request: fleet.Request, peer: Peer) -> None:
        signature = [{'dtype': s.dtype, 'shape': s.shape} for s in request.signature]
        caller = Caller(peer.name, peer.grant.max_replays, peer.grant.allows('admin'))
        try:
            holders, replay = self.directory.warm(request.model, signature, request.options,
                                                  request.replicas, caller)
            reply = fleet.ok(request.id, holders, replay)
        except WarmError as exc:
            reply = fleet.error(request.id, exc.code, exc.message)
        except ReplicaDown as exc:
            reply = fleet.error(request.id, 'no_replica', str(exc))
        except Exception as exc:  # noqa: B902 - the robot gets its one reply whatever happened
            log.exception('warm failed')
            reply = fleet.error(request.id, 'internal', f'{type(exc).__name__}')
        finally:
            self._policy.end(peer)
        self._outbox.pusher().send_multipart(envelope + [fleet.encode(reply)])
