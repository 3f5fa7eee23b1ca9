"""
The server's trust boundary in one object: who sent a request, may they, is there room.

:class:`Guard` is what the server calls; the policy lives in
:mod:`rrto_server.auth` (keys, roles, quotas) and :mod:`rrto_server.admission`
(shedding under overload).  Per message the server asks :meth:`Guard.admit`
for the sender (:meth:`Guard.peer`: from the CURVE ``User-Id`` of its first
frame) and for permission in one call, and calls the returned ``done`` exactly
once when the request is answered.  Each batch of received messages is put in
admission order first (:meth:`Guard.order`).
"""

from __future__ import annotations

import logging
from typing import Callable

import msgspec
import zmq

from rrto_server.admission import Admission, dispatch_order
from rrto_server.auth import ANONYMOUS, CurveGate, KeyRing, Peer, Policy, needs_curve
from rrto_wire.errors import ProtocolError

log = logging.getLogger('rrto_server.guard')

ADMITTED_KINDS = frozenset({'infer'})     # the kinds admission control sheds


class _Urgency(msgspec.Struct):
    """The two header fields that order a batch (the strict decode comes later)."""

    kind: str = ''
    priority: int = 0


_URGENCY = msgspec.json.Decoder(_Urgency)


class Guard:
    """Authentication (CURVE), authorization (roles, ceilings, quotas) and admission."""

    def __init__(self, ctx: zmq.Context, bind: str, keys_dir: str | None = None,
                 insecure: bool = False, capacity: int = 64):
        self.keyring: KeyRing | None = None
        self._gate: CurveGate | None = None
        if keys_dir:
            self.keyring = KeyRing(keys_dir)
            self._gate = CurveGate(ctx, self.keyring)
        elif needs_curve(bind):
            if not insecure:
                raise ValueError(
                    f'{bind} is reachable from other hosts: pass a key directory (CURVE, see '
                    "'rrto-keys') or, on a network you trust completely, the insecure flag")
            log.warning('*** INSECURE: %s accepts unauthenticated, unencrypted requests from '
                        'any host that reaches it; every peer may upload and run models and '
                        'read all stats. Use a key directory outside a closed lab. ***', bind)
        self.policy = Policy()
        self.admission = Admission(capacity)
        self.backlog = 0      # messages received, not yet dispatched (set by the I/O thread)

    def order(self, batch: list[list]) -> list[tuple[list, int]]:
        """Return received messages (frame lists) in dispatch order, each with its backlog."""
        return dispatch_order(self.admission, batch, self._urgency)

    def _urgency(self, frames: list) -> int | None:
        """Return the priority an inference request would be admitted at (else None)."""
        if len(frames) < 2:
            return None
        header = frames[2] if len(frames) > 2 and len(frames[1]) == 0 else frames[1]
        try:
            urgency = _URGENCY.decode(header)       # a zmq.Frame is a buffer: no copy
            if urgency.kind not in ADMITTED_KINDS:
                return None
            return min(urgency.priority, self.peer(frames[0]).grant.max_priority)
        except (msgspec.DecodeError, ProtocolError, RecursionError):
            return None             # refused when it is decoded: it is cheap, goes first

    @property
    def authenticating(self) -> bool:
        return self.keyring is not None

    def secure(self, sock: zmq.Socket) -> None:
        """Make a server socket require CURVE (call before ``bind``); no-op when open."""
        if self.keyring is not None:
            self.keyring.secure(sock)

    def peer(self, frame: zmq.Frame) -> Peer:
        """Return the sender of the message ``frame`` belongs to; raise if its key is revoked."""
        return ANONYMOUS if self.keyring is None else self.keyring.sender(frame)

    def admit(self, frame: zmq.Frame, kind: str, priority: int | None = None
              ) -> tuple[Peer, int | None, Callable[[], None]]:
        """
        Check one request; return (its sender, the priority it runs at, ``done``).

        The sender is :meth:`peer`'s for the message ``frame`` belongs to (raises if
        its key is revoked).  Raises ``forbidden`` (role), ``overloaded`` (the key's
        in-flight quota, or admission control shedding its priority).  ``done`` must
        be called once, when the request has been answered.
        """
        peer = ANONYMOUS if self.keyring is None else self.keyring.sender(frame)
        policy = self.policy
        priority = policy.admit(peer, kind, priority)      # role, ceiling, quota
        band = None             # admission's band: looked up once, here
        if kind in ADMITTED_KINDS:
            try:
                band = self.admission.admit(priority or 0, self.backlog)
            except Exception:
                policy.end(peer)
                raise
        answered = False

        def done() -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            policy.end(peer)
            if band is not None:
                self.admission.release(band)
        return peer, priority, done

    def sees(self, peer: Peer, owners: list[str]) -> bool:
        """Return True if ``peer`` may see a model uploaded by ``owners`` (stats)."""
        return peer.grant.allows('admin') or peer.name in owners

    def snapshot(self) -> dict:
        return {'authenticating': self.authenticating,
                'keys': len(self.keyring) if self.keyring is not None else 0,
                'priority_clamped': self.policy.clamped, 'admission': self.admission.snapshot()}

    def close(self) -> None:
        if self._gate is not None:
            self._gate.close()
